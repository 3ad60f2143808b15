"""Intake: how inbound messages enter the store, and the group commit that makes it fast.

An `Acceptor` records a message's dedupe key and its job in one transaction (the Store itself,
or the GroupCommitter in front of it).

Group commit: concurrent acknowledgements share one synced transaction.

Each acknowledged callback must be on disk (fsync) before WeCom gets its 200. One fsync per
callback caps throughput at the disk's sync rate and makes callbacks queue for the write lock;
a single committer thread instead takes everything that arrived while the previous sync ran and
commits it together. A lone callback is committed at once, so nothing waits for a batch to fill.
Batches are bounded (MAX_BATCH) and before each one the committer lets a waiting job-side
writer take the lock first (Store.yield_turn, bounded), so a burst of callbacks cannot starve
the job side's progress writes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.store import Arrival, NewJob, Store

MAX_BATCH = 256
# A callback waits at most this long for its commit; then it is answered 503 (WeCom redelivers,
# and the dedupe key makes a late commit harmless). WeCom itself gives up after 5 s.
COMMIT_WAIT_SECONDS = 4.0


class Acceptor(Protocol):
    def accept(self, app: str, dedupe_key: str, job: NewJob | None) -> int | None:
        """The new job id, 0 when there is nothing to do, None for a redelivery; raises
        StoreUnavailableError when it was not stored."""
        ...


@dataclass
class _Pending:
    arrival: Arrival
    done: threading.Event = field(default_factory=threading.Event)
    result: int | None = None
    error: StoreUnavailableError | None = None


class GroupCommitter:
    def __init__(
        self,
        store: Store,
        *,
        on_stored: Callable[[int], None] = lambda jobs: None,
        wait_seconds: float = COMMIT_WAIT_SECONDS,
    ) -> None:
        self._store = store
        # Wakes the job side, once per batch with the number of new jobs, not per callback.
        self._on_stored = on_stored
        self._wait = wait_seconds
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def accept(self, app: str, dedupe_key: str, job: NewJob | None) -> int | None:
        """Same contract as Store.accept; raises StoreUnavailableError when not stored."""
        pending = _Pending(Arrival(app, dedupe_key, job))
        self._queue.put(pending)
        if not pending.done.wait(self._wait):
            raise StoreUnavailableError(f"the commit did not finish within {self._wait:g} s")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            # The job side first when it waits: its "part sent" writes must not starve.
            self._store.yield_turn()
            results = self._store.accept_many([p.arrival for p in batch])
        except Exception as exc:  # every failure goes to the waiters: none may wait forever
            error = (
                exc
                if isinstance(exc, StoreUnavailableError)
                else StoreUnavailableError(f"commit failed: {type(exc).__name__}: {exc}")
            )
            for pending in batch:
                pending.error = error
                pending.done.set()
            return
        new_jobs = sum(1 for result in results if result)
        if new_jobs:
            self._on_stored(new_jobs)
        for pending, result in zip(batch, results, strict=True):
            pending.result = result
            pending.done.set()
