"""The AI bot's webhook endpoint: the GET handshake, messages stored before they are
acknowledged (the acknowledgement opens the answer's stream), stream refreshes answered from
the stored progress, the welcome answered in place."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wecom_bridge.channels.aibot import THINKING_TEXT, inbound_message
from wecom_bridge.channels.aibot_webhook import AibotWebhookInbound, StreamBoard
from wecom_bridge.channels.base import InboundKind
from wecom_bridge.config import AppConfig
from wecom_bridge.errors import CallbackError, StoreUnavailableError
from wecom_bridge.jobs.intake import Acceptor
from wecom_bridge.jobs.kinds import new_job
from wecom_bridge.jobs.routing import route
from wecom_bridge.metrics import Metrics
from wecom_bridge.web.callbacks import CALLBACKS, HttpAnswer, query_args, read_body
from wecom_bridge.wecom.aibot_frames import AibotMessage, stream_body

log = logging.getLogger("wecom_bridge.aibot")


@dataclass(frozen=True)
class AibotWebhookEndpoint:
    app: AppConfig
    inbound: AibotWebhookInbound
    acceptor: Acceptor
    board: StreamBoard
    metrics: Metrics
    max_body_bytes: int

    @property
    def path(self) -> str:
        return self.inbound.path

    def answer(self, environ: Mapping[str, Any]) -> HttpAnswer:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD", "POST"):
            return HttpAnswer(405)
        try:
            args = query_args(environ.get("QUERY_STRING", ""))
            if method != "POST":
                plaintext = self.inbound.handshake(args)
                self.metrics.inc(CALLBACKS, {"outcome": "url_verified"})
                return HttpAnswer(200, plaintext.encode("utf-8"))
            length = environ.get("CONTENT_LENGTH") or ""
            size = int(length) if length.isdigit() else None
            body = read_body(environ["wsgi.input"], size, self.max_body_bytes)
            return self._receive(self.inbound.open(args, body))
        except CallbackError as exc:
            self.metrics.inc(CALLBACKS, {"outcome": type(exc).__name__})
            log.warning(
                "AI-bot callback refused",
                extra={"app": self.app.name, "reason": type(exc).__name__, "detail": str(exc)},
            )
            return HttpAnswer(exc.http_status, f"{exc.http_status} refused\n".encode())
        except StoreUnavailableError as exc:
            self.metrics.inc(CALLBACKS, {"outcome": "store_unavailable"})
            log.error(
                "AI-bot callback not stored; WeCom will retry",
                extra={"app": self.app.name, "event": "store_unavailable", "error": str(exc)},
            )
            return HttpAnswer(503, b"503 not stored\n")

    def _receive(self, message: AibotMessage) -> HttpAnswer:
        if message.msgtype == "stream":  # a refresh: the text so far, from the store
            state = self.board.get_stream(self.app.name, message.stream_id)
            content = state.content if state is not None and state.content else THINKING_TEXT
            finished = state is not None and state.finished
            images = state.images if state is not None else ()
            self.metrics.inc(CALLBACKS, {"outcome": "stream_refresh"})
            return self._sealed(stream_body(message.stream_id, content, finished, images))
        inbound = inbound_message(self.app, message, req_id="")
        inbound = dataclasses.replace(
            inbound, context={**inbound.context, "received_at": f"{time.time():.3f}"}
        )
        spec = route(inbound, self.app.replies)
        welcome = inbound.kind is InboundKind.ENTER
        job = new_job(inbound.sender, spec) if spec is not None and not welcome else None
        job_id = self.acceptor.accept(self.app.name, inbound.dedupe_key, job)
        self.metrics.inc(CALLBACKS, {"outcome": "duplicate" if job_id is None else "accepted"})
        if welcome:
            text = self.app.replies.welcome_text
            return (
                self._sealed({"msgtype": "text", "text": {"content": text}})
                if text
                else (HttpAnswer(200))
            )
        if spec is None:
            return HttpAnswer(200)
        # Stored (or stored before): the reply opens the stream WeCom will refresh.
        return self._sealed(stream_body(inbound.context["stream_id"], THINKING_TEXT, False))

    def _sealed(self, reply: Mapping[str, Any]) -> HttpAnswer:
        return HttpAnswer(200, self.inbound.seal(reply))
