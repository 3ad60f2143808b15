"""The bridge end to end on loopback: real HTTP in, real HTTP out to the WeCom and Dify doubles."""

from __future__ import annotations

import concurrent.futures
import time

import requests
from conftest import AppSecrets, dify_state, wait_for, wecom_state

from wecom_bridge.config import load_config
from wecom_bridge.jobs.store import FreeSpaceFloor
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.callbacks import (
    CallbackClient,
    build_text_callback,
    build_url_verification,
)
from wecom_bridge.testing.server import ServerThread


def sent_texts(wecom_double: ServerThread, user: str | None = None) -> list[str]:
    return [
        m["text"]["content"]
        for m in wecom_state(wecom_double).snapshot()
        if user is None or m.get("touser") == user
    ]


def job_states(bridge: ServerThread) -> list:
    return bridge.app.extensions["wecom_bridge"].store.jobs()


# --- URL verification ------------------------------------------------------------------------


def test_url_verification_returns_plaintext_only(callbacks: CallbackClient) -> None:
    resp = callbacks.verify_url("1616140317555161061")
    assert resp.status_code == 200
    assert resp.content == b"1616140317555161061"
    assert resp.headers["Content-Type"].startswith("text/plain")


def test_url_verification_forged_and_missing(bridge: ServerThread, secrets: AppSecrets) -> None:
    params = build_url_verification(secrets.crypto(), "123")
    forged = {**params, "msg_signature": "0" * 40}
    assert requests.get(f"{bridge.url}/wxcomapp", params=forged, timeout=5).status_code == 403
    del params["echostr"]
    assert requests.get(f"{bridge.url}/wxcomapp", params=params, timeout=5).status_code == 400


# --- messages ---------------------------------------------------------------------------------


def test_text_message_is_answered_through_message_send(
    callbacks: CallbackClient, wecom_double: ServerThread, secrets: AppSecrets
) -> None:
    resp = callbacks.send_text("zhangsan", "年假怎么请？")
    assert resp.status_code == 200 and resp.content == b""
    wait_for(lambda: sent_texts(wecom_double))
    (message,) = wecom_state(wecom_double).snapshot()
    assert message["touser"] == "zhangsan"
    assert str(message["agentid"]) == secrets.agent_id
    assert "年假怎么请？" in message["text"]["content"]


def test_redeliveries_produce_one_dify_call_and_one_answer(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    # WeCom redelivers the same MsgId up to three more times; some overlap in flight.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(
            pool.map(
                lambda _: callbacks.send_text("lisi", "你好", msg_id="77001").status_code, range(4)
            )
        )
    assert codes == [200] * 4
    wait_for(lambda: sent_texts(wecom_double))
    time.sleep(1.0)  # give a wrongly queued duplicate the time to show up
    assert len(sent_texts(wecom_double)) == 1
    assert (
        len([r for r in dify_state(dify_double).requests if "query" in (r.get("json") or {})]) == 1
    )


def test_forged_or_foreign_callbacks_are_refused_and_not_stored(
    bridge: ServerThread, secrets: AppSecrets
) -> None:
    url = f"{bridge.url}/wxcomapp"
    params, body = build_text_callback(
        secrets.crypto(), from_user="u", content="x", msg_id="1", agent_id=secrets.agent_id
    )
    forged = {**params, "msg_signature": "f" * 40}
    assert requests.post(url, params=forged, data=body, timeout=5).status_code == 403
    other = AppSecrets(corp_id="wwothercorp").crypto()
    p2, b2 = build_text_callback(
        other, from_user="u", content="x", msg_id="2", agent_id=secrets.agent_id
    )
    assert requests.post(url, params=p2, data=b2, timeout=5).status_code == 403
    assert requests.post(url, params=params, data=b"<xml><nope", timeout=5).status_code == 400
    big = b"<xml><Encrypt>" + b"A" * 70_000 + b"</Encrypt></xml>"
    assert requests.post(url, params=params, data=big, timeout=5).status_code == 413
    assert job_states(bridge) == []


def test_per_user_order_kept(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    dify_state(dify_double).delay = 0.2
    for n in range(5):
        callbacks.send_text("wangwu", f"问题{n}")
        callbacks.send_text("zhaoliu", f"question {n}")
    wait_for(lambda: len(sent_texts(wecom_double)) == 10, timeout=30)
    for user, prefix in (("wangwu", "问题"), ("zhaoliu", "question ")):
        answers = sent_texts(wecom_double, user)
        order = [next(n for n in range(5) if f"{prefix}{n}" in a) for a in answers]
        assert order == [0, 1, 2, 3, 4]


def test_long_answer_split_in_order(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    long_answer = "".join(f"第{n}段：企业微信知识库回答。\n\n" for n in range(200))
    dify_state(dify_double).set_answer(long_answer)
    callbacks.send_text("chenqi", "长一点")
    wait_for(lambda: job_states_done(callbacks), timeout=20)
    parts = sent_texts(wecom_double, "chenqi")
    assert len(parts) > 1
    assert all(len(p.encode()) <= 2048 for p in parts)
    assert "".join(parts) == long_answer.strip()


def job_states_done(callbacks: CallbackClient) -> bool:
    status = requests.get(callbacks.url.replace("/wxcomapp", "/readyz"), timeout=5).json()
    return status["queue_depth"] == 0


def test_dify_failure_gives_fallback(
    callbacks: CallbackClient,
    wecom_double: ServerThread,
    dify_double: ServerThread,
    bridge: ServerThread,
) -> None:
    dify_state(dify_double).fail_next(500, "internal_server_error", "boom", times=10)
    callbacks.send_text("sunba", "还在吗")
    wait_for(lambda: sent_texts(wecom_double, "sunba"), timeout=20)
    assert sent_texts(wecom_double, "sunba") == ["抱歉，知识库暂时无法回答，请稍后再试。"]
    wait_for(lambda: job_states(bridge)[0].status == "done")  # marked done just after the send
    (job,) = job_states(bridge)
    assert job.status == "done" and job.error.startswith("dify:")


def test_stale_conversation_starts_new_one(
    callbacks: CallbackClient,
    wecom_double: ServerThread,
    bridge: ServerThread,
    secrets: AppSecrets,
) -> None:
    store = bridge.app.extensions["wecom_bridge"].store
    store.set_conversation(secrets.corp_id, secrets.agent_id, "zhoujiu", "gone-conversation")
    callbacks.send_text("zhoujiu", "hello again")
    wait_for(lambda: sent_texts(wecom_double, "zhoujiu"))
    assert "hello again" in sent_texts(wecom_double, "zhoujiu")[0]
    new_id = store.get_conversation(secrets.corp_id, secrets.agent_id, "zhoujiu")
    assert new_id and new_id != "gone-conversation"


def test_conversation_reused_then_reset(
    callbacks: CallbackClient,
    wecom_double: ServerThread,
    bridge: ServerThread,
    dify_double: ServerThread,
    secrets: AppSecrets,
) -> None:
    store = bridge.app.extensions["wecom_bridge"].store
    callbacks.send_text("wu", "first")
    wait_for(lambda: len(sent_texts(wecom_double, "wu")) == 1)
    first = store.get_conversation(secrets.corp_id, secrets.agent_id, "wu")
    callbacks.send_text("wu", "second")
    wait_for(lambda: len(sent_texts(wecom_double, "wu")) == 2)
    assert store.get_conversation(secrets.corp_id, secrets.agent_id, "wu") == first
    sent_ids = [
        r["json"].get("conversation_id")
        for r in dify_state(dify_double).requests
        if (r.get("json") or {}).get("query") == "second"
    ]
    assert sent_ids == [first]
    callbacks.send_text("wu", "新对话")
    wait_for(lambda: len(sent_texts(wecom_double, "wu")) == 3)
    assert sent_texts(wecom_double, "wu")[2] == "好的，已开始新的对话。"
    assert store.get_conversation(secrets.corp_id, secrets.agent_id, "wu") == ""


def test_token_expiry_refreshes_and_delivers(
    callbacks: CallbackClient, wecom_double: ServerThread
) -> None:
    callbacks.send_text("zheng", "one")
    wait_for(lambda: len(sent_texts(wecom_double, "zheng")) == 1)
    wecom_state(wecom_double).expire_tokens()
    callbacks.send_text("zheng", "two")
    wait_for(lambda: len(sent_texts(wecom_double, "zheng")) == 2)
    assert wecom_state(wecom_double).gettoken_calls == 2


def test_untrusted_ip_keeps_job_until_fixed(
    callbacks: CallbackClient, wecom_double: ServerThread, bridge: ServerThread
) -> None:
    wecom_state(wecom_double).fail_next("gettoken", 60020)
    callbacks.send_text("feng", "are you there")
    wait_for(lambda: any(j.errcode == 60020 for j in job_states(bridge)))
    (job,) = job_states(bridge)
    assert job.status == "queued"  # kept for a retry, not lost
    wait_for(lambda: sent_texts(wecom_double, "feng"), timeout=30)


def test_unsupported_type_and_welcome(
    callbacks: CallbackClient, wecom_double: ServerThread, secrets: AppSecrets
) -> None:
    from wecom_bridge.testing.callbacks import build_callback

    params, body = build_callback(
        secrets.crypto(),
        {
            "ToUserName": secrets.corp_id,
            "FromUserName": "chu",
            "CreateTime": 1700000000,
            "MsgType": "video",  # images, files and voice go to Dify (test_media_in.py)
            "MediaId": "m",
            "ThumbMediaId": "t",
            "MsgId": "880001",
            "AgentID": secrets.agent_id,
        },
    )
    assert callbacks.post(params, body).status_code == 200
    callbacks.send_event("chu", "enter_agent")
    wait_for(lambda: len(sent_texts(wecom_double, "chu")) == 2)
    assert sent_texts(wecom_double, "chu") == [
        "暂时不支持这类消息，请换一种方式提问。",
        "欢迎使用知识库助手",
    ]


def test_store_unavailable_answers_503_then_redelivery_accepted(
    callbacks: CallbackClient, wecom_double: ServerThread, bridge: ServerThread
) -> None:
    import sqlite3

    store = bridge.app.extensions["wecom_bridge"].store
    blocker = sqlite3.connect(store.path, isolation_level=None, timeout=5)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        resp = callbacks.send_text("han", "locked", msg_id="990001")
        assert resp.status_code == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert callbacks.send_text("han", "locked", msg_id="990001").status_code == 200
    wait_for(lambda: sent_texts(wecom_double, "han"))
    assert len(sent_texts(wecom_double, "han")) == 1


def test_low_disk_space_refuses_new_work_until_space_returns(
    callbacks: CallbackClient, wecom_double: ServerThread, bridge: ServerThread
) -> None:
    store = bridge.app.extensions["wecom_bridge"].store
    real_floor = store.space
    # The real free space of the test's data dir, with the floor set just above it.
    store.space = FreeSpaceFloor(real_floor.directory, real_floor.free_bytes() + 2**30)
    resp = callbacks.send_text("lowdisk", "disk full?", msg_id="990002")
    assert resp.status_code == 503
    ready = requests.get(f"{bridge.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert "BRIDGE_MIN_FREE_MB" in ready.json()["db"]
    assert not sent_texts(wecom_double, "lowdisk")

    store.space = real_floor  # space is back: WeCom's redelivery is taken
    assert requests.get(f"{bridge.url}/readyz", timeout=5).status_code == 200
    assert callbacks.send_text("lowdisk", "disk full?", msg_id="990002").status_code == 200
    wait_for(lambda: sent_texts(wecom_double, "lowdisk"))
    assert len(sent_texts(wecom_double, "lowdisk")) == 1


def test_unusable_data_dir_at_start_is_not_fatal(
    bridge_env: dict[str, str], secrets: AppSecrets, wecom_double: ServerThread, tmp_path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir's parent should be")
    env = {**bridge_env, "BRIDGE_DATA_DIR": str(blocker / "data")}
    app = create_app(load_config(env))
    try:
        with ServerThread(app) as server:
            client = CallbackClient(f"{server.url}/wxcomapp", secrets.crypto(), secrets.agent_id)
            assert client.send_text("nodisk", "stored?", msg_id="990003").status_code == 503
            assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 503

            blocker.unlink()  # the operator fixes the volume
            (blocker / "data").mkdir(parents=True)
            wait_for(lambda: requests.get(f"{server.url}/readyz", timeout=5).status_code == 200)
            assert client.send_text("nodisk", "stored?", msg_id="990003").status_code == 200
            wait_for(lambda: sent_texts(wecom_double, "nodisk"))
    finally:
        app.extensions["wecom_bridge"].pool.stop()


def test_health_ready_metrics(
    callbacks: CallbackClient, bridge: ServerThread, wecom_double: ServerThread
) -> None:
    assert requests.get(f"{bridge.url}/healthz", timeout=5).text == "ok"
    ready = requests.get(f"{bridge.url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "db": "writable", "workers": True, "queue_depth": 0}
    callbacks.send_text("metrics-user", "hi", msg_id="555")
    callbacks.send_text("metrics-user", "hi", msg_id="555")
    wait_for(lambda: sent_texts(wecom_double))
    text = requests.get(f"{bridge.url}/metrics", timeout=5).text
    assert 'wecom_bridge_callbacks_total{outcome="accepted"} 1' in text
    assert "wecom_bridge_duplicates_total 1" in text
    assert "wecom_bridge_dify_latency_seconds_count" in text
    assert "wecom_bridge_token_refreshes_total 1" in text
