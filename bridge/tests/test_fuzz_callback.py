"""Property-based fuzzing of the callback path: crypto, XML parsing and the HTTP endpoint.

Everything a WeCom callback carries is attacker-controlled until the signature has been checked:
query parameters, body, the base64 `Encrypt` field and, for anyone holding the key, the
decrypted XML. The properties below feed hypothesis-generated input at each layer and require:

* crypto (`WeComCrypto`): bad base64, wrong lengths, bad padding, wrong length field or corp id
  raise only `CallbackError` subclasses; encrypt -> decrypt round-trips any bytes; a flipped
  ciphertext byte is refused whenever it damages the framing (length field, corp id,
  padding). AES-CBC has no MAC, so a flip that only damages the random prefix or the message
  bytes is accepted by `decrypt` — that is asserted exactly, together with the real
  protection: the original msg_signature no longer verifies.
* XML (`parse_xml`, `parse_envelope`, `parse_message`): arbitrary bytes and generated XML-ish
  documents (random tags, missing fields, DTDs and entities, odd encodings, nested elements,
  non-numeric CreateTime) return a dataclass or raise `MalformedXmlError`, nothing else.
* HTTP (`create_app` with a real SQLite store in a temp dir, Flask test client with
  `testing = True`, so any exception fails the test): only the documented statuses come back
  (200, 400, 403, 405, 413; 503 only when the store is down, which never happens here), a
  refused callback stores nothing, a validly signed fuzzed plaintext is acknowledged exactly
  when it parses as a message, and the app still answers a valid callback afterwards.
"""

from __future__ import annotations

import base64
import string
import struct
from collections.abc import Callable
from typing import TypeVar
from xml.sax.saxutils import escape

import pytest
from conftest import AppSecrets, wecom_env
from Crypto.Cipher import AES
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import event, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from wecom_bridge.config import load_config
from wecom_bridge.errors import CallbackError, MalformedXmlError, SignatureError
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.callbacks import build_callback, build_text_callback, new_msg_id
from wecom_bridge.wecom.crypto import PKCS7_BLOCK, WeComCrypto, parse_encoding_aes_key
from wecom_bridge.wecom.messages import (
    KNOWN_FIELDS,
    CallbackMessage,
    Envelope,
    parse_envelope,
    parse_message,
    parse_xml,
)

SECRETS = AppSecrets()
CRYPTO = SECRETS.crypto()
AES_KEY = parse_encoding_aes_key(SECRETS.aes_key)
RID = SECRETS.corp_id.encode()
PATH = "/wxcomapp"
MAX_BODY = 64 * 1024  # BRIDGE_MAX_BODY_BYTES default
REFUSED = {400, 403, 413}
# callback.py / errors.py: 200 ack, CallbackError's 400/403/413, 503 when not stored; Flask's
# own 405 for other methods (and 200 for OPTIONS).
DOCUMENTED = {200, *REFUSED, 405, 503}


def fuzz(examples: int) -> settings:
    """Hypothesis settings for this module: no deadline, no example database in the repo."""
    return settings(max_examples=examples, deadline=None, database=None)


# --- strategies --------------------------------------------------------------------------------

B64_ALPHABET = string.ascii_letters + string.digits + "+/="
JUNK_ALPHABET = B64_ALPHABET + " \n\t-_.!é中\x00"
XML_NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True)
# The message fields the parser knows, plus the envelope's.
FIELD_NAMES = (*sorted(KNOWN_FIELDS), "Encrypt")
ENCODINGS = ("utf-8", "UTF-16", "iso-8859-1", "gbk", "ascii", "foo", "", "utf-8'?>")
# Text that may appear unescaped inside an element, plus a few that can never be XML.
TEXT = st.text(max_size=40)
# Text XML can carry (what WeCom can put in a message): no C0 controls except tab and newline.
XML_TEXT = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc"), include_characters="\t\n"),
    min_size=1,
    max_size=50,
)
NUMERIC_ISH = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", " 12 ", "1_000", "0x10", "١٢٣", "1e3", "NaN", "9" * 5000, "-"]),
    TEXT,
)


@st.composite
def element_value(draw: st.DrawFn) -> str:
    """The inside of one element: text, CDATA, nested elements, huge text or raw junk."""
    kind = draw(st.sampled_from(["text", "cdata", "nested", "empty", "huge", "raw", "attr"]))
    if kind == "text":
        return escape(draw(TEXT))
    if kind == "cdata":
        return f"<![CDATA[{draw(TEXT)}]]>"
    if kind == "nested":
        name = draw(XML_NAME)
        return f"<{name}>{escape(draw(TEXT))}</{name}>" * draw(st.integers(1, 3))
    if kind == "empty":
        return ""
    if kind == "huge":
        return draw(st.sampled_from(["A", "中", "&amp;", "<![CDATA[x]]>"])) * draw(
            st.integers(1000, 20_000)
        )
    if kind == "attr":
        return f'<b c="{escape(draw(TEXT))}"/>{escape(draw(TEXT))}'
    return draw(TEXT)  # raw: may contain <, & or control characters


@st.composite
def xml_child(draw: st.DrawFn) -> str:
    name = draw(st.one_of(st.sampled_from(FIELD_NAMES), XML_NAME))
    if name in ("CreateTime", "AgentID", "MsgId") and draw(st.booleans()):
        value = escape(draw(NUMERIC_ISH))
    elif name == "MsgType" and draw(st.booleans()):
        value = draw(st.sampled_from(["text", "event", "image", "", "TEXT", "voice"]))
    else:
        value = draw(element_value())
    if draw(st.integers(0, 9)) == 0:
        return f"<{name}/>"
    return f"<{name}>{value}</{name}>"


@st.composite
def xml_prolog(draw: st.DrawFn) -> str:
    parts = []
    if draw(st.booleans()):
        parts.append(f'<?xml version="1.0" encoding="{draw(st.sampled_from(ENCODINGS))}"?>')
    dtd = draw(st.integers(0, 5))
    if dtd == 1:
        parts.append('<!DOCTYPE xml [<!ENTITY a "AAAA"><!ENTITY b "&a;&a;&a;">]>')
    elif dtd == 2:
        parts.append('<!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]>')
    elif dtd == 3:
        parts.append("<! doctype xml>")
    return "".join(parts)


@st.composite
def xml_document(draw: st.DrawFn) -> bytes:
    """An XML-ish document: usually `<xml>` with children, sometimes broken on purpose."""
    root = draw(st.one_of(st.just("xml"), st.just("xml"), XML_NAME))
    children = "".join(draw(st.lists(xml_child(), max_size=12)))
    if draw(st.integers(0, 5)) == 0:
        children += "&a;&b;&x;&lt;&#0;&#x1F600;"
    text = f"{draw(xml_prolog())}<{root}>{children}</{root}>"
    if draw(st.integers(0, 5)) == 0:  # truncated
        text = text[: draw(st.integers(0, len(text)))]
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "gbk", "latin-1"]))
    return text.encode(encoding, errors="replace")


@st.composite
def envelope_document(draw: st.DrawFn) -> bytes:
    """`<xml>` with fuzzed children and an `<Encrypt>` whose content is fuzzed too."""
    children = draw(st.lists(xml_child(), max_size=3))
    position = draw(st.integers(0, len(children)))
    encrypt = draw(st.one_of(st.text(alphabet=B64_ALPHABET, min_size=1), element_value()))
    children.insert(position, f"<Encrypt>{encrypt}</Encrypt>")
    return f"{draw(xml_prolog())}<xml>{''.join(children)}</xml>".encode()


@st.composite
def valid_message_fields(draw: st.DrawFn) -> dict[str, str | int]:
    """A message as WeCom would send it, with fuzzed values (possibly empty, odd, or huge)."""
    fields: dict[str, str | int] = {
        "FromUserName": draw(st.text(min_size=1, max_size=30)),
        "CreateTime": draw(st.integers(0, 2**40)),
        "MsgType": draw(st.sampled_from(["text", "event", "image", "location"])),
        "AgentID": SECRETS.agent_id,
        "MsgId": draw(st.integers(1, 10**19)),
    }
    fields["Content"] = draw(st.text(max_size=300))
    fields["Event"] = draw(st.sampled_from(["enter_agent", "subscribe", "click", ""]))
    return fields


def _xml_from_fields(fields: dict[str, str | int]) -> bytes:
    """Like messages.message_xml, but keeps values with characters XML cannot carry."""
    body = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in fields.items())
    return f"<xml><ToUserName>{SECRETS.corp_id}</ToUserName>{body}</xml>".encode()


ANY_PLAINTEXT_XML = st.one_of(
    xml_document(),
    st.binary(max_size=400),
    valid_message_fields().map(_xml_from_fields),
)


# --- crypto ------------------------------------------------------------------------------------


def _decrypt_or_refuse(crypto: WeComCrypto, encrypted: str) -> bytes | None:
    """decrypt(), with CallbackError (the documented refusal) turned into None."""
    try:
        return crypto.decrypt(encrypted)
    except CallbackError:
        return None


def _raw_encrypt(plain: bytes) -> str:
    """AES-CBC with the app's key over bytes we framed ourselves (possibly wrongly)."""
    cipher = AES.new(AES_KEY, AES.MODE_CBC, AES_KEY[:16])
    return base64.b64encode(cipher.encrypt(plain)).decode("ascii")


@fuzz(300)
@given(
    st.one_of(
        st.text(max_size=200),
        st.text(alphabet=B64_ALPHABET, max_size=200),
        st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
        st.integers(1, 12).flatmap(
            lambda n: st.binary(min_size=16 * n, max_size=16 * n).map(
                lambda b: base64.b64encode(b).decode()
            )
        ),
    )
)
def test_decrypt_of_arbitrary_input_only_raises_callback_errors(encrypted: str) -> None:
    _decrypt_or_refuse(CRYPTO, encrypted)


@st.composite
def framed_plaintext(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """(AES plaintext, message, framing-correct?) with each framing part right or wrong."""
    message = draw(st.binary(max_size=100))
    good_length, good_rid, good_pad = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    length = len(message) if good_length else draw(st.integers(0, 2**32 - 1))
    rid = RID if good_rid else draw(st.binary(max_size=20))
    body = draw(st.binary(min_size=16, max_size=16)) + struct.pack(">I", length) + message + rid
    if good_pad:
        pad = PKCS7_BLOCK - len(body) % PKCS7_BLOCK
        tail = bytes([pad]) * pad
    else:
        tail = draw(st.binary(max_size=40))
        tail += draw(
            st.binary(min_size=(-len(body + tail)) % 16, max_size=(-len(body + tail)) % 16)
        )
    ok = good_length and good_rid and good_pad
    return body + tail, message, ok


@fuzz(300)
@given(framed_plaintext())
def test_decrypt_accepts_exactly_the_correctly_framed_payloads(
    case: tuple[bytes, bytes, bool],
) -> None:
    plain, message, framed_ok = case
    result = _decrypt_or_refuse(CRYPTO, _raw_encrypt(plain))
    event(f"framing {'ok' if framed_ok else 'wrong'}, {'refused' if result is None else 'ok'}")
    if framed_ok:
        assert result == message
    elif result is not None:
        # Wrong parts can only be accepted if they still frame consistently (e.g. a random
        # tail that happens to be valid padding): then the result is what the framing says.
        body = plain[: -plain[-1]]
        (length,) = struct.unpack(">I", body[16:20])
        assert length == len(result)
        assert body[20:] == result + RID


@fuzz(200)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda t: t.encode("utf-8")),
        st.text(alphabet="😀👨‍👩‍👧\x00中a", min_size=3000, max_size=6000).map(str.encode),
    ),
    st.binary(min_size=16, max_size=16),
)
def test_encrypt_decrypt_round_trip(plaintext: bytes, random16: bytes) -> None:
    assert CRYPTO.decrypt(CRYPTO.encrypt(plaintext, random16)) == plaintext


@fuzz(200)
@given(st.text(max_size=300), TEXT, TEXT)
def test_verify_url_round_trip(echo: str, timestamp: str, nonce: str) -> None:
    echostr = CRYPTO.encrypt(echo.encode("utf-8"))
    signature = CRYPTO.sign(timestamp, nonce, echostr)
    assert CRYPTO.verify_url(signature.upper(), timestamp, nonce, echostr) == echo


@fuzz(300)
@given(TEXT, TEXT, TEXT, st.text(max_size=200))
def test_verify_functions_refuse_with_callback_errors_only(
    signature: str, timestamp: str, nonce: str, echostr: str
) -> None:
    with pytest.raises(CallbackError):
        CRYPTO.verify_url(signature, timestamp, nonce, echostr)
    with pytest.raises(SignatureError):
        CRYPTO.verify_signature(signature, timestamp, nonce, echostr)


def _framing_positions(message_len: int, total_len: int) -> set[int]:
    """Plaintext offsets the decryptor checks: length field, corp id and padding."""
    return set(range(16, 20)) | set(range(20 + message_len, total_len))


def _flip_kind(damaged: set[int], exact: int | None, garbled: set[int], framing: set[int]) -> str:
    if not damaged & framing:
        return "prefix/message only"
    if exact in framing and not garbled & framing:
        return "exact framing change"
    return "garbled framing"


def _damaged_positions(flipped: int, total_len: int) -> tuple[set[int], int | None]:
    """CBC: flipping ciphertext byte i garbles plaintext block i//16 and flips byte i+16."""
    block = flipped // 16
    exact = flipped + 16 if flipped + 16 < total_len else None
    return set(range(16 * block, 16 * block + 16)), exact


@fuzz(400)
@given(
    st.binary(max_size=120),
    st.binary(min_size=16, max_size=16),
    st.data(),
)
def test_flipped_ciphertext_byte(message: bytes, random16: bytes, data: st.DataObject) -> None:
    encrypted = CRYPTO.encrypt(message, random16)
    raw = bytearray(base64.b64decode(encrypted))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[index] ^= data.draw(st.integers(1, 255), label="mask")
    tampered = base64.b64encode(bytes(raw)).decode()
    result = _decrypt_or_refuse(CRYPTO, tampered)

    garbled, exact = _damaged_positions(index, len(raw))
    framing = _framing_positions(len(message), len(raw))
    damaged = garbled | ({exact} if exact is not None else set())
    outcome = "refused" if result is None else "accepted"
    event(f"flip: {_flip_kind(damaged, exact, garbled, framing)}, {outcome}")
    if not damaged & framing:
        # No MAC in WeCom's scheme: damage confined to prefix and message is not detectable
        # by decrypt. It changes only the damaged message bytes.
        assert result is not None and len(result) == len(message)
        changed = {20 + n for n, (a, b) in enumerate(zip(result, message, strict=True)) if a != b}
        assert changed <= damaged
    elif exact is not None and exact in framing and not garbled & framing:
        # An exact (non-random) change to the length field, corp id or padding: always refused.
        assert result is None
    else:
        # The garbled block overlaps the framing: refused unless the 16 random bytes happen to
        # reproduce every framing byte they cover; then only message bytes differ.
        assert result is None or (
            len(result) == len(message)
            and {20 + n for n, (a, b) in enumerate(zip(result, message, strict=True)) if a != b}
            <= damaged
        )
    # What actually protects the callback: the signature is over the base64 text.
    with pytest.raises(SignatureError):
        CRYPTO.verify_signature(CRYPTO.sign("1", "2", encrypted), "1", "2", tampered)


# --- XML parsing -------------------------------------------------------------------------------


T = TypeVar("T")


def _parse_or_refuse(parse: Callable[[bytes], T], data: bytes) -> T | None:
    """parse(data), with MalformedXmlError (the documented refusal) turned into None."""
    try:
        return parse(data)
    except MalformedXmlError:
        return None


@fuzz(300)
@given(st.one_of(st.binary(max_size=500), xml_document()))
def test_parse_xml_returns_flat_text_fields_or_refuses(data: bytes) -> None:
    fields = _parse_or_refuse(parse_xml, data)
    event("parsed" if fields is not None else "MalformedXmlError")
    assert fields is None or all(
        isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
    )


@fuzz(300)
@given(st.one_of(st.binary(max_size=500), xml_document(), envelope_document()))
def test_parse_envelope_returns_envelope_with_encrypt_or_refuses(data: bytes) -> None:
    envelope = _parse_or_refuse(parse_envelope, data)
    event("parsed" if envelope is not None else "MalformedXmlError")
    assert envelope is None or (isinstance(envelope, Envelope) and envelope.encrypt)


@fuzz(400)
@given(ANY_PLAINTEXT_XML)
def test_parse_message_returns_message_or_refuses(data: bytes) -> None:
    message = _parse_or_refuse(parse_message, data)
    event("parsed" if message is not None else "MalformedXmlError")
    if message is not None:
        assert isinstance(message, CallbackMessage)
        assert message.from_user and message.msg_type
        assert isinstance(message.create_time, int)
        assert message.dedupe_key()


ENTITY_DTDS = (
    '<!DOCTYPE xml [<!ENTITY a "AAAA"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>',
    '<!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
    '<!DOCTYPE xml [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>',
)


@fuzz(100)
@given(
    st.sampled_from(ENTITY_DTDS),
    st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"]),
    st.lists(xml_child(), max_size=4).map("".join),
    st.sampled_from(["", "&a;", "&b;", "&x;"]),
)
def test_entity_declarations_are_refused_in_any_encoding(
    dtd: str, encoding: str, children: str, reference: str
) -> None:
    document = f"{dtd}<xml>{children}<Content>{reference}</Content></xml>"
    with pytest.raises(MalformedXmlError):
        parse_xml(document.encode(encoding, errors="replace"))


# --- HTTP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """The real app on a real SQLite store; no worker pool (nothing here needs answering)."""
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    env = {
        **wecom_env(SECRETS, "http://127.0.0.1:9"),
        "DIFY_API_BASE": "http://127.0.0.1:9/v1",
        "DIFY_API_KEY": SECRETS.dify_key,
        "BRIDGE_DATA_DIR": str(data_dir),
    }
    app = create_app(load_config(env), in_process_workers=False)
    app.testing = True  # exceptions propagate: any unhandled one fails the test
    assert app.config["MAX_CONTENT_LENGTH"] == MAX_BODY
    return app


@pytest.fixture(scope="module")
def client(fuzz_app: Flask) -> FlaskClient:
    return fuzz_app.test_client()


def _queue_depth(app: Flask) -> int:
    return app.extensions["wecom_bridge"].store.queue_depth()


def _status(resp: TestResponse) -> int:
    """The response's status, counted for --hypothesis-show-statistics; always documented."""
    event(f"HTTP {resp.status_code}")
    assert resp.status_code in DOCUMENTED
    return resp.status_code


QUERY_NAMES = st.sampled_from(["msg_signature", "timestamp", "nonce", "echostr", "x", ""])
QUERY_VALUES = st.one_of(
    TEXT,
    st.just(""),
    st.text(alphabet="0123456789abcdef", min_size=40, max_size=40),
    st.text(min_size=2000, max_size=4000),
)
QUERY = st.lists(st.tuples(QUERY_NAMES, QUERY_VALUES), max_size=8)
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "text/xml",
            "text/xml; charset=utf-8",
            "application/xml",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            "application/json",
            "text/plain; charset=gbk",
            "",
        ]
    ),
    st.text(alphabet=string.printable.strip(), max_size=30),
)
METHODS = st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
BODIES = st.one_of(
    st.binary(max_size=500),
    xml_document(),
    envelope_document(),
    st.text(alphabet=JUNK_ALPHABET, max_size=300).map(
        lambda e: f"<xml><ToUserName>x</ToUserName><Encrypt>{escape(e)}</Encrypt></xml>".encode()
    ),
)


@fuzz(300)
@given(METHODS, QUERY, BODIES, CONTENT_TYPES)
def test_unsigned_requests_get_documented_refusals(
    fuzz_app: Flask,
    client: FlaskClient,
    method: str,
    query: list[tuple[str, str]],
    body: bytes,
    content_type: str,
) -> None:
    before = _queue_depth(fuzz_app)
    resp = client.open(
        PATH, method=method, query_string=query, data=body, content_type=content_type
    )
    _status(resp)
    if method in ("GET", "POST", "HEAD"):
        assert resp.status_code in REFUSED
    elif method == "OPTIONS":
        assert resp.status_code == 200
    else:
        assert resp.status_code == 405
    assert _queue_depth(fuzz_app) == before


@fuzz(300)
@given(
    st.one_of(
        st.text(alphabet=JUNK_ALPHABET, min_size=1, max_size=300).map(str.strip),
        st.binary(min_size=1, max_size=300).map(lambda b: base64.b64encode(b).decode()),
        st.binary(min_size=1, max_size=300).map(lambda b: CRYPTO.encrypt(b)[:-4]),
    ).filter(bool),
    st.booleans(),
)
def test_envelope_with_fuzzed_encrypt(
    fuzz_app: Flask, client: FlaskClient, encrypt: str, signed: bool
) -> None:
    """The envelope is fine, the Encrypt field is junk: refused unsigned; signed, the status
    is what decrypt and the message parser make of it (never a 5xx)."""
    params = {"msg_signature": "0" * 40, "timestamp": "1700000000", "nonce": "42"}
    if signed:
        params["msg_signature"] = CRYPTO.sign(params["timestamp"], params["nonce"], encrypt)
    body = f"<xml><ToUserName>x</ToUserName><Encrypt>{escape(encrypt)}</Encrypt></xml>"
    before = _queue_depth(fuzz_app)
    resp = client.post(PATH, query_string=params, data=body.encode(), content_type="text/xml")
    _status(resp)
    if "\x00" in encrypt:  # not XML at all
        assert resp.status_code == 400
    elif not signed:
        assert resp.status_code == 403
    else:
        assert resp.status_code == _expected_for_encrypt(encrypt)
    assert _queue_depth(fuzz_app) == before


def _expected_for_encrypt(encrypt: str) -> int:
    """The status the layers below imply for a correctly signed Encrypt value."""
    try:
        return _expected_for_plaintext(CRYPTO.decrypt(encrypt))
    except CallbackError as exc:
        return exc.http_status


def _expected_for_plaintext(plaintext: bytes) -> int:
    try:
        parse_message(plaintext)
    except MalformedXmlError:
        return 400
    return 200


@fuzz(300)
@given(ANY_PLAINTEXT_XML, TEXT.filter(bool), TEXT.filter(bool))
def test_validly_signed_fuzzed_plaintext(
    client: FlaskClient, plaintext: bytes, timestamp: str, nonce: str
) -> None:
    """Encrypted with the app's key and correctly signed: the fuzz reaches the XML parser."""
    encrypt = CRYPTO.encrypt(plaintext)
    params = {
        "msg_signature": CRYPTO.sign(timestamp, nonce, encrypt),
        "timestamp": timestamp,
        "nonce": nonce,
    }
    body = f"<xml><Encrypt>{encrypt}</Encrypt></xml>".encode()
    resp = client.post(PATH, query_string=params, data=body, content_type="text/xml")
    _status(resp)
    expected = 413 if len(body) > MAX_BODY else _expected_for_plaintext(plaintext)
    assert resp.status_code == expected
    if expected == 200:
        assert resp.data == b""


@fuzz(200)
@given(st.text(max_size=300), TEXT.filter(bool), TEXT.filter(bool))
def test_validly_signed_url_verification_echoes_plaintext(
    client: FlaskClient, echo: str, timestamp: str, nonce: str
) -> None:
    echostr = CRYPTO.encrypt(echo.encode("utf-8"))
    params = {
        "msg_signature": CRYPTO.sign(timestamp, nonce, echostr),
        "timestamp": timestamp,
        "nonce": nonce,
        "echostr": echostr,
    }
    resp = client.get(PATH, query_string=params)
    _status(resp)
    assert resp.status_code == 200
    assert resp.get_data(as_text=True) == echo


@fuzz(100)
@given(st.binary(max_size=200).map(lambda b: b + b"\xff"))  # 0xFF is never UTF-8
def test_url_verification_of_non_utf8_echostr_is_400(client: FlaskClient, echo: bytes) -> None:
    echostr = CRYPTO.encrypt(echo)
    params = {"msg_signature": CRYPTO.sign("1", "2", echostr), "timestamp": "1", "nonce": "2"}
    resp = client.get(PATH, query_string={**params, "echostr": echostr})
    _status(resp)
    assert resp.status_code == 400


QUERY_MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["drop", "empty", "replace", "prepend", "append", "swap"]),
        st.sampled_from(["msg_signature", "timestamp", "nonce"]),
        QUERY_VALUES,
    ),
    max_size=3,
)


def _mutate(params: dict[str, str], mutations: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    query = list(params.items())
    for op, name, value in mutations:
        if op == "drop":
            query = [(k, v) for k, v in query if k != name]
        elif op == "empty":
            query = [(k, "" if k == name else v) for k, v in query]
        elif op == "replace":
            query = [(k, value if k == name else v) for k, v in query]
        elif op == "prepend":
            query.insert(0, (name, value))
        elif op == "append":
            query.append((name, value))
        else:  # swap timestamp and nonce: the sorted-concatenation signature still matches
            swap = {"timestamp": "nonce", "nonce": "timestamp"}
            query = [(swap.get(k, k), v) for k, v in query]
    return query


def _first(query: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in query if k == name), "")


@fuzz(300)
@given(QUERY_MUTATIONS, XML_TEXT, st.integers(1, 10**19))
def test_fuzzed_query_on_a_valid_callback(
    client: FlaskClient, mutations: list[tuple[str, str, str]], content: str, msg_id: int
) -> None:
    params, body = build_text_callback(
        CRYPTO, from_user="fuzz", content=content, msg_id=str(msg_id), agent_id=SECRETS.agent_id
    )
    query = _mutate(params, mutations)
    resp = client.post(PATH, query_string=query, data=body, content_type="text/xml")
    _status(resp)
    sig, ts, nonce = (_first(query, n) for n in ("msg_signature", "timestamp", "nonce"))
    encrypt = parse_envelope(body).encrypt
    if not (sig and ts and nonce):
        assert resp.status_code == 400
    elif CRYPTO.sign(ts, nonce, encrypt) == sig.lower():
        assert resp.status_code == 200
    else:
        assert resp.status_code == 403


@fuzz(100)
@given(CONTENT_TYPES, XML_TEXT)
def test_valid_callback_accepted_under_any_content_type(
    client: FlaskClient, content_type: str, content: str
) -> None:
    params, body = build_callback(
        CRYPTO, {"FromUserName": "ct", "MsgType": "text", "Content": content, "CreateTime": 1}
    )
    resp = client.post(PATH, query_string=params, data=body, content_type=content_type)
    _status(resp)
    assert resp.status_code == 200


@fuzz(60)
@given(st.integers(MAX_BODY - 64, MAX_BODY + 64))
def test_body_size_limit(client: FlaskClient, size: int) -> None:
    params = {"msg_signature": "0" * 40, "timestamp": "1", "nonce": "2"}
    body = b"<xml><Encrypt>" + b"A" * (size - 30) + b"</Encrypt></xml>"
    assert len(body) == size
    resp = client.post(PATH, query_string=params, data=body, content_type="text/xml")
    _status(resp)
    assert resp.status_code == (413 if size > MAX_BODY else 403)


def test_app_still_answers_after_the_fuzz(fuzz_app: Flask, client: FlaskClient) -> None:
    """Runs last in this module: no state left behind by the fuzz poisons a valid callback."""
    before = _queue_depth(fuzz_app)
    params, body = build_text_callback(
        CRYPTO,
        from_user="after-fuzz",
        content="还在吗？",
        msg_id=new_msg_id(),
        agent_id=SECRETS.agent_id,
    )
    assert client.post(PATH, query_string=params, data=body).status_code == 200
    assert _queue_depth(fuzz_app) == before + 1
    echostr = CRYPTO.encrypt(b"ping")
    verify = {"msg_signature": CRYPTO.sign("1", "2", echostr), "timestamp": "1", "nonce": "2"}
    resp = client.get(PATH, query_string={**verify, "echostr": echostr})
    assert (resp.status_code, resp.data) == (200, b"ping")
    assert client.get("/healthz").status_code == 200
