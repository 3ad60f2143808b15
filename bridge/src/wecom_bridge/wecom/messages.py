"""Message types and the XML they travel in."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.parsers import expat
from xml.parsers.expat import ExpatError

import xmltodict

from wecom_bridge.errors import MalformedXmlError

# WeCom never sends a DTD; refusing any stops entity tricks (billion laughs, external entities)
# before the parser sees them.
_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class _DtdRefused(Exception):
    """Raised from inside expat when the document declares a DTD or an entity."""


class _FlatFields:
    """Collects the text of `<xml>`'s leaf children as expat reports them (a few C callbacks per
    element: the callback path's parse costs a fraction of a general XML-to-dict converter)."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.repeated: set[str] = set()
        self.root = ""
        self.root_has_content = False
        self._path: list[str] = []
        self._text: list[str] = []
        self._nested = False  # the current child has children or attributes: not a text field

    def start(self, name: str, attrs: dict[str, str]) -> None:
        depth = len(self._path)
        self._path.append(name)
        if depth == 0:
            self.root = name
            self.root_has_content = bool(attrs)
        elif depth == 1:
            self.root_has_content = True
            self._text, self._nested = [], bool(attrs)
        else:
            self._nested = True

    def end(self, name: str) -> None:
        self._path.pop()
        if len(self._path) != 1:
            return
        if name in self.fields or name in self.repeated:
            self.repeated.add(name)  # as a list, a repeated element is no text field
            self.fields.pop(name, None)
        elif not self._nested:
            self.fields[name] = "".join(self._text).strip()

    def text(self, data: str) -> None:
        if len(self._path) == 2:
            self._text.append(data)

    @staticmethod
    def refuse(*_: object) -> None:
        raise _DtdRefused


def parse_xml(data: bytes) -> dict[str, str]:
    """Parse a flat WeCom `<xml>…</xml>` document into a dict of its child elements' text.

    Elements with children or attributes (e.g. batch job details) and repeated elements are not
    fields the bridge needs; they are left out."""
    if _DTD.search(data):
        raise MalformedXmlError("XML with a DTD or entity declaration is refused")
    collector = _FlatFields()
    parser = expat.ParserCreate()
    # The byte check above misses a DTD in UTF-16 or UTF-32; expat itself refuses it then.
    parser.StartDoctypeDeclHandler = collector.refuse
    parser.EntityDeclHandler = collector.refuse
    parser.StartElementHandler = collector.start
    parser.EndElementHandler = collector.end
    parser.CharacterDataHandler = collector.text
    parser.buffer_text = True
    try:
        parser.Parse(data, True)
    except _DtdRefused:
        raise MalformedXmlError("XML with a DTD or entity declaration is refused") from None
    except (ExpatError, ValueError, LookupError) as exc:
        # LookupError: an XML declaration naming an encoding Python does not know
        # (`<?xml version="1.0" encoding="foo"?>`), raised by expat's codec lookup.
        raise MalformedXmlError(f"not well-formed XML: {exc}") from exc
    if collector.root != "xml" or not collector.root_has_content:
        raise MalformedXmlError("root element <xml> with children expected")
    return collector.fields


@dataclass(frozen=True)
class Envelope:
    """The outer, still encrypted callback body."""

    to_user: str
    encrypt: str
    agent_id: str


def parse_envelope(body: bytes) -> Envelope:
    fields = parse_xml(body)
    encrypt = fields.get("Encrypt", "")
    if not encrypt:
        raise MalformedXmlError("callback body has no <Encrypt>")
    return Envelope(fields.get("ToUserName", ""), encrypt, fields.get("AgentID", ""))


@dataclass(frozen=True)
class CallbackMessage:
    """A decrypted message or event a member sent to the self-built app (its XML fields)."""

    corp_id: str
    agent_id: str
    from_user: str
    create_time: int
    msg_type: str
    content: str = ""
    msg_id: str = ""
    event: str = ""
    event_key: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_event(self) -> bool:
        return self.msg_type == "event"

    def dedupe_key(self) -> str:
        """MsgId for messages; events have none, so user + time + event (+ key)."""
        if self.msg_id:
            return f"msg:{self.msg_id}"
        return f"event:{self.from_user}:{self.create_time}:{self.event}:{self.event_key}"


# The fields CallbackMessage has attributes for; anything else lands in `extra`.
KNOWN_FIELDS = frozenset(
    {
        "ToUserName",
        "FromUserName",
        "CreateTime",
        "MsgType",
        "Content",
        "MsgId",
        "AgentID",
        "Event",
        "EventKey",
    }
)


def parse_message(plaintext: bytes) -> CallbackMessage:
    fields = parse_xml(plaintext)
    from_user, msg_type = fields.get("FromUserName", ""), fields.get("MsgType", "")
    if not from_user or not msg_type:
        raise MalformedXmlError("message without FromUserName or MsgType")
    try:
        create_time = int(fields.get("CreateTime", "0") or 0)
    except ValueError as exc:
        raise MalformedXmlError("CreateTime is not a number") from exc
    return CallbackMessage(
        corp_id=fields.get("ToUserName", ""),
        agent_id=fields.get("AgentID", ""),
        from_user=from_user,
        create_time=create_time,
        msg_type=msg_type,
        content=fields.get("Content", ""),
        msg_id=fields.get("MsgId", ""),
        event=fields.get("Event", ""),
        event_key=fields.get("EventKey", ""),
        extra={k: v for k, v in fields.items() if k not in KNOWN_FIELDS},
    )


def message_xml(fields: dict[str, str | int]) -> bytes:
    """Render a flat `<xml>` document (CDATA-safe via xmltodict's escaping)."""
    text: str = xmltodict.unparse({"xml": fields}, full_document=False)
    return text.encode("utf-8")


# message/send truncates a longer text.content silently (bytes of UTF-8).
WECOM_TEXT_LIMIT = 2048


@dataclass(frozen=True)
class OutboundMessage:
    """One message/send call's worth of message (already split to fit 2048 bytes)."""

    agent_id: str
    content: str
    msgtype: str = "text"  # text | markdown | image | file (media_id instead of content)
    touser: str = ""
    toparty: str = ""
    totag: str = ""
    safe: int = 0
    enable_duplicate_check: int = 0
    duplicate_check_interval: int = 1800
    media_id: str = ""  # image and file messages: what media/upload returned

    def payload(self) -> dict[str, object]:
        inner = {"media_id": self.media_id} if self.media_id else {"content": self.content}
        body: dict[str, object] = {
            "msgtype": self.msgtype,
            "agentid": int(self.agent_id) if self.agent_id.isdigit() else self.agent_id,
            self.msgtype: inner,
            "safe": self.safe,
            "enable_duplicate_check": self.enable_duplicate_check,
            "duplicate_check_interval": self.duplicate_check_interval,
        }
        for key in ("touser", "toparty", "totag"):
            if getattr(self, key):
                body[key] = getattr(self, key)
        return body


@dataclass(frozen=True)
class SendResult:
    """WeCom's answer to message/send."""

    msgid: str = ""
    invaliduser: str = ""
    invalidparty: str = ""
    invalidtag: str = ""
    unlicenseduser: str = ""  # recipients without an interface licence: not delivered
    delivered: bool = True  # False: accepted, but nobody it named can receive it
