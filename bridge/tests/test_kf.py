"""微信客服 (kf) end to end on loopback: the kf double's callbacks in, its sync_msg pulled,
answers through its send_msg — the bridge's stored cursor, dedupe, windows and hand-over."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
from conftest import AppSecrets, BridgeProcess, dify_state, wait_for
from test_chat_page import chromium

from wecom_bridge.cli import main
from wecom_bridge.config import load_config
from wecom_bridge.errors import ConfigError
from wecom_bridge.jobs.store import Store
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.callbacks import build_callback, build_url_verification
from wecom_bridge.testing.dify_double import create_dify_double
from wecom_bridge.testing.kf_double import DEFAULT_ACCOUNT, KfCallback, KfDoubleState
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.testing.wecom_double import create_wecom_double
from wecom_bridge.wecom.crypto import WeComCrypto

KF_SECRET = "test-kf-secret-not-real"
KF_TOKEN = "KfToken456"
KF_AES_KEY = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut"
CUSTOMER = "wmCUSTOMER0001"


@pytest.fixture
def kf_state(secrets: AppSecrets) -> KfDoubleState:
    return KfDoubleState(corp_id=secrets.corp_id, secret=KF_SECRET)


@pytest.fixture
def kf_wecom(secrets: AppSecrets, kf_state: KfDoubleState) -> Iterator[ServerThread]:
    app = create_wecom_double(
        corp_id=secrets.corp_id, secret=secrets.secret, agent_id=secrets.agent_id, kf=kf_state
    )
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def kf_dify(secrets: AppSecrets) -> Iterator[ServerThread]:
    with ServerThread(create_dify_double(api_key=secrets.dify_key)) as server:
        yield server


@pytest.fixture
def kf_env(
    tmp_path: Path, secrets: AppSecrets, kf_wecom: ServerThread, kf_dify: ServerThread
) -> dict[str, str]:
    return {
        "WECOM_CORP_ID": secrets.corp_id,
        "WECOM_AGENT_ID": secrets.agent_id,
        "WECOM_SECRET": secrets.secret,
        "WECOM_TOKEN": secrets.token,
        "WECOM_ENCODING_AES_KEY": secrets.aes_key,
        "WECOM_API_BASE": kf_wecom.url,
        "WECOM_KF_SECRET": KF_SECRET,
        "WECOM_KF_TOKEN": KF_TOKEN,
        "WECOM_KF_ENCODING_AES_KEY": KF_AES_KEY,
        "WECOM_KF_WELCOME_TEXT": "您好，我是知识库助手。",
        "DIFY_API_BASE": f"{kf_dify.url}/v1",
        "DIFY_API_KEY": secrets.dify_key,
        "DIFY_BACKOFF": "0.05",
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
    }


class Bridge:
    """The bridge in-process on loopback, restartable on the same data dir."""

    def __init__(self, env: dict[str, str], kf: KfDoubleState) -> None:
        self.env, self.kf = env, kf
        self.server: ServerThread | None = None

    def start(self) -> Bridge:
        app = create_app(load_config(self.env))
        self.server = ServerThread(app).start()
        self.kf.callback = KfCallback(f"{self.server.url}/wxcomkf", KF_TOKEN, KF_AES_KEY)
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.server.app.extensions["wecom_bridge"].pool.stop()
        self.server.stop()
        self.server = None

    @property
    def store(self) -> Store:
        assert self.server is not None
        return self.server.app.extensions["wecom_bridge"].store


@pytest.fixture
def bridge(kf_env: dict[str, str], kf_state: KfDoubleState) -> Iterator[Bridge]:
    running = Bridge(kf_env, kf_state).start()
    yield running
    if running.server is not None:
        running.stop()


def say(kf: KfDoubleState, text: str, user: str = CUSTOMER) -> int | None:
    """The customer writes; WeCom signals the bridge. The callback's HTTP status."""
    _, token = kf.customer_says(user, text)
    return kf.signal(None, token)


def received(kf: KfDoubleState, user: str = CUSTOMER) -> list[str]:
    with kf.lock:
        return [m["text"]["content"] for m in kf.sent if m["touser"] == user]


def answer(text: str) -> str:
    return f"Dify double answer: {text}"


# --- the callback -----------------------------------------------------------------------------


def test_kf_callback_url_verification_and_forgery(bridge: Bridge, secrets: AppSecrets) -> None:
    assert bridge.server is not None
    url = f"{bridge.server.url}/wxcomkf"
    crypto = WeComCrypto(KF_TOKEN, KF_AES_KEY, secrets.corp_id)
    params = build_url_verification(crypto, "4711")
    assert requests.get(url, params=params, timeout=5).content == b"4711"
    # Signed with the app's token instead of the kf's: refused, nothing stored.
    wrong = WeComCrypto(secrets.token, secrets.aes_key, secrets.corp_id)
    fields: dict[str, str | int] = {
        "MsgType": "event",
        "Event": "kf_msg_or_event",
        "Token": "ENCx",
        "OpenKfId": DEFAULT_ACCOUNT,
    }
    params, body = build_callback(wrong, fields)
    assert requests.post(url, params=params, data=body, timeout=5).status_code == 403
    assert bridge.store.jobs() == []


def test_redelivered_callback_stores_one_pull(bridge: Bridge, kf_state: KfDoubleState) -> None:
    _, token = kf_state.customer_says(CUSTOMER, "年假怎么请？")
    assert kf_state.signal(None, token) == 200
    assert kf_state.signal(None, token) == 200  # WeCom's redelivery: same Token
    wait_for(lambda: received(kf_state))
    pulls = [j for j in bridge.store.jobs() if j.kind == "kf_pull"]
    assert len(pulls) == 1
    assert received(kf_state) == [answer("年假怎么请？")]


def post_kf_callback(bridge: Bridge, corp_id: str, fields: dict[str, str | int]) -> int:
    assert bridge.server is not None
    crypto = WeComCrypto(KF_TOKEN, KF_AES_KEY, corp_id)
    params, body = build_callback(crypto, fields)
    url = f"{bridge.server.url}/wxcomkf"
    return requests.post(url, params=params, data=body, timeout=5).status_code


def test_callback_without_open_kfid_pulls_every_account(
    bridge: Bridge, kf_state: KfDoubleState, secrets: AppSecrets
) -> None:
    # Older kf callbacks carry only the Token (doc 94670's sample has no OpenKfId).
    _, token = kf_state.customer_says(CUSTOMER, "没有账号的回调")
    fields: dict[str, str | int] = {"MsgType": "event", "Event": "kf_msg_or_event", "Token": token}
    assert post_kf_callback(bridge, secrets.corp_id, fields) == 200
    wait_for(lambda: received(kf_state))
    assert received(kf_state) == [answer("没有账号的回调")]
    assert bridge.store.kf_cursor("kf", "")


def test_the_bound_apps_own_events_are_acknowledged_and_dropped(
    bridge: Bridge, secrets: AppSecrets
) -> None:
    fields: dict[str, str | int] = {"MsgType": "event", "Event": "enter_agent", "FromUserName": "u"}
    assert post_kf_callback(bridge, secrets.corp_id, fields) == 200
    assert bridge.store.jobs() == []


def test_a_kf_only_bridge_needs_none_of_the_self_built_apps_variables(
    kf_env: dict[str, str], kf_state: KfDoubleState
) -> None:
    only_kf = {
        k: v
        for k, v in kf_env.items()
        if k not in ("WECOM_AGENT_ID", "WECOM_SECRET", "WECOM_TOKEN", "WECOM_ENCODING_AES_KEY")
    }
    assert load_config(only_kf).apps == ()
    bridge = Bridge(only_kf, kf_state).start()
    try:
        assert bridge.server is not None
        assert requests.get(f"{bridge.server.url}/wxcomapp", timeout=5).status_code == 404
        assert say(kf_state, "只有客服") == 200
        wait_for(lambda: received(kf_state))
        assert received(kf_state) == [answer("只有客服")]
    finally:
        bridge.stop()


# --- the pull ---------------------------------------------------------------------------------


def test_burst_of_five_answered_in_order_exactly_once(
    bridge: Bridge, kf_state: KfDoubleState, kf_dify: ServerThread
) -> None:
    questions = [f"问题{n}" for n in range(1, 6)]
    tokens = [kf_state.customer_says(CUSTOMER, q)[1] for q in questions]
    for token in tokens:  # all five written before the first callback arrives
        assert kf_state.signal(None, token) == 200
    wait_for(lambda: len(received(kf_state)) == 5)
    time.sleep(0.5)  # the later pulls find nothing new
    assert received(kf_state) == [answer(q) for q in questions]
    users = {r["json"].get("user") for r in dify_state(kf_dify).snapshot() if r.get("json")}
    assert users == {f"kf:{DEFAULT_ACCOUNT}:{CUSTOMER}"}  # never a bare external userid


def test_has_more_is_followed_and_the_cursor_survives_a_restart(
    kf_env: dict[str, str], kf_state: KfDoubleState
) -> None:
    kf_state.page_size = 2  # WeCom may hand out fewer than asked: pages of 2
    bridge = Bridge(kf_env, kf_state).start()
    try:
        tokens = [kf_state.customer_says(CUSTOMER, f"第{n}问")[1] for n in range(5)]
        assert kf_state.signal(None, tokens[-1]) == 200
        wait_for(lambda: len(received(kf_state)) == 5)
        cursor = bridge.store.kf_cursor("kf", DEFAULT_ACCOUNT)
        assert cursor
    finally:
        bridge.stop()
    bridge.start()  # same data dir: the cursor is where the last pull stopped
    try:
        assert say(kf_state, "重启后的问题") == 200
        wait_for(lambda: len(received(kf_state)) == 6)
        time.sleep(0.3)
        assert received(kf_state)[-1] == answer("重启后的问题")
        assert len(received(kf_state)) == 6  # nothing pulled twice
    finally:
        bridge.stop()


def test_empty_store_starts_now_not_with_three_days_of_history(
    kf_env: dict[str, str], kf_state: KfDoubleState
) -> None:
    with kf_state.lock:  # a question from yesterday, when no bridge listened
        kf_state.log[DEFAULT_ACCOUNT] = [
            {
                "msgid": "old-1",
                "open_kfid": DEFAULT_ACCOUNT,
                "external_userid": CUSTOMER,
                "send_time": int(time.time()) - 86400,
                "origin": 3,
                "msgtype": "text",
                "text": {"content": "昨天的问题"},
            }
        ]
    bridge = Bridge(kf_env, kf_state).start()
    try:
        assert say(kf_state, "今天的问题") == 200
        wait_for(lambda: received(kf_state))
        time.sleep(0.3)
        assert received(kf_state) == [answer("今天的问题")]
        pull = next(j for j in bridge.store.jobs() if j.kind == "kf_pull")
        assert pull.result and pull.result["skipped_history"] == 1
    finally:
        bridge.stop()


def test_a_first_pull_resumed_after_a_failure_still_skips_the_history(
    kf_env: dict[str, str], kf_state: KfDoubleState
) -> None:
    old = int(time.time()) - 86400
    with kf_state.lock:
        kf_state.log[DEFAULT_ACCOUNT] = [
            {
                "msgid": f"old-{n}",
                "open_kfid": DEFAULT_ACCOUNT,
                "external_userid": CUSTOMER,
                "send_time": old,
                "origin": 3,
                "msgtype": "text",
                "text": {"content": f"旧问题{n}"},
            }
            for n in range(3)
        ]
    kf_state.page_size = 1
    kf_state.fail_next("sync_msg", 0, -1)  # the first page lands, the second fails
    bridge = Bridge(kf_env, kf_state).start()
    try:
        assert say(kf_state, "新问题") == 200
        wait_for(lambda: received(kf_state), timeout=20)
        time.sleep(0.3)
        assert received(kf_state) == [answer("新问题")]
    finally:
        bridge.stop()


def test_history_start_answers_the_backlog(kf_env: dict[str, str], kf_state: KfDoubleState) -> None:
    kf_state.customer_says(CUSTOMER, "没人听到的问题")
    bridge = Bridge({**kf_env, "WECOM_KF_START": "history"}, kf_state).start()
    try:
        assert say(kf_state, "新问题") == 200
        wait_for(lambda: len(received(kf_state)) == 2)
        assert received(kf_state) == [answer("没人听到的问题"), answer("新问题")]
    finally:
        bridge.stop()


def test_expired_pull_token_pulls_without_it(bridge: Bridge, kf_state: KfDoubleState) -> None:
    kf_state.customer_says(CUSTOMER, "令牌过期了")
    with kf_state.lock:
        token = kf_state._pull_token()
        kf_state.pull_tokens[token] = 0.0  # expired before the pull ran
    assert kf_state.signal(None, token) == 200
    wait_for(lambda: received(kf_state))
    assert received(kf_state) == [answer("令牌过期了")]
    assert kf_state.stats()["sync_calls_without_token"] >= 1


def test_sync_failure_retries_the_pull_without_losing_messages(
    bridge: Bridge, kf_state: KfDoubleState
) -> None:
    kf_state.fail_next("sync_msg", -1)  # WeCom busy once
    assert say(kf_state, "系统繁忙时的问题") == 200
    wait_for(lambda: received(kf_state), timeout=20)
    assert received(kf_state) == [answer("系统繁忙时的问题")]


# --- answers, windows, welcome --------------------------------------------------------------------


def test_welcome_on_enter_session_through_send_msg_on_event(
    bridge: Bridge, kf_state: KfDoubleState
) -> None:
    _, token = kf_state.customer_enters(CUSTOMER)
    assert kf_state.signal(None, token) == 200
    wait_for(lambda: received(kf_state))
    with kf_state.lock:
        assert kf_state.sent[0]["welcome"] is True
    assert received(kf_state) == ["您好，我是知识库助手。"]


def test_window_used_up_is_recorded_not_retried(bridge: Bridge, kf_state: KfDoubleState) -> None:
    _, token = kf_state.customer_says(CUSTOMER, "窗口用完了吗？")
    with kf_state.lock:  # five messages already went out since the customer last wrote
        kf_state.sessions[(DEFAULT_ACCOUNT, CUSTOMER)].sent_since = 5
    assert kf_state.signal(None, token) == 200
    failed = wait_for(lambda: bridge.store.jobs("failed"))
    assert failed[0].kind == "chat" and failed[0].errcode == 95001
    assert "5 messages within 48 hours" in (failed[0].error or "")
    assert failed[0].attempts == 1  # not retried blindly
    assert received(kf_state) == []
    with kf_state.lock:
        assert [r["errcode"] for r in kf_state.refused] == [95001]


def test_a_long_answer_is_cut_to_the_five_messages_wecom_takes(
    bridge: Bridge, kf_state: KfDoubleState, kf_dify: ServerThread
) -> None:
    dify_state(kf_dify).set_answer("很长的回答。" * 2000)  # 36 KB: 18 parts of 2048 bytes
    assert say(kf_state, "全部告诉我") == 200
    wait_for(lambda: len(received(kf_state)) == 5)
    time.sleep(0.5)
    parts = received(kf_state)
    assert len(parts) == 5 and parts[-1].endswith("其余部分未能发送）")
    assert not bridge.store.jobs("failed")
    with kf_state.lock:
        assert kf_state.refused == []  # the sixth message was never tried


# --- hand-over --------------------------------------------------------------------------------


def test_handover_then_silence_then_bot_again(bridge: Bridge, kf_state: KfDoubleState) -> None:
    assert say(kf_state, "转人工") == 200
    wait_for(lambda: kf_state.session_of(CUSTOMER).state == 2)
    assert received(kf_state) == ["好的，正在为您转接人工客服，请稍候。"]
    kf_state.servicer_action(CUSTOMER, "take")
    assert say(kf_state, "人工在吗？") == 200  # a human holds the session: the bot is silent
    wait_for(lambda: any(j.kind == "kf_pull" and j.status == "done" for j in bridge.store.jobs()))
    time.sleep(0.5)
    assert len(received(kf_state)) == 1
    assert not [j for j in bridge.store.jobs() if j.kind == "chat"]
    kf_state.servicer_action(CUSTOMER, "end")  # the session returns: the next one is the bot's
    assert say(kf_state, "还有一个问题") == 200
    wait_for(lambda: len(received(kf_state)) == 2)
    assert received(kf_state)[-1] == answer("还有一个问题")


def test_messages_after_a_handover_in_the_same_pull_stay_unanswered(
    bridge: Bridge, kf_state: KfDoubleState
) -> None:
    kf_state.customer_says(CUSTOMER, "人工")
    assert say(kf_state, "快点") == 200
    wait_for(lambda: kf_state.session_of(CUSTOMER).state == 2)
    time.sleep(0.3)
    assert received(kf_state) == ["好的，正在为您转接人工客服，请稍候。"]
    assert not [j for j in bridge.store.jobs() if j.kind == "chat"]  # not even asked


def test_conversation_per_customer_and_reset(bridge: Bridge, kf_state: KfDoubleState) -> None:
    assert say(kf_state, "第一句") == 200
    wait_for(lambda: received(kf_state))
    conversation = bridge.store.get_conversation(
        "wwtestcorp0001", "kf", f"kf:{DEFAULT_ACCOUNT}:{CUSTOMER}"
    )
    assert conversation
    assert say(kf_state, "/reset") == 200
    wait_for(lambda: len(received(kf_state)) == 2)
    assert received(kf_state)[-1] == "好的，已开始新的对话。"
    assert not bridge.store.get_conversation(
        "wwtestcorp0001", "kf", f"kf:{DEFAULT_ACCOUNT}:{CUSTOMER}"
    )


# --- configuration ----------------------------------------------------------------------------


def test_kf_is_off_without_its_secret_and_needs_its_callback_settings(
    kf_env: dict[str, str],
) -> None:
    without = {k: v for k, v in kf_env.items() if not k.startswith("WECOM_KF_")}
    assert load_config(without).kf is None
    with pytest.raises(ConfigError, match="WECOM_KF_TOKEN"):
        load_config({**without, "WECOM_KF_SECRET": KF_SECRET})
    with pytest.raises(ConfigError, match="WECOM_KF_CALLBACK_PATH"):
        load_config({**kf_env, "WECOM_KF_CALLBACK_PATH": "/wxcomapp"})
    with pytest.raises(ConfigError, match="WECOM_KF_START"):
        load_config({**kf_env, "WECOM_KF_START": "yesterday"})
    kf = load_config({**kf_env, "WECOM_KF_HANDOVER_WORDS": "找人工|真人"}).kf
    assert kf is not None and kf.handover_words == ("找人工", "真人")
    assert KF_SECRET not in repr(kf)


# --- doctor -----------------------------------------------------------------------------------


def kf_doctor(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    url: str,
) -> dict[str, dict[str, str]]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main(["doctor", "--json", "--timeout", "3", "--kf-callback-url", url])
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_doctor_checks_the_kf_callback_and_secret(
    bridge: Bridge,
    kf_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert bridge.server is not None
    url = f"{bridge.server.url}/wxcomkf"
    results = kf_doctor(capsys, monkeypatch, kf_env, url)
    assert results["kf-callback"]["status"] == "PASS"
    assert results["kf-secret"]["status"] == "PASS"
    assert DEFAULT_ACCOUNT in results["kf-secret"]["detail"]
    wrong = {**kf_env, "WECOM_KF_SECRET": "not-the-kf-secret", "WECOM_KF_TOKEN": "OtherToken1"}
    results = kf_doctor(capsys, monkeypatch, wrong, url)
    assert results["kf-secret"]["status"] == "FAIL"
    assert "WECOM_KF_SECRET is wrong" in results["kf-secret"]["hint"]
    assert results["kf-callback"]["status"] == "FAIL"
    assert "WECOM_KF_TOKEN" in results["kf-callback"]["hint"]


def test_doctor_of_a_kf_only_deployment_checks_kf_and_dify_not_an_app(
    kf_env: dict[str, str],
    kf_state: KfDoubleState,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    self_built = ("WECOM_AGENT_ID", "WECOM_SECRET", "WECOM_TOKEN", "WECOM_ENCODING_AES_KEY")
    for name in self_built:
        monkeypatch.delenv(name, raising=False)
    only_kf = {k: v for k, v in kf_env.items() if k not in self_built}
    bridge = Bridge(only_kf, kf_state).start()
    try:
        assert bridge.server is not None
        results = kf_doctor(capsys, monkeypatch, only_kf, f"{bridge.server.url}/wxcomkf")
    finally:
        bridge.stop()
    assert results["kf-callback"]["status"] == "PASS"
    assert results["kf-secret"]["status"] == "PASS"
    assert results["dify"]["status"] == "PASS", results["dify"]
    assert "wecom-gettoken" not in results and "callback" not in results


# --- simulate ---------------------------------------------------------------------------------


def test_simulate_chats_as_an_external_customer(
    bridge: Bridge,
    kf_env: dict[str, str],
    kf_wecom: ServerThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert bridge.server is not None
    for name, value in kf_env.items():
        monkeypatch.setenv(name, value)
    url = f"{bridge.server.url}/wxcomkf"
    args = ["simulate", "--kf", "--url", url, "--api-url", kf_wecom.url, "--quiet", "0.5"]
    assert main([*args, "--redeliver", "1", "退货怎么办？"]) == 0
    out = capsys.readouterr().out
    assert "redelivery 1/1" in out
    assert out.rstrip().endswith(answer("退货怎么办？"))
    assert main([*args, "--event", "enter_session"]) == 0
    assert "您好，我是知识库助手。" in capsys.readouterr().out


def test_check_config_names_the_kf_channel(
    kf_env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in kf_env.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "微信客服: callback path /wxcomkf, start now" in out
    assert KF_SECRET not in out and KF_AES_KEY not in out


# --- kill -9 ----------------------------------------------------------------------------------


def test_kill9_mid_burst_neither_loses_nor_replays(
    kf_env: dict[str, str], kf_state: KfDoubleState, kf_dify: ServerThread
) -> None:
    dify_state(kf_dify).delay = 1.5  # the kill lands while answers are being prepared
    customers = [f"wmKILL{n:04d}" for n in range(6)]
    questions = {c: [f"{c} 问题{k}" for k in range(2)] for c in customers}
    first = BridgeProcess(kf_env).start()
    kf_state.callback = KfCallback(f"{first.url}/wxcomkf", KF_TOKEN, KF_AES_KEY)
    statuses = [say(kf_state, questions[c][k], c) for k in range(2) for c in customers]
    first.kill9()
    assert statuses == [200] * 12
    answered_before = sum(len(received(kf_state, c)) for c in customers)

    dify_state(kf_dify).delay = 0.0
    second = BridgeProcess(kf_env).start()
    kf_state.callback = KfCallback(f"{second.url}/wxcomkf", KF_TOKEN, KF_AES_KEY)
    try:
        wait_for(lambda: sum(len(received(kf_state, c)) for c in customers) >= 12, timeout=60)
        assert say(kf_state, "重启之后", customers[0]) == 200  # the stored cursor: only this is new
        wait_for(lambda: len(received(kf_state, customers[0])) == 3, timeout=30)
        time.sleep(1.0)
    finally:
        log = second.stop()
    assert answered_before < 12, "the kill came too late to test anything"
    for customer, asked in questions.items():
        expected = [answer(q) for q in asked] + (
            [answer("重启之后")] if customer == customers[0] else []
        )
        assert received(kf_state, customer) == expected, log


# --- the chat page ----------------------------------------------------------------------------


def test_chat_page_chats_as_a_kf_customer(
    bridge: Bridge, kf_wecom: ServerThread, kf_state: KfDoubleState, tmp_path: Path
) -> None:
    query = urlencode(
        {"user": CUSTOMER, "text": "发票怎么开？", "kf": "1", "once": "1", "wait": "2"}
    )
    result = chromium(tmp_path, f"{kf_wecom.url}/_double/chat?{query}", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert '<body data-state="done">' in result.stdout
    assert f'<div class="bubble">{answer("发票怎么开？")}</div>' in result.stdout
    assert received(kf_state) == [answer("发票怎么开？")]  # pulled and sent through kf/send_msg


def test_a_session_state_wecom_will_not_tell_does_not_stall_the_account(
    bridge: Bridge, kf_state: KfDoubleState
) -> None:
    kf_state.fail_next("service_state", 95000)  # a permanent refusal of service_state/get
    assert say(kf_state, "状态查不到") == 200
    wait_for(lambda: received(kf_state))
    assert received(kf_state) == [answer("状态查不到")]


def test_burst_answered_on_the_postgresql_store(
    kf_env: dict[str, str], kf_state: KfDoubleState, postgres_url: str
) -> None:
    bridge = Bridge({**kf_env, "BRIDGE_DATABASE_URL": postgres_url}, kf_state).start()
    try:
        questions = [f"共享存储{n}" for n in range(5)]
        tokens = [kf_state.customer_says(CUSTOMER, q)[1] for q in questions]
        assert [kf_state.signal(None, t) for t in tokens] == [200] * 5
        wait_for(lambda: len(received(kf_state)) == 5)
        assert received(kf_state) == [answer(q) for q in questions]
        assert bridge.store.kf_cursor("kf", DEFAULT_ACCOUNT)
    finally:
        bridge.stop()
