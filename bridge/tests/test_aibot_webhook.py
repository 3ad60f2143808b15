"""The AI bot's webhook mode end to end: WeCom's side played by the AI-bot double's webhook
sender (encrypted JSON callbacks, stream refreshes, a one-time response_url), the bridge
in-process on a real HTTP server, the Dify double streaming."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
import requests
from conftest import aibot_double_process, dify_state, wait_for

from wecom_bridge.channels.aibot_webhook import AibotWebhookOutbound
from wecom_bridge.channels.base import Reply
from wecom_bridge.cli import main
from wecom_bridge.config import load_config
from wecom_bridge.errors import WeComApiError
from wecom_bridge.jobs.media_out import MediaRef, MediaSender, PartTransfer
from wecom_bridge.jobs.store import SqliteStore
from wecom_bridge.metrics import Metrics
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.aibot_double import AibotWebhookSender
from wecom_bridge.testing.dify_signed_files import tiny_png
from wecom_bridge.testing.server import ServerThread

TOKEN = "AibotToken42"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"


@pytest.fixture
def env(tmp_path, dify_double, secrets) -> dict[str, str]:
    return {
        "WECOM_AIBOT_MODE": "webhook",
        "WECOM_AIBOT_TOKEN": TOKEN,
        "WECOM_AIBOT_ENCODING_AES_KEY": AES_KEY,
        "WECOM_AIBOT_STREAM_INTERVAL": "0.2",
        "DIFY_API_BASE": f"{dify_double.url}/v1",
        "DIFY_API_KEY": secrets.dify_key,
        "DIFY_BACKOFF": "0.05",
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
        "BRIDGE_WELCOME_TEXT": "欢迎！",
    }


@pytest.fixture
def bridge(env) -> Iterator[ServerThread]:
    app = create_app(load_config(env))
    with ServerThread(app) as server:
        yield server
    app.extensions["wecom_bridge"].pool.stop()


@pytest.fixture
def wecom(bridge) -> Iterator[AibotWebhookSender]:
    with AibotWebhookSender(f"{bridge.url}/wxcomaibot", TOKEN, AES_KEY, refresh_interval=0.1) as s:
        yield s


def test_the_handshake_answers_the_echostr_and_a_forged_callback_is_refused(wecom, bridge):
    assert wecom.handshake("echo-123") == (200, "echo-123")
    forged = AibotWebhookSender(f"{bridge.url}/wxcomaibot", "WrongToken1", AES_KEY)
    try:
        assert forged.handshake()[0] == 403
        status, reply = forged.post(forged.message("zhangsan", "hi"))
        assert status == 403 and reply is None
    finally:
        forged.stop()


def test_a_question_streams_through_refreshes_until_finished(wecom, dify_double):
    state = dify_state(dify_double)
    state.set_answer("网关回答：" + "文字" * 100)
    state.set_pace(chunk_chars=10, chunk_interval=0.05)
    exchange = wecom.ask("zhangsan", "问题？")
    assert exchange.first["msgtype"] == "stream" and exchange.first["stream"]["finish"] is False
    assert exchange.finished == "网关回答：" + "文字" * 100
    partial = {u.content for u in exchange.updates if not u.finish} - {"…"}
    assert partial  # the member saw the answer grow before it was finished
    assert all(("网关回答：" + "文字" * 100).startswith(p) for p in partial)


def test_a_redelivered_message_is_asked_once(wecom, dify_double):
    first = wecom.ask("lisi", "同一个问题", msgid="m-dup-1")
    again = wecom.ask("lisi", "同一个问题", msgid="m-dup-1")
    assert first.finished and again.finished == first.finished
    asked = [r for r in dify_state(dify_double).snapshot() if r["path"] == "/v1/chat-messages"]
    assert len(asked) == 1


def test_the_welcome_is_the_passive_reply_to_enter_chat(wecom):
    body = {
        "msgid": "enter-1",
        "aibotid": "webhook-bot",
        "chattype": "single",
        "from": {"userid": "wangwu"},
        "msgtype": "event",
        "event": {"eventtype": "enter_chat"},
    }
    status, reply = wecom.post(body)
    assert status == 200 and reply == {"msgtype": "text", "text": {"content": "欢迎！"}}


def test_beyond_20480_bytes_the_rest_comes_through_response_url_once(wecom, dify_double):
    answer = ("长回答。" * 2000).strip()
    dify_state(dify_double).set_answer(answer)
    exchange = wecom.ask("zhaoliu", "全部")
    late = wait_for(lambda: wecom.late_for(exchange.msgid))
    assert exchange.finished + "".join(late) == answer


def test_beyond_two_parts_the_member_is_told_the_rest_is_missing(wecom, dify_double):
    # WeCom takes the stream and one response_url call: a third 20480-byte part has no way out.
    answer = ("很长的回答。" * 6000).strip()  # ~108 KB: six parts on an unlimited channel
    dify_state(dify_double).set_answer(answer)
    exchange = wecom.ask("zhaoliu", "全部")
    late = wait_for(lambda: wecom.late_for(exchange.msgid))
    delivered = exchange.finished + "".join(late)
    assert len(late) == 1 and len(late[0].encode()) <= 20480
    assert delivered.endswith("其余部分未能发送）")
    assert answer.startswith(delivered[: len(delivered) - len("其余部分未能发送）") - 30])


def late_context(body: dict) -> dict[str, str]:
    """A message's reply context as stored, received 6 min 40 s ago: no more refreshes."""
    return {
        "stream_id": f"s{body['msgid']}",
        "reply": "stream",
        "response_url": body["response_url"],
        "received_at": f"{time.time() - 400:.3f}",
    }


def test_an_answer_that_outlives_the_window_goes_through_response_url_exactly_once(tmp_path, env):
    (app,) = load_config(env).apps
    store = SqliteStore(tmp_path / "store")
    with AibotWebhookSender("http://127.0.0.1:1/unused", TOKEN, AES_KEY) as wecom:
        body = wecom.message("zhaoliu", "慢问题")
        context = late_context(body)
        outbound = AibotWebhookOutbound(app, store, Metrics())
        outbound.send_part(Reply("zhaoliu", context), "迟到的回答")
        assert wecom.late_for(str(body["msgid"])) == ["迟到的回答"]
        with pytest.raises(WeComApiError, match="used already"):
            outbound.send_part(Reply("zhaoliu", context), "再一次")
        assert wecom.late_for(str(body["msgid"])) == ["迟到的回答"]


def test_a_webhook_only_deployment_serves_no_self_built_app_path(bridge, wecom):
    assert requests.get(f"{bridge.url}/wxcomapp", timeout=5).status_code == 404
    assert wecom.handshake()[0] == 200


def test_doctor_checks_the_webhook_bots_signed_handshake(bridge, env, monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith(("WECOM_", "DIFY_", "BRIDGE_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main(["doctor", "--json", "--timeout", "3", "--callback-url", f"{bridge.url}/wxcomaibot"])
    results = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert results["callback"]["status"] == "PASS", results["callback"]
    assert "wecom-gettoken" not in results and "trusted-ip" not in results
    monkeypatch.setenv("WECOM_AIBOT_TOKEN", "OtherToken9")
    main(["doctor", "--json", "--timeout", "3", "--callback-url", f"{bridge.url}/wxcomaibot"])
    wrong = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert wrong["callback"]["status"] == "FAIL"


def test_the_simulator_plays_the_member_through_the_webhook_double_process(
    bridge, dify_double, capsys
):
    """`aibot-double --webhook` as its own process: WeCom's side calling the bridge's callback
    URL and refreshing the stream; `simulate-aibot` prints the stream as it arrives."""
    env = {"WECOM_AIBOT_TOKEN": TOKEN, "WECOM_AIBOT_ENCODING_AES_KEY": AES_KEY}
    with aibot_double_process(["--webhook", f"{bridge.url}/wxcomaibot"], env) as control:
        state = dify_state(dify_double)
        state.set_answer("第一句。第二句。第三句。" * 10)
        state.set_pace(chunk_chars=6, chunk_interval=0.05)
        code = main(["simulate-aibot", "年假？", "--control", control, "--group", "grp9"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "update:" in out and "finished: " + "第一句。第二句。第三句。" * 10 in out
        assert requests.get(f"{control}/control/status", timeout=5).json()["mode"] == "webhook"
        code = main(["simulate-aibot", "看图 #md-image", "--control", control])
        out = capsys.readouterr().out
        assert code == 0 and f"an image with the finish: {len(tiny_png(2))} bytes" in out, out


def test_the_webhook_double_refuses_without_its_crypto(capsys):
    code = main(["aibot-double", "--webhook", "http://127.0.0.1:1/wxcomaibot"])
    assert code == 2
    assert "WECOM_AIBOT_TOKEN" in capsys.readouterr().err


def test_a_webhook_bot_finishes_its_stream_with_difys_image(wecom, dify_double):
    """WeCom's finishing stream reply carries images (msg_item: base64 and md5 of a JPG/PNG):
    Dify's markdown image leaves the text and rides on the finish, the text around it stays,
    and the stream shows no half-written image link while Dify writes."""
    exchange = wecom.ask("qian", "报表 #md-image")
    assert exchange.rejected == []  # the double checks msg_item as WeCom documents it
    answer = exchange.finished
    assert answer is not None and answer.startswith("Dify double answer: 报表 #md-image")
    assert "以上是图表。" in answer and "/files/" not in answer
    assert exchange.updates[-1].images == [tiny_png(2)]
    assert all("![" not in u.content and not u.images for u in exchange.updates[:-1])


def test_difys_message_file_image_rides_on_the_finish_too(wecom, dify_double):
    exchange = wecom.ask("qian", "画一张 #image")
    assert exchange.finished is not None and exchange.updates[-1].images == [tiny_png(1)]
    assert "/files/" not in exchange.finished


def test_what_cannot_ride_on_the_finish_follows_the_text_as_its_link(wecom, dify_double):
    """An 11 MB image (over WeCom's 10 MB) and a PDF (a webhook bot cannot send files) reach
    the member as working links, a "PNG" that is HTML as the refusal, in the one finished
    stream."""
    exchange = wecom.ask("qian", "都要 #md-image #not-image #big-image #file", wait=60)
    assert exchange.rejected == [] and exchange.updates[-1].images == [tiny_png(2)]
    answer = exchange.finished
    assert answer is not None
    for name in ("big", "report.pdf"):
        assert f"{name}：{dify_double.url}/files/" in answer, name
    assert "此文件无法发送（fake）。" in answer  # BRIDGE_MEDIA_REFUSED_TEXT, as elsewhere
    assert "chart：" not in answer  # the one that went as an image has no link
    assert wecom.late_for(exchange.msgid) == []


def test_an_image_answer_past_the_stream_window_goes_as_links_once(tmp_path, env, dify_double):
    """Too late for the stream: response_url takes text only, so the image goes as its link;
    a job resumed after the finish was stored sends nothing again."""
    (app,) = load_config(env).apps
    store = SqliteStore(tmp_path / "store")
    outbound = AibotWebhookOutbound(app, store, Metrics())
    sender = MediaSender(tmp_path / "media")
    ref = MediaRef("image", f"{dify_double.url}/files/tools/x.png", "chart")
    noted: dict[str, object] = {}
    transfer = PartTransfer(1, noted, noted.__setitem__, lambda what, write: write())
    settings = (app.dify, app.media)
    with AibotWebhookSender("http://127.0.0.1:1/unused", TOKEN, AES_KEY) as wecom:
        body = wecom.message("zhaoliu", "慢问题")
        late = late_context(body)
        sender.finish_stream(transfer, [ref], Reply("zhaoliu", late), outbound, settings, "图如下")
        assert wecom.late_for(str(body["msgid"])) == [f"图如下\n\nchart：{ref.url}"]
        resumed = {**late, "stream_id": "s-resumed", "received_at": f"{time.time():.3f}"}
        store.save_stream(app.name, "s-resumed", "已完成", finished=True)
        noted["stream_text"] = "已完成"  # the finish was stored, then the bridge was killed
        sender.finish_stream(
            transfer, [ref], Reply("zhaoliu", resumed), outbound, settings, "已完成"
        )
        state = store.get_stream(app.name, "s-resumed")
        assert state is not None and not state.response_url_used  # nothing sent again
        assert len(wecom.late_for(str(body["msgid"]))) == 1
