"""Crypto: WeCom's public vector, round trips, tampering, padding, corp id."""

import base64
import struct
import urllib.parse

import pytest
from Crypto.Cipher import AES
from wechatpy.enterprise.crypto import WeChatCrypto

from wecom_bridge.errors import (
    Base64Error,
    DecryptError,
    ReceiveIdError,
    SignatureError,
)
from wecom_bridge.wecom.crypto import WeComCrypto, parse_encoding_aes_key, pkcs7_unpad

# The example on WeCom's 加解密方案 page (document path/90968).
TOKEN = "QDG6eK"
AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
CORP = "wx5823bf96d3bd56c7"
ECHOSTR_QS = (
    "P9nAzCzyDtyTWESHep1vC5X9xho%2FqYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp%2B4RPcs8TgAE7OaBO"
    "%2BFZXvnaqQ%3D%3D"
)


@pytest.fixture
def crypto() -> WeComCrypto:
    return WeComCrypto(TOKEN, AES_KEY, CORP)


def test_public_vector_url_verification(crypto: WeComCrypto) -> None:
    echostr = urllib.parse.unquote(ECHOSTR_QS)
    plain = crypto.verify_url(
        "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3", "1409659589", "263014780", echostr
    )
    assert plain == "1616140317555161061"


def test_public_vector_rejects_other_token() -> None:
    other = WeComCrypto("QDG6eL", AES_KEY, CORP)
    with pytest.raises(SignatureError):
        other.verify_url(
            "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3",
            "1409659589",
            "263014780",
            urllib.parse.unquote(ECHOSTR_QS),
        )


def test_signature_uppercase_hex_accepted(crypto: WeComCrypto) -> None:
    sig = crypto.sign("1", "2", "abc")
    crypto.verify_signature(sig.upper(), "1", "2", "abc")


def test_round_trip_multibyte(crypto: WeComCrypto) -> None:
    msg = "<xml><Content><![CDATA[你好 👋🏽 知识库]]></Content></xml>".encode()
    assert crypto.decrypt(crypto.encrypt(msg)) == msg


@pytest.mark.parametrize("size", [0, 1, 11, 12, 31, 32, 33, 1000])
def test_round_trip_sizes_are_32_block_padded(crypto: WeComCrypto, size: int) -> None:
    msg = b"x" * size
    raw = base64.b64decode(crypto.encrypt(msg))
    assert len(raw) % 32 == 0
    assert crypto.decrypt(crypto.encrypt(msg)) == msg


def test_wrong_corp_id_refused(crypto: WeComCrypto) -> None:
    other_corp = WeComCrypto(TOKEN, AES_KEY, "wwsomeoneelse")
    with pytest.raises(ReceiveIdError):
        crypto.decrypt(other_corp.encrypt(b"hello"))


def test_tampered_ciphertext_refused(crypto: WeComCrypto) -> None:
    raw = bytearray(base64.b64decode(crypto.encrypt(b"hello world")))
    raw[-1] ^= 0x01  # corrupts the last block: padding check must catch it
    with pytest.raises((DecryptError, ReceiveIdError)):
        crypto.decrypt(base64.b64encode(bytes(raw)).decode())


def test_not_base64_refused(crypto: WeComCrypto) -> None:
    with pytest.raises(Base64Error):
        crypto.decrypt("not*base64!")


def test_ciphertext_not_block_multiple_refused(crypto: WeComCrypto) -> None:
    with pytest.raises(DecryptError):
        crypto.decrypt(base64.b64encode(b"0123456789").decode())


def _encrypt_raw(plaintext_padded: bytes) -> str:
    key = parse_encoding_aes_key(AES_KEY)
    return base64.b64encode(AES.new(key, AES.MODE_CBC, key[:16]).encrypt(plaintext_padded)).decode()


@pytest.mark.parametrize("pad_byte", [0, 33, 200])
def test_bad_padding_value_refused(crypto: WeComCrypto, pad_byte: int) -> None:
    body = b"r" * 16 + struct.pack(">I", 2) + b"hi" + CORP.encode()
    body += b"\x00" * (31 - len(body) % 32) + bytes([pad_byte])
    with pytest.raises(DecryptError):
        crypto.decrypt(_encrypt_raw(body))


def test_inconsistent_padding_refused(crypto: WeComCrypto) -> None:
    body = b"r" * 16 + struct.pack(">I", 2) + b"hi" + CORP.encode()
    pad = 32 - len(body) % 32
    padded = body + bytes([pad]) * (pad - 2) + bytes([pad - 1, pad])
    with pytest.raises(DecryptError):
        crypto.decrypt(_encrypt_raw(padded))


def test_length_field_beyond_payload_refused(crypto: WeComCrypto) -> None:
    body = b"r" * 16 + struct.pack(">I", 5000) + b"hi" + CORP.encode()
    pad = 32 - len(body) % 32
    with pytest.raises(DecryptError):
        crypto.decrypt(_encrypt_raw(body + bytes([pad]) * pad))


def test_pkcs7_unpad_strict() -> None:
    assert pkcs7_unpad(b"a" * 31 + b"\x01") == b"a" * 31
    assert pkcs7_unpad(b"\x20" * 32) == b""
    with pytest.raises(DecryptError):
        pkcs7_unpad(b"a" * 31 + b"\x00")
    with pytest.raises(DecryptError):
        pkcs7_unpad(b"a" * 16)  # not a whole 32-byte block


@pytest.mark.parametrize(
    ("key", "problem"),
    [("short", "exactly 43"), ("*" * 43, "base64"), ("", "exactly 43")],
)
def test_bad_encoding_aes_key(key: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_encoding_aes_key(key)


# --- wechatpy as an independent, test-only oracle ------------------------------------------


def test_wechatpy_encrypts_we_decrypt(crypto: WeComCrypto) -> None:
    oracle = WeChatCrypto(TOKEN, AES_KEY, CORP)
    reply = "<xml><Content><![CDATA[来自 wechatpy 的消息]]></Content></xml>"
    envelope = oracle.encrypt_message(reply, "nonce123", "1409659589")
    encrypt = envelope.split("<Encrypt><![CDATA[")[1].split("]]>")[0]
    signature = envelope.split("<MsgSignature><![CDATA[")[1].split("]]>")[0]
    crypto.verify_signature(signature, "1409659589", "nonce123", encrypt)
    assert crypto.decrypt(encrypt).decode() == reply


def test_we_encrypt_wechatpy_decrypts(crypto: WeComCrypto) -> None:
    oracle = WeChatCrypto(TOKEN, AES_KEY, CORP)
    plain = "<xml><ToUserName>x</ToUserName><Content>你好</Content></xml>"
    encrypt = crypto.encrypt(plain.encode())
    body = f"<xml><ToUserName>{CORP}</ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    sig = crypto.sign("1409659589", "nonce123", encrypt)
    assert oracle.decrypt_message(body, sig, "1409659589", "nonce123") == plain
