"""Workers: take jobs from the store in per-user order, ask Dify, send the answer to WeCom.

A job keeps its progress in the store (answer parts, parts already sent), so a worker killed
at any point leaves a job another worker resumes where it stopped: Dify is asked again only if
no answer was stored, and parts already sent are not sent again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from wecom_bridge.channels.proactive import SendRequest
from wecom_bridge.config import AppConfig
from wecom_bridge.dify.client import DifyClient
from wecom_bridge.errors import (
    DifyError,
    SendRequestError,
    StoreUnavailableError,
    WeComApiError,
    WeComConfigError,
)
from wecom_bridge.jobs.pacing import SlidingWindowLimiter
from wecom_bridge.jobs.sending import send_parts
from wecom_bridge.jobs.splitter import split_message
from wecom_bridge.jobs.store import Job, Store
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.api import WeComClient
from wecom_bridge.wecom.messages import OutboundMessage, SendResult

log = logging.getLogger("wecom_bridge.jobs.processor")

MAX_JOB_RETRY_DELAY = 300.0


@dataclass(frozen=True)
class AppRuntime:
    """One configured app with its clients."""

    config: AppConfig
    dify: DifyClient | None  # None: configuration loaded without Dify
    wecom: WeComClient


class JobProcessor:
    def __init__(
        self,
        store: Store,
        apps: dict[str, AppRuntime],
        metrics: Metrics,
        *,
        limiter: SlidingWindowLimiter | None = None,
        send_max_age: float = 3600.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.apps = apps
        self.metrics = metrics
        self.limiter = limiter or SlidingWindowLimiter()
        self.send_max_age = send_max_age
        self._sleep = sleep
        self._clock = clock

    def process(self, job: Job) -> None:
        app = self.apps.get(job.app)
        fields = {
            "job_id": job.id,
            "user": job.user,
            "app": job.app,
            "kind": job.kind,
            "msg_id": job.payload.get("msg_id", ""),
        }
        if app is None:
            self._fail(
                job, "no such app configured (was it removed from the config?)", None, fields
            )
            return
        try:
            if job.parts is None:
                parts, result = self._prepare(job, app)
            else:
                parts, result = job.parts, job.result or {}
            self._send_parts(job, app, parts)
        except WeComApiError as exc:
            self._send_failed(job, exc, fields)
            return
        except SendRequestError as exc:  # a stored payload no longer valid: never retried
            self._fail(job, f"invalid send request: {exc}", None, fields)
            return
        dify_error = result.get("dify_error")
        self.store.finish(job.id, error=f"dify: {dify_error}" if dify_error else None)
        self.metrics.inc("wecom_bridge_jobs_total", {"status": "done"})
        done = "sent" if job.kind == "send" else "answered"
        log.info(done, extra={**fields, "event": "job_done", "parts": len(parts)})

    # --- the answer -------------------------------------------------------------------------

    def _prepare(self, job: Job, app: AppRuntime) -> tuple[list[str], dict[str, object]]:
        text, result = self._answer_text(job, app)
        parts = split_message(text) if text else []
        self.store.save_parts(job.id, parts, result)
        return parts, result

    def _answer_text(self, job: Job, app: AppRuntime) -> tuple[str, dict[str, object]]:
        cfg = app.config
        if job.kind == "reset":
            self.store.forget_conversation(cfg.corp_id, cfg.agent_id, job.user)
            return cfg.reset_reply, {}
        if job.kind == "notice":
            return str(job.payload.get("text", "")), {}
        if job.kind == "send":
            return SendRequest.from_payload(job.payload).content, {}
        return self._ask_dify(job, app)

    def _ask_dify(self, job: Job, app: AppRuntime) -> tuple[str, dict[str, object]]:
        cfg = app.config
        if app.dify is None:  # only a configuration loaded without Dify has none
            return cfg.fallback_reply, {"dify_error": "not configured"}
        conversation = self.store.get_conversation(cfg.corp_id, cfg.agent_id, job.user)
        query = str(job.payload.get("query", ""))
        try:
            answer = app.dify.ask(query, job.user, conversation)
        except DifyError as exc:
            log.warning(
                "Dify failed, sending the fallback text",
                extra={
                    "job_id": job.id,
                    "user": job.user,
                    "event": "dify_failed",
                    "code": exc.code,
                    "status": exc.status,
                    "error": str(exc),
                },
            )
            return cfg.fallback_reply, {"dify_error": exc.code or str(exc.status or "unreachable")}
        if answer.conversation_id and answer.conversation_id != conversation:
            self.store.set_conversation(cfg.corp_id, cfg.agent_id, job.user, answer.conversation_id)
        text = answer.text.strip() or cfg.fallback_reply
        return text, {"conversation_id": answer.conversation_id, "message_id": answer.message_id}

    # --- sending ----------------------------------------------------------------------------

    def _send_parts(self, job: Job, app: AppRuntime, parts: list[str]) -> None:
        cfg = app.config
        if job.kind == "send":
            request = SendRequest.from_payload(job.payload)
            messages = [request.message(cfg.agent_id, part) for part in parts]
            keys = request.recipients.limit_keys(cfg.name)
        else:
            messages = [
                OutboundMessage(
                    agent_id=cfg.agent_id,
                    content=part,
                    msgtype=cfg.reply_msgtype,
                    touser=job.user,
                )
                for part in parts
            ]
            keys = [f"{cfg.name}:{job.user}"]

        def sent(index: int, result: SendResult) -> None:
            invalid = {
                "invaliduser": result.invaliduser,
                "invalidparty": result.invalidparty,
                "invalidtag": result.invalidtag,
            }
            self.store.mark_part_sent(job.id, index + 1, result.msgid, invalid)

        # WeCom silently drops more than 30 messages a minute to one member: wait, never drop.
        send_parts(
            app.wecom,
            self.limiter,
            keys,
            messages,
            on_sent=sent,
            start=job.parts_sent,
            sleep=self._sleep,
        )

    def _send_failed(self, job: Job, exc: WeComApiError, fields: dict[str, object]) -> None:
        age = self._clock() - job.received_at
        if (exc.retryable or isinstance(exc, WeComConfigError)) and age < self.send_max_age:
            delay = min(MAX_JOB_RETRY_DELAY, 5.0 * 2 ** (job.attempts - 1))
            self.store.retry_later(job.id, delay, str(exc), exc.errcode)
            log.warning(
                "send failed, will retry",
                extra={**fields, "event": "send_retry", "errcode": exc.errcode, "delay": delay},
            )
            return
        self._fail(job, str(exc), exc.errcode, fields)

    def _fail(self, job: Job, error: str, errcode: int | None, fields: dict[str, object]) -> None:
        self.store.fail(job.id, error, errcode)
        self.metrics.inc("wecom_bridge_jobs_total", {"status": "failed"})
        log.error(
            "job failed",
            extra={**fields, "event": "job_failed", "errcode": errcode, "error": error},
        )


class WorkerPool:
    """A bounded pool of worker threads plus one housekeeping thread.

    Workers wake at once when a callback stores a job (notify) and otherwise poll, so jobs
    stored by another process or left by a dead one are picked up too.
    """

    def __init__(
        self,
        store: Store,
        processor: JobProcessor,
        *,
        size: int = 4,
        lease_seconds: float = 15.0,
        heartbeat_seconds: float = 5.0,
        poll_seconds: float = 1.0,
        dedupe_ttl: float = 48 * 3600,
        job_retention: float = 7 * 86400,
    ) -> None:
        self.store = store
        self.processor = processor
        self.size = size
        self.owner = uuid.uuid4().hex
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.dedupe_ttl = dedupe_ttl
        self.job_retention = job_retention
        self._wake = threading.Condition()
        self._pending_wakeups = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        try:
            self.store.heartbeat(self.owner)
            self.store.requeue_expired()
        except StoreUnavailableError as exc:
            log.error("store unavailable at start", extra={"error": str(exc)})
        for n in range(self.size):
            self._spawn(self._work, f"bridge-worker-{n}")
        self._spawn(self._housekeep, "bridge-housekeeping")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def notify(self) -> None:
        with self._wake:
            self._pending_wakeups += 1
            self._wake.notify()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        try:
            self.store.release_owned(self.owner)
        except StoreUnavailableError:
            log.warning("could not release jobs on shutdown; their leases will expire")

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim(self.owner, self.lease_seconds)
            except StoreUnavailableError as exc:
                log.error("store unavailable, worker waits", extra={"error": str(exc)})
                self._stopping.wait(self.poll_seconds)
                continue
            if job is None:
                self._idle()
                continue
            self._run_job(job)

    def _run_job(self, job: Job) -> None:
        try:
            self.processor.process(job)
        except StoreUnavailableError as exc:
            # Progress stays as last stored; the lease runs out and the job is retried.
            log.error(
                "store unavailable while processing", extra={"job_id": job.id, "error": str(exc)}
            )
        except Exception:
            log.exception("unexpected error processing job", extra={"job_id": job.id})
            with contextlib.suppress(StoreUnavailableError):  # the lease expiry retries it
                self.store.retry_later(
                    job.id, min(MAX_JOB_RETRY_DELAY, 5.0 * job.attempts), "internal error", None
                )

    def _idle(self) -> None:
        try:
            next_in = self.store.next_available_in()
        except StoreUnavailableError:
            next_in = None
        timeout = self.poll_seconds if next_in is None else min(self.poll_seconds, next_in)
        with self._wake:
            if self._pending_wakeups == 0:
                self._wake.wait(timeout)
            self._pending_wakeups = max(0, self._pending_wakeups - 1)

    def _housekeep(self) -> None:
        last_sweep = 0.0
        while not self._stopping.wait(self.heartbeat_seconds):
            try:
                self.store.heartbeat(self.owner)
                self.store.renew_leases(self.owner, self.lease_seconds)
                if self.store.requeue_expired():
                    self.notify()
                if time.monotonic() - last_sweep > 600:
                    self.store.sweep(self.dedupe_ttl, self.job_retention)
                    last_sweep = time.monotonic()
            except StoreUnavailableError as exc:
                log.error("housekeeping: store unavailable", extra={"error": str(exc)})
