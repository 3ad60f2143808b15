"""The AI bot's (智能机器人) frames: what goes over its long connection, and its callbacks' JSON.

Every frame is one JSON text `{"cmd", "headers": {"req_id"}, "body"}` (WeCom doc 101463; the
official Node SDK WecomTeam/aibot-node-sdk uses the same shapes). WeCom answers each frame the
bot sends with an ack `{"headers": {"req_id"}, "errcode", "errmsg"}` carrying the same req_id.
Messages and events arrive as `aibot_msg_callback` / `aibot_event_callback`; an answer to one
is sent with the req_id it arrived with. The webhook mode carries the same message bodies,
encrypted, over HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wecom_bridge.errors import BridgeError

CMD_SUBSCRIBE = "aibot_subscribe"
CMD_PING = "ping"
CMD_MSG_CALLBACK = "aibot_msg_callback"
CMD_EVENT_CALLBACK = "aibot_event_callback"
CMD_RESPOND = "aibot_respond_msg"
CMD_RESPOND_WELCOME = "aibot_respond_welcome_msg"
CMD_SEND = "aibot_send_msg"
# Uploading a file for a reply (long connection only): init → chunks → finish gives a media_id
# (3 days), sent as an image or file message with aibot_send_msg.
CMD_UPLOAD_INIT = "aibot_upload_media_init"
CMD_UPLOAD_CHUNK = "aibot_upload_media_chunk"
CMD_UPLOAD_FINISH = "aibot_upload_media_finish"
UPLOAD_CHUNK_BYTES = 512 * 1024
UPLOAD_MAX_CHUNKS = 100

# The longest stream content WeCom shows (UTF-8 bytes).
STREAM_CONTENT_LIMIT = 20480
STREAM_MAX_IMAGES = 10  # msg_item entries of one finishing reply
STREAM_IMAGE_LIMIT = 10 * 1024 * 1024  # bytes of one msg_item image before base64
EVENT_ENTER_CHAT = "enter_chat"
EVENT_DISCONNECTED = "disconnected_event"  # a newer connection took the bot over
ERR_INVALID_REQ_ID = 846605
ERR_STREAM_EXPIRED = 846608
# Replies that can never land on the message's own stream: answer with a new message instead.
STREAM_GONE = frozenset({ERR_INVALID_REQ_ID, ERR_STREAM_EXPIRED})


class AibotFrameError(BridgeError):
    """A frame that is not the AI bot's JSON shape."""


def new_req_id(prefix: str) -> str:
    """A req_id for a frame the bot starts (the SDK's form: `<cmd>_<ms>_<random>`)."""
    return f"{prefix}_{int(time.time() * 1000)}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Frame:
    """One frame in either direction; an ack has no cmd but an errcode."""

    req_id: str
    cmd: str = ""
    body: Mapping[str, Any] = field(default_factory=dict)
    errcode: int | None = None
    errmsg: str = ""

    def to_json(self) -> str:
        data: dict[str, Any] = {"headers": {"req_id": self.req_id}}
        if self.cmd:
            data["cmd"] = self.cmd
        if self.body:
            data["body"] = dict(self.body)
        if self.errcode is not None:
            data["errcode"] = self.errcode
            data["errmsg"] = self.errmsg
        return json.dumps(data, ensure_ascii=False)


def parse_frame(raw: str | bytes) -> Frame:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AibotFrameError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AibotFrameError("not a JSON object")
    headers = data.get("headers")
    body = data.get("body") or {}
    if not isinstance(headers, dict) or not isinstance(body, dict):
        raise AibotFrameError("headers and body must be objects")
    errcode = data.get("errcode")
    return Frame(
        req_id=str(headers.get("req_id") or ""),
        cmd=str(data.get("cmd") or ""),
        body=body,
        errcode=int(errcode) if isinstance(errcode, int) else None,
        errmsg=str(data.get("errmsg") or ""),
    )


def ack(req_id: str, errcode: int = 0, errmsg: str = "ok") -> Frame:
    return Frame(req_id=req_id, errcode=errcode, errmsg=errmsg)


def subscribe(bot_id: str, secret: str) -> Frame:
    return Frame(new_req_id(CMD_SUBSCRIBE), CMD_SUBSCRIBE, {"bot_id": bot_id, "secret": secret})


def ping() -> Frame:
    return Frame(new_req_id(CMD_PING), CMD_PING)


@dataclass(frozen=True)
class StreamImage:
    """An image the finishing stream reply carries in `msg_item` (doc 101031: JPG or PNG, at
    most 10 MB before encoding, at most 10 per reply): its base64 and the md5 of its bytes."""

    base64: str
    md5: str

    @classmethod
    def of(cls, data: bytes) -> StreamImage:
        digest = hashlib.md5(data).hexdigest()  # noqa: S324 - WeCom's checksum, not security
        return cls(base64.b64encode(data).decode("ascii"), digest)

    def item(self) -> dict[str, Any]:
        return {"msgtype": "image", "image": {"base64": self.base64, "md5": self.md5}}


def stream_body(
    stream_id: str, content: str, finish: bool, images: Sequence[StreamImage] = ()
) -> dict[str, Any]:
    """A stream update: the whole text so far (each update replaces what is shown); the
    finishing one may carry images (WeCom takes msg_item only with finish)."""
    stream: dict[str, Any] = {"id": stream_id, "finish": finish, "content": content}
    if finish and images:
        stream["msg_item"] = [image.item() for image in images]
    return {"msgtype": "stream", "stream": stream}


def stream_reply(req_id: str, stream_id: str, content: str, *, finish: bool) -> Frame:
    return Frame(req_id, CMD_RESPOND, stream_body(stream_id, content, finish))


def welcome_reply(req_id: str, text: str) -> Frame:
    """The answer to an enter_chat event (WeCom takes it only within 5 s of the event)."""
    return Frame(req_id, CMD_RESPOND_WELCOME, {"msgtype": "text", "text": {"content": text}})


def markdown_message(chatid: str, content: str) -> Frame:
    """A message the bot starts: to a member (chatid = their userid) or a group (its chatid)."""
    return Frame(
        new_req_id(CMD_SEND),
        CMD_SEND,
        {"chatid": chatid, "msgtype": "markdown", "markdown": {"content": content}},
    )


def upload_init(kind: str, filename: str, data: bytes) -> Frame:
    chunks = -(-len(data) // UPLOAD_CHUNK_BYTES)
    body = {
        "type": kind,
        "filename": filename,
        "total_size": len(data),
        "total_chunks": chunks,
        "md5": hashlib.md5(data).hexdigest(),  # noqa: S324 - WeCom's integrity check, not security
    }
    return Frame(new_req_id(CMD_UPLOAD_INIT), CMD_UPLOAD_INIT, body)


def upload_chunk(upload_id: str, index: int, chunk: bytes) -> Frame:
    body = {
        "upload_id": upload_id,
        "chunk_index": index,  # 0-based
        "base64_data": base64.b64encode(chunk).decode("ascii"),
    }
    return Frame(new_req_id(CMD_UPLOAD_CHUNK), CMD_UPLOAD_CHUNK, body)


def upload_finish(upload_id: str) -> Frame:
    return Frame(new_req_id(CMD_UPLOAD_FINISH), CMD_UPLOAD_FINISH, {"upload_id": upload_id})


def media_message(chatid: str, kind: str, media_id: str) -> Frame:
    """An uploaded image or file, as a message the bot starts."""
    body = {"chatid": chatid, "msgtype": kind, kind: {"media_id": media_id}}
    return Frame(new_req_id(CMD_SEND), CMD_SEND, body)


@dataclass(frozen=True)
class AibotMedia:
    """An image or file of a message: an encrypted download, valid five minutes."""

    kind: str  # image | file
    url: str
    aeskey: str = ""  # long connection: this URL's key; webhook: "" (the bot's EncodingAESKey)


@dataclass(frozen=True)
class AibotMessage:
    """A message or event body, as both modes deliver it."""

    msgid: str
    msgtype: str
    userid: str
    chattype: str = "single"  # single | group
    chatid: str = ""  # groups only
    aibotid: str = ""
    text: str = ""  # text content, or a voice message's transcription
    event_type: str = ""  # msgtype event: enter_chat, disconnected_event, …
    response_url: str = ""
    stream_id: str = ""  # webhook: a stream-refresh callback names its stream
    media: tuple[AibotMedia, ...] = ()  # image, file, and the images of a mixed message

    @property
    def is_group(self) -> bool:
        return self.chattype == "group"

    @property
    def chat(self) -> str:
        """Where a message the bot starts goes: the group, or the member."""
        return self.chatid if self.is_group and self.chatid else self.userid


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _media_of(kind: str, value: object) -> list[AibotMedia]:
    item = _dict(value)
    url = str(item.get("url") or "")
    return [AibotMedia(kind, url, str(item.get("aeskey") or ""))] if url else []


def _mixed(body: Mapping[str, Any]) -> tuple[str, list[AibotMedia]]:
    """A mixed (图文混排) message: its texts joined, its images in order."""
    texts: list[str] = []
    media: list[AibotMedia] = []
    items = _dict(body.get("mixed")).get("msg_item")
    for item in items if isinstance(items, list) else []:
        entry = _dict(item)
        if entry.get("msgtype") == "text":
            texts.append(str(_dict(entry.get("text")).get("content") or ""))
        elif entry.get("msgtype") == "image":
            media += _media_of("image", entry.get("image"))
    return "\n".join(t for t in texts if t), media


def parse_message(body: Mapping[str, Any]) -> AibotMessage:
    """A callback body as a typed message; AibotFrameError when it lacks what every one has."""
    msgid = str(body.get("msgid") or "")
    msgtype = str(body.get("msgtype") or "")
    userid = str(_dict(body.get("from")).get("userid") or "")
    if not msgtype or not userid:
        raise AibotFrameError("a callback needs msgtype and from.userid")
    if msgtype == "text":
        text = str(_dict(body.get("text")).get("content") or "")
    elif msgtype == "voice":  # WeCom transcribes voice for the bot
        text = str(_dict(body.get("voice")).get("content") or "")
    else:
        text = ""
    media: list[AibotMedia] = []
    if msgtype in ("image", "file"):
        media = _media_of(msgtype, body.get(msgtype))
    elif msgtype == "mixed":
        text, media = _mixed(body)
    return AibotMessage(
        msgid=msgid,
        msgtype=msgtype,
        userid=userid,
        chattype=str(body.get("chattype") or "single"),
        chatid=str(body.get("chatid") or ""),
        aibotid=str(body.get("aibotid") or ""),
        text=text,
        event_type=str(_dict(body.get("event")).get("eventtype") or ""),
        response_url=str(body.get("response_url") or ""),
        stream_id=str(_dict(body.get("stream")).get("id") or ""),
        media=tuple(media),
    )
