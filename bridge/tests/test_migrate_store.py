"""`wecom-bridge migrate-store`: a SQLite store moves into PostgreSQL with its queue, progress,
keys, conversations and tokens, once however often it runs, and a bridge on PostgreSQL then
finishes what the old one left."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import wait_for, wecom_state

from wecom_bridge.cli import main
from wecom_bridge.config import load_config
from wecom_bridge.jobs.kinds import ChatJob, NoticeJob, new_job
from wecom_bridge.jobs.postgres_store import PostgresStore
from wecom_bridge.jobs.store import SentPart, SqliteStore
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.server import ServerThread


@pytest.fixture
def old_store(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """What a bridge on one server leaves when it is stopped mid-work."""
    data = tmp_path / "old-data"
    store = SqliteStore(data)
    ids = {
        "done": store.enqueue_once(
            "default", new_job("wang", NoticeJob("已发送")), "idem-1", "fp-1"
        )[0],
    }
    store.finish(store.claim("old-bridge", 15).id)
    store.accept("default", "msg:answered-already", None)
    ids["half_sent"] = store.accept("default", "msg:half", new_job("zhao", NoticeJob("p1p2")))
    job = store.claim("old-bridge", 15)  # running when the bridge was stopped
    store.save_parts(job.id, ["第一部分", "第二部分"], {"conversation_id": "c-9"})
    store.mark_part_sent(job.id, SentPart(1, "msgid-1"))
    ids["queued"] = store.accept("default", "msg:queued", new_job("qian", ChatJob("还没答", "")))
    store.set_conversation("wwtestcorp0001", "1000002", "zhao", "conv-zhao")
    store.put_token("wwtestcorp0001:abc", "token-1", 2_000_000_000.0)
    store.close()
    return data, ids


def run(data: Path, url: str, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    monkeypatch.setenv("BRIDGE_DATABASE_URL", url)
    return main(["migrate-store", "--data-dir", str(data), *extra])


def test_everything_moves_once(
    old_store: tuple[Path, dict[str, int]],
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, _ = old_store
    assert run(data, postgres_url, monkeypatch) == 0
    assert "copied to PostgreSQL: jobs 3, dedupe 3, send_keys 1, conversations 1, tokens 1" in (
        capsys.readouterr().out
    )
    store = PostgresStore(postgres_url)
    done, half, queued = store.jobs()
    assert (done.status, half.status, queued.status) == ("done", "queued", "queued")
    assert (half.parts, half.parts_sent, half.attempts) == (["第一部分", "第二部分"], 1, 1)
    assert half.result == {"conversation_id": "c-9", "msgids": ["msgid-1"]}
    # WeCom's redeliveries stay dropped; a repeated send API request is still the same job.
    assert store.accept("default", "msg:half", None) is None
    assert store.accept("default", "msg:answered-already", None) is None
    replay = new_job("wang", NoticeJob("已发送"))
    assert store.enqueue_once("default", replay, "idem-1", "fp-1") == (done.id, True)
    assert store.get_conversation("wwtestcorp0001", "1000002", "zhao") == "conv-zhao"
    assert store.get_token("wwtestcorp0001:abc") == ("token-1", 2_000_000_000.0)

    assert run(data, postgres_url, monkeypatch) == 0  # again: nothing twice
    assert "jobs 0, dedupe 0, send_keys 0, conversations 0, tokens 0" in capsys.readouterr().out
    assert len(store.jobs()) == 3
    store.close()


def test_refuses_while_the_old_bridge_works(
    old_store: tuple[Path, dict[str, int]],
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, _ = old_store
    SqliteStore(data).heartbeat("old-bridge-job-process")
    assert run(data, postgres_url, monkeypatch) == 1
    assert "is running" in capsys.readouterr().err
    assert run(data, postgres_url, monkeypatch, "--dry-run", "--force") == 0
    assert "found in" in capsys.readouterr().out
    assert PostgresStore(postgres_url).jobs() == []  # the dry run wrote nothing


def test_wrong_or_missing_target_is_a_usage_error(
    old_store: tuple[Path, dict[str, int]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, _ = old_store
    monkeypatch.delenv("BRIDGE_DATABASE_URL", raising=False)
    assert main(["migrate-store", "--data-dir", str(data)]) == 2
    assert "BRIDGE_DATABASE_URL is not set" in capsys.readouterr().err
    assert run(data, "mysql://root:hunter2@db/bridge", monkeypatch) == 2
    err = capsys.readouterr().err
    assert "must be a postgresql:// URL" in err and "hunter2" not in err


def test_a_bridge_on_postgresql_finishes_what_the_old_one_left(
    old_store: tuple[Path, dict[str, int]],
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    bridge_env: dict[str, str],
    wecom_double: ServerThread,
) -> None:
    data, _ = old_store
    assert run(data, postgres_url, monkeypatch) == 0
    app = create_app(load_config({**bridge_env, "BRIDGE_DATABASE_URL": postgres_url}))
    try:
        wait_for(lambda: wecom_state(wecom_double).messages_for("qian"), 30)
        wait_for(lambda: wecom_state(wecom_double).messages_for("zhao"), 30)
        zhao = wecom_state(wecom_double).messages_for("zhao")
        assert [m["text"]["content"] for m in zhao] == ["第二部分"]  # the first was sent before
    finally:
        app.extensions["wecom_bridge"].pool.stop()
