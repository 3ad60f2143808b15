"""WeCom callback crypto (加解密方案, document path/90968), compatible with Tencent's library.

AES-256-CBC with IV = key[:16]; plaintext = 16 random bytes | uint32 BE length | msg | receive id,
PKCS#7-padded to a multiple of 32 bytes; signature = sha1 of the sorted, concatenated
(token, timestamp, nonce, encrypt).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import struct
import time

from Crypto.Cipher import AES

from wecom_bridge.errors import Base64Error, DecryptError, ReceiveIdError, SignatureError

PKCS7_BLOCK = 32
ENCODING_AES_KEY_LENGTH = 43


def parse_encoding_aes_key(encoding_aes_key: str) -> bytes:
    """Decode the console's 43-character EncodingAESKey into the 32-byte AES key.

    Raises ValueError saying what is wrong (the caller names the variable).
    """
    if len(encoding_aes_key) != ENCODING_AES_KEY_LENGTH:
        raise ValueError(
            f"must be exactly {ENCODING_AES_KEY_LENGTH} characters, got {len(encoding_aes_key)}"
        )
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except binascii.Error as exc:
        raise ValueError("is not base64 (letters, digits, '+' and '/' only)") from exc
    if len(key) != 32:  # pragma: no cover - 43 valid base64 chars always decode to 32 bytes
        raise ValueError("does not decode to a 32-byte key")
    return key


def signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    joined = "".join(sorted([token, timestamp, nonce, encrypt]))
    return hashlib.sha1(joined.encode("utf-8")).hexdigest()  # noqa: S324 - WeCom's protocol


def pkcs7_pad(data: bytes) -> bytes:
    pad = PKCS7_BLOCK - len(data) % PKCS7_BLOCK
    return data + bytes([pad]) * pad


def pkcs7_unpad(data: bytes) -> bytes:
    """Strict: the pad length must be 1..32 and every pad byte must carry it."""
    if not data or len(data) % PKCS7_BLOCK:
        raise DecryptError("decrypted length is not a multiple of the 32-byte block")
    pad = data[-1]
    if not 1 <= pad <= PKCS7_BLOCK or data[-pad:] != bytes([pad]) * pad:
        raise DecryptError("invalid PKCS#7 padding")
    return data[:-pad]


class WeComCrypto:
    """Signs, encrypts and decrypts for one WeCom app (token + EncodingAESKey + receive id)."""

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        self._token = token
        self._key = parse_encoding_aes_key(encoding_aes_key)
        self.receive_id = receive_id

    def sign(self, timestamp: str, nonce: str, encrypt: str) -> str:
        return signature(self._token, timestamp, nonce, encrypt)

    def verify_signature(
        self, msg_signature: str, timestamp: str, nonce: str, encrypt: str
    ) -> None:
        expected = self.sign(timestamp, nonce, encrypt)
        if not hmac.compare_digest(expected.encode(), msg_signature.lower().encode()):
            raise SignatureError("msg_signature does not match")

    def encrypt(self, plaintext: bytes, random16: bytes | None = None) -> str:
        prefix = random16 if random16 is not None else os.urandom(16)
        if len(prefix) != 16:
            raise ValueError("random prefix must be 16 bytes")
        body = prefix + struct.pack(">I", len(plaintext)) + plaintext + self.receive_id.encode()
        cipher = AES.new(self._key, AES.MODE_CBC, self._key[:16])
        return base64.b64encode(cipher.encrypt(pkcs7_pad(body))).decode("ascii")

    def decrypt(self, encrypted: str) -> bytes:
        """Decrypt a base64 payload and check that it was meant for our receive id."""
        try:
            raw = base64.b64decode(encrypted, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Base64Error("payload is not base64") from exc
        if not raw or len(raw) % AES.block_size:
            raise DecryptError("ciphertext length is not a multiple of the AES block")
        cipher = AES.new(self._key, AES.MODE_CBC, self._key[:16])
        body = pkcs7_unpad(cipher.decrypt(raw))
        if len(body) < 20:
            raise DecryptError("decrypted payload too short")
        (length,) = struct.unpack(">I", body[16:20])
        if 20 + length > len(body):
            raise DecryptError("message length field exceeds the payload")
        message, receive_id = body[20 : 20 + length], body[20 + length :]
        if receive_id != self.receive_id.encode():
            raise ReceiveIdError("receive id (corp id) does not match")
        return message

    def verify_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """The GET handshake: check the signature over echostr, return its plaintext."""
        self.verify_signature(msg_signature, timestamp, nonce, echostr)
        try:
            return self.decrypt(echostr).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecryptError("echostr plaintext is not UTF-8") from exc


def default_timestamp(timestamp: str | None) -> str:
    return timestamp if timestamp is not None else str(int(time.time()))


def default_nonce(nonce: str | None) -> str:
    return nonce if nonce is not None else str(secrets.randbelow(10**10))


def build_url_verification(
    crypto: WeComCrypto,
    echostr_plaintext: str,
    *,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Query parameters of the GET WeCom sends when the admin saves the callback URL (what
    `doctor` sends to prove the endpoint, and what the WeCom double sends)."""
    ts, nc = default_timestamp(timestamp), default_nonce(nonce)
    echostr = crypto.encrypt(echostr_plaintext.encode("utf-8"))
    return {
        "msg_signature": crypto.sign(ts, nc, echostr),
        "timestamp": ts,
        "nonce": nc,
        "echostr": echostr,
    }
