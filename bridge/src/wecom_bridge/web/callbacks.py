"""The HTTP side of callback channels: WeCom's GET handshake and POST callbacks.

A POST is acknowledged (200, empty body) as soon as the channel's adapter has verified and
decoded it and the pipeline's job for it is stored with its dedupe key in one transaction —
never after talking to Dify. When it cannot be stored the answer is 503, so WeCom delivers it
again; a refused callback (forged, malformed, too large) gets the status its error type names.

Callback paths are answered by a small WSGI layer in front of Flask (`CallbackRouter`): the
acknowledgement path is the hot one, and Flask's request context, routing and response objects
cost more per callback than the callback's own work. Everything else goes on to Flask.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any, Protocol
from urllib.parse import parse_qsl

from wecom_bridge.channels.base import InboundMessage
from wecom_bridge.config import Replies
from wecom_bridge.errors import BodyTooLargeError, CallbackError, StoreUnavailableError
from wecom_bridge.jobs.intake import Acceptor
from wecom_bridge.jobs.kinds import new_job
from wecom_bridge.jobs.routing import route
from wecom_bridge.metrics import Metrics

log = logging.getLogger("wecom_bridge.callback")

CALLBACKS = "wecom_bridge_callbacks_total"
ALLOWED = "GET, HEAD, POST, OPTIONS"
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class CallbackInbound(Protocol):
    """A channel that WeCom calls over HTTP (the self-built app; later the AI bot's webhook)."""

    @property
    def path(self) -> str: ...

    def handshake(self, args: Mapping[str, str]) -> str: ...

    def decode(self, args: Mapping[str, str], body: bytes) -> InboundMessage: ...


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes = b""


def query_args(query_string: str) -> dict[str, str]:
    """The query's parameters; of a repeated one the first counts (as werkzeug's args.get)."""
    args: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        args.setdefault(name, value)
    return args


def read_body(stream: IO[bytes], content_length: int | None, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes without reading more than limit + 1."""
    if content_length is not None and content_length > limit:
        raise BodyTooLargeError(f"body over {limit} bytes")
    body = stream.read(limit + 1 if content_length is None else content_length)
    if len(body) > limit:
        raise BodyTooLargeError(f"body over {limit} bytes")
    return body


class IntakeTally:
    """What the callback paths accepted, logged once a second at INFO; one line per callback
    only at DEBUG (at INFO it cost a sixth of an acknowledgement). Refusals and store failures
    are logged one by one at WARNING and ERROR; each job's line on the job side names its
    msg_id."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, app: str, outcome: str) -> None:
        with self._lock:
            self._counts[(app, outcome)] += 1

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        for app in sorted({app for app, _ in counts}):
            mine = {outcome: n for (a, outcome), n in counts.items() if a == app}
            log.info(
                "callbacks stored",
                extra={"app": app, "event": "intake", "seconds": self._interval, **mine},
            )

    def start(self) -> None:
        def run() -> None:
            while True:
                time.sleep(self._interval)
                self.flush()

        threading.Thread(target=run, name="intake-log", daemon=True).start()


@dataclass(frozen=True)
class CallbackEndpoint:
    app: str
    inbound: CallbackInbound
    replies: Replies
    acceptor: Acceptor  # wakes the job side itself once the job is stored
    metrics: Metrics
    max_body_bytes: int
    tally: IntakeTally

    @property
    def path(self) -> str:
        return self.inbound.path

    def handshake(self, args: Mapping[str, str]) -> HttpAnswer:
        plaintext = self.inbound.handshake(args)
        self.metrics.inc(CALLBACKS, {"outcome": "url_verified"})
        log.info("URL verification answered", extra={"app": self.app, "event": "verify_url"})
        # Exactly the plaintext: no quotes, no newline, no BOM — anything else fails the console.
        return HttpAnswer(200, plaintext.encode("utf-8"))

    def receive(self, args: Mapping[str, str], body: bytes) -> HttpAnswer:
        message = self.inbound.decode(args, body)
        spec = route(message, self.replies)
        job = new_job(message.sender, spec) if spec is not None else None
        job_id = self.acceptor.accept(self.app, message.dedupe_key, job)
        self._record(message, job_id)
        return HttpAnswer(200)

    def _record(self, message: InboundMessage, job_id: int | None) -> None:
        outcome = "duplicate" if job_id is None else "accepted"
        if job_id is None:
            self.metrics.inc("wecom_bridge_duplicates_total")
        self.metrics.inc(CALLBACKS, {"outcome": outcome})
        self.tally.add(self.app, outcome)
        if log.isEnabledFor(logging.DEBUG):
            fields = {"app": self.app, "user": message.sender, "msg_id": message.msg_id}
            text = "redelivery dropped" if job_id is None else "callback stored"
            log.debug(
                text,
                extra={**fields, "msg_type": message.msg_type, "event": outcome, "job_id": job_id},
            )

    def answer(self, environ: Mapping[str, Any]) -> HttpAnswer:
        """The answer to one request of any method (HEAD as GET, without the body)."""
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "OPTIONS":
            return HttpAnswer(200)
        if method not in ("GET", "HEAD", "POST"):
            return HttpAnswer(405)
        try:
            args = query_args(environ.get("QUERY_STRING", ""))
            if method != "POST":
                return self.handshake(args)
            length = environ.get("CONTENT_LENGTH") or ""
            size = int(length) if length.isdigit() else None
            return self.receive(args, read_body(environ["wsgi.input"], size, self.max_body_bytes))
        except CallbackError as exc:
            return self._refused(exc)
        except StoreUnavailableError as exc:
            self.metrics.inc(CALLBACKS, {"outcome": "store_unavailable"})
            log.error(
                "callback not stored; WeCom will redeliver",
                extra={"app": self.app, "event": "store_unavailable", "error": str(exc)},
            )
            return HttpAnswer(503, b"503 not stored\n")

    def _refused(self, exc: CallbackError) -> HttpAnswer:
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
        return HttpAnswer(exc.http_status, f"{exc.http_status} refused\n".encode())


class Endpoint(Protocol):
    """What the router needs of an endpoint (the self-built app's, the AI bot's webhook)."""

    @property
    def path(self) -> str: ...

    def answer(self, environ: Mapping[str, Any]) -> HttpAnswer: ...


class CallbackRouter:
    """WSGI: callback paths to their endpoints, every other request to `fallback` (Flask)."""

    def __init__(self, endpoints: Iterable[Endpoint], fallback: WsgiApp) -> None:
        self._by_path = {endpoint.path: endpoint for endpoint in endpoints}
        self._fallback = fallback

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        endpoint = self._by_path.get(environ.get("PATH_INFO", ""))
        if endpoint is None:
            return self._fallback(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        answer = endpoint.answer(environ)
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(answer.body))),
        ]
        if method == "OPTIONS" or answer.status == 405:
            headers.append(("Allow", ALLOWED))
        start_response(f"{answer.status} {HTTPStatus(answer.status).phrase}", headers)
        return [b"" if method == "HEAD" else answer.body]
