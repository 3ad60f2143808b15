"""The AI bot's webhook mode: WeCom POSTs encrypted JSON to the callback URL and pulls the answer.

Inbound: the same signature and AES scheme as the self-built app, with an empty ReceiveId; the
body is JSON `{"encrypt"}` and so is the reply (`encrypt`, `msgsignature`, `timestamp`, `nonce`).
A message is answered at once with the start of a stream; WeCom then sends stream-refresh
callbacks for that stream id, each answered with the text stored so far, until it is finished
— for at most 6 minutes after the message. Outbound (the job side): the text so far is stored
as Dify writes it (at most once per `stream_interval`); the first part finishes the stored
stream while WeCom still refreshes it, carrying the answer's images (`msg_item`, stored with
the finish in the same write); an answer that outlives that window, or a part beyond the
first, goes through the message's `response_url`, which WeCom takes once (text only: images
go there as links). Files have no way out in this mode but their links.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import requests

from wecom_bridge.channels.aibot import fit
from wecom_bridge.channels.base import Reply, StreamFinish, Target, TextProgress
from wecom_bridge.config import AppConfig
from wecom_bridge.errors import MalformedJsonError, MissingParameterError, WeComApiError
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.aibot_frames import (
    STREAM_CONTENT_LIMIT,
    STREAM_MAX_IMAGES,
    AibotMessage,
    StreamImage,
    parse_message,
)
from wecom_bridge.wecom.crypto import WeComCrypto
from wecom_bridge.wecom.messages import SendResult

SIGNED_QUERY = ("msg_signature", "timestamp", "nonce")
# WeCom refreshes a stream for 6 minutes after the message; a finish stored later than this
# margin before the end might never be fetched, so it goes through response_url instead.
REFRESH_WINDOW = 360.0
WINDOW_MARGIN = 30.0


class StreamState(Protocol):
    @property
    def content(self) -> str: ...

    @property
    def finished(self) -> bool: ...

    @property
    def images(self) -> Sequence[StreamImage]: ...


class StreamBoard(Protocol):
    """Where webhook streams are kept between the job side and the web side (the store)."""

    def save_stream(
        self,
        app: str,
        stream_id: str,
        content: str,
        *,
        finished: bool,
        images: Sequence[StreamImage] = (),
    ) -> None: ...

    def get_stream(self, app: str, stream_id: str) -> StreamState | None: ...

    def use_response_url(self, app: str, stream_id: str) -> bool: ...


def _query(args: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    values = {name: args.get(name, "") for name in names}
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise MissingParameterError(f"missing query parameter(s): {', '.join(missing)}")
    return values


class AibotWebhookInbound:
    """Verifies and decrypts the bot's callbacks, and encrypts its passive replies."""

    def __init__(self, app: AppConfig) -> None:
        assert app.aibot is not None  # noqa: S101 - AI-bot apps only
        self.app = app
        # An internal bot's ReceiveId is the empty string.
        self.crypto = WeComCrypto(app.aibot.token, app.aibot.encoding_aes_key, "")

    @property
    def path(self) -> str:
        return self.app.callback_path

    def handshake(self, args: Mapping[str, str]) -> str:
        q = _query(args, (*SIGNED_QUERY, "echostr"))
        return self.crypto.verify_url(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"])

    def open(self, args: Mapping[str, str], body: bytes) -> AibotMessage:
        q = _query(args, SIGNED_QUERY)
        try:
            envelope = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise MalformedJsonError("the body is not JSON") from None
        encrypt = envelope.get("encrypt") if isinstance(envelope, dict) else None
        if not isinstance(encrypt, str) or not encrypt:
            raise MalformedJsonError('the body has no "encrypt"')
        self.crypto.verify_signature(q["msg_signature"], q["timestamp"], q["nonce"], encrypt)
        try:
            data = json.loads(self.crypto.decrypt(encrypt))
        except (ValueError, UnicodeDecodeError):
            raise MalformedJsonError("the decrypted message is not JSON") from None
        if not isinstance(data, dict):
            raise MalformedJsonError("the decrypted message is not a JSON object")
        try:
            return parse_message(data)
        except ValueError as exc:
            raise MalformedJsonError(str(exc)) from None

    def seal(self, reply: Mapping[str, Any]) -> bytes:
        """A passive reply as WeCom takes it: encrypted and signed JSON."""
        timestamp, nonce = str(int(time.time())), secrets.token_hex(8)
        encrypt = self.crypto.encrypt(json.dumps(reply, ensure_ascii=False).encode("utf-8"))
        sealed = {
            "encrypt": encrypt,
            "msgsignature": self.crypto.sign(timestamp, nonce, encrypt),
            "timestamp": timestamp,
            "nonce": nonce,
        }
        return json.dumps(sealed).encode()


class AibotWebhookOutbound:
    """The job side of a webhook bot: stores the stream for WeCom to pull, else response_url.
    Not a MediaOutbound (the upload frames exist only on the long connection): Dify's images
    ride on the stream's finish (a StreamImageOutbound), its files reach the member as links."""

    part_limit_bytes = STREAM_CONTENT_LIMIT
    max_parts: int | None = 2  # the stream, then the response_url WeCom takes once
    max_stream_images = STREAM_MAX_IMAGES

    def __init__(
        self,
        app: AppConfig,
        board: StreamBoard,
        metrics: Metrics,
        *,
        post: Callable[..., requests.Response] = requests.post,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert app.aibot is not None  # noqa: S101 - AI-bot apps only
        self.app = app
        self.board = board
        self.metrics = metrics
        self._post = post
        self._clock = clock
        self._interval = app.aibot.stream_interval

    def pacing_keys(self, target: Target) -> list[str]:
        return []

    @contextmanager
    def streaming(self, target: Target) -> Iterator[TextProgress | None]:
        context = target.context if isinstance(target, Reply) else {}
        stream_id = context.get("stream_id", "")
        if not stream_id or context.get("reply") != "stream":
            yield None
            return
        last = float("-inf")

        def progress(text: str) -> None:
            nonlocal last
            if self._clock() - last >= self._interval:
                last = self._clock()
                self.board.save_stream(self.app.name, stream_id, fit(text), finished=False)

        yield progress

    def send_part(self, target: Target, text: str) -> SendResult:
        context = self._context(target)
        stream_id = context["stream_id"]
        state = self.board.get_stream(self.app.name, stream_id)
        if self._finish_of(context, state) is StreamFinish.CLOSED:
            return self._respond_late(context, stream_id, text)
        self.board.save_stream(self.app.name, stream_id, text, finished=True)
        return SendResult(msgid=stream_id)

    def stream_finish(self, target: Target, text: str) -> StreamFinish:
        context = self._context(target)
        state = self.board.get_stream(self.app.name, context["stream_id"])
        finish = self._finish_of(context, state)
        if finish is StreamFinish.CLOSED and state is not None and state.content == text:
            return StreamFinish.DELIVERED  # finished with this text before a crash
        return finish

    def finish_with_images(
        self, target: Target, text: str, images: Sequence[StreamImage], fallback: str
    ) -> SendResult:
        context = self._context(target)
        stream_id = context["stream_id"]
        state = self.board.get_stream(self.app.name, stream_id)
        if self._finish_of(context, state) is StreamFinish.CLOSED:
            return self._respond_late(context, stream_id, fallback)
        self.board.save_stream(self.app.name, stream_id, text, finished=True, images=images)
        return SendResult(msgid=stream_id)

    @staticmethod
    def _context(target: Target) -> Mapping[str, str]:
        if not isinstance(target, Reply) or not target.context.get("stream_id"):
            raise WeComApiError(None, "the AI bot answers messages only (no send API yet)")
        return target.context

    def _finish_of(self, context: Mapping[str, str], state: StreamState | None) -> StreamFinish:
        """OPEN while WeCom refreshes the unfinished stream (with a margin), else CLOSED."""
        received = float(context.get("received_at") or 0.0)
        in_window = self._clock() - received < REFRESH_WINDOW - WINDOW_MARGIN
        unfinished = state is None or not state.finished
        return StreamFinish.OPEN if in_window and unfinished else StreamFinish.CLOSED

    def _respond_late(self, context: Mapping[str, str], stream_id: str, text: str) -> SendResult:
        url = context.get("response_url", "")
        if not url:
            raise WeComApiError(None, "the answer outlived the stream and no response_url came")
        if not self.board.use_response_url(self.app.name, stream_id):
            raise WeComApiError(
                None, "the message's response_url was used already (WeCom takes it once)"
            )
        body = {"msgtype": "markdown", "markdown": {"content": text}}
        try:
            response = self._post(url, json=body, timeout=(3.05, 10))
            data = response.json()
        except (requests.RequestException, ValueError) as exc:
            # Not retried: WeCom may have taken the one call before the answer was lost.
            raise WeComApiError(None, f"response_url: {type(exc).__name__}") from None
        if not isinstance(data, dict) or data.get("errcode", 0) != 0:
            raise WeComApiError(None, f"response_url refused: {data!r}"[:200])
        self.metrics.inc("wecom_bridge_aibot_messages_sent_total", {"app": self.app.name})
        return SendResult(msgid="")
