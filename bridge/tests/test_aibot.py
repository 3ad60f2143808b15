"""The AI bot (智能机器人) on its long connection, end to end: the bridge against the AI-bot
double (a real WebSocket server) and the Dify double (real HTTP, streaming SSE)."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import (
    AppSecrets,
    BridgeProcess,
    aibot_double_process,
    dify_state,
    free_port,
    wait_for,
)

from wecom_bridge.cli import main
from wecom_bridge.config import load_config
from wecom_bridge.errors import ConfigError
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.aibot_double import AibotDouble
from wecom_bridge.testing.server import ServerThread

BOT_ID = "aibot-test-0001"
BOT_SECRET = "aibot-secret-not-real"


@pytest.fixture
def aibot() -> Iterator[AibotDouble]:
    with AibotDouble(BOT_ID, BOT_SECRET) as double:
        yield double


def aibot_env(tmp_path: Path, ws_url: str, dify: ServerThread, secrets: AppSecrets):
    """An AI-bot-only deployment: not one variable of the self-built app."""
    return {
        "WECOM_AIBOT_MODE": "ws",
        "WECOM_AIBOT_BOT_ID": BOT_ID,
        "WECOM_AIBOT_SECRET": BOT_SECRET,
        "WECOM_AIBOT_WS_URL": ws_url,
        "WECOM_AIBOT_STREAM_INTERVAL": "0.2",
        "DIFY_API_BASE": f"{dify.url}/v1",
        "DIFY_API_KEY": secrets.dify_key,
        "DIFY_BACKOFF": "0.05",
        "DIFY_READ_TIMEOUT": "10",
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
        "BRIDGE_WELCOME_TEXT": "欢迎使用知识库助手",
    }


class Bridge:
    def __init__(self, env: dict[str, str]) -> None:
        self.app = create_app(load_config(env))
        self.server = ServerThread(self.app).start()
        self.runtime = self.app.extensions["wecom_bridge"]

    def readyz(self) -> tuple[int, dict[str, object]]:
        response = requests.get(f"{self.server.url}/readyz", timeout=5)
        return response.status_code, response.json()

    def stop(self) -> None:
        for link in self.runtime.links:
            link.stop()
        self.server.stop()
        self.runtime.pool.stop()


@pytest.fixture
def start_bridge(tmp_path, aibot, dify_double, secrets) -> Iterator:
    started: list[Bridge] = []

    def start(**extra: str) -> Bridge:
        bridge = Bridge({**aibot_env(tmp_path, aibot.url, dify_double, secrets), **extra})
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


def finished(aibot: AibotDouble, msgid: str) -> str | None:
    return aibot.wait(lambda: aibot.transcript(msgid).finished)


# --- configuration ------------------------------------------------------------------------------


def test_an_ai_bot_only_deployment_needs_none_of_the_self_built_apps_variables(tmp_path):
    env = {
        "WECOM_AIBOT_MODE": "ws",
        "WECOM_AIBOT_BOT_ID": BOT_ID,
        "WECOM_AIBOT_SECRET": BOT_SECRET,
        "DIFY_API_BASE": "http://127.0.0.1:1/v1",
        "DIFY_API_KEY": "k",
    }
    (app,) = load_config(env).apps
    assert app.channel == "aibot" and app.aibot is not None
    assert app.aibot.ws_url == "wss://openws.work.weixin.qq.com"
    assert not app.takes_callbacks
    assert BOT_SECRET not in repr(app)  # secrets never in a log line of the config


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"WECOM_AIBOT_SECRET": ""}, "WECOM_AIBOT_SECRET"),
        ({"WECOM_AIBOT_MODE": "socket"}, "WECOM_AIBOT_MODE"),
        ({"WECOM_AIBOT_WS_URL": "http://x"}, "WECOM_AIBOT_WS_URL"),
        ({"WECOM_AIBOT_GROUP_CONVERSATION": "team"}, "WECOM_AIBOT_GROUP_CONVERSATION"),
    ],
)
def test_a_wrong_ai_bot_variable_is_named(change, variable):
    env = {
        "WECOM_AIBOT_MODE": "ws",
        "WECOM_AIBOT_BOT_ID": BOT_ID,
        "WECOM_AIBOT_SECRET": BOT_SECRET,
        "DIFY_API_BASE": "http://127.0.0.1:1/v1",
        "DIFY_API_KEY": "k",
        **change,
    }
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    assert caught.value.variable == variable


def test_no_channel_at_all_names_the_self_built_apps_first_variable():
    with pytest.raises(ConfigError) as caught:
        load_config({"DIFY_API_BASE": "http://127.0.0.1:1/v1", "DIFY_API_KEY": "k"})
    assert caught.value.variable == "WECOM_CORP_ID"


def test_several_bots_and_an_app_from_the_apps_file(tmp_path, secrets):
    apps = tmp_path / "apps.toml"
    apps.write_text(
        f"""
[[app]]
name = "kb"
corp_id = "{secrets.corp_id}"
agent_id = "{secrets.agent_id}"
secret = "s"
token = "{secrets.token}"
encoding_aes_key = "{secrets.aes_key}"

[[app]]
name = "bot-a"
channel = "aibot"
aibot_bot_id = "bot-a-id"
aibot_secret = "sa"

[[app]]
name = "bot-b"
channel = "aibot"
aibot_bot_id = "bot-b-id"
aibot_secret = "sb"
aibot_group_conversation = "group"
""",
        encoding="utf-8",
    )
    apps.chmod(0o600)
    env = {"BRIDGE_APPS_FILE": str(apps), "DIFY_API_BASE": "http://x/v1", "DIFY_API_KEY": "k"}
    kb, bot_a, bot_b = load_config(env).apps
    assert kb.channel == "app" and kb.takes_callbacks
    assert bot_a.aibot is not None and bot_a.aibot.bot_id == "bot-a-id"
    assert bot_b.aibot is not None and bot_b.aibot.group_conversation == "group"
    assert bot_a.agent_id != bot_b.agent_id  # their Dify conversations are kept apart


# --- answers, streamed ----------------------------------------------------------------------


def test_a_question_is_streamed_then_finished_with_the_whole_answer(
    start_bridge, aibot, dify_double
):
    dify_state(dify_double).set_answer("知识库的回答：" + "内容" * 200)
    dify_state(dify_double).set_pace(chunk_chars=20, chunk_interval=0.05)
    bridge = start_bridge()
    aibot.wait_connected()
    msgid = aibot.deliver_text("zhangsan", "年假怎么算？")
    final = finished(aibot, msgid)
    assert final == "知识库的回答：" + "内容" * 200
    updates = aibot.transcript(msgid).updates
    partial = [u.content for u in updates if not u.finish]
    assert len(partial) >= 3  # the member saw it grow
    growing = [c for c in partial if c != "…"]
    assert growing == sorted(growing, key=len) and final.startswith(growing[0])
    # Dify was asked once, as the member, and the Dify conversation is kept for the next one.
    asked = [r for r in dify_state(dify_double).snapshot() if r["path"] == "/v1/chat-messages"]
    assert len(asked) == 1 and asked[0]["json"]["user"] == "zhangsan"
    assert bridge.runtime.store.get_conversation("", f"aibot:{BOT_ID}", "zhangsan")


def test_updates_are_throttled(start_bridge, aibot, dify_double):
    """200 deltas in about 2 s, at most one update per 0.2 s: some ten, not 200."""
    dify_state(dify_double).set_answer("字" * 400)
    dify_state(dify_double).set_pace(chunk_chars=2, chunk_interval=0.01)
    start_bridge()
    aibot.wait_connected()
    msgid = aibot.deliver_text("lisi", "写一段长文")
    finished(aibot, msgid)
    updates = aibot.transcript(msgid).updates
    span = updates[-1].at - updates[0].at
    assert len(updates) <= span / 0.2 + 3
    gaps = sorted(b.at - a.at for a, b in itertools.pairwise(updates[:-1]))
    # The median, not the minimum: the double stamps a frame when its thread gets to it, which
    # on a busy machine bunches two stamps now and then; without the throttle it would be ~0.01 s.
    assert gaps[len(gaps) // 2] >= 0.18


def test_a_silent_dify_gets_keep_alive_updates_so_the_stream_does_not_expire(
    tmp_path, dify_double, secrets
):
    with AibotDouble(BOT_ID, BOT_SECRET, stream_idle_expiry=1.5) as aibot:
        env = {
            **aibot_env(tmp_path, aibot.url, dify_double, secrets),
            "WECOM_AIBOT_KEEPALIVE_SECONDS": "1",
        }
        dify_state(dify_double).set_delay(4.0)  # thinking, only pings
        bridge = Bridge(env)
        try:
            aibot.wait_connected()
            msgid = aibot.deliver_text("wangwu", "慢问题")
            final = aibot.wait(lambda: aibot.transcript(msgid).finished, timeout=20)
            assert final.startswith("Dify double answer")
            assert aibot.messages_to("wangwu") == []  # finished in its own stream
            assert len(aibot.transcript(msgid).updates) >= 4
        finally:
            bridge.stop()


def test_without_keep_alive_the_double_expires_the_stream_and_the_answer_is_a_new_message(
    tmp_path, dify_double, secrets
):
    """The counterpart of the test above: the double's expiry is real, and the bridge still
    answers once when the stream is gone."""
    with AibotDouble(BOT_ID, BOT_SECRET, stream_idle_expiry=1.0) as aibot:
        env = {
            **aibot_env(tmp_path, aibot.url, dify_double, secrets),
            "WECOM_AIBOT_KEEPALIVE_SECONDS": "30",
        }
        dify_state(dify_double).set_delay(2.5)
        bridge = Bridge(env)
        try:
            aibot.wait_connected()
            msgid = aibot.deliver_text("wangwu", "慢问题")
            aibot.wait(lambda: aibot.messages_to("wangwu"), timeout=20)
            assert aibot.transcript(msgid).finished is None
            assert len(aibot.answers(msgid)) == 1
        finally:
            bridge.stop()


def test_an_answer_beyond_20480_bytes_continues_in_a_further_message(
    start_bridge, aibot, dify_double
):
    answer = ("长回答。" * 2000).strip()  # 24 000 bytes
    dify_state(dify_double).set_answer(answer)
    start_bridge()
    aibot.wait_connected()
    msgid = aibot.deliver_text("zhaoliu", "给我全部")
    first = finished(aibot, msgid)
    rest = aibot.wait(lambda: aibot.messages_to("zhaoliu"))
    assert len(first.encode()) <= 20480
    assert first + "".join(rest) == answer
    assert all(len(u.content.encode()) <= 20480 for u in aibot.transcript(msgid).updates)


# --- durable and deduplicated ---------------------------------------------------------------


def test_a_redelivered_msgid_is_answered_once(start_bridge, aibot, dify_double):
    start_bridge()
    aibot.wait_connected()
    msgid = aibot.deliver_text("zhangsan", "问题一")
    finished(aibot, msgid)
    aibot.redeliver(msgid)
    aibot.deliver_text("zhangsan", "问题二")  # answered after the redelivery was judged
    aibot.wait(
        lambda: (
            len([r for r in dify_state(dify_double).snapshot() if r["path"] == "/v1/chat-messages"])
            == 2
        )
    )
    asked = [
        r["json"]["query"]
        for r in dify_state(dify_double).snapshot()
        if r["path"] == "/v1/chat-messages"
    ]
    assert asked == ["问题一", "问题二"]


def test_welcome_reset_and_unsupported_types(start_bridge, aibot, dify_double):
    bridge = start_bridge()
    aibot.wait_connected()
    enter = aibot.enter_chat("zhangsan")
    assert aibot.wait(lambda: aibot.transcript(enter).welcome) == "欢迎使用知识库助手"
    first = aibot.deliver_text("zhangsan", "第一个问题")
    finished(aibot, first)
    store = bridge.runtime.store
    assert store.get_conversation("", f"aibot:{BOT_ID}", "zhangsan")
    reset = aibot.deliver_text("zhangsan", "新对话")
    assert finished(aibot, reset) == "好的，已开始新的对话。"
    assert store.get_conversation("", f"aibot:{BOT_ID}", "zhangsan") == ""
    video = aibot.deliver("zhangsan", "video", {"url": "https://example.invalid/x"})
    assert finished(aibot, video) == "暂时不支持这类消息，请换一种方式提问。"


def test_group_chat_keyed_per_member_with_the_member_passed_to_dify(
    start_bridge, aibot, dify_double
):
    state = dify_state(dify_double)
    state.set_input_form(
        [{"text-input": {"variable": "member", "label": "成员", "required": False}}]
    )
    start_bridge()
    aibot.wait_connected()
    a = aibot.deliver_text("zhangsan", "@知识库助手 报销流程？", chatid="grp1")
    finished(aibot, a)
    b = aibot.deliver_text("lisi", "@知识库助手 报销流程？", chatid="grp1")
    finished(aibot, b)
    asked = [r["json"] for r in state.snapshot() if r["path"] == "/v1/chat-messages"]
    assert [q["query"] for q in asked] == ["报销流程？", "报销流程？"]  # the @mention is not asked
    assert [q["inputs"].get("member") for q in asked] == ["zhangsan", "lisi"]
    assert asked[0]["user"] != asked[1]["user"]  # one Dify conversation each
    assert aibot.transcript(a).chat == "grp1"


def test_group_chat_can_share_one_conversation_per_group(start_bridge, aibot, dify_double):
    state = dify_state(dify_double)
    start_bridge(WECOM_AIBOT_GROUP_CONVERSATION="group")
    aibot.wait_connected()
    finished(aibot, aibot.deliver_text("zhangsan", "@bot 第一问", chatid="grp2"))
    finished(aibot, aibot.deliver_text("lisi", "@bot 第二问", chatid="grp2"))
    asked = [r["json"] for r in state.snapshot() if r["path"] == "/v1/chat-messages"]
    assert asked[0]["user"] == asked[1]["user"] == "group:grp2"
    assert (
        asked[1]["conversation_id"]
        and asked[1]["conversation_id"] == state.messages[0]["conversation_id"]
    )
    assert "member" not in asked[0]["inputs"]  # the app declares no such input


# --- the connection -------------------------------------------------------------------------


def test_a_wrong_secret_shows_in_readyz_and_metrics(start_bridge, aibot):
    bridge = start_bridge(WECOM_AIBOT_SECRET="wrong-secret")
    wait_for(lambda: aibot.refused_subscriptions >= 1)
    status, body = wait_for(lambda: (r := bridge.readyz()) and "auth_failed" in str(r[1]) and r)
    assert status == 503
    assert "wrong-secret" not in str(body)
    metrics = requests.get(f"{bridge.server.url}/metrics", timeout=5).text
    assert 'wecom_bridge_aibot_link_changes_total{app="aibot",state="auth_failed"}' in metrics
    assert "wecom_bridge_aibot_links_unsubscribed 1" in metrics


def test_readyz_is_ready_once_subscribed_and_not_after_a_takeover(start_bridge, aibot):
    bridge = start_bridge()
    aibot.wait_connected()
    _, body = wait_for(lambda: (r := bridge.readyz())[0] == 200 and r)
    assert body["aibot"] == {f"aibot:{BOT_ID}": "subscribed"}
    aibot.kick()  # another client subscribed the same bot
    _, body = wait_for(lambda: (r := bridge.readyz())[0] == 503 and r)
    assert "taken_over" in str(body["aibot"])


def test_a_dropped_connection_is_reconnected_and_answers_again(start_bridge, aibot):
    start_bridge()
    aibot.wait_connected()
    aibot.drop()
    wait_for(lambda: aibot.subscriptions >= 2, timeout=15)
    msgid = aibot.deliver_text("zhangsan", "重连后的问题")
    assert finished(aibot, msgid).startswith("Dify double answer")


def test_two_job_sides_on_one_store_hold_one_connection(start_bridge, aibot):
    first = start_bridge()
    aibot.wait_connected()
    second = start_bridge()  # same data dir: another process of the same deployment
    wait_for(lambda: second.runtime.links[0].connection.state == "standby")
    time.sleep(2)
    assert aibot.subscriptions == 1  # the second stands by instead of kicking the first off
    for link in first.runtime.links:
        link.stop()  # frees the role
    wait_for(lambda: aibot.subscriptions == 2 and aibot.connected, timeout=15)
    msgid = aibot.deliver_text("zhangsan", "接手后的问题")
    assert finished(aibot, msgid).startswith("Dify double answer")
    assert second.runtime.links[0].connection.state == "subscribed"


def test_two_bridges_on_one_postgresql_hold_one_connection_and_share_its_state(
    start_bridge, aibot, postgres_url, tmp_path
):
    """Two hosts (data dirs of their own) on one PostgreSQL store: Store.exclusive lets one
    connect; the other's /readyz still sees the holder's report, and it takes over once the
    holder stops."""
    first = start_bridge(BRIDGE_DATABASE_URL=postgres_url, BRIDGE_DATA_DIR=str(tmp_path / "a"))
    aibot.wait_connected()
    second = start_bridge(BRIDGE_DATABASE_URL=postgres_url, BRIDGE_DATA_DIR=str(tmp_path / "b"))
    wait_for(lambda: second.runtime.links[0].connection.state == "standby")
    _, body = wait_for(lambda: (r := second.readyz())[0] == 200 and r)
    assert body["aibot"] == {f"aibot:{BOT_ID}": "subscribed"}  # the first one's report
    assert aibot.subscriptions == 1
    for link in first.runtime.links:
        link.stop()  # frees the role
    wait_for(lambda: aibot.subscriptions == 2 and aibot.connected, timeout=15)
    msgid = aibot.deliver_text("zhangsan", "另一台主机接手")
    assert finished(aibot, msgid).startswith("Dify double answer")
    assert second.runtime.links[0].connection.state == "subscribed"
    # The first bridge's workers still run, but leave the bot's jobs to the connection's holder.
    assert [j.attempts for j in second.runtime.store.jobs() if j.kind == "chat"] == [1]


def test_kill_9_mid_answer_still_answers_exactly_once(tmp_path, aibot, dify_double, secrets):
    """`serve` killed while the answer streams: after the restart the member gets the answer
    as a new message (the old stream belonged to the dead connection), once; Dify is not
    asked again."""
    state = dify_state(dify_double)
    answer = "完整的答案。" * 100
    state.set_answer(answer)
    state.set_pace(chunk_chars=10, chunk_interval=0.1)  # about 6 s of streaming
    env = aibot_env(tmp_path, aibot.url, dify_double, secrets)
    bridge = BridgeProcess(env).start()
    try:
        aibot.wait_connected()
        msgid = aibot.deliver_text("zhangsan", "长问题")
        aibot.wait(lambda: len(aibot.transcript(msgid).updates) >= 3)
        bridge.kill9()
        assert aibot.transcript(msgid).finished is None
        bridge = BridgeProcess(env).start()
        aibot.wait(lambda: aibot.answers(msgid), timeout=60)
        time.sleep(2)
        assert aibot.answers(msgid) == [answer]
        asked = [r for r in state.snapshot() if r["path"] == "/v1/chat-messages"]
        assert len(asked) == 1
    finally:
        bridge.stop()


# --- operator tools -------------------------------------------------------------------------


def _doctor(monkeypatch, capsys, env: dict[str, str], *args: str) -> dict[str, dict[str, str]]:
    for name in list(os.environ):
        if name.startswith(("WECOM_", "DIFY_", "BRIDGE_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main(["doctor", "--json", "--timeout", "3", *args])
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_doctor_checks_the_subscription_and_nothing_of_an_edge(
    monkeypatch, capsys, tmp_path, aibot, dify_double, secrets
):
    env = aibot_env(tmp_path, aibot.url, dify_double, secrets)
    results = _doctor(monkeypatch, capsys, env)
    assert results["aibot-subscribe"]["status"] == "PASS"
    assert results["dify"]["status"] == "PASS"
    assert "dns" not in results and "callback" not in results and "gettoken" not in results
    wrong = _doctor(monkeypatch, capsys, {**env, "WECOM_AIBOT_SECRET": "nope"})
    assert wrong["aibot-subscribe"]["status"] == "FAIL"
    assert "errcode 40001" in wrong["aibot-subscribe"]["detail"]
    assert "nope" not in json.dumps(wrong)


def test_the_simulator_plays_the_member_through_the_double_process(
    tmp_path, dify_double, secrets, capsys
):
    """`aibot-double` as its own process (as molecule and the demo run it), the bridge
    connected to it, `simulate-aibot` printing the stream as it arrives."""
    ws_port = free_port()
    env = {"WECOM_AIBOT_BOT_ID": BOT_ID, "WECOM_AIBOT_SECRET": BOT_SECRET}
    with aibot_double_process(["--listen", f"127.0.0.1:{ws_port}"], env) as control:
        state = dify_state(dify_double)
        state.set_answer("第一句。第二句。第三句。" * 10)
        state.set_pace(chunk_chars=6, chunk_interval=0.05)
        bridge = Bridge(aibot_env(tmp_path, f"ws://127.0.0.1:{ws_port}", dify_double, secrets))
        try:
            wait_for(
                lambda: requests.get(f"{control}/control/status", timeout=2).json()["connected"]
            )
            code = main(["simulate-aibot", "年假？", "--control", control, "--group", "grp9"])
            out = capsys.readouterr().out
            assert code == 0
            assert "update:" in out and "finished: " + "第一句。第二句。第三句。" * 10 in out
            assert "group grp9" in out
            # An image with its caption: the double serves it encrypted, as a mixed message.
            from test_media_in import png

            state.set_answer(None)
            state.files.configure(enabled=True, allowed_file_types=["image"])
            image = tmp_path / "shot.png"
            image.write_bytes(png())
            args = ["simulate-aibot", "这是什么", "--image", str(image), "--control", control]
            assert main(args) == 0
            out = capsys.readouterr().out
            assert "finished: Dify double answer: 这是什么 [files: image:shot.png]" in out
        finally:
            bridge.stop()
