"""What a member receives for each way Dify answers, through the whole bridge (real HTTP in,
the Dify double behaving like Dify's server, message/send at the WeCom double)."""

from __future__ import annotations

import time

from conftest import dify_state, wait_for, wecom_state

from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.server import ServerThread

FALLBACK = "抱歉，知识库暂时无法回答，请稍后再试。"


def texts_to(wecom_double: ServerThread, user: str) -> list[str]:
    sent = wecom_state(wecom_double).snapshot()
    return [m["text"]["content"] for m in sent if m["touser"] == user]


def posts(dify_double: ServerThread) -> list[dict]:
    return [r for r in dify_state(dify_double).snapshot() if r["method"] == "POST"]


def test_paused_workflow_tells_the_member_and_logs_the_run(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread, caplog
) -> None:
    state = dify_state(dify_double)
    state.mode = "workflow"
    state.workflow_status_next("paused")
    callbacks.send_text("wangwu", "请审批我的报销")
    wait_for(lambda: texts_to(wecom_double, "wangwu"), timeout=20)
    (text,) = texts_to(wecom_double, "wangwu")
    assert "人工处理" in text
    (run_id,) = state.workflow_runs
    assert any(getattr(r, "workflow_run_id", None) == run_id for r in caplog.records)


def test_failed_workflow_gives_the_fallback(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    state = dify_state(dify_double)
    state.mode = "workflow"
    state.workflow_status_next("failed")
    callbacks.send_text("zhaoliu", "跑一下")
    wait_for(lambda: texts_to(wecom_double, "zhaoliu"), timeout=20)
    assert texts_to(wecom_double, "zhaoliu") == [FALLBACK]
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
