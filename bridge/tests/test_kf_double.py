"""The 微信客服 part of the WeCom double, checked against WeCom's kf docs (each test names its
source: doc 94670 sync_msg, 94677 send_msg, 94698 service_state, the kf callback's XML)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask, request

from wecom_bridge.testing.kf_double import DEFAULT_ACCOUNT, KfCallback, KfDoubleState
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.testing.wecom_double import create_wecom_double
from wecom_bridge.wecom.crypto import WeComCrypto
from wecom_bridge.wecom.kf_api import parse_signal
from wecom_bridge.wecom.messages import parse_envelope

CORP_ID = "wwkfdoublecorp"
APP_SECRET = "app-secret"
KF_SECRET = "kf-secret"
KF_TOKEN = "KfDoubleToken1"
KF_AES = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
USER = "wmDOUBLEcustomer"


@pytest.fixture
def kf() -> KfDoubleState:
    return KfDoubleState(corp_id=CORP_ID, secret=KF_SECRET)


@pytest.fixture
def server(kf: KfDoubleState) -> Iterator[ServerThread]:
    with ServerThread(create_wecom_double(corp_id=CORP_ID, secret=APP_SECRET, kf=kf)) as srv:
        yield srv


def token(server: ServerThread, secret: str = KF_SECRET) -> str:
    answer = requests.get(
        f"{server.url}/cgi-bin/gettoken",
        params={"corpid": CORP_ID, "corpsecret": secret},
        timeout=5,
    ).json()
    return str(answer["access_token"])


def call(server: ServerThread, path: str, body: dict[str, Any], secret: str = KF_SECRET) -> Any:
    return requests.post(
        f"{server.url}/cgi-bin/kf/{path}",
        params={"access_token": token(server, secret)},
        json=body,
        timeout=5,
    ).json()


def test_only_the_kf_secrets_token_calls_the_kf_api(server: ServerThread) -> None:
    # doc 94677: "仅允许微信客服的Secret所获取的access_token调用"
    assert call(server, "sync_msg", {"open_kfid": DEFAULT_ACCOUNT}, APP_SECRET)["errcode"] == 40014
    assert call(server, "sync_msg", {"open_kfid": DEFAULT_ACCOUNT})["errcode"] == 0


def test_sync_msg_pages_with_has_more_and_cursor(server: ServerThread, kf: KfDoubleState) -> None:
    # doc 94670: next_cursor continues where the last call stopped; has_more=1 while more wait;
    # fewer than `limit` may come back.
    kf.page_size = 2
    for n in range(3):
        kf.customer_says(USER, f"q{n}")
    first = call(server, "sync_msg", {"open_kfid": DEFAULT_ACCOUNT, "limit": 1000})
    assert [m["text"]["content"] for m in first["msg_list"]] == ["q0", "q1"]
    assert first["has_more"] == 1
    body = {"open_kfid": DEFAULT_ACCOUNT, "cursor": first["next_cursor"]}
    second = call(server, "sync_msg", body)
    assert [m["text"]["content"] for m in second["msg_list"]] == ["q2"]
    assert second["has_more"] == 0
    assert second["msg_list"][0]["origin"] == 3 and second["msg_list"][0]["msgid"]
    again = call(
        server, "sync_msg", {"open_kfid": DEFAULT_ACCOUNT, "cursor": second["next_cursor"]}
    )
    assert again["msg_list"] == [] and again["has_more"] == 0


def test_sync_msg_without_cursor_starts_three_days_back(
    server: ServerThread, kf: KfDoubleState
) -> None:
    # doc 94670 / the project's protocol notes: no cursor = the last three days' messages.
    kf.customer_says(USER, "recent")
    with kf.lock:
        kf.log[DEFAULT_ACCOUNT].insert(
            0,
            {
                **kf.log[DEFAULT_ACCOUNT][0],
                "msgid": "old",
                "send_time": int(time.time()) - 4 * 86400,
            },
        )
    page = call(server, "sync_msg", {"open_kfid": DEFAULT_ACCOUNT})
    assert "old" not in [m["msgid"] for m in page["msg_list"]]


def test_the_pull_token_is_checked_when_given(server: ServerThread, kf: KfDoubleState) -> None:
    # doc 94670: token from the callback, valid 10 minutes; optional (then rate-limited).
    _, pull_token = kf.customer_says(USER, "hi")
    ok = call(server, "sync_msg", {"open_kfid": DEFAULT_ACCOUNT, "token": pull_token})
    assert ok["errcode"] == 0
    bad = call(server, "sync_msg", {"open_kfid": DEFAULT_ACCOUNT, "token": "ENCforged"})
    assert bad["errcode"] == 95007


def test_send_msg_window_and_session_state(server: ServerThread, kf: KfDoubleState) -> None:
    # doc 94677: only in state 0/1; at most 5 messages within 48 h of the customer's message.
    def send(text: str) -> int:
        body = {
            "touser": USER,
            "open_kfid": DEFAULT_ACCOUNT,
            "msgtype": "text",
            "text": {"content": text},
        }
        return int(call(server, "send_msg", body)["errcode"])

    assert send("before the customer wrote") == 95018  # state 4: no session yet
    kf.customer_says(USER, "hello")
    assert [send(f"a{n}") for n in range(6)] == [0, 0, 0, 0, 0, 95001]
    assert kf.session_of(USER).state == 1  # answered through the API: the bot's session
    kf.customer_says(USER, "again")  # the customer writes again: five more
    assert send("b") == 0
    kf.servicer_action(USER, "take")
    assert send("while a human has it") == 95018


def test_welcome_code_once_within_20_seconds(server: ServerThread, kf: KfDoubleState) -> None:
    # doc 94677 (send_msg_on_event): the enter_session event's welcome_code, usable once.
    code, _ = kf.customer_enters(USER)
    body = {"code": code, "msgtype": "text", "text": {"content": "欢迎"}}
    assert call(server, "send_msg_on_event", body)["errcode"] == 0
    assert call(server, "send_msg_on_event", body)["errcode"] != 0
    events = call(server, "sync_msg", {"open_kfid": DEFAULT_ACCOUNT})["msg_list"]
    assert events[0]["event"]["event_type"] == "enter_session"
    assert events[0]["event"]["welcome_code"] == code


def test_service_state_transitions(server: ServerThread, kf: KfDoubleState) -> None:
    # doc 94698: 0/1 → 1/2/3/4, 2 → 2/3/4, 3 → 3/4, 4 → none; 3 needs servicer_userid.
    who = {"open_kfid": DEFAULT_ACCOUNT, "external_userid": USER}
    kf.customer_says(USER, "hi")
    assert call(server, "service_state/get", who)["service_state"] == 0
    assert call(server, "service_state/trans", {**who, "service_state": 2})["errcode"] == 0
    assert call(server, "service_state/trans", {**who, "service_state": 1})["errcode"] == 95016
    assert call(server, "service_state/trans", {**who, "service_state": 3})["errcode"] != 0
    body = {**who, "service_state": 3, "servicer_userid": "zhangsan"}
    assert call(server, "service_state/trans", body)["errcode"] == 0
    state = call(server, "service_state/get", who)
    assert state["service_state"] == 3 and state["servicer_userid"] == "zhangsan"
    kf.servicer_action(USER, "end")
    assert call(server, "service_state/trans", {**who, "service_state": 1})["errcode"] == 95016
    kf.customer_says(USER, "new question")  # a new message opens a new session
    assert call(server, "service_state/get", who)["service_state"] == 0


def test_callback_is_a_signed_kf_signal_without_content(kf: KfDoubleState) -> None:
    # The kf callback: event kf_msg_or_event with Token and OpenKfId only (doc 94670, 回调事件).
    seen: list[tuple[dict[str, str], bytes]] = []
    receiver = Flask("receiver")

    @receiver.post("/wxcomkf")
    def receive() -> str:
        seen.append((dict(request.args), request.get_data()))
        return ""

    with ServerThread(receiver) as srv:
        kf.callback = KfCallback(f"{srv.url}/wxcomkf", KF_TOKEN, KF_AES)
        _, pull_token = kf.customer_says(USER, "秘密内容")
        assert kf.signal(None, pull_token) == 200
    params, body = seen[0]
    crypto = WeComCrypto(KF_TOKEN, KF_AES, CORP_ID)
    envelope = parse_envelope(body)
    crypto.verify_signature(
        params["msg_signature"], params["timestamp"], params["nonce"], envelope.encrypt
    )
    plaintext = crypto.decrypt(envelope.encrypt)
    assert "秘密内容".encode() not in plaintext
    signal = parse_signal(plaintext)
    assert signal.open_kfid == DEFAULT_ACCOUNT and signal.token == pull_token
