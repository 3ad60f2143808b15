"""The HTTP side of callback channels: WeCom's GET handshake and POST callbacks.

A POST is acknowledged (200, empty body) as soon as the channel's adapter has verified and
decoded it and the pipeline's job for it is stored with its dedupe key in one transaction —
never after talking to Dify. When it cannot be stored the answer is 503, so WeCom delivers it
again; a refused callback (forged, malformed, too large) gets the status its error type names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from flask import Flask, Response, request

from wecom_bridge.channels.base import InboundMessage
from wecom_bridge.config import Replies
from wecom_bridge.errors import BodyTooLargeError, CallbackError, StoreUnavailableError
from wecom_bridge.jobs.intake import Acceptor
from wecom_bridge.jobs.kinds import new_job
from wecom_bridge.jobs.routing import route
from wecom_bridge.metrics import Metrics

log = logging.getLogger("wecom_bridge.callback")

CALLBACKS = "wecom_bridge_callbacks_total"


class CallbackInbound(Protocol):
    """A channel that WeCom calls over HTTP (the self-built app; later the AI bot's webhook)."""

    @property
    def path(self) -> str: ...

    def handshake(self, args: Mapping[str, str]) -> str: ...

    def decode(self, args: Mapping[str, str], body: bytes) -> InboundMessage: ...


@dataclass(frozen=True)
class CallbackEndpoint:
    app: str
    inbound: CallbackInbound
    replies: Replies
    acceptor: Acceptor
    metrics: Metrics
    notify: Callable[[], None]
    max_body_bytes: int

    def handshake(self) -> Response:
        plaintext = self.inbound.handshake(request.args)
        self.metrics.inc(CALLBACKS, {"outcome": "url_verified"})
        log.info("URL verification answered", extra={"app": self.app, "event": "verify_url"})
        # Exactly the plaintext: no quotes, no newline, no BOM — anything else fails the console.
        return Response(plaintext, status=200, mimetype="text/plain")

    def receive(self) -> Response:
        if (request.content_length or 0) > self.max_body_bytes:
            raise BodyTooLargeError(f"body over {self.max_body_bytes} bytes")
        body = request.get_data(cache=False)
        if len(body) > self.max_body_bytes:
            raise BodyTooLargeError(f"body over {self.max_body_bytes} bytes")
        message = self.inbound.decode(request.args, body)
        spec = route(message, self.replies)
        job = new_job(message.sender, spec) if spec is not None else None
        job_id = self.acceptor.accept(self.app, message.dedupe_key, job)
        self._record(message, job_id)
        if job_id:
            self.notify()
        return Response(b"", status=200, mimetype="text/plain")

    def _record(self, message: InboundMessage, job_id: int | None) -> None:
        fields = {
            "app": self.app,
            "user": message.sender,
            "msg_id": message.msg_id,
            "msg_type": message.msg_type,
        }
        if job_id is None:
            self.metrics.inc("wecom_bridge_duplicates_total")
            self.metrics.inc(CALLBACKS, {"outcome": "duplicate"})
            log.info("redelivery dropped", extra={**fields, "event": "duplicate"})
        else:
            self.metrics.inc(CALLBACKS, {"outcome": "accepted"})
            log.info("callback stored", extra={**fields, "event": "accepted", "job_id": job_id})

    def view(self) -> Response:
        try:
            if request.method in ("GET", "HEAD"):  # Flask answers HEAD with the GET view
                return self.handshake()
            return self.receive()
        except CallbackError as exc:
            return self._refused(exc)
        except StoreUnavailableError as exc:
            self.metrics.inc(CALLBACKS, {"outcome": "store_unavailable"})
            log.error(
                "callback not stored; WeCom will redeliver",
                extra={"app": self.app, "event": "store_unavailable", "error": str(exc)},
            )
            return Response("503 not stored\n", status=503, mimetype="text/plain")

    def _refused(self, exc: CallbackError) -> Response:
        outcome = type(exc).__name__
        self.metrics.inc(CALLBACKS, {"outcome": outcome})
        log.warning(
            "callback refused",
            extra={
                "app": self.app,
                "event": "refused",
                "reason": outcome,
                "wecom_code": exc.wecom_code,
                "status": exc.http_status,
                "detail": str(exc),
            },
        )
        return Response(
            f"{exc.http_status} refused\n", status=exc.http_status, mimetype="text/plain"
        )


def register_callback(flask_app: Flask, endpoint: CallbackEndpoint) -> None:
    flask_app.add_url_rule(
        endpoint.inbound.path,
        endpoint=f"callback:{endpoint.app}",
        view_func=endpoint.view,
        methods=["GET", "POST"],
    )
