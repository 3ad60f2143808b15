"""Exactly once under contention for SQLite's write lock (issue 18, point 11): a write that
records what WeCom accepted is never given up, and the web side's group commit lets the job
side take the lock. The load test itself is bench/bench_exactly_once.py (numbers in
docs/benchmarks.md)."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from conftest import RecordingChannel, plain_app, wait_for

from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.kinds import NoticeJob, new_job
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import TURNS_DIR, SentPart, SqliteStore
from wecom_bridge.jobs.workers import WorkerPool
from wecom_bridge.metrics import Metrics


def hold_write_lock(path: Path, seconds: float, locked: threading.Event) -> None:
    """Another process's writer holding the lock (a raw connection, like a long commit)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    locked.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


def test_part_sent_write_outlasting_the_busy_timeout_is_retried_not_resent(
    tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    store = SqliteStore(tmp_path, busy_timeout=0.1, takes_turns=True)
    job_id = store.enqueue("default", new_job("zhao", NoticeJob("一条通知")))
    job = store.claim("w1", 15)
    assert job is not None and job.id == job_id
    store.save_parts(job_id, ["一条通知"], {})
    job = store.get_job(job_id)
    locked = threading.Event()

    class LockAfterSend(RecordingChannel):
        def send_part(self, target, text):  # WeCom accepts, then the lock is taken away
            result = super().send_part(target, text)
            threading.Thread(
                target=hold_write_lock, args=(store.path, 0.6, locked), daemon=True
            ).start()
            locked.wait(5)
            return result

    channel = LockAfterSend()
    processor = JobProcessor(store, {"default": AppRuntime(plain_app(), None, channel)}, Metrics())
    processor.process(job)  # the old processor raised StoreUnavailableError here
    done = store.get_job(job_id)
    assert (done.status, done.parts_sent) == ("done", 1)
    assert channel.sent == [("zhao", "一条通知")]
    retries = [r for r in caplog.records if getattr(r, "event", "") == "record_retry"]
    assert retries and retries[0].what.startswith("part 1 sent")  # with the finish


def test_job_writer_announces_its_turn_while_it_waits(tmp_path: Path) -> None:
    job_side = SqliteStore(tmp_path, busy_timeout=2.0, takes_turns=True)
    web_side = SqliteStore(tmp_path)
    job_id = job_side.enqueue("default", new_job("li", NoticeJob("x")))
    assert not web_side.writers_waiting()
    locked = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(job_side.path, 0.4, locked))
    holder.start()
    locked.wait(5)
    writer = threading.Thread(target=job_side.mark_part_sent, args=(job_id, SentPart(1, "m1")))
    writer.start()
    time.sleep(0.1)
    assert web_side.writers_waiting()  # the job side waits for the lock and says so
    started = time.monotonic()
    web_side.yield_turn(max_wait=2.0)  # the committer lets it go first
    writer.join(5)
    holder.join(5)
    assert 0.1 < time.monotonic() - started < 1.0
    assert not web_side.writers_waiting()
    assert job_side.get_job(job_id).parts_sent == 1


def test_the_committer_waits_for_the_writers_it_found_not_for_later_ones(tmp_path: Path) -> None:
    """Writers that keep announcing (here two job-side stores, each with its own lock, so one is
    always waiting while the other writes; one store's threads announce one at a time) do not hold
    the callbacks: the committer used to wait until none was announced, i.e. its whole bound."""
    job_sides = [SqliteStore(tmp_path, busy_timeout=2.0, takes_turns=True) for _ in range(2)]
    web_side = SqliteStore(tmp_path)
    job_id = job_sides[0].enqueue("default", new_job("li", NoticeJob("x")))
    stop = threading.Event()
    writes = 0

    def busy_job_side(store: SqliteStore) -> None:
        nonlocal writes
        while not stop.is_set():
            store.mark_part_sent(job_id, SentPart(1, "m1"))
            writes += 1

    writers = [threading.Thread(target=busy_job_side, args=(store,)) for store in job_sides]
    for writer in writers:
        writer.start()
    try:
        while not web_side.writers_waiting():
            time.sleep(0.001)
        started = time.monotonic()
        web_side.yield_turn(max_wait=10.0)
        waited = time.monotonic() - started
    finally:
        stop.set()
        for writer in writers:
            writer.join(5)
    assert writes > 0
    assert waited < 5.0, f"the committer waited {waited:.1f} s for later writers"


def test_stale_turn_marks_are_ignored_and_the_wait_is_bounded(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    turns = tmp_path / TURNS_DIR
    turns.mkdir()
    mark = turns / "12345-1"
    mark.touch()
    started = time.monotonic()
    store.yield_turn(max_wait=0.05)  # a live-looking mark (a crashed writer's): bounded
    assert time.monotonic() - started < 0.5
    old = time.time() - 3600
    os.utime(mark, (old, old))
    assert not store.writers_waiting()


def test_job_dropped_after_a_store_error_is_resumed_not_stuck(tmp_path: Path) -> None:
    """A store error in the middle of a job leaves it to its lease; the pool must stop renewing
    that lease (it used to renew every lease of a live worker, so the job stayed `running` for
    ever and its member was never answered: 2 of 20,000 in the load test)."""
    store = SqliteStore(tmp_path)

    class FlakyOnce(RecordingChannel):
        failed = False

        def send_part(self, target, text):
            if not self.failed:
                self.failed = True
                raise StoreUnavailableError("database is locked")
            return super().send_part(target, text)

    channel = FlakyOnce()
    processor = JobProcessor(store, {"default": AppRuntime(plain_app(), None, channel)}, Metrics())
    pool = WorkerPool(store, processor, size=1, lease_seconds=0.5, heartbeat_seconds=0.1)
    pool.poll_seconds = 0.05
    job_id = store.enqueue("default", new_job("qian", NoticeJob("你好")))
    pool.start()
    try:
        wait_for(lambda: store.get_job(job_id).status == "done", timeout=10)
    finally:
        pool.stop()
    assert channel.sent == [("qian", "你好")]
