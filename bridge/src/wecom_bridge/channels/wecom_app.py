"""The callback endpoint WeCom calls: GET URL verification and POST message callbacks.

A POST is acknowledged (200, empty body) as soon as the message is verified, decrypted and
stored with its dedupe key in one transaction — never after talking to Dify. When it cannot be
stored the answer is 503, so WeCom delivers it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from flask import Flask, Response, request

from wecom_bridge.config import AppConfig
from wecom_bridge.errors import CallbackError, StoreUnavailableError
from wecom_bridge.jobs.store import NewJob
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.crypto import WeComCrypto
from wecom_bridge.wecom.messages import InboundMessage, parse_envelope, parse_message

log = logging.getLogger("wecom_bridge.channels.wecom_app")

WELCOME_EVENTS = ("enter_agent", "subscribe")
_QUERY = ("msg_signature", "timestamp", "nonce")


class Acceptor(Protocol):
    """Stores a delivery durably with its dedupe key (Store, or GroupCommitter in front of it)."""

    def accept(self, app: str, dedupe_key: str, job: NewJob | None) -> int | None: ...


@dataclass(frozen=True)
class CallbackHandler:
    app: AppConfig
    crypto: WeComCrypto
    acceptor: Acceptor
    metrics: Metrics
    notify: Callable[[], None]
    max_body_bytes: int

    def verify_url(self) -> Response:
        params = _query(request.args, (*_QUERY, "echostr"))
        plaintext = self.crypto.verify_url(
            params["msg_signature"], params["timestamp"], params["nonce"], params["echostr"]
        )
        self.metrics.inc("wecom_bridge_callbacks_total", {"outcome": "url_verified"})
        log.info("URL verification answered", extra={"app": self.app.name, "event": "verify_url"})
        # Exactly the plaintext: no quotes, no newline, no BOM — anything else fails the console.
        return Response(plaintext, status=200, mimetype="text/plain")

    def receive(self) -> Response:
        if (request.content_length or 0) > self.max_body_bytes:
            raise _TooLarge()
        body = request.get_data(cache=False)
        if len(body) > self.max_body_bytes:
            raise _TooLarge()
        params = _query(request.args, _QUERY)
        envelope = parse_envelope(body)
        self.crypto.verify_signature(
            params["msg_signature"], params["timestamp"], params["nonce"], envelope.encrypt
        )
        message = parse_message(self.crypto.decrypt(envelope.encrypt))
        job = self.job_for(message)
        job_id = self.acceptor.accept(self.app.name, message.dedupe_key(), job)
        fields = {
            "app": self.app.name,
            "user": message.from_user,
            "msg_id": message.msg_id,
            "msg_type": message.msg_type,
        }
        if job_id is None:
            self.metrics.inc("wecom_bridge_duplicates_total")
            self.metrics.inc("wecom_bridge_callbacks_total", {"outcome": "duplicate"})
            log.info("redelivery dropped", extra={**fields, "event": "duplicate"})
        else:
            self.metrics.inc("wecom_bridge_callbacks_total", {"outcome": "accepted"})
            log.info("callback stored", extra={**fields, "event": "accepted", "job_id": job_id})
            if job_id:
                self.notify()
        return Response(b"", status=200, mimetype="text/plain")

    def job_for(self, message: InboundMessage) -> NewJob | None:
        """What the workers should do for this message (None: nothing, only dedupe)."""
        user = message.from_user
        if message.msg_type == "text":
            text = message.content.strip()
            if not text:
                return None
            if text in self.app.reset_words:
                return NewJob("reset", user, {"msg_id": message.msg_id})
            return NewJob("chat", user, {"query": text, "msg_id": message.msg_id})
        if message.is_event:
            if message.event in WELCOME_EVENTS and self.app.welcome_text:
                return NewJob("notice", user, {"text": self.app.welcome_text})
            return None
        if self.app.unsupported_reply:
            return NewJob(
                "notice",
                user,
                {
                    "text": self.app.unsupported_reply,
                    "msg_id": message.msg_id,
                    "msg_type": message.msg_type,
                },
            )
        return None


class _MissingParameter(CallbackError):
    http_status = 400


class _TooLarge(CallbackError):
    http_status = 413


def _query(args: object, names: tuple[str, ...]) -> dict[str, str]:
    values = {name: args.get(name, "") for name in names}  # type: ignore[attr-defined]
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise _MissingParameter(f"missing query parameter(s): {', '.join(missing)}")
    return values


def register_callback(flask_app: Flask, handler: CallbackHandler, metrics: Metrics) -> None:
    def view() -> Response:
        try:
            if request.method in ("GET", "HEAD"):  # Flask answers HEAD with the GET view
                return handler.verify_url()
            return handler.receive()
        except CallbackError as exc:
            outcome = type(exc).__name__
            metrics.inc("wecom_bridge_callbacks_total", {"outcome": outcome})
            log.warning(
                "callback refused",
                extra={
                    "app": handler.app.name,
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
        except StoreUnavailableError as exc:
            metrics.inc("wecom_bridge_callbacks_total", {"outcome": "store_unavailable"})
            log.error(
                "callback not stored; WeCom will redeliver",
                extra={"app": handler.app.name, "event": "store_unavailable", "error": str(exc)},
            )
            return Response("503 not stored\n", status=503, mimetype="text/plain")

    flask_app.add_url_rule(
        handler.app.callback_path,
        endpoint=f"callback:{handler.app.name}",
        view_func=view,
        methods=["GET", "POST"],
    )
