"""Job workers: one dispatcher claims jobs in per-member order, a pool of threads runs them.

Most of a job's time is spent waiting on Dify (5–30 s for a real model) and on WeCom, so
threads that only wait are cheap and the default pool is wide (64). Claims go through one
dispatcher thread instead of every worker polling: an idle pool costs one claim per poll
interval, not one per worker, and claims never race each other for the store's write lock.

The dispatcher claims only while a worker is free and skips the apps that already have as
many jobs running as their limit allows (`app_limits`: what protects a Dify app from the
whole pool at once), so a busy app never holds back another app's members. It wakes at once
when a new job is stored (`notify`, in this process or through the process model's wake-up
socket) or a running one finishes, and otherwise polls, so jobs stored by another process or
left by a dead one are picked up too.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Mapping

from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.processor import MAX_JOB_RETRY_DELAY, JobProcessor
from wecom_bridge.jobs.store import Job, Store

log = logging.getLogger("wecom_bridge.workers")

# Unexpected errors a job may meet before it is given up (the member then gets the fallback).
MAX_INTERNAL_ERRORS = 5
DEFAULT_WORKERS = 64


class AppSlots:
    """How many jobs of each app are running, against each app's limit (none: the pool's)."""

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)
        self._running: Counter[str] = Counter()
        self._lock = threading.Lock()

    def full(self) -> frozenset[str]:
        """The apps that may not start another job now."""
        with self._lock:
            return frozenset(
                app for app, limit in self._limits.items() if self._running[app] >= limit
            )

    def start(self, app: str) -> None:
        with self._lock:
            self._running[app] += 1

    def finish(self, app: str) -> None:
        with self._lock:
            self._running[app] -= 1


class WorkerPool:
    """A dispatcher, `size` worker threads and one housekeeping thread."""

    def __init__(
        self,
        store: Store,
        processor: JobProcessor,
        *,
        size: int = DEFAULT_WORKERS,
        app_limits: Mapping[str, int] | None = None,
        lease_seconds: float = 15.0,
        heartbeat_seconds: float = 5.0,
        poll_seconds: float = 1.0,
        dedupe_ttl: float = 48 * 3600,
        job_retention: float = 7 * 86400,
        max_internal_errors: int = MAX_INTERNAL_ERRORS,
        error_retry_base: float = 5.0,
        held_elsewhere: Callable[[], Collection[str]] = frozenset,
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
        self.app_slots = AppSlots(app_limits or {})
        # Apps whose jobs only another process can run (an AI bot whose long connection
        # another bridge holds): their jobs are left to it.
        self.held_elsewhere = held_elsewhere
        # Free workers: the dispatcher takes one before it claims, a worker gives it back.
        self._free = threading.Semaphore(size)
        self._handoff: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._wake = threading.Event()
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
        self._spawn(self._dispatch, "bridge-dispatcher")
        self._spawn(self._housekeep, "bridge-housekeeping")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def notify(self, jobs: int = 1) -> None:
        """New jobs were stored (how many does not matter: the dispatcher claims until the
        queue or the free workers run out)."""
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        for _ in range(self.size):
            self._handoff.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.store.release_owned(self.owner)
        except StoreUnavailableError:
            log.warning("could not release jobs on shutdown; their leases will expire")

    # --- the dispatcher -------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            if not self._free.acquire(timeout=self.poll_seconds):
                continue
            job = self._claim()
            if job is None:
                self._free.release()
                self._idle()
                continue
            self.app_slots.start(job.app)
            with self._in_hand_lock:
                self._in_hand.add(job.id)
            self._handoff.put(job)

    def _claim(self) -> Job | None:
        try:
            return self.store.claim(self.owner, self.lease_seconds, skip_apps=self._skipped())
        except StoreUnavailableError as exc:
            log.error("store unavailable, dispatcher waits", extra={"error": str(exc)})
            self._stopping.wait(self.poll_seconds)
            return None

    def _skipped(self) -> set[str]:
        return set(self.app_slots.full()) | set(self.held_elsewhere())

    def _idle(self) -> None:
        """Nothing to claim: wait for a notify, a finished job, or the next retry time."""
        try:
            next_in = self.store.next_available_in(skip_apps=self._skipped())
        except StoreUnavailableError:
            next_in = None
        timeout = self.poll_seconds if next_in is None else min(self.poll_seconds, next_in)
        self._wake.wait(timeout)
        self._wake.clear()

    # --- the workers ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._handoff.get()
            if job is None:
                return
            try:
                self._run_job(job)
            finally:
                with self._in_hand_lock:
                    self._in_hand.discard(job.id)
                self._free.release()
                # A finished job may let its member's next message, or a full app, go on.
                self.app_slots.finish(job.app)
                self._wake.set()

    def _run_job(self, job: Job) -> None:
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

    def _after_error(self, job: Job, exc: Exception) -> None:
        """Retry a job that failed unexpectedly, but only so often: a job that always fails
        would otherwise hold its member's later messages back for ever."""
        error = f"internal error: {type(exc).__name__}"
        delay = min(MAX_JOB_RETRY_DELAY, self.error_retry_base * job.attempts)
        with contextlib.suppress(StoreUnavailableError):  # else the lease expiry retries it
            if self.store.retry_after_error(job.id, delay, error) >= self.max_internal_errors:
                self.processor.give_up(job, error)

    # --- housekeeping ---------------------------------------------------------------------

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
