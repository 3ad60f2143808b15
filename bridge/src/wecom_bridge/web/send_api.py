"""The send API: `POST /api/v1/messages` queues a proactive message, `GET …/<id>` reports it.

Bearer-token authentication (BRIDGE_API_TOKEN, compared in constant time); without a configured
token the routes do not exist (404). A request is answered 202 only once its `send` job is
committed to the store, so it survives a crash or restart and is sent exactly once (the
workers' usual guarantee); then the job side is poked, as for callbacks. With an
Idempotency-Key header a retried request queues nothing new: it gets the first one's message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from wecom_bridge.channels.proactive import SendRequest, parse_send_request, resolve_app
from wecom_bridge.config import AppConfig, BridgeConfig
from wecom_bridge.errors import (
    IdempotencyConflictError,
    JobPayloadError,
    SendRequestError,
    StoreUnavailableError,
)
from wecom_bridge.jobs.kinds import VERSION_FIELD, SendJob, decode, new_job
from wecom_bridge.jobs.splitter import split_message
from wecom_bridge.jobs.store import Job, NewJob, Store
from wecom_bridge.metrics import Metrics

log = logging.getLogger("wecom_bridge.web.send_api")

API_PATH = "/api/v1/messages"
# A client that retries after a timeout sends the same key again and gets the first message back.
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# What a member of the API sees of the store's job states.
STATUS = {"queued": "queued", "running": "running", "done": "sent", "failed": "failed"}
_METRIC = "wecom_bridge_send_api_requests_total"


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _problem(status: int, error: str, field_name: str | None = None) -> Response:
    return _json({"error": error, "field": field_name}, status)


@dataclass(frozen=True)
class SendApi:
    config: BridgeConfig
    store: Store
    metrics: Metrics
    notify: Callable[[], None]
    token: str = field(repr=False)

    def authorized(self) -> bool:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    def unauthorized(self) -> Response:
        self.metrics.inc(_METRIC, {"outcome": "unauthorized"})
        log.warning(
            "send API request without a valid token",
            extra={"event": "api_unauthorized", "remote": request.remote_addr},
        )
        return _json(
            {"error": "missing or wrong bearer token", "field": None},
            401,
            {"WWW-Authenticate": 'Bearer realm="wecom-bridge"'},
        )

    def create(self) -> Response:
        try:
            body = request.get_data(cache=False)
        except RequestEntityTooLarge:
            self.metrics.inc(_METRIC, {"outcome": "too_large"})
            return _problem(413, f"body over {self.config.max_body_bytes} bytes")
        try:
            message, app, key = self._parse(body)
        except SendRequestError as exc:
            return self._invalid(exc)
        job = new_job(message.recipients.key(), SendJob(message))
        try:
            job_id, replayed = self._store(app.name, job, key)
        except IdempotencyConflictError as exc:
            self.metrics.inc(_METRIC, {"outcome": "conflict"})
            return _problem(409, f"{IDEMPOTENCY_HEADER}: {exc}", IDEMPOTENCY_HEADER)
        except StoreUnavailableError as exc:
            self.metrics.inc(_METRIC, {"outcome": "store_unavailable"})
            log.error(
                "send request not stored", extra={"event": "store_unavailable", "error": str(exc)}
            )
            return _problem(503, "not stored, try again")
        if replayed:
            return self._replayed(job_id)
        self.metrics.inc(_METRIC, {"outcome": "queued"})
        log.info(
            "send request queued",
            extra={
                "event": "api_queued",
                "job_id": job_id,
                "app": app.name,
                "user": job.user,
                "msgtype": message.msgtype,
            },
        )
        self.notify()
        return _json({"id": job_id, "status": "queued"}, 202, {"Location": f"{API_PATH}/{job_id}"})

    def _parse(self, body: bytes) -> tuple[SendRequest, AppConfig, str | None]:
        """The message, the app that sends it and the idempotency key; SendRequestError names
        what is wrong."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            raise SendRequestError(None, "body must be a JSON object")
        message, app_name = parse_send_request(doc)
        return message, resolve_app(self.config, app_name), idempotency_key()

    def _store(self, app: str, job: NewJob, key: str | None) -> tuple[int, bool]:
        """(job id, whether an earlier request with this key had queued it)."""
        if key is None:
            return self.store.enqueue(app, job), False
        return self.store.enqueue_once(app, job, key, request_fingerprint(app, job))

    def _replayed(self, job_id: int) -> Response:
        """The answer to a repeated request: the message its key queued, as it is now
        (`expired`: it finished longer ago than the job retention, its details are gone)."""
        try:
            job = self.store.get_job(job_id)
        except StoreUnavailableError:
            return _problem(503, "store unavailable, try again")  # nothing new was queued
        self.metrics.inc(_METRIC, {"outcome": "replayed"})
        status = STATUS.get(job.status, job.status) if job is not None else "expired"
        headers = {"Location": f"{API_PATH}/{job_id}", "Idempotent-Replayed": "true"}
        return _json({"id": job_id, "status": status}, 202, headers)

    def _invalid(self, exc: SendRequestError) -> Response:
        self.metrics.inc(_METRIC, {"outcome": "invalid"})
        return _problem(400, exc.problem, exc.field)

    def status(self, job_id: int) -> Response:
        try:
            job = self.store.get_job(job_id)
        except StoreUnavailableError:
            return _problem(503, "store unavailable, try again")
        if job is None or job.kind != "send":  # members' chats are not the API's business
            return _problem(404, f"no message {job_id}")
        return _json(describe(job), 200)


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header: None when absent; 1-255 visible ASCII chars."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 0 < len(key) <= MAX_KEY_LENGTH or not all("!" <= c <= "~" for c in key):
        raise SendRequestError(
            IDEMPOTENCY_HEADER, f"must be 1-{MAX_KEY_LENGTH} visible ASCII characters"
        )
    return key


def request_fingerprint(app: str, job: NewJob) -> str:
    """What a repeated request must match: the app and the message, as queued."""
    # Without the payload's version, so a retry across an upgrade still matches.
    message = {k: v for k, v in job.payload.items() if k != VERSION_FIELD}
    canonical = json.dumps({"app": app, "payload": message}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _planned_parts(job: Job) -> int:
    """A job not prepared yet: the split is deterministic, so say what it will be."""
    try:
        spec = decode(job.kind, job.payload)
    except JobPayloadError:
        return 0
    return len(split_message(spec.request.content)) if isinstance(spec, SendJob) else 0


def describe(job: Job) -> dict[str, Any]:
    """The API's view of a `send` job."""
    result = job.result or {}
    msgids = result.get("msgids")
    status = STATUS.get(job.status, job.status)
    sent = status == "sent"
    parts = len(job.parts) if job.parts is not None else _planned_parts(job)
    return {
        "id": job.id,
        "status": status,
        "app": job.app,
        "msgids": msgids if isinstance(msgids, list) else [],
        "parts": parts,
        "parts_sent": job.parts_sent,
        "attempts": job.attempts,
        "errcode": 0 if sent else job.errcode,
        "error": None if sent else job.error,
        "invaliduser": result.get("invaliduser", ""),
        "invalidparty": result.get("invalidparty", ""),
        "invalidtag": result.get("invalidtag", ""),
    }


def register_send_api(flask_app: Flask, api: SendApi) -> None:
    def create() -> Response:
        return api.create() if api.authorized() else api.unauthorized()

    def status(job_id: int) -> Response:
        return api.status(job_id) if api.authorized() else api.unauthorized()

    flask_app.add_url_rule(API_PATH, endpoint="send_api:create", view_func=create, methods=["POST"])
    flask_app.add_url_rule(
        f"{API_PATH}/<int:job_id>", endpoint="send_api:status", view_func=status, methods=["GET"]
    )
