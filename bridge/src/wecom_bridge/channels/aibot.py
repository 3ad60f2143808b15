"""The AI bot channel (智能机器人): messages in single and group chats, answers streamed.

Inbound: a message body (from the long connection or a webhook callback) becomes one
`InboundMessage` whose `sender` is the conversation it continues — the member in a single chat;
in a group the member within that group, or the whole group (WECOM_AIBOT_GROUP_CONVERSATION) —
and whose context keeps what the answer needs: the req_id it arrived with, the chat, the stream.
Outbound: while Dify writes, the whole text so far goes out as updates of one stream (at most one
per `stream_interval`, a keep-alive when nothing changed for `keepalive_seconds`); the first
part of the answer finishes that stream; further parts, and answers whose stream can no longer
be continued (a restart: the req_id belonged to the old connection; or the stream expired), go
out as new messages to the chat.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from wecom_bridge.channels.base import (
    InboundKind,
    InboundMessage,
    MediaRef,
    Reply,
    Target,
    TextProgress,
)
from wecom_bridge.config import AibotSettings, AppConfig
from wecom_bridge.errors import WeComApiError
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom import aibot_frames as frames
from wecom_bridge.wecom.aibot_frames import STREAM_CONTENT_LIMIT, AibotMessage, Frame
from wecom_bridge.wecom.messages import SendResult
from wecom_bridge.wecom.uploads import UploadedMedia

log = logging.getLogger("wecom_bridge.aibot")

# A group message starts with the @mention of the bot (and maybe of others): not the question.
_MENTIONS = re.compile(r"^\s*(?:@\S+\s+)+")
THINKING_TEXT = "…"  # shown at once, until Dify's first words arrive
FINISHED_STREAMS_KEPT = 10_000


def conversation_key(settings: AibotSettings, message: AibotMessage) -> str:
    """Whose line (ordering) and Dify conversation a message belongs to."""
    if not message.is_group:
        return message.userid
    if settings.group_conversation == "group":
        return f"group:{message.chatid}"
    return f"group:{message.chatid}:{message.userid}"


def _kind(message: AibotMessage) -> InboundKind:
    if message.msgtype in ("text", "voice"):
        return InboundKind.TEXT
    if message.msgtype == "event":
        return (
            InboundKind.ENTER
            if message.event_type == frames.EVENT_ENTER_CHAT
            else (InboundKind.EVENT)
        )
    if message.media:  # image, file, or a mixed message with images
        return InboundKind.MEDIA
    if message.msgtype == "mixed" and message.text:
        return InboundKind.TEXT
    return InboundKind.UNSUPPORTED


def inbound_message(app: AppConfig, message: AibotMessage, req_id: str) -> InboundMessage:
    """One AI-bot message as the pipeline's message (`req_id`: the frame's or the callback's)."""
    assert app.aibot is not None  # noqa: S101 - only AI-bot apps get here
    kind = _kind(message)
    text = _MENTIONS.sub("", message.text) if message.is_group else message.text
    context = {
        "req_id": req_id,
        "chat": message.chat,
        "member": message.userid,
        "reply": "welcome" if kind is InboundKind.ENTER else "stream",
        # One stream per message: its id is derived from the msgid, so a redelivered or
        # resumed answer updates the same stream rather than starting another.
        "stream_id": f"s{message.msgid}"[:64],
    }
    if message.response_url:
        context["response_url"] = message.response_url
    return InboundMessage(
        app=app.name,
        sender=conversation_key(app.aibot, message),
        kind=kind,
        dedupe_key=f"aibot:{message.msgid}",
        text=text,
        msg_id=message.msgid,
        msg_type=message.msgtype if kind is not InboundKind.EVENT else message.event_type,
        context=context,
        media=tuple(MediaRef(m.kind, url=m.url, aeskey=m.aeskey) for m in message.media),
    )


class FrameLink(Protocol):
    """Sends one frame and returns WeCom's ack (AibotConnection, or a test's stand-in)."""

    def request(self, frame: Frame) -> Frame: ...


def fit(text: str, limit: int = STREAM_CONTENT_LIMIT) -> str:
    """`text` cut to `limit` UTF-8 bytes on a character boundary (for in-progress updates;
    the final answer is split into parts on natural boundaries instead)."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


@dataclass
class _Progress:
    text: str = ""
    changed: bool = False


class StreamPump:
    """Sends one stream's updates from its own thread: the latest text at most every
    `interval`, and the same text again after `keepalive` of silence (a stream left alone
    expires). Stops for good when WeCom says the stream is gone."""

    def __init__(
        self,
        link: FrameLink,
        req_id: str,
        stream_id: str,
        *,
        interval: float,
        keepalive: float,
        metrics: Metrics,
        app: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._req_id = req_id
        self._stream_id = stream_id
        self._interval = interval
        self._keepalive = keepalive
        self._metrics = metrics
        self._app = app
        self._clock = clock
        self._progress = _Progress(THINKING_TEXT, True)
        self._cond = threading.Condition()
        self._closed = False
        self.gone = False  # WeCom refused an update: the stream cannot be continued
        self._thread = threading.Thread(target=self._run, name="aibot-stream", daemon=True)

    def start(self) -> StreamPump:
        self._thread.start()
        return self

    def update(self, text: str) -> None:
        if not text.strip():
            return
        with self._cond:
            self._progress = _Progress(text, True)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(10)

    def _run(self) -> None:
        last_sent = float("-inf")
        words_sent = False  # only the placeholder so far: Dify's first words go out at once
        while True:
            with self._cond:
                wait_until = self._next_update(last_sent, words_sent)
                while not self._closed and self._clock() < wait_until:
                    self._cond.wait(max(0.01, wait_until - self._clock()))
                    wait_until = self._next_update(last_sent, words_sent)
                if self._closed:
                    return
                text = self._progress.text
                self._progress.changed = False
            if not self._send(text):
                return
            words_sent = words_sent or text != THINKING_TEXT
            # From the ack, not the send: a slow ack must not bunch the next update up.
            last_sent = self._clock()

    def _next_update(self, last_sent: float, words_sent: bool) -> float:
        if not self._progress.changed:
            return last_sent + self._keepalive
        return last_sent + self._interval if words_sent else last_sent

    def _send(self, text: str) -> bool:
        """One update; False when the stream can no longer be updated."""
        frame = frames.stream_reply(self._req_id, self._stream_id, fit(text), finish=False)
        try:
            self._link.request(frame)
        except WeComApiError as exc:
            if exc.errcode in frames.STREAM_GONE:
                self.gone = True
                log.info(
                    "AI bot: the stream cannot be continued; the answer will be a new message",
                    extra={"event": "aibot_stream_gone", "errcode": exc.errcode},
                )
                return False
            log.warning(
                "AI bot: stream update not sent",
                extra={"event": "aibot_update_failed", "error": str(exc)},
            )
            return True
        self._metrics.inc("wecom_bridge_aibot_stream_updates_total", {"app": self._app})
        return True


class AibotOutbound:
    """Answers an AI-bot message: streamed updates, then the parts (see the module doc)."""

    part_limit_bytes = STREAM_CONTENT_LIMIT
    max_parts: int | None = None  # parts beyond the stream are new messages (aibot_send_msg)

    def __init__(self, app: AppConfig, link: FrameLink, metrics: Metrics) -> None:
        assert app.aibot is not None  # noqa: S101 - built for AI-bot apps only
        self.app = app
        self.settings = app.aibot
        self.link = link
        self.metrics = metrics
        # Streams this process finished: a further part of the same answer is a new message.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def pacing_keys(self, target: Target) -> list[str]:
        return []  # WeCom documents no per-member limit for the bot's replies

    @contextmanager
    def streaming(self, target: Target) -> Iterator[TextProgress | None]:
        context = target.context if isinstance(target, Reply) else {}
        if context.get("reply") != "stream" or not context.get("req_id"):
            yield None
            return
        pump = StreamPump(
            self.link,
            context["req_id"],
            context["stream_id"],
            interval=self.settings.stream_interval,
            keepalive=self.settings.keepalive_seconds,
            metrics=self.metrics,
            app=self.app.name,
        ).start()
        try:
            yield pump.update
        finally:
            pump.close()
            if pump.gone:
                self._mark_finished(context["stream_id"])

    def send_part(self, target: Target, text: str) -> SendResult:
        if not isinstance(target, Reply) or not target.context.get("chat"):
            raise WeComApiError(None, "the AI bot answers messages only (no send API yet)")
        context = target.context
        if context.get("reply") == "welcome":
            self.link.request(frames.welcome_reply(context["req_id"], text))
            return SendResult(msgid="")
        stream_id = context.get("stream_id", "")
        if stream_id and not self._is_finished(stream_id):
            frame = frames.stream_reply(context["req_id"], stream_id, text, finish=True)
            try:
                self.link.request(frame)
            except WeComApiError as exc:
                if exc.errcode not in frames.STREAM_GONE:
                    raise
                log.info(
                    "AI bot: the message's stream is gone; answering with a new message",
                    extra={"event": "aibot_new_message", "errcode": exc.errcode},
                )
            else:
                self._mark_finished(stream_id)
                return SendResult(msgid=stream_id)
            self._mark_finished(stream_id)
        self.link.request(frames.markdown_message(context["chat"], text))
        self.metrics.inc("wecom_bridge_aibot_messages_sent_total", {"app": self.app.name})
        return SendResult(msgid="")

    # --- media (the long connection's upload frames; a webhook bot sends links instead) ----

    def upload_media(self, kind: str, path: Path, filename: str) -> UploadedMedia:
        data = path.read_bytes()
        chunks = -(-len(data) // frames.UPLOAD_CHUNK_BYTES)
        if chunks > frames.UPLOAD_MAX_CHUNKS:
            raise WeComApiError(None, f"{len(data)} bytes take more than 100 upload chunks")
        init = self.link.request(frames.upload_init(kind, filename, data))
        upload_id = str(init.body.get("upload_id") or "")
        if not upload_id:
            raise WeComApiError(None, "upload init answered without upload_id", retryable=True)
        for index in range(chunks):
            start = index * frames.UPLOAD_CHUNK_BYTES
            chunk = data[start : start + frames.UPLOAD_CHUNK_BYTES]
            self.link.request(frames.upload_chunk(upload_id, index, chunk))
        finish = self.link.request(frames.upload_finish(upload_id))
        media_id = str(finish.body.get("media_id") or "")
        if not media_id:
            raise WeComApiError(None, "upload finish answered without media_id", retryable=True)
        try:
            created_at = float(finish.body.get("created_at") or time.time())
        except (TypeError, ValueError):
            created_at = time.time()
        return UploadedMedia(media_id, created_at, kind)

    def send_media(self, target: Target, kind: str, media_id: str, caption: str) -> SendResult:
        if not isinstance(target, Reply) or not target.context.get("chat"):
            raise WeComApiError(None, "the AI bot answers messages only (no send API yet)")
        context = target.context
        stream_id = context.get("stream_id", "")
        if stream_id and context.get("reply") == "stream" and not self._is_finished(stream_id):
            # A stream must not stay open behind a file: finish it with the file's caption
            # (a stream frame cannot carry a file; the file follows as a message of its own).
            frame = frames.stream_reply(context["req_id"], stream_id, caption, finish=True)
            try:
                self.link.request(frame)
            except WeComApiError as exc:
                if exc.errcode not in frames.STREAM_GONE:
                    raise
            self._mark_finished(stream_id)
        self.link.request(frames.media_message(target.context["chat"], kind, media_id))
        self.metrics.inc("wecom_bridge_aibot_messages_sent_total", {"app": self.app.name})
        return SendResult(msgid="")

    def _is_finished(self, stream_id: str) -> bool:
        with self._lock:
            return stream_id in self._finished

    def _mark_finished(self, stream_id: str) -> None:
        with self._lock:
            self._finished[stream_id] = None
            while len(self._finished) > FINISHED_STREAMS_KEPT:
                self._finished.popitem(last=False)
