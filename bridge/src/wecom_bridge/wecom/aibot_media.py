"""The AI bot's (智能机器人) inbound media: encrypted downloads, decrypted as they arrive.

An image or file of a bot message is a URL (valid five minutes) whose content is AES-256-CBC
encrypted, IV = the key's first 16 bytes, PKCS#7-padded to a multiple of 32 bytes (WeCom's doc
100719 and its Node SDK WecomTeam/aibot-node-sdk `decryptFile`). The key: on the long connection
the message's own `aeskey` (base64, one per URL); on the webhook the bot's EncodingAESKey.
"""

from __future__ import annotations

import base64
import binascii
from typing import IO

import requests
from Crypto.Cipher import AES

from wecom_bridge.errors import DecryptError, MediaRefusedError, MediaTransientError
from wecom_bridge.wecom.api import MediaTooLargeError
from wecom_bridge.wecom.crypto import PKCS7_BLOCK, parse_encoding_aes_key, pkcs7_pad

CHUNK = 64 * 1024  # a multiple of the AES block


def media_key(aeskey: str, encoding_aes_key: str) -> bytes:
    """The 32-byte key of one download: the message's aeskey, else the bot's."""
    if not aeskey:
        return parse_encoding_aes_key(encoding_aes_key)
    try:
        key = base64.b64decode(aeskey + "=" * (-len(aeskey) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecryptError("the message's aeskey is not base64") from exc
    if len(key) != 32:
        raise DecryptError(f"the message's aeskey decodes to {len(key)} bytes, not 32")
    return key


def encrypt_media(content: bytes, key: bytes) -> bytes:
    """WeCom's side of it (the double serves media this way)."""
    return AES.new(key, AES.MODE_CBC, key[:16]).encrypt(pkcs7_pad(content))


class _Decryptor:
    """Decrypts a stream chunk by chunk; the last 32 bytes are held back until the end, when
    their padding is checked and removed."""

    def __init__(self, key: bytes, dest: IO[bytes], max_bytes: int) -> None:
        self._cipher = AES.new(key, AES.MODE_CBC, key[:16])
        self._dest = dest
        self._max = max_bytes
        self._pending = b""  # ciphertext not yet a whole number of AES blocks
        self._held = b""  # the last decrypted bytes: they may be padding
        self._encrypted = 0
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self._encrypted += len(chunk)
        data = self._pending + chunk
        whole = len(data) - len(data) % AES.block_size
        self._pending = data[whole:]
        plain = self._held + self._cipher.decrypt(data[:whole])
        if len(plain) > PKCS7_BLOCK:
            self._write(plain[:-PKCS7_BLOCK])
            plain = plain[-PKCS7_BLOCK:]
        self._held = plain

    def finish(self) -> None:
        if not self._encrypted or self._encrypted % PKCS7_BLOCK:
            raise DecryptError("encrypted media is not a whole number of 32-byte blocks")
        pad = self._held[-1]
        if not 1 <= pad <= PKCS7_BLOCK or self._held[-pad:] != bytes([pad]) * pad:
            raise DecryptError("encrypted media has invalid PKCS#7 padding (wrong key?)")
        self._write(self._held[:-pad])

    def _write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._max:
            raise MediaTooLargeError(self._max)
        self._dest.write(data)


def download_decrypted(
    session: requests.Session,
    url: str,
    key: bytes,
    dest: IO[bytes],
    max_bytes: int,
    timeout: tuple[float, float] = (5.0, 30.0),
) -> tuple[int, str]:
    """Fetch `url`, decrypt into `dest` (at most `max_bytes`): (size, Content-Disposition).
    MediaTransientError for network errors and 5xx; DecryptError when it does not decrypt;
    MediaRefusedError("expired") for a 4xx (the URL lives five minutes)."""
    try:
        response = session.get(url, timeout=timeout, stream=True)
    except requests.RequestException as exc:
        raise MediaTransientError(f"AI bot media: {type(exc).__name__}") from None
    with response:
        if response.status_code >= 500 or response.status_code == 429:
            raise MediaTransientError(f"AI bot media: HTTP {response.status_code}")
        if response.status_code >= 400:
            raise MediaRefusedError("expired", f"AI bot media URL: HTTP {response.status_code}")
        decryptor = _Decryptor(key, dest, max_bytes)
        try:
            for chunk in response.iter_content(CHUNK):
                decryptor.feed(chunk)
        except requests.RequestException as exc:
            raise MediaTransientError(f"AI bot media broke: {type(exc).__name__}") from None
        decryptor.finish()
        return decryptor.size, response.headers.get("Content-Disposition", "")
