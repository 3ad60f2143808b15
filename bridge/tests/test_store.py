"""The store suite: dedupe, per-user order, leases, progress, tokens, idempotency keys and the
group commit, run against both backends (SQLite, and a real PostgreSQL server); then what only
SQLite has (its write lock, the free-space floor)."""

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import StoreBackend

from wecom_bridge.errors import IdempotencyConflictError, StoreUnavailableError
from wecom_bridge.jobs.store import Arrival, Conversation, NewJob, SentPart, SqliteStore
from wecom_bridge.wecom.aibot_frames import StreamImage


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def chat(user: str, text: str) -> NewJob:
    return NewJob("chat", user, {"query": text})


def test_dedupe_accepts_once(store_backend: StoreBackend) -> None:
    store = store_backend()
    assert store.accept("app", "msg:1", chat("u", "hi"))
    assert store.accept("app", "msg:1", chat("u", "hi")) is None
    assert store.accept("other-app", "msg:1", chat("u", "hi"))  # keys are per app
    assert store.queue_depth() == 2


def test_dedupe_without_job(store_backend: StoreBackend) -> None:
    store = store_backend()
    assert store.accept("app", "event:u:1:click:", None) == 0
    assert store.accept("app", "event:u:1:click:", None) is None
    assert store.queue_depth() == 0


def test_per_user_order_and_concurrency(store_backend: StoreBackend) -> None:
    store = store_backend()
    for text in ("a1", "a2"):
        store.enqueue("app", chat("alice", text))
    store.enqueue("app", chat("bob", "b1"))
    first = store.claim("w1", 30)
    second = store.claim("w2", 30)
    assert (first.payload["query"], second.payload["query"]) == ("a1", "b1")
    assert store.claim("w3", 30) is None  # alice's a2 waits for a1
    store.finish(first.id)
    third = store.claim("w3", 30)
    assert third.payload["query"] == "a2"


def test_delayed_job_keeps_later_ones_waiting(store_backend: StoreBackend) -> None:
    clock = Clock()
    store = store_backend(clock=clock)
    store.enqueue("app", chat("alice", "a1"))
    store.enqueue("app", chat("alice", "a2"))
    job = store.claim("w", 30)
    store.retry_later(job.id, 10, "send failed", 45009)
    assert store.claim("w", 30) is None
    assert store.next_available_in() == pytest.approx(10)
    clock.now += 11
    assert store.claim("w", 30).payload["query"] == "a1"


def test_next_in_line_is_the_members_following_queued_job(store_backend: StoreBackend) -> None:
    """What a media job's caption window looks at: the same member's next queued job only."""
    store = store_backend()
    first = store.enqueue("app", chat("alice", "image"))
    store.enqueue("app", chat("bob", "b1"))
    store.enqueue("other", chat("alice", "x1"))
    second = store.enqueue("app", chat("alice", "caption"))
    following = store.next_in_line("app", "alice", first)
    assert following is not None and following.id == second
    assert following.payload["query"] == "caption"
    store.finish(second)  # absorbed: finished while still queued, never claimed
    assert store.next_in_line("app", "alice", first) is None
    job = store.claim("w", 30)
    assert job is not None and job.id == first and store.claim("w", 30).payload["query"] == "b1"


def test_expired_lease_requeued(store_backend: StoreBackend) -> None:
    clock = Clock()
    store = store_backend(clock=clock)
    store.enqueue("app", chat("u", "x"))
    job = store.claim("dead-worker", 15)
    clock.now += 10
    store.renew_leases("other-worker", 15)  # renewing someone else's does not save it
    assert store.requeue_expired() == 0
    clock.now += 6
    assert store.requeue_expired() == 1
    again = store.claim("w2", 15)
    assert again.id == job.id and again.attempts == 2


def test_progress_is_kept(store_backend: StoreBackend) -> None:
    store = store_backend()
    job_id = store.enqueue("app", chat("u", "x"))
    store.save_parts(job_id, ["p1", "p2"], {"conversation_id": "c"})
    store.mark_part_sent(job_id, SentPart(1, "msgid-1"))
    job = store.get_job(job_id)
    assert job.parts == ["p1", "p2"] and job.parts_sent == 1
    assert job.result == {"conversation_id": "c", "msgids": ["msgid-1"]}


def test_the_answer_and_its_conversation_are_one_write(store_backend: StoreBackend) -> None:
    store = store_backend()
    job_id = store.enqueue("app", chat("u", "x"))
    store.set_conversation("c", "1", "u", "conv-old")
    store.save_parts(
        job_id, ["p1"], {"message_id": "m"}, conversation=Conversation("c", "1", "u", "conv-new")
    )
    assert store.get_job(job_id).parts == ["p1"]
    assert store.get_conversation("c", "1", "u") == "conv-new"
    assert store.get_conversation("c", "2", "u") == ""


def test_the_last_part_is_marked_with_the_finish(store_backend: StoreBackend) -> None:
    store = store_backend()
    job_id = store.enqueue("app", chat("u", "x"))
    store.save_parts(job_id, ["p1", "p2"], {})
    store.mark_part_sent(job_id, SentPart(1, "msgid-1"))
    last = SentPart(2, "msgid-2", {"invaliduser": "ghost", "invalidtag": ""})
    store.finish(job_id, error="dify: timeout", last_part=last)
    job = store.get_job(job_id)
    assert (job.status, job.parts_sent, job.error) == ("done", 2, "dify: timeout")
    assert job.result == {"msgids": ["msgid-1", "msgid-2"], "invaliduser": "ghost"}


def test_a_part_is_marked_once_however_often_its_write_is_retried(
    store_backend: StoreBackend,
) -> None:
    """A commit that landed but whose reply was lost is written again: the part stays one."""
    store = store_backend()
    job_id = store.enqueue("app", chat("u", "x"))
    store.save_parts(job_id, ["p1", "p2"], {})
    store.mark_part_sent(job_id, SentPart(1, "msgid-1"))
    store.mark_part_sent(job_id, SentPart(1, "msgid-1"))
    store.finish(job_id, last_part=SentPart(2, "msgid-2"))
    store.finish(job_id, last_part=SentPart(2, "msgid-2"))
    job = store.get_job(job_id)
    assert (job.status, job.parts_sent) == ("done", 2)
    assert job.result == {"msgids": ["msgid-1", "msgid-2"]}


def test_a_sent_part_with_a_foreign_field_is_refused(store_backend: StoreBackend) -> None:
    store = store_backend()
    job_id = store.enqueue("app", chat("u", "x"))
    with pytest.raises(ValueError, match="invalidmember"):
        store.finish(job_id, last_part=SentPart(1, "m", {"invalidmember": "x"}))
    assert store.get_job(job_id).status == "queued"  # nothing of the finish was written


def test_conversations_and_tokens(store_backend: StoreBackend) -> None:
    store = store_backend()
    assert store.get_conversation("c", "1", "u") == ""
    store.set_conversation("c", "1", "u", "conv-1")
    store.set_conversation("c", "1", "u", "conv-2")
    assert store.get_conversation("c", "1", "u") == "conv-2"
    assert store.get_conversation("c", "2", "u") == ""
    store.forget_conversation("c", "1", "u")
    assert store.get_conversation("c", "1", "u") == ""
    store.put_token("k", "tok", 123.0)
    assert store_backend().get_token("k") == ("tok", 123.0)  # persisted across instances
    store.drop_token("k", "older-tok")  # replaced meanwhile: kept
    assert store.get_token("k") == ("tok", 123.0)
    store.drop_token("k", "tok")
    assert store.get_token("k") is None


def test_sweep_expires_old_keys_and_jobs(store_backend: StoreBackend) -> None:
    clock = Clock()
    store = store_backend(clock=clock)
    store.accept("app", "msg:old", chat("u", "x"))
    store.finish(store.claim("w", 30).id)
    clock.now += 100
    store.accept("app", "msg:new", None)
    assert store.sweep(dedupe_ttl=50, job_retention=50) == (1, 1)
    assert store.accept("app", "msg:old", None) == 0  # a key past its TTL is new again


def send(text: str) -> NewJob:
    return NewJob("send", "zhangsan", {"touser": "zhangsan", "content": text})


def test_idempotency_key_queues_once_across_restarts_until_swept(
    store_backend: StoreBackend,
) -> None:
    clock = Clock()
    store = store_backend(clock=clock)
    job_id, replayed = store.enqueue_once("app", send("hi"), "key-1", "fp-hi")
    assert not replayed
    assert store_backend(clock=clock).enqueue_once("app", send("hi"), "key-1", "fp-hi") == (
        job_id,
        True,
    )
    with pytest.raises(IdempotencyConflictError) as conflict:
        store.enqueue_once("app", send("other"), "key-1", "fp-other")
    assert conflict.value.job_id == job_id
    assert store.queue_depth() == 1  # neither the replay nor the conflict queued anything
    clock.now += 100
    assert store.sweep(dedupe_ttl=50, job_retention=50) == (1, 0)  # the job is still queued
    new_id, replayed = store.enqueue_once("app", send("hi"), "key-1", "fp-hi")
    assert (new_id != job_id, replayed) == (True, False)  # a key past its TTL is new again


def test_idempotency_key_repeat_answered_below_the_free_space_floor(tmp_path: Path) -> None:
    job_id, _ = SqliteStore(tmp_path).enqueue_once("app", send("hi"), "key-3", "fp")
    full = SqliteStore(tmp_path, min_free_bytes=2**62)  # no disk has that much free
    assert full.enqueue_once("app", send("hi"), "key-3", "fp") == (job_id, True)
    with pytest.raises(StoreUnavailableError):
        full.enqueue_once("app", send("new"), "key-4", "fp-new")
    assert full.queue_depth() == 1


def test_idempotency_key_under_concurrent_requests(store_backend: StoreBackend) -> None:
    store_backend()  # schema first
    results: list[tuple[int, bool]] = []

    def request() -> None:  # each request on its own connection, as each web thread has
        results.append(store_backend().enqueue_once("app", send("hi"), "key-2", "fp"))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({job_id for job_id, _ in results}) == 1
    assert sorted(replayed for _, replayed in results) == [False] + [True] * 7
    assert store_backend().queue_depth() == 1


def test_locked_database_refuses_within_timeout(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, busy_timeout=0.2)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError):
            store.accept("app", "msg:1", chat("u", "x"))
    finally:
        blocker.execute("ROLLBACK")
    assert store.accept("app", "msg:1", chat("u", "x"))  # recovers once the lock is gone


def test_concurrent_claims_never_double_claim(store_backend: StoreBackend) -> None:
    store = store_backend()
    for n in range(60):
        store.enqueue("app", chat(f"user{n % 20}", str(n)))
    claimed: list[int] = []
    lock = threading.Lock()

    def drain(name: str) -> None:
        while True:
            job = store.claim(name, 30)
            if job is None:
                if store.queue_depth() == 0:
                    return
                continue
            with lock:
                claimed.append(job.id)
            store.finish(job.id)

    threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 60


def test_group_commit_many_concurrent_callbacks(store_backend: StoreBackend) -> None:
    from wecom_bridge.jobs.intake import GroupCommitter

    store = store_backend()
    committer = GroupCommitter(store)
    results: list[int | None] = []
    lock = threading.Lock()

    def deliver(n: int) -> None:
        # every key delivered twice, concurrently: exactly one of each pair is new
        result = committer.accept("app", f"msg:{n // 2}", chat(f"u{n}", "x"))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 200
    assert results.count(None) == 100
    assert store.queue_depth() == 100


def test_group_commit_reports_store_failure(tmp_path: Path) -> None:
    from wecom_bridge.jobs.intake import GroupCommitter

    store = SqliteStore(tmp_path, busy_timeout=0.2)
    committer = GroupCommitter(store)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError):
            committer.accept("app", "msg:1", chat("u", "x"))
    finally:
        blocker.execute("ROLLBACK")
    assert committer.accept("app", "msg:1", chat("u", "x"))


def test_group_commit_hands_any_failure_to_the_waiters(store_backend: StoreBackend) -> None:
    """An error that is not the store's own (here: a payload JSON cannot hold) must reach the
    waiting callback as a 503, not kill the committer and leave every later callback hanging."""
    from wecom_bridge.jobs.intake import GroupCommitter

    store = store_backend()
    committer = GroupCommitter(store)
    with pytest.raises(StoreUnavailableError, match="commit failed: TypeError"):
        committer.accept("app", "msg:1", NewJob("chat", "u", {"query": object()}))
    assert committer.accept("app", "msg:2", chat("u", "x"))  # the committer still works


def test_group_commit_waits_a_bounded_time(tmp_path: Path) -> None:
    from wecom_bridge.jobs.intake import GroupCommitter

    store = SqliteStore(tmp_path, busy_timeout=5.0)
    committer = GroupCommitter(store, wait_seconds=0.3)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailableError, match=r"did not finish within 0\.3 s"):
            committer.accept("app", "msg:1", chat("u", "x"))
    finally:
        blocker.execute("ROLLBACK")
    assert time.monotonic() - started < 2.0


def test_an_exclusive_role_has_one_holder_at_a_time(store_backend: StoreBackend) -> None:
    """E.g. the AI bot's long connection: one bridge holds it, another takes it over."""
    first, second = store_backend().exclusive("aibot"), store_backend().exclusive("aibot")
    assert first.try_acquire() and first.held()
    assert first.try_acquire()  # already held: still the holder
    assert not second.try_acquire() and not second.held()
    other = store_backend().exclusive("another-role")
    assert other.try_acquire()  # one holder per name
    first.release()
    assert not first.held()
    assert second.try_acquire() and second.held()
    second.release()
    other.release()


def test_an_exclusive_role_is_free_once_its_holder_process_died(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from wecom_bridge.jobs.store import SqliteStore\n"
            "lock = SqliteStore(pathlib.Path(sys.argv[1])).exclusive('aibot')\n"
            "assert lock.try_acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    mine = SqliteStore(tmp_path).exclusive("aibot")
    assert not mine.try_acquire()
    holder.kill()
    holder.wait(10)
    assert mine.try_acquire()
    mine.release()


def test_a_kf_page_and_its_cursor_are_stored_together_or_not_at_all(
    store_backend: StoreBackend,
) -> None:
    store = store_backend()
    arrival = Arrival("kf", "kf:msg1", chat("kf:wk1:wm1", "问"))
    assert store.kf_cursor("kf", "wk1") is None  # never pulled
    with pytest.raises(StoreUnavailableError):  # the cursor write fails inside the transaction
        store.accept_pulled("kf", "wk1", None, [arrival])  # type: ignore[arg-type]
    assert store.jobs() == [] and store.kf_cursor("kf", "wk1") is None
    assert store.accept_pulled("kf", "wk1", "c1", [arrival])[0]
    assert store.accept_pulled("kf", "wk1", "c2", [arrival]) == [None]  # deduplicated by msgid
    assert store.kf_cursor("kf", "wk1") == "c2" and len(store.jobs()) == 1
    assert store.kf_cursor("kf", "wk2") is None  # per kf account


def test_an_ai_bot_stream_is_shared_until_finished_and_its_response_url_used_once(
    store_backend: StoreBackend,
) -> None:
    """The webhook mode: the job side writes the stream, the web side (another store, as
    another process) answers WeCom's refreshes from it; response_url may be called once."""
    clock = Clock()
    writer, reader = store_backend(clock=clock), store_backend(clock=clock)
    assert reader.get_stream("bot", "s1") is None
    writer.save_stream("bot", "s1", "半", finished=False)
    partial = reader.get_stream("bot", "s1")
    assert partial is not None and (partial.content, partial.finished) == ("半", False)
    assert partial.images == ()
    image = StreamImage.of(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    writer.save_stream("bot", "s1", "半个回答", finished=True, images=[image])
    writer.save_stream("bot", "s1", "不该出现", finished=False)  # a finished stream stays
    done = reader.get_stream("bot", "s1")
    assert done is not None and (done.content, done.finished) == ("半个回答", True)
    assert done.images == (image,)  # the finish and its images in the same write
    assert not done.response_url_used
    assert reader.use_response_url("bot", "s1")
    assert not writer.use_response_url("bot", "s1")  # once, whichever process asks
    assert writer.use_response_url("bot", "s2")  # a stream not written yet: claimed too
    assert reader.get_stream("other-bot", "s1") is None  # per app
    clock.now += 100
    writer.save_stream("bot", "s3", "新", finished=False)
    writer.sweep(dedupe_ttl=50, job_retention=50)
    assert reader.get_stream("bot", "s1") is None and reader.get_stream("bot", "s3") is not None


def test_a_store_of_an_older_release_gains_the_streams_images_column(tmp_path: Path) -> None:
    """The streams table shipped without `images`: CREATE TABLE IF NOT EXISTS leaves it so,
    and the store adds the column (PostgreSQL: migration 5) instead of failing every finish."""
    data = tmp_path / "store"
    data.mkdir()
    with sqlite3.connect(data / "bridge.sqlite3") as old:
        old.execute(
            "CREATE TABLE streams (app TEXT NOT NULL, stream_id TEXT NOT NULL,"
            " content TEXT NOT NULL, finished INTEGER NOT NULL DEFAULT 0,"
            " response_url_used INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL,"
            " PRIMARY KEY (app, stream_id))"
        )
        old.execute("INSERT INTO streams VALUES ('bot', 'old', '旧的', 1, 0, 1.0)")
    store = SqliteStore(data)
    kept = store.get_stream("bot", "old")
    assert kept is not None and (kept.content, kept.images) == ("旧的", ())
    image = StreamImage.of(b"\xff\xd8\xff" + b"\0" * 64)
    store.save_stream("bot", "new", "新的", finished=True, images=[image])
    assert SqliteStore(data).get_stream("bot", "new").images == (image,)  # type: ignore[union-attr]
    store.close()


def test_a_long_connections_report_is_its_holders_latest(store_backend: StoreBackend) -> None:
    clock = Clock()
    first, second = store_backend(clock=clock), store_backend(clock=clock)
    assert first.link_states() == []
    first.set_link_state("aibot:b1", "owner-1", "connecting", "wss://example")
    first.set_link_state("aibot:b1", "owner-1", "subscribed", "")
    clock.now += 5
    second.set_link_state("aibot:b2", "owner-2", "auth_failed", "errcode 40058")
    (b1, b2) = second.link_states()
    assert (b1.name, b1.owner, b1.state, b1.detail) == ("aibot:b1", "owner-1", "subscribed", "")
    assert b1.updated_at == 1_000_000.0 and b2.updated_at == 1_000_005.0
    second.set_link_state("aibot:b1", "owner-3", "subscribed", "")  # taken over
    assert [s.owner for s in first.link_states()] == ["owner-3", "owner-2"]
