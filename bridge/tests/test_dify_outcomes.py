"""What a member receives for each way Dify answers, through the whole bridge (real HTTP in,
the Dify double behaving like Dify's server, message/send at the WeCom double)."""

from __future__ import annotations

import time

import pytest
from conftest import dify_state, wait_for, wecom_state

from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.server import ServerThread

FALLBACK = "抱歉，知识库暂时无法回答，请稍后再试。"


def texts_to(wecom_double: ServerThread, user: str) -> list[str]:
    sent = wecom_state(wecom_double).snapshot()
    return [m["text"]["content"] for m in sent if m["touser"] == user]


def posts(dify_double: ServerThread) -> list[dict]:
    return [r for r in dify_state(dify_double).snapshot() if r["method"] == "POST"]


def workflow_answer(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread, status: str
) -> list[str]:
    """What a member receives from a workflow app whose run ends with `status`."""
    state = dify_state(dify_double)
    state.mode = "workflow"
    state.workflow_status_next(status)
    callbacks.send_text(f"member-{status}", "请审批我的报销")
    wait_for(lambda: texts_to(wecom_double, f"member-{status}"), timeout=20)
    return texts_to(wecom_double, f"member-{status}")


def test_paused_workflow_tells_the_member_and_logs_the_run(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread, caplog
) -> None:
    (text,) = workflow_answer(callbacks, wecom_double, dify_double, "paused")
    assert "人工处理" in text
    (run_id,) = dify_state(dify_double).workflow_runs
    assert any(getattr(r, "workflow_run_id", None) == run_id for r in caplog.records)


@pytest.mark.parametrize("status", ["failed", "stopped"])
def test_failed_or_stopped_workflow_gives_the_fallback(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread, status: str
) -> None:
    assert workflow_answer(callbacks, wecom_double, dify_double, status) == [FALLBACK]
    assert len(posts(dify_double)) == 1


def test_broken_stream_answer_reaches_the_member_once(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    dify_state(dify_double).cut_next()
    callbacks.send_text("qianqi", "断了吗")
    wait_for(lambda: texts_to(wecom_double, "qianqi"), timeout=20)
    time.sleep(0.5)
    assert texts_to(wecom_double, "qianqi") == ["Dify double answer: 断了吗"]
    assert len(posts(dify_double)) == 1


def test_reasoning_never_reaches_the_member(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    dify_state(dify_double).reasoning = "先分析用户的问题：……"
    callbacks.send_text("sunba", "几点下班")
    wait_for(lambda: texts_to(wecom_double, "sunba"), timeout=20)
    assert texts_to(wecom_double, "sunba") == ["Dify double answer: 几点下班"]


def test_conversation_id_dify_refuses_starts_a_new_one(
    callbacks: CallbackClient, wecom_double: ServerThread, bridge: ServerThread, secrets
) -> None:
    store = bridge.app.extensions["wecom_bridge"].store
    store.set_conversation(secrets.corp_id, secrets.agent_id, "zhoujiu", "not-a-uuid")
    callbacks.send_text("zhoujiu", "还记得我吗")
    wait_for(lambda: texts_to(wecom_double, "zhoujiu"), timeout=20)
    assert texts_to(wecom_double, "zhoujiu") == ["Dify double answer: 还记得我吗"]
    new_id = store.get_conversation(secrets.corp_id, secrets.agent_id, "zhoujiu")
    assert new_id and new_id != "not-a-uuid"
