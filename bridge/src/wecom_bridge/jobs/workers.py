"""Worker threads: claim jobs in per-member order and hand each to the processor.

Workers wake at once when a new job is stored (`notify`, from the same process or through the
wake-up socket of the process model) and otherwise poll, so jobs stored by another process or
left by a dead one are picked up too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable

from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.processor import MAX_JOB_RETRY_DELAY, JobProcessor
from wecom_bridge.jobs.store import Job, Store

log = logging.getLogger("wecom_bridge.workers")

# Unexpected errors a job may meet before it is given up (the member then gets the fallback).
MAX_INTERNAL_ERRORS = 5


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
        max_internal_errors: int = MAX_INTERNAL_ERRORS,
        error_retry_base: float = 5.0,
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
        self.max_internal_errors = max_internal_errors
        self.error_retry_base = error_retry_base
        self._wake = threading.Condition()
        self._pending_wakeups = 0
        # The jobs the workers have in hand: only their leases are renewed.
        self._in_hand: set[int] = set()
        self._in_hand_lock = threading.Lock()
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

    def notify(self, jobs: int = 1) -> None:
        """`jobs` new jobs: wake as many idle workers (at most all of them). More would only
        queue for the write lock the callbacks' commits need."""
        wake = max(1, min(jobs, self.size))
        with self._wake:
            self._pending_wakeups = min(self.size, self._pending_wakeups + wake)
            self._wake.notify(wake)

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
        with self._in_hand_lock:
            self._in_hand.add(job.id)
        try:
            self.processor.process(job)
        except StoreUnavailableError as exc:
            # Progress stays as last stored; the lease (no longer renewed: the job left the
            # worker's hands) runs out and the job is resumed from there.
            log.error(
                "store unavailable while processing", extra={"job_id": job.id, "error": str(exc)}
            )
        except Exception as exc:
            log.exception("unexpected error processing job", extra={"job_id": job.id})
            self._after_error(job, exc)
        finally:
            with self._in_hand_lock:
                self._in_hand.discard(job.id)

    def _after_error(self, job: Job, exc: Exception) -> None:
        """Retry a job that failed unexpectedly, but only so often: a job that always fails
        would otherwise hold its member's later messages back for ever."""
        error = f"internal error: {type(exc).__name__}"
        delay = min(MAX_JOB_RETRY_DELAY, self.error_retry_base * job.attempts)
        with contextlib.suppress(StoreUnavailableError):  # else the lease expiry retries it
            if self.store.retry_after_error(job.id, delay, error) >= self.max_internal_errors:
                self.processor.give_up(job, error)

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
                with self._in_hand_lock:
                    in_hand = sorted(self._in_hand)
                self.store.renew_leases(self.owner, self.lease_seconds, in_hand)
                if self.store.requeue_expired():
                    self.notify()
                if time.monotonic() - last_sweep > 600:
                    self.store.sweep(self.dedupe_ttl, self.job_retention)
                    last_sweep = time.monotonic()
            except StoreUnavailableError as exc:
                log.error("housekeeping: store unavailable", extra={"error": str(exc)})
