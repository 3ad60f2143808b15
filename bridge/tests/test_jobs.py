"""Typed jobs and routing: payloads round-trip, survive version skew, and fail cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import AppSecrets, dify_state, wait_for, wecom_state

from wecom_bridge.channels.base import InboundKind, InboundMessage
from wecom_bridge.channels.proactive import parse_send_request
from wecom_bridge.config import Replies, load_config
from wecom_bridge.errors import JobPayloadError
from wecom_bridge.jobs.kinds import (
    PAYLOAD_VERSION,
    ChatJob,
    NoticeJob,
    ResetJob,
    SendJob,
    decode,
    encode,
    new_job,
)
from wecom_bridge.jobs.routing import route
from wecom_bridge.jobs.store import NewJob, SqliteStore
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.server import ServerThread


def _send_job() -> SendJob:
    request, _ = parse_send_request({"touser": "a|b", "msgtype": "markdown", "content": "**x**"})
    return SendJob(request)


@pytest.mark.parametrize(
    "spec",
    [ChatJob("年假怎么请？", "1001"), ResetJob("1002"), NoticeJob("欢迎", "", ""), _send_job()],
    ids=["chat", "reset", "notice", "send"],
)
def test_every_kind_round_trips_with_its_version(spec: object) -> None:
    kind, payload = encode(spec)  # type: ignore[arg-type]
    assert payload["v"] == PAYLOAD_VERSION
    assert decode(kind, payload) == spec


def test_a_payload_from_before_versioning_still_runs() -> None:
    # What 0.1.0 stored for a chat and a send job: no "v", the same fields.
    assert decode("chat", {"query": "hi", "msg_id": "7"}) == ChatJob("hi", "7")
    legacy_send = {"touser": "a", "toparty": "", "totag": "", "msgtype": "text", "content": "x"}
    assert decode("send", legacy_send) == SendJob(parse_send_request(legacy_send)[0])


def test_fields_of_a_newer_release_are_ignored() -> None:
    newer = {"v": PAYLOAD_VERSION + 1, "query": "hi", "msg_id": "7", "attachments": [1]}
    assert decode("chat", newer) == ChatJob("hi", "7")
    kind, payload = encode(_send_job())
    assert decode(kind, {**payload, "v": 99, "media": "m1"}) == _send_job()


@pytest.mark.parametrize(
    ("kind", "payload", "problem"),
    [
        ("telepathy", {"v": 1}, "unknown job kind"),
        ("chat", {"v": 1}, "'query' is missing"),
        ("chat", {"v": 1, "query": 42}, "'query' is not a string"),
        ("notice", {"v": 1, "text": ""}, "'text' is missing"),
        ("send", {"v": 1, "touser": "a", "msgtype": "fax", "content": "x"}, "msgtype"),
    ],
)
def test_unreadable_payloads_are_typed_errors(
    kind: str, payload: dict[str, object], problem: str
) -> None:
    with pytest.raises(JobPayloadError, match=problem):
        decode(kind, payload)


def _message(kind: InboundKind, text: str = "", msg_type: str = "text") -> InboundMessage:
    return InboundMessage("default", "zhangsan", kind, "k", text, "m1", msg_type)


def test_routing_rules_live_in_the_pipeline() -> None:
    replies = Replies(welcome_text="欢迎")
    assert route(_message(InboundKind.TEXT, "  问题 "), replies) == ChatJob("问题", "m1")
    assert route(_message(InboundKind.TEXT, "新对话"), replies) == ResetJob("m1")
    assert route(_message(InboundKind.TEXT, "   "), replies) is None
    assert route(_message(InboundKind.ENTER, msg_type="event"), replies) == NoticeJob("欢迎")
    assert route(_message(InboundKind.ENTER, msg_type="event"), Replies()) is None
    assert route(_message(InboundKind.EVENT, msg_type="event"), replies) is None
    unsupported = route(_message(InboundKind.UNSUPPORTED, msg_type="image"), replies)
    assert unsupported == NoticeJob(Replies().unsupported_reply, "m1", "image")
    assert route(_message(InboundKind.UNSUPPORTED), Replies(unsupported_reply="")) is None


def test_new_job_is_the_stores_row() -> None:
    assert new_job("lisi", ResetJob("9")) == NewJob("reset", "lisi", {"v": 1, "msg_id": "9"})


def test_an_unreadable_job_fails_alone_and_the_member_is_not_blocked(
    bridge_env: dict[str, str],
    secrets: AppSecrets,
    wecom_double: ServerThread,
    dify_double: ServerThread,
) -> None:
    """A job of a kind (or shape) this release cannot read is failed, never retried, and the
    member's later messages are answered."""
    store = SqliteStore(Path(bridge_env["BRIDGE_DATA_DIR"]))
    broken = store.enqueue("default", NewJob("telepathy", "wangwu", {"v": 9}))
    bad_chat = store.enqueue("default", NewJob("chat", "wangwu", {"v": 1, "query": 7}))
    fine = store.enqueue("default", new_job("wangwu", ChatJob("还在吗")))
    app = create_app(load_config(bridge_env))
    try:
        wait_for(lambda: store.get_job(fine).status == "done", timeout=20)
    finally:
        app.extensions["wecom_bridge"].pool.stop()
    assert store.get_job(broken).status == "failed"
    assert "unknown job kind 'telepathy'" in store.get_job(broken).error
    assert store.get_job(bad_chat).status == "failed"
    assert [m["touser"] for m in wecom_state(wecom_double).snapshot()] == ["wangwu"]
    assert (
        len([r for r in dify_state(dify_double).requests if "query" in (r.get("json") or {})]) == 1
    )
