"""A WeCom AI-bot (智能机器人) double: the long-connection server, as WeCom's doc 101463 and
its Node SDK (WecomTeam/aibot-node-sdk) describe it.

- A client subscribes with `aibot_subscribe` {bot_id, secret}; a wrong pair is refused
  (errcode 40001) and a frame before subscribing closes the connection.
- One connection per bot: a newer subscription sends the older one `disconnected_event` and
  closes it.
- Every frame the bot sends is acked with its req_id ({errcode, errmsg}); `ping` too.
- A message is pushed as `aibot_msg_callback` with a fresh req_id that only the connection it
  was pushed on may answer (another gets 846605, invalid req_id). Its stream: each update
  replaces the displayed text; content over 20480 bytes is refused (40058); a stream left
  without updates for `stream_idle_expiry`, or older than `stream_max_age` (6 min), or already
  finished, is refused with 846608. The finishing update may carry images (`msg_item`, checked
  as `stream_images` says); an update with a msg_item WeCom would not take is refused (40058).
- `enter_chat` is pushed as `aibot_event_callback`; the welcome must come within 5 s.
- `aibot_send_msg` {chatid, markdown} is a new message from the bot; {chatid, msgtype image|file,
  image|file: {media_id}} sends a file uploaded with `aibot_upload_media_init` {type, filename,
  total_size, total_chunks, md5} → upload_id, `…_chunk` {upload_id, chunk_index (0-based),
  base64_data (≤ 512 KB)} and `…_finish` {upload_id} → {type, media_id, created_at} (the flow of
  WeCom's SDKs; the same type limits as media/upload, at most 100 chunks).

The test API (`deliver_text`, `enter_chat`, `transcript`, `view`, `kick`, `drop`) is what tests
use; testing/aibot_control.py puts an HTTP control API and the chat page in front of it (and of
the webhook mode's `AibotWebhookSender`) for the simulator, molecule and the demo.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from wecom_bridge.wecom import aibot_frames as frames
from wecom_bridge.wecom.aibot_frames import STREAM_CONTENT_LIMIT, Frame

ERR_BAD_SECRET = 40001
UPLOAD_LIMITS = {"image": 10 << 20, "voice": 2 << 20, "video": 10 << 20, "file": 20 << 20}
ERR_BAD_PARAM = 40058
WELCOME_WINDOW = 5.0
STREAM_MAX_AGE = 360.0


@dataclass
class StreamUpdate:
    at: float
    content: str
    finish: bool
    images: list[bytes] = field(default_factory=list)  # a finishing reply's msg_item images


@dataclass
class Delivery:
    """One pushed message and everything the bot answered to it."""

    msgid: str
    req_id: str
    userid: str
    chat: str  # where a new message to it would go (chatid or userid)
    text: str
    pushed_at: float
    connection: int  # which connection it was pushed on
    kind: str = "message"  # message | enter_chat
    stream_id: str = ""
    updates: list[StreamUpdate] = field(default_factory=list)
    welcome: str | None = None

    @property
    def finished(self) -> str | None:
        last = self.updates[-1] if self.updates else None
        return last.content if last is not None and last.finish else None


def _update_view(u: StreamUpdate) -> dict[str, Any]:
    images = [{"md5": hashlib.md5(i).hexdigest(), "bytes": len(i)} for i in u.images]  # noqa: S324
    return {"at": u.at, "content": u.content, "finish": u.finish, "images": images}


def _finished_image(updates: list[StreamUpdate], index: int) -> bytes | None:
    last = updates[-1] if updates else None
    images = last.images if last is not None and last.finish else []
    return images[index] if 0 <= index < len(images) else None


def _finished_images(updates: list[StreamUpdate]) -> list[dict[str, Any]]:
    last = updates[-1] if updates else None
    return _update_view(last)["images"] if last is not None and last.finish else []


class StreamImageError(ValueError):
    """A stream reply's msg_item that WeCom would not take."""


def stream_images(stream: dict[str, Any]) -> list[bytes]:
    """The images of a stream reply's `msg_item`, as WeCom's doc 101031 (被动回复消息 › 流式消息
    回复) allows them: only in the finishing reply, at most 10, each `{msgtype: image, image:
    {base64, md5}}` of a JPG or PNG of at most 10 MB before encoding, md5 of the raw bytes."""
    items = stream.get("msg_item")
    if items is None:
        return []
    if not stream.get("finish"):
        raise StreamImageError("msg_item is taken only when finish is true")
    if not isinstance(items, list) or len(items) > frames.STREAM_MAX_IMAGES:
        raise StreamImageError(f"msg_item: a list of at most {frames.STREAM_MAX_IMAGES} items")
    images = []
    for item in items:
        image = item.get("image") if isinstance(item, dict) else None
        if item.get("msgtype") != "image" or not isinstance(image, dict):
            raise StreamImageError("msg_item: msgtype image with an image object expected")
        try:
            data = base64.b64decode(str(image.get("base64", "")), validate=True)
        except ValueError:
            raise StreamImageError("msg_item: image.base64 is not base64") from None
        if hashlib.md5(data).hexdigest() != image.get("md5"):  # noqa: S324 - WeCom's checksum
            raise StreamImageError("msg_item: image.md5 is not the md5 of the image")
        if len(data) > frames.STREAM_IMAGE_LIMIT:
            raise StreamImageError("msg_item: an image over 10 MB")
        if not data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
            raise StreamImageError("msg_item: only JPG and PNG images")
        images.append(data)
    return images


@dataclass
class SentMessage:
    at: float
    chat: str
    content: str
    msgtype: str = "markdown"  # markdown | image | file
    media_id: str = ""


@dataclass
class Upload:
    """One upload over the long connection (init → chunks → finish)."""

    type: str
    filename: str
    total_size: int
    total_chunks: int
    md5: str
    chunks: dict[int, bytes] = field(default_factory=dict)
    media_id: str = ""


class AibotDouble:
    def __init__(
        self,
        bot_id: str,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        stream_idle_expiry: float = 300.0,
        stream_max_age: float = STREAM_MAX_AGE,
    ) -> None:
        self.bot_id = bot_id
        self.secret = secret
        self.stream_idle_expiry = stream_idle_expiry
        self.stream_max_age = stream_max_age
        # Reentrant: `wait` holds it while its predicate reads the transcript.
        self.lock = threading.RLock()
        self.deliveries: dict[str, Delivery] = {}  # by msgid
        self._by_req: dict[str, Delivery] = {}
        self.sent: list[SentMessage] = []
        self.uploads: dict[str, Upload] = {}  # by upload_id
        self.media: dict[str, Upload] = {}  # finished uploads, by media_id
        self.subscriptions = 0
        self.refused_subscriptions = 0
        self.pings = 0
        self._active: ServerConnection | None = None
        self._active_no = 0
        self._server: Server = serve(self._handle, host, port)
        self.port = int(self._server.socket.getsockname()[1])
        self.url = f"ws://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="aibot-double", daemon=True
        )
        self._changed = threading.Condition(self.lock)

    def start(self) -> AibotDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.drop()
        self._server.shutdown()
        self._thread.join(5)

    def __enter__(self) -> AibotDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the test API ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        with self.lock:
            return self._active is not None

    def wait_connected(self, timeout: float = 10.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._active is not None, timeout):
                raise TimeoutError("no subscribed connection")

    def deliver_text(
        self, userid: str, text: str, *, chatid: str = "", msgid: str | None = None
    ) -> str:
        """Push a member's text message (in a group when `chatid` is given); its msgid."""
        msgid = msgid or uuid.uuid4().hex
        body: dict[str, Any] = {
            "msgid": msgid,
            "aibotid": self.bot_id,
            "chattype": "group" if chatid else "single",
            "from": {"userid": userid},
            "create_time": int(time.time()),
            "msgtype": "text",
            "text": {"content": text},
        }
        if chatid:
            body["chatid"] = chatid
        self._push(frames.CMD_MSG_CALLBACK, body, userid, chatid or userid, text, "message")
        return msgid

    # The long connection's media carries its own per-URL aeskey.
    media_key: bytes | None = None

    def deliver_media(self, userid: str, msgtype: str, content: dict[str, Any]) -> str:
        return self.deliver(userid, msgtype, content)

    def deliver(self, userid: str, msgtype: str, content: dict[str, Any]) -> str:
        """Push a message of another type (image, file, mixed …)."""
        msgid = uuid.uuid4().hex
        body = {
            "msgid": msgid,
            "aibotid": self.bot_id,
            "chattype": "single",
            "from": {"userid": userid},
            "msgtype": msgtype,
            msgtype: content,
        }
        self._push(frames.CMD_MSG_CALLBACK, body, userid, userid, "", "message")
        return msgid

    def enter_chat(self, userid: str) -> str:
        msgid = uuid.uuid4().hex
        body = {
            "msgid": msgid,
            "create_time": int(time.time()),
            "aibotid": self.bot_id,
            "from": {"userid": userid},
            "chattype": "single",
            "msgtype": "event",
            "event": {"eventtype": frames.EVENT_ENTER_CHAT},
        }
        self._push(frames.CMD_EVENT_CALLBACK, body, userid, userid, "", "enter_chat")
        return msgid

    def redeliver(self, msgid: str) -> None:
        """Push the same message again (same msgid, a new req_id), as after a reconnect."""
        with self.lock:
            old = self.deliveries[msgid]
        self.deliver_text(old.userid, old.text, msgid=msgid)

    def transcript(self, msgid: str) -> Delivery:
        with self.lock:
            return self.deliveries[msgid]

    def messages_to(self, chat: str) -> list[str]:
        with self.lock:
            return [m.content for m in self.sent if m.chat == chat]

    def answers(self, msgid: str) -> list[str]:
        """Every complete answer the member saw for `msgid`: its finished stream, plus the
        new messages sent to its chat after it was pushed (tests of one question at a time)."""
        with self.lock:
            d = self.deliveries[msgid]
            texts = [d.finished] if d.finished is not None else []
            return texts + [
                self._shown(m) for m in self.sent if m.chat == d.chat and m.at >= d.pushed_at
            ]

    def _shown(self, message: SentMessage) -> str:
        """A sent message as the chat page lists it: its text, or an uploaded file's name."""
        if message.msgtype == "markdown":
            return message.content
        upload = self.media.get(message.media_id)
        label = "图片" if message.msgtype == "image" else "文件"
        return f"[{label}] {upload.filename if upload else message.media_id}"

    def view(self, msgid: str) -> dict[str, Any] | None:
        """What the member saw of `msgid` so far (the control API's and chat page's shape)."""
        with self.lock:
            d = self.deliveries.get(msgid)
            if d is None:
                return None
            return {
                "msgid": d.msgid,
                "userid": d.userid,
                "chat": d.chat,
                "updates": [_update_view(u) for u in d.updates],
                "finished": d.finished,
                "welcome": d.welcome,
                "pushed_at": d.pushed_at,
                "answers": self.answers(msgid),
                "images": _finished_images(d.updates),
            }

    def image(self, msgid: str, index: int) -> bytes | None:
        """Image `index` of the finished stream of `msgid` (the chat page shows it)."""
        with self.lock:
            d = self.deliveries.get(msgid)
            return _finished_image(d.updates if d else [], index)

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "mode": "ws",
                "connected": self._active is not None,
                "subscriptions": self.subscriptions,
                "refused_subscriptions": self.refused_subscriptions,
                "pings": self.pings,
                "sent": [{"chat": m.chat, "content": m.content} for m in self.sent],
            }

    def wait(self, predicate: Any, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("condition not met")
                self._changed.wait(min(remaining, 0.05))

    def kick(self) -> None:
        """Another client took the bot over: the active connection gets disconnected_event."""
        with self.lock:
            ws = self._active
            self._active = None
        if ws is not None:
            event = self._disconnected_event()
            with contextlib.suppress(ConnectionClosed):
                ws.send(
                    Frame(frames.new_req_id("event"), frames.CMD_EVENT_CALLBACK, event).to_json()
                )
            ws.close()

    def drop(self) -> None:
        """The network drops the active connection."""
        with self.lock:
            ws = self._active
            self._active = None
        if ws is not None:
            ws.close()

    # --- the server side ------------------------------------------------------------------------

    def _disconnected_event(self) -> dict[str, Any]:
        return {
            "msgid": uuid.uuid4().hex,
            "aibotid": self.bot_id,
            "msgtype": "event",
            "event": {"eventtype": frames.EVENT_DISCONNECTED},
        }

    def _push(
        self, cmd: str, body: dict[str, Any], userid: str, chat: str, text: str, kind: str
    ) -> None:
        req_id = f"{cmd}_{uuid.uuid4().hex}"
        with self.lock:
            ws = self._active
            if ws is None:
                raise ConnectionError("no subscribed connection to push to")
            delivery = Delivery(
                msgid=str(body["msgid"]),
                req_id=req_id,
                userid=userid,
                chat=chat,
                text=text,
                pushed_at=time.time(),
                connection=self._active_no,
                kind=kind,
            )
            self.deliveries.setdefault(delivery.msgid, delivery)
            if self.deliveries[delivery.msgid] is not delivery:  # a redelivery: the newest counts
                old = self.deliveries[delivery.msgid]
                delivery.updates, delivery.welcome = old.updates, old.welcome
                self.deliveries[delivery.msgid] = delivery
            self._by_req[req_id] = delivery
        ws.send(Frame(req_id, cmd, body).to_json())

    def _handle(self, ws: ServerConnection) -> None:
        number = 0
        try:
            for raw in ws:
                frame = frames.parse_frame(raw)
                if frame.cmd == frames.CMD_SUBSCRIBE:
                    number = self._subscribe(ws, frame)
                    if not number:
                        return
                    continue
                if not number:
                    return  # nothing before the subscription
                ws.send(self._answer(frame, number).to_json())
        except (ConnectionClosed, frames.AibotFrameError):
            pass
        finally:
            with self._changed:
                if self._active is ws:
                    self._active = None
                self._changed.notify_all()

    def _subscribe(self, ws: ServerConnection, frame: Frame) -> int:
        if frame.body.get("bot_id") != self.bot_id or frame.body.get("secret") != self.secret:
            with self.lock:
                self.refused_subscriptions += 1
            ws.send(frames.ack(frame.req_id, ERR_BAD_SECRET, "invalid secret").to_json())
            return 0
        with self._changed:
            previous = self._active
            self._active = None
        if previous is not None:  # one connection per bot: the older one is told and closed
            event = self._disconnected_event()
            with contextlib.suppress(ConnectionClosed):
                previous.send(
                    Frame(frames.new_req_id("event"), frames.CMD_EVENT_CALLBACK, event).to_json()
                )
            previous.close()
        ws.send(frames.ack(frame.req_id).to_json())
        with self._changed:
            self.subscriptions += 1
            self._active_no += 1
            self._active = ws
            self._changed.notify_all()
            return self._active_no

    def _answer(self, frame: Frame, connection: int) -> Frame:
        with self._changed:
            try:
                if frame.cmd.startswith("aibot_upload_media_"):
                    code, message, body = self._upload(frame)
                    return Frame(frame.req_id, body=body, errcode=code, errmsg=message)
                code, message = self._apply(frame, connection)
            finally:
                self._changed.notify_all()
        return frames.ack(frame.req_id, code, message)

    def _upload(self, frame: Frame) -> tuple[int, str, dict[str, Any]]:
        """The upload frames, checked as WeCom does: a known type within its size limit, at
        most 100 chunks of at most 512 KB, every chunk present and the md5 right at finish."""
        body = frame.body
        if frame.cmd == frames.CMD_UPLOAD_INIT:
            kind, size, count = body.get("type"), body.get("total_size"), body.get("total_chunks")
            if kind not in UPLOAD_LIMITS or not isinstance(size, int) or not isinstance(count, int):
                return ERR_BAD_PARAM, "type, total_size and total_chunks are required", {}
            if not 5 < size <= UPLOAD_LIMITS[kind] or not 0 < count <= frames.UPLOAD_MAX_CHUNKS:
                return ERR_BAD_PARAM, "file size or chunk count out of range", {}
            upload_id = secrets.token_hex(8)
            self.uploads[upload_id] = Upload(
                str(kind), str(body.get("filename") or ""), size, count, str(body.get("md5"))
            )
            return 0, "ok", {"upload_id": upload_id}
        upload = self.uploads.get(str(body.get("upload_id") or ""))
        if upload is None:
            return ERR_BAD_PARAM, "unknown upload_id", {}
        if frame.cmd == frames.CMD_UPLOAD_CHUNK:
            index = int(str(body.get("chunk_index", -1)))
            data = base64.b64decode(str(body.get("base64_data") or ""))
            if not 0 <= index < upload.total_chunks or len(data) > frames.UPLOAD_CHUNK_BYTES:
                return ERR_BAD_PARAM, "bad chunk", {}
            upload.chunks[index] = data
            return 0, "ok", {}
        if frame.cmd != frames.CMD_UPLOAD_FINISH:
            return ERR_BAD_PARAM, f"unknown cmd {frame.cmd}", {}
        data = b"".join(upload.chunks.get(i, b"") for i in range(upload.total_chunks))
        if len(upload.chunks) != upload.total_chunks or len(data) != upload.total_size:
            return ERR_BAD_PARAM, "chunks missing", {}
        if hashlib.md5(data).hexdigest() != upload.md5:  # noqa: S324 - WeCom's check
            return ERR_BAD_PARAM, "md5 mismatch", {}
        upload.media_id = f"m{secrets.token_hex(12)}"
        self.media[upload.media_id] = upload
        return (
            0,
            "ok",
            {"type": upload.type, "media_id": upload.media_id, "created_at": str(int(time.time()))},
        )

    def _apply(self, frame: Frame, connection: int) -> tuple[int, str]:
        now = time.time()
        if frame.cmd == frames.CMD_PING:
            self.pings += 1
            return 0, "ok"
        if frame.cmd == frames.CMD_SEND and frame.body.get("msgtype") in UPLOAD_LIMITS:
            kind = str(frame.body["msgtype"])
            media = frame.body.get(kind) or {}
            media_id = str(media.get("media_id", "")) if isinstance(media, dict) else ""
            chat = str(frame.body.get("chatid") or "")
            if not chat or media_id not in self.media:
                return ERR_BAD_PARAM, "chatid and a known media_id are required"
            self.sent.append(SentMessage(now, chat, "", kind, media_id))
            return 0, "ok"
        if frame.cmd == frames.CMD_SEND:
            markdown = frame.body.get("markdown") or {}
            content = str(markdown.get("content", "")) if isinstance(markdown, dict) else ""
            chat = str(frame.body.get("chatid") or "")
            if not chat or not content:
                return ERR_BAD_PARAM, "chatid and markdown.content are required"
            if len(content.encode()) > STREAM_CONTENT_LIMIT:
                return ERR_BAD_PARAM, "content exceeds 20480 bytes"
            self.sent.append(SentMessage(now, chat, content))
            return 0, "ok"
        delivery = self._by_req.get(frame.req_id)
        if delivery is None or delivery.connection != connection:
            return frames.ERR_INVALID_REQ_ID, "invalid req_id"
        if frame.cmd == frames.CMD_RESPOND_WELCOME:
            if delivery.kind != "enter_chat" or now - delivery.pushed_at > WELCOME_WINDOW:
                return frames.ERR_INVALID_REQ_ID, "invalid req_id"
            text = frame.body.get("text") or {}
            delivery.welcome = str(text.get("content", "")) if isinstance(text, dict) else ""
            return 0, "ok"
        if frame.cmd != frames.CMD_RESPOND:
            return ERR_BAD_PARAM, f"unknown cmd {frame.cmd}"
        return self._stream(delivery, frame.body, now)

    def _stream(self, delivery: Delivery, body: Any, now: float) -> tuple[int, str]:
        stream = body.get("stream") if body.get("msgtype") == "stream" else None
        if not isinstance(stream, dict) or not stream.get("id"):
            return ERR_BAD_PARAM, "msgtype stream with stream.id expected"
        content = str(stream.get("content", ""))
        if len(content.encode()) > STREAM_CONTENT_LIMIT:
            return ERR_BAD_PARAM, "content exceeds 20480 bytes"
        if delivery.stream_id and delivery.stream_id != stream["id"]:
            return ERR_BAD_PARAM, "one stream per message"
        last = delivery.updates[-1].at if delivery.updates else delivery.pushed_at
        expired = (
            now - last > self.stream_idle_expiry or now - delivery.pushed_at > self.stream_max_age
        )
        if delivery.finished is not None or expired:
            return frames.ERR_STREAM_EXPIRED, "stream message update expired"
        try:
            images = stream_images(stream)
        except StreamImageError as exc:
            return ERR_BAD_PARAM, str(exc)
        delivery.stream_id = str(stream["id"])
        delivery.updates.append(StreamUpdate(now, content, bool(stream.get("finish")), images))
        return 0, "ok"


# --- webhook mode -------------------------------------------------------------------------------


@dataclass
class WebhookExchange:
    """One message sent to the bridge's webhook and what WeCom saw of its answer."""

    msgid: str
    status: int
    first: dict[str, Any] | None  # the decrypted passive reply
    updates: list[StreamUpdate] = field(default_factory=list)  # from the refreshes
    late: list[str] = field(default_factory=list)  # what came through response_url
    rejected: list[str] = field(default_factory=list)  # replies WeCom would not take, and why
    userid: str = ""
    chat: str = ""
    pushed_at: float = 0.0
    welcome: str | None = None  # the passive reply to enter_chat

    @property
    def finished(self) -> str | None:
        last = self.updates[-1] if self.updates else None
        return last.content if last is not None and last.finish else None


class AibotWebhookSender:
    """WeCom's side of the webhook mode: encrypted JSON callbacks (ReceiveId empty) to the
    bridge, stream-refresh callbacks until the stream is finished or `window` (6 min) has
    passed, and the one-time response_url (a call beyond the first is refused). A reply whose
    msg_item WeCom would not take is not shown (kept in the exchange's `rejected`)."""

    def __init__(
        self,
        callback_url: str,
        token: str,
        encoding_aes_key: str,
        *,
        refresh_interval: float = 1.0,
        window: float = STREAM_MAX_AGE,
    ) -> None:
        from wecom_bridge.testing.server import ServerThread
        from wecom_bridge.wecom.crypto import WeComCrypto, parse_encoding_aes_key

        self.callback_url = callback_url
        self.crypto = WeComCrypto(token, encoding_aes_key, "")
        # The webhook's media is encrypted with the bot's own key (the message carries none).
        self.media_key: bytes | None = parse_encoding_aes_key(encoding_aes_key)
        self.refresh_interval = refresh_interval
        self.window = window
        self.lock = threading.Lock()
        self.late: dict[str, list[str]] = {}  # response_url posts, by msgid
        self.exchanges: dict[str, WebhookExchange] = {}  # by msgid, growing while refreshed
        self._used: set[str] = set()
        self._server = ServerThread(self._response_url_app()).start()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> AibotWebhookSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handshake(self, echostr: str = "hello-aibot") -> tuple[int, str]:
        import requests

        from wecom_bridge.wecom.crypto import build_url_verification

        params = build_url_verification(self.crypto, echostr)
        response = requests.get(self.callback_url, params=params, timeout=5)
        return response.status_code, response.text

    def post(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """One encrypted callback; (HTTP status, the decrypted reply or None)."""
        import requests

        timestamp, nonce = str(int(time.time())), uuid.uuid4().hex[:10]
        encrypt = self.crypto.encrypt(json.dumps(body, ensure_ascii=False).encode())
        params = {
            "msg_signature": self.crypto.sign(timestamp, nonce, encrypt),
            "timestamp": timestamp,
            "nonce": nonce,
        }
        response = requests.post(
            self.callback_url, params=params, json={"encrypt": encrypt}, timeout=5
        )
        if response.status_code != 200 or not response.content:
            return response.status_code, None
        sealed = response.json()
        expected = self.crypto.sign(sealed["timestamp"], sealed["nonce"], sealed["encrypt"])
        if sealed.get("msgsignature") != expected:
            raise AssertionError("the passive reply's msgsignature is wrong")
        return 200, json.loads(self.crypto.decrypt(sealed["encrypt"]))

    def message(
        self,
        userid: str,
        text: str,
        *,
        chatid: str = "",
        msgid: str | None = None,
        media: tuple[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A text message, or (`media`: msgtype and its content) an image, file or mixed one."""
        msgid = msgid or uuid.uuid4().hex
        msgtype, content = media or ("text", {"content": text})
        body: dict[str, Any] = {
            "msgid": msgid,
            "aibotid": "webhook-bot",
            "chattype": "group" if chatid else "single",
            "from": {"userid": userid},
            "response_url": f"{self._server.url}/response/{msgid}",
            "msgtype": msgtype,
            msgtype: content,
        }
        if chatid:
            body["chatid"] = chatid
        return body

    def ask(
        self,
        userid: str,
        text: str,
        *,
        chatid: str = "",
        msgid: str | None = None,
        wait: float = 30.0,
        media: tuple[str, dict[str, Any]] | None = None,
    ) -> WebhookExchange:
        """Send a message (text, or `media` as in `message`) and refresh its stream as WeCom
        does; returns when finished, when the window is over, or after `wait` seconds."""
        body = self.message(userid, text, chatid=chatid, msgid=msgid, media=media)
        exchange = self._exchange(body)
        self._converse(body, exchange, wait)
        exchange.late = self.late_for(exchange.msgid)
        return exchange

    def deliver_text(self, userid: str, text: str, *, chatid: str = "") -> str:
        """`ask` in the background (the control API, the chat page); see `view`."""
        return self._in_background(self.message(userid, text, chatid=chatid))

    def deliver_media(self, userid: str, msgtype: str, content: dict[str, Any]) -> str:
        """An image, file or mixed message, asked in the background like `deliver_text`."""
        return self._in_background(self.message(userid, "", media=(msgtype, content)))

    def _in_background(self, body: dict[str, Any]) -> str:
        exchange = self._exchange(body)
        threading.Thread(
            target=self._converse, args=(body, exchange, self.window), daemon=True
        ).start()
        return exchange.msgid

    def enter_chat(self, userid: str) -> str:
        """The member opens the bot's chat: enter_chat, answered by the passive welcome."""
        body = {
            "msgid": uuid.uuid4().hex,
            "aibotid": "webhook-bot",
            "chattype": "single",
            "from": {"userid": userid},
            "msgtype": "event",
            "event": {"eventtype": "enter_chat"},
        }
        exchange = self._exchange(body)
        _, reply = self.post(body)
        text = (reply or {}).get("text") if (reply or {}).get("msgtype") == "text" else None
        with self.lock:
            exchange.welcome = str(text.get("content", "")) if isinstance(text, dict) else None
        return exchange.msgid

    def view(self, msgid: str) -> dict[str, Any] | None:
        """What the member saw of `msgid` so far (the same shape as AibotDouble.view)."""
        with self.lock:
            x = self.exchanges.get(msgid)
            if x is None:
                return None
            finished = x.finished
            return {
                "msgid": x.msgid,
                "userid": x.userid,
                "chat": x.chat,
                "updates": [_update_view(u) for u in x.updates],
                "finished": finished,
                "welcome": x.welcome,
                "pushed_at": x.pushed_at,
                "answers": ([finished] if finished is not None else [])
                + list(self.late.get(msgid, [])),
                "images": _finished_images(x.updates),
                "rejected": list(x.rejected),
            }

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "mode": "webhook",
                "callback_url": self.callback_url,
                "asked": len(self.exchanges),
            }

    def _exchange(self, body: dict[str, Any]) -> WebhookExchange:
        chat = str(body.get("chatid") or body["from"]["userid"])
        exchange = WebhookExchange(
            str(body["msgid"]),
            0,
            None,
            userid=str(body["from"]["userid"]),
            chat=chat,
            pushed_at=time.time(),
        )
        with self.lock:
            self.exchanges[exchange.msgid] = exchange
        return exchange

    def _converse(self, body: dict[str, Any], exchange: WebhookExchange, wait: float) -> None:
        status, first = self.post(body)
        exchange.status, exchange.first = status, first
        stream = (first or {}).get("stream") if (first or {}).get("msgtype") == "stream" else None
        if not isinstance(stream, dict):
            return
        started = time.time()
        self._record(exchange, stream)
        while not exchange.finished and time.time() - started < min(self.window, wait):
            time.sleep(self.refresh_interval)
            refresh = {
                "msgid": uuid.uuid4().hex,
                "aibotid": "webhook-bot",
                "chattype": body["chattype"],
                "from": {"userid": exchange.userid},
                "msgtype": "stream",
                "stream": {"id": stream["id"]},
            }
            _, reply = self.post(refresh)
            self._record(exchange, (reply or {}).get("stream") or {})

    def _record(self, exchange: WebhookExchange, stream: dict[str, Any]) -> None:
        try:
            images = stream_images(stream)
        except StreamImageError as exc:  # not shown: the stream goes on being refreshed
            with self.lock:
                exchange.rejected.append(str(exc))
            return
        update = StreamUpdate(
            time.time(), str(stream.get("content", "")), bool(stream.get("finish")), images
        )
        with self.lock:
            exchange.updates.append(update)

    def image(self, msgid: str, index: int) -> bytes | None:
        """Image `index` of the finished stream of `msgid` (the chat page shows it)."""
        with self.lock:
            exchange = self.exchanges.get(msgid)
            return _finished_image(exchange.updates if exchange else [], index)

    def late_for(self, msgid: str) -> list[str]:
        with self.lock:
            return list(self.late.get(msgid, []))

    def _response_url_app(self) -> Any:
        from flask import Flask, Response, jsonify, request

        app = Flask("aibot_response_url")

        @app.post("/response/<msgid>")
        def respond(msgid: str) -> Response:
            data = request.get_json(force=True, silent=True) or {}
            with self.lock:
                if msgid in self._used:  # WeCom takes a response_url once
                    return jsonify({"errcode": ERR_BAD_PARAM, "errmsg": "response_url used"})
                self._used.add(msgid)
                markdown = data.get("markdown") or {}
                self.late.setdefault(msgid, []).append(str(markdown.get("content", "")))
            return jsonify({"errcode": 0, "errmsg": "ok"})

        return app
