"""The worker pool: a wide pool runs many members at once, each app within its limit, each
member in order, and an idle pool does not poll the store once per worker (real store and
processor, on both backends; the channel is the only stand-in, so the test can hold sends open)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from conftest import RecordingChannel, StoreBackend, plain_app, wait_for

from wecom_bridge.channels.base import Target
from wecom_bridge.jobs.kinds import NoticeJob, new_job
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import Job, SqliteStore, Store
from wecom_bridge.jobs.workers import WorkerPool
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.messages import SendResult


class HeldChannel(RecordingChannel):
    """Every send waits until the test opens the gate; counts how many wait at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting: Counter[str] = Counter()
        self.most_waiting = 0

    def send_part(self, target: Target, text: str) -> SendResult:
        with self.lock:
            self.waiting[text.split(":")[0]] += 1
            self.most_waiting = max(self.most_waiting, sum(self.waiting.values()))
        self.gate.wait(30)
        with self.lock:
            self.waiting[text.split(":")[0]] -= 1
        return super().send_part(target, text)


class CountingStore(SqliteStore):
    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.claims = 0

    def claim(self, owner: str, lease_seconds: float, **kwargs: object) -> Job | None:
        self.claims += 1
        return super().claim(owner, lease_seconds, **kwargs)  # type: ignore[arg-type]


def _processor(store: Store, channel: RecordingChannel, *apps: str) -> JobProcessor:
    runtimes = {name: AppRuntime(plain_app(name), None, channel) for name in apps}
    return JobProcessor(store, runtimes, Metrics(), sleep=lambda _: None)


def test_a_wide_pool_runs_that_many_members_at_once(store_backend: StoreBackend) -> None:
    store = store_backend()
    channel = HeldChannel()
    pool = WorkerPool(store, _processor(store, channel, "a"), size=24, poll_seconds=0.05)
    for n in range(40):
        store.enqueue("a", new_job(f"member{n}", NoticeJob(f"a:{n}")))
    pool.start()
    try:
        wait_for(lambda: channel.most_waiting >= 24)
        assert channel.most_waiting == 24  # never more than the pool
        channel.gate.set()
        wait_for(lambda: len(channel.sent) == 40)
    finally:
        pool.stop()


def test_an_app_at_its_limit_does_not_hold_back_another_app(store_backend: StoreBackend) -> None:
    store = store_backend()
    channel = HeldChannel()
    processor = _processor(store, channel, "a", "b")
    pool = WorkerPool(store, processor, size=8, app_limits={"a": 3}, poll_seconds=0.05)
    for n in range(10):
        store.enqueue("a", new_job(f"member{n}", NoticeJob(f"a:{n}")))
    later = [store.enqueue("b", new_job(f"member{n}", NoticeJob(f"b:{n}"))) for n in range(4)]
    pool.start()
    try:
        wait_for(lambda: channel.waiting["a"] == 3 and channel.waiting["b"] == 4)
        assert channel.waiting["a"] == 3  # a's limit, though 1 worker is still free
        assert [store.get_job(j).status for j in later] == ["running"] * 4
        channel.gate.set()
        wait_for(lambda: len(channel.sent) == 14)
    finally:
        pool.stop()


def test_each_member_is_answered_in_order_by_a_wide_pool(store_backend: StoreBackend) -> None:
    store = store_backend()
    channel = RecordingChannel()
    pool = WorkerPool(store, _processor(store, channel, "a"), size=32, poll_seconds=0.05)
    for turn in range(5):
        for member in range(12):
            store.enqueue("a", new_job(f"member{member}", NoticeJob(f"{member}:{turn}")))
    pool.start()
    try:
        wait_for(lambda: len(channel.sent) == 60)
    finally:
        pool.stop()
    for member in range(12):
        said = [text for user, text in channel.sent if user == f"member{member}"]
        assert said == [f"{member}:{turn}" for turn in range(5)]


def test_an_idle_pool_claims_once_per_poll_not_once_per_worker(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    pool = WorkerPool(store, _processor(store, RecordingChannel(), "a"), size=64, poll_seconds=0.1)
    pool.start()
    try:
        threading.Event().wait(1.0)
    finally:
        pool.stop()
    # One dispatcher: about 10 claims in a second; 64 polling workers would make ~640.
    assert store.claims <= 30


def test_a_notify_starts_a_new_job_without_waiting_for_the_poll(
    store_backend: StoreBackend,
) -> None:
    store = store_backend()
    channel = RecordingChannel()
    pool = WorkerPool(store, _processor(store, channel, "a"), size=4, poll_seconds=30)
    pool.start()
    try:
        threading.Event().wait(0.2)  # the dispatcher is now waiting out its 30 s poll
        store.enqueue("a", new_job("zhao", NoticeJob("hello")))
        pool.notify()
        wait_for(lambda: channel.sent == [("zhao", "hello")], timeout=5)
    finally:
        pool.stop()
