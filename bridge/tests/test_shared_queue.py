"""Several bridges on one PostgreSQL (issue 14): one queue, per-member order across bridges,
NOTIFY wake-ups, leases taken over, dedupe across bridges, one token refresh, shared pacing,
migrations applied once, and the database going away and coming back.

Each "bridge" is a whole bridge app (callbacks, group commit, its own worker pool and
connection pool) on a real loopback server; they share only the database, as on two hosts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from conftest import AppSecrets, BridgeProcess, FakeClock, dify_state, wait_for, wecom_state

from wecom_bridge.config import load_config
from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.kinds import ChatJob, new_job
from wecom_bridge.jobs.postgres_store import (
    SCHEMA_VERSION,
    JobNotifications,
    PostgresStore,
    SharedSendPacing,
    migrate,
)
from wecom_bridge.jobs.store import NewJob
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.postgres import ThrowawayPostgres
from wecom_bridge.testing.redelivery import (
    Deliverer,
    WeComRetry,
    answer_texts,
    make_messages,
    tally,
    wait_for_answers,
)
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.wecom.api import WeComClient


def chat(user: str, text: str) -> NewJob:
    return new_job(user, ChatJob(text, ""))


class Bridges:
    """Two bridge apps on one database, each with its own data dir, pools and workers."""

    def __init__(self, env: dict[str, str], tmp_path: Path, count: int = 2) -> None:
        self.servers: list[ServerThread] = []
        for n in range(count):
            config = load_config({**env, "BRIDGE_DATA_DIR": str(tmp_path / f"bridge-{n}")})
            self.servers.append(ServerThread(create_app(config)).__enter__())

    def runtime(self, n: int):
        return self.servers[n].app.extensions["wecom_bridge"]

    def jobs_done(self, n: int) -> float:
        return self.runtime(n).metrics.value("wecom_bridge_jobs_total", {"status": "done"})

    def close(self) -> None:
        for server in self.servers:
            server.app.extensions["wecom_bridge"].pool.stop()
            server.__exit__(None, None, None)


@pytest.fixture
def bridges(bridge_env: dict[str, str], postgres_url: str, tmp_path: Path) -> Iterator[Bridges]:
    pair = Bridges({**bridge_env, "BRIDGE_DATABASE_URL": postgres_url}, tmp_path)
    yield pair
    pair.close()


def clients(bridges: Bridges, secrets: AppSecrets) -> list[CallbackClient]:
    return [
        CallbackClient(f"{s.url}/wxcomapp", secrets.crypto(), secrets.agent_id)
        for s in bridges.servers
    ]


# --- the queue across bridges -------------------------------------------------------------------


def test_a_burst_spread_over_two_bridges_is_answered_once_each_by_both(
    bridges: Bridges, secrets: AppSecrets, wecom_double: ServerThread
) -> None:
    messages = make_messages(secrets.crypto(), secrets.agent_id, "burst", 60)
    outcomes = []
    for n, server in enumerate(bridges.servers):
        deliverer = Deliverer(f"{server.url}/wxcomapp", concurrency=8)
        outcomes += deliverer.deliver_all(messages[n::2])
    counts = tally(outcomes, wait_for_answers(wecom_double.url, outcomes, timeout=60, settle=1))
    print(f"two bridges, one PostgreSQL: {counts.line()}")
    assert (counts.acknowledged, counts.answered, counts.duplicates, counts.lost) == (60, 60, 0, 0)
    # NOTIFY woke both job sides: each answered some of the other one's callbacks' share.
    assert bridges.jobs_done(0) > 0 and bridges.jobs_done(1) > 0
    assert bridges.jobs_done(0) + bridges.jobs_done(1) == 60


def test_a_members_messages_are_answered_in_order_across_bridges(
    bridges: Bridges, secrets: AppSecrets, wecom_double: ServerThread
) -> None:
    dify = clients(bridges, secrets)
    for n in range(8):  # alternating bridges, each acknowledged before the next is sent
        for member in ("alice", "bob"):
            assert dify[n % 2].send_text(member, f"{member} question {n}").status_code == 200
    wait_for(
        lambda: all(len(wecom_state(wecom_double).messages_for(m)) == 8 for m in ("alice", "bob")),
        60,
    )
    texts = answer_texts(wecom_state(wecom_double).snapshot())
    for member in ("alice", "bob"):
        asked = [f"{member} question {n}" for n in range(8)]
        assert [next(q for q in asked if q in t) for t in texts[member]] == asked


def test_a_redelivery_landing_on_the_other_bridge_is_dropped(
    bridges: Bridges, secrets: AppSecrets, wecom_double: ServerThread
) -> None:
    message = make_messages(secrets.crypto(), secrets.agent_id, "redelivered", 1)[0]
    statuses = [
        Deliverer(f"{server.url}/wxcomapp").post_once(message) for server in bridges.servers * 2
    ]
    assert statuses == [200] * 4
    wait_for(lambda: wecom_state(wecom_double).messages_for(message.user), 30)
    time.sleep(1.5)  # a duplicate answer would be sent by now
    assert len(wecom_state(wecom_double).messages_for(message.user)) == 1
    assert len(bridges.runtime(0).store.jobs()) == 1


def test_notify_wakes_another_bridges_job_side(postgres_url: str) -> None:
    woken: list[int] = []
    listener = JobNotifications(postgres_url, woken.append)
    listener.start()
    try:
        assert listener.listening.wait(10)
        woken.clear()  # the wake-up every (re)connect gives
        other_bridge = PostgresStore(postgres_url)
        other_bridge.accept_many([])  # nothing stored: nobody is woken
        other_bridge.enqueue("app", chat("u", "x"))
        wait_for(lambda: woken == [1], 5)
        other_bridge.close()
    finally:
        listener.close()


def test_claims_skip_a_job_another_bridge_is_claiming(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    first = store.enqueue("app", chat("alice", "a1"))
    store.enqueue("app", chat("alice", "a2"))
    store.enqueue("app", chat("bob", "b1"))
    with psycopg.connect(postgres_url) as other, other.transaction():
        # Another bridge's claim of alice's first job, not yet committed.
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first,))
        started = time.monotonic()
        job = store.claim("bridge-b", 15)
        assert time.monotonic() - started < 1.0  # did not wait for the other bridge
        assert job is not None and job.payload["query"] == "b1"  # never alice's a2
        assert store.claim("bridge-b", 15) is None
    store.close()


def test_a_dead_bridges_job_resumes_on_another_after_its_lease(
    bridge_env: dict[str, str], postgres_url: str, tmp_path: Path, wecom_double: ServerThread
) -> None:
    dead = PostgresStore(postgres_url)
    dead.enqueue("default", chat("zhao", "被中断的问题"))
    assert dead.claim("dead-bridge", 1.0) is not None  # claimed, then the host vanished
    dead.close()
    survivor = Bridges({**bridge_env, "BRIDGE_DATABASE_URL": postgres_url}, tmp_path, count=1)
    try:
        survivor.runtime(0).pool.heartbeat_seconds = 0.2  # housekeeping finds the lease soon
        wait_for(lambda: wecom_state(wecom_double).messages_for("zhao"), 30)
        # The answer is sent before its job is marked done: wait for the mark too.
        (job,) = wait_for(lambda: survivor.runtime(0).store.jobs("done"), 30)
        assert job.attempts == 2 and len(wecom_state(wecom_double).messages_for("zhao")) == 1
    finally:
        survivor.close()


# --- what the bridges share besides the queue -------------------------------------------------


def test_one_token_refresh_for_all_bridges(
    postgres_url: str, secrets: AppSecrets, wecom_double: ServerThread
) -> None:
    stores = [PostgresStore(postgres_url) for _ in range(3)]  # three hosts' pools
    wecoms = [
        WeComClient(
            api_base=wecom_double.url,
            corp_id=secrets.corp_id,
            secret=secrets.secret,
            token_cache=store,
        )
        for store in stores
    ]
    tokens: list[str] = []
    threads = [
        threading.Thread(target=lambda w=w: tokens.append(w.access_token()))
        for w in wecoms
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(tokens) == 12 and len(set(tokens)) == 1
    assert wecom_state(wecom_double).gettoken_calls == 1
    for store in stores:
        store.close()


def test_the_exclusive_role_moves_when_its_holders_connection_dies(postgres_url: str) -> None:
    """The AI bot's long connection: the bridge holding it loses its database session (host
    gone, network cut) and the next bridge to try takes over; the old holder sees it lost it."""
    holder = PostgresStore(postgres_url).exclusive("aibot")
    waiting = PostgresStore(postgres_url).exclusive("aibot")
    assert holder.try_acquire() and not waiting.try_acquire()
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'wecom-bridge-lead' AND datname = current_database()"
        )
    assert not holder.held()
    assert waiting.try_acquire() and waiting.held()
    waiting.release()


def test_send_pacing_is_shared_by_all_bridges(postgres_url: str) -> None:
    clock = FakeClock()
    pacers = [SharedSendPacing(PostgresStore(postgres_url, clock=clock)) for _ in range(2)]
    waits = [pacers[n % 2].reserve_all(["zhangsan"]) for n in range(30)]
    assert waits == [0.0] * 30  # 30 a minute, whichever bridge sends
    assert pacers[0].reserve_all(["zhangsan"]) == pytest.approx(60.0)
    assert pacers[1].reserve_all(["lisi"]) == 0.0  # per member
    clock.now += 61
    assert pacers[1].reserve_all(["zhangsan"]) == pytest.approx(0.0)


def test_migrations_apply_once_when_bridges_start_together(postgres_url: str) -> None:
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def start_bridge() -> None:
        try:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                applied.append(migrate(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_bridge) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert sorted(applied) == [[]] * 5 + [list(range(1, SCHEMA_VERSION + 1))]
    with psycopg.connect(postgres_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


# --- the database going away ------------------------------------------------------------------


def test_database_restart_503_then_reconnect_without_restart(
    bridge_env: dict[str, str],
    postgres_server: ThrowawayPostgres,
    postgres_url: str,
    secrets: AppSecrets,
    wecom_double: ServerThread,
) -> None:
    env = {**bridge_env, "BRIDGE_DATABASE_URL": postgres_url, "BRIDGE_DB_BUSY_TIMEOUT": "0.5"}
    bridge = Bridges(env, Path(bridge_env["BRIDGE_DATA_DIR"]), count=1)
    callbacks = clients(bridge, secrets)[0]
    try:
        assert callbacks.send_text("qian", "before").status_code == 200
        postgres_server.stop()
        try:
            started = time.monotonic()
            assert callbacks.send_text("qian", "while down").status_code == 503
            assert time.monotonic() - started < 4.5  # within WeCom's 5 s
            assert requests.get(f"{bridge.servers[0].url}/readyz", timeout=10).status_code == 503
        finally:
            postgres_server.start()
        # Same pools, no restart: WeCom's delivery (retried 1 s apart) is taken once the
        # pools have reconnected.
        (after,) = make_messages(secrets.crypto(), secrets.agent_id, "after-restart", 1)
        deliverer = Deliverer(f"{bridge.servers[0].url}/wxcomapp", retry=WeComRetry(interval=1))
        assert deliverer.deliver(after)[-1] == 200
        wait_for(lambda: wecom_state(wecom_double).messages_for(after.user), 30)
        # "before" may have been mid-answer when the database went: retried, answered once.
        wait_for(lambda: wecom_state(wecom_double).messages_for("qian"), 30)
        time.sleep(1.0)
        assert len(wecom_state(wecom_double).messages_for("qian")) == 1
    finally:
        bridge.close()


def test_store_calls_fail_fast_while_the_server_is_down(
    postgres_server: ThrowawayPostgres, postgres_url: str
) -> None:
    store = PostgresStore(postgres_url, busy_timeout=0.5)
    store.check_open()
    postgres_server.stop()
    try:
        with pytest.raises(StoreUnavailableError, match="PostgreSQL"):
            store.accept("app", "msg:1", chat("u", "x"))
        with pytest.raises(StoreUnavailableError):
            store.claim("w", 15)
    finally:
        postgres_server.start()
    assert store.accept("app", "msg:1", chat("u", "x"))
    store.close()


def test_kill9_of_one_serving_bridge_the_other_finishes_its_jobs(
    bridge_env: dict[str, str],
    postgres_url: str,
    tmp_path: Path,
    secrets: AppSecrets,
    wecom_double: ServerThread,
    dify_double: ServerThread,
) -> None:
    """Two `wecom-bridge serve` processes (gunicorn, job process, LISTEN); one is killed -9
    while its workers hold jobs: their leases run out and the other bridge answers them."""
    dify_state(dify_double).delay = 1.5  # the kill lands while answers are being prepared
    env = {**bridge_env, "BRIDGE_DATABASE_URL": postgres_url}
    doomed = BridgeProcess({**env, "BRIDGE_DATA_DIR": str(tmp_path / "a")}).start()
    survivor = BridgeProcess({**env, "BRIDGE_DATA_DIR": str(tmp_path / "b")}).start()
    try:
        messages = make_messages(secrets.crypto(), secrets.agent_id, "kill9", 16)
        outcomes = Deliverer(f"{doomed.url}/wxcomapp").deliver_all(messages)
        doomed.kill9()
        answered_before = len(wecom_state(wecom_double).snapshot())
        dify_state(dify_double).delay = 0.0
        records = wait_for_answers(wecom_double.url, outcomes, timeout=60, settle=1)
    finally:
        log = survivor.stop()
    counts = tally(outcomes, records)
    print(f"kill -9 of one of two bridges: {counts.line()}")
    assert answered_before < 16, "the kill came too late to test anything"
    assert (counts.acknowledged, counts.answered, counts.duplicates, counts.lost) == (
        16,
        16,
        0,
        0,
    ), log
