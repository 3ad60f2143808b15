"""The doubles themselves: callbacks they build, and the WeCom and Dify APIs they play."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests
from flask import Flask, Response, request
from wechatpy.enterprise.crypto import WeChatCrypto  # wechatpy 1.8 names the WeCom module so

from wecom_bridge.errors import ConfigError
from wecom_bridge.testing.aibot_double import StreamImageError, stream_images
from wecom_bridge.testing.callbacks import (
    CallbackClient,
    build_callback,
    build_event_callback,
    build_text_callback,
    build_url_verification,
)
from wecom_bridge.testing.dify_double import create_dify_double, dify_double_from_env
from wecom_bridge.testing.dify_signed_files import DifyAnswerFiles, tiny_png
from wecom_bridge.testing.server import ServerThread, parse_listen
from wecom_bridge.testing.wecom_double import create_wecom_double, wecom_double_from_env
from wecom_bridge.wecom.aibot_frames import StreamImage
from wecom_bridge.wecom.crypto import WeComCrypto
from wecom_bridge.wecom.messages import parse_envelope, parse_message, parse_xml

TOKEN = "QDG6eK"
AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
CORP_ID = "wx5823bf96d3bd56c7"
SECRET = "double-test-secret"
AGENT_ID = "1000002"
DIFY_KEY = "app-double-test"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - only parsed, never bound


@pytest.fixture
def crypto() -> WeComCrypto:
    return WeComCrypto(TOKEN, AES_KEY, CORP_ID)


def open_callback(crypto: WeComCrypto, params: dict[str, str], body: bytes) -> dict[str, str]:
    envelope = parse_envelope(body)
    crypto.verify_signature(
        params["msg_signature"], params["timestamp"], params["nonce"], envelope.encrypt
    )
    return parse_xml(crypto.decrypt(envelope.encrypt))


# --- callbacks -------------------------------------------------------------------------------


def test_url_verification_round_trip(crypto: WeComCrypto) -> None:
    params = build_url_verification(
        crypto, "1616140317555161061", timestamp="1409659589", nonce="263014780"
    )
    assert params["timestamp"] == "1409659589"
    assert params["nonce"] == "263014780"
    plaintext = crypto.verify_url(
        params["msg_signature"], params["timestamp"], params["nonce"], params["echostr"]
    )
    assert plaintext == "1616140317555161061"


def test_text_callback_decrypts(crypto: WeComCrypto) -> None:
    params, body = build_text_callback(
        crypto,
        from_user="zhangsan",
        content="你好 <b>&</b>",
        msg_id="1234567890123456789",
        agent_id=AGENT_ID,
        create_time=1700000000,
    )
    envelope = parse_envelope(body)
    assert envelope.to_user == CORP_ID
    assert envelope.agent_id == AGENT_ID
    message = parse_message(crypto.decrypt(envelope.encrypt))
    assert message.from_user == "zhangsan"
    assert message.content == "你好 <b>&</b>"
    assert message.msg_id == "1234567890123456789"
    assert message.create_time == 1700000000
    assert message.msg_type == "text"
    assert message.corp_id == CORP_ID
    assert open_callback(crypto, params, body)["AgentID"] == AGENT_ID


def test_event_callback_decrypts(crypto: WeComCrypto) -> None:
    params, body = build_event_callback(
        crypto, from_user="lisi", event="enter_agent", agent_id=AGENT_ID, create_time=1700000001
    )
    fields = open_callback(crypto, params, body)
    assert fields["MsgType"] == "event"
    assert fields["Event"] == "enter_agent"
    assert fields["EventKey"] == ""
    assert parse_message(crypto.decrypt(parse_envelope(body).encrypt)).dedupe_key() == (
        "event:lisi:1700000001:enter_agent:"
    )


def test_any_message_type(crypto: WeComCrypto) -> None:
    fields = {
        "FromUserName": "u",
        "CreateTime": 1,
        "MsgType": "image",
        "PicUrl": "http://p",
        "MediaId": "m1",
        "MsgId": "42",
        "AgentID": AGENT_ID,
    }
    params, body = build_callback(crypto, fields)
    decrypted = open_callback(crypto, params, body)
    assert decrypted["MediaId"] == "m1"
    assert decrypted["ToUserName"] == CORP_ID


def test_callbacks_are_unique(crypto: WeComCrypto) -> None:
    one = build_text_callback(crypto, from_user="u", content="c", msg_id="1", agent_id=AGENT_ID)
    two = build_text_callback(crypto, from_user="u", content="c", msg_id="1", agent_id=AGENT_ID)
    assert one[1] != two[1]  # random AES prefix


def test_wechatpy_decrypts_our_callback(crypto: WeComCrypto) -> None:
    params, body = build_text_callback(
        crypto, from_user="zhangsan", content="独立实现验证 ✅", msg_id="99", agent_id=AGENT_ID
    )
    oracle = WeChatCrypto(TOKEN, AES_KEY, CORP_ID)
    xml = oracle.decrypt_message(
        body.decode(), params["msg_signature"], params["timestamp"], params["nonce"]
    )
    assert parse_xml(xml.encode())["Content"] == "独立实现验证 ✅"


def test_wechatpy_checks_our_url_verification(crypto: WeComCrypto) -> None:
    params = build_url_verification(crypto, "echo-123")
    oracle = WeChatCrypto(TOKEN, AES_KEY, CORP_ID)
    echo = oracle.check_signature(
        params["msg_signature"], params["timestamp"], params["nonce"], params["echostr"]
    )
    assert echo == "echo-123"


def test_we_decrypt_what_wechatpy_encrypts(crypto: WeComCrypto) -> None:
    oracle = WeChatCrypto(TOKEN, AES_KEY, CORP_ID)
    inner = "<xml><Content><![CDATA[来自 wechatpy]]></Content><MsgType>text</MsgType></xml>"
    envelope = parse_xml(oracle.encrypt_message(inner, "12345", "1700000000").encode())
    crypto.verify_signature(envelope["MsgSignature"], "1700000000", "12345", envelope["Encrypt"])
    assert parse_xml(crypto.decrypt(envelope["Encrypt"]))["Content"] == "来自 wechatpy"


@pytest.fixture
def receiver(crypto: WeComCrypto) -> Iterator[tuple[ServerThread, list[dict[str, str]]]]:
    """A minimal callback endpoint that checks what CallbackClient sends."""
    received: list[dict[str, str]] = []
    app = Flask("receiver")

    @app.route("/wxcomapp", methods=["GET", "POST"])
    def callback() -> Response | str:
        args = request.args
        if request.method == "GET":
            return crypto.verify_url(
                args["msg_signature"], args["timestamp"], args["nonce"], args["echostr"]
            )
        received.append(open_callback(crypto, dict(args), request.get_data()))
        return ""

    with ServerThread(app) as server:
        yield server, received


def test_callback_client(crypto: WeComCrypto, receiver) -> None:
    server, received = receiver
    client = CallbackClient(server.url + "/wxcomapp", crypto, AGENT_ID)
    assert client.verify_url("hello-echo").text == "hello-echo"
    assert client.verify_url().text.isdigit()
    assert client.send_text("zhangsan", "问题？", msg_id="777").status_code == 200
    assert client.send_text("zhangsan", "second").status_code == 200
    assert client.send_event("zhangsan", "enter_agent").status_code == 200
    assert [r.get("Content") for r in received] == ["问题？", "second", None]
    assert received[0]["MsgId"] == "777"
    assert received[1]["MsgId"] != received[0]["MsgId"]
    assert received[2]["Event"] == "enter_agent"


# --- WeCom API double ------------------------------------------------------------------------


@pytest.fixture
def wecom() -> Iterator[ServerThread]:
    app = create_wecom_double(corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID)
    with ServerThread(app) as server:
        yield server


def gettoken(server: ServerThread, corpid: str = CORP_ID, secret: str = SECRET) -> dict:
    params = {"corpid": corpid, "corpsecret": secret}
    return requests.get(server.url + "/cgi-bin/gettoken", params=params, timeout=5).json()


def send(server: ServerThread, token: str, content: str = "hi", user: str = "u1") -> dict:
    body = {
        "touser": user,
        "msgtype": "text",
        "agentid": int(AGENT_ID),
        "text": {"content": content},
    }
    url = server.url + "/cgi-bin/message/send"
    return requests.post(url, params={"access_token": token}, json=body, timeout=5).json()


def test_gettoken(wecom: ServerThread) -> None:
    data = gettoken(wecom)
    assert data["errcode"] == 0
    assert data["expires_in"] == 7200
    assert gettoken(wecom, secret="wrong")["errcode"] == 40001
    assert gettoken(wecom, corpid="wrong")["errcode"] == 40013
    assert wecom.app.extensions["wecom_double"].gettoken_calls == 3


def test_send_records_messages(wecom: ServerThread) -> None:
    token = gettoken(wecom)["access_token"]
    result = send(wecom, token, "第一条")
    assert result["errcode"] == 0
    assert result["errmsg"] == "ok"
    assert result["invaliduser"] == ""
    assert result["msgid"]
    messages = requests.get(wecom.url + "/_double/messages", timeout=5).json()["messages"]
    assert [m["text"]["content"] for m in messages] == ["第一条"]
    assert messages[0]["touser"] == "u1"
    assert messages[0]["received_at"] <= time.time()
    assert requests.delete(wecom.url + "/_double/messages", timeout=5).ok
    assert requests.get(wecom.url + "/_double/messages", timeout=5).json() == {"messages": []}


def test_send_checks_the_token(wecom: ServerThread) -> None:
    assert send(wecom, "")["errcode"] == 41001
    assert send(wecom, "made-up")["errcode"] == 40014
    token = gettoken(wecom)["access_token"]
    assert requests.post(wecom.url + "/_double/expire-tokens", timeout=5).ok
    assert send(wecom, token)["errcode"] == 42001
    assert send(wecom, gettoken(wecom)["access_token"])["errcode"] == 0


def test_journal_keeps_messages_and_tokens_across_restarts(tmp_path) -> None:
    journal = tmp_path / "wecom-double.jsonl"
    first = create_wecom_double(corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID, journal=journal)
    with ServerThread(first) as server:
        token = gettoken(server)["access_token"]
        old_token = gettoken(server)["access_token"]
        assert send(server, token, "before the clear")["errcode"] == 0
        assert requests.delete(server.url + "/_double/messages", timeout=5).ok
        assert send(server, token, "kept")["errcode"] == 0
    with journal.open("a") as cut:
        cut.write('{"kind": "message", "rec')  # killed mid-write

    second = create_wecom_double(corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID, journal=journal)
    with ServerThread(second) as server:
        messages = requests.get(server.url + "/_double/messages", timeout=5).json()["messages"]
        assert [m["text"]["content"] for m in messages] == ["kept"]
        assert send(server, old_token)["errcode"] == 0  # issued tokens stay valid
        assert requests.post(server.url + "/_double/expire-tokens", timeout=5).ok
    third = create_wecom_double(corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID, journal=journal)
    with ServerThread(third) as server:
        assert send(server, token)["errcode"] == 42001
        assert (
            len(requests.get(server.url + "/_double/messages", timeout=5).json()["messages"]) == 2
        )


def test_journal_is_compacted_to_the_state_at_start_and_owner_only(tmp_path) -> None:
    journal = tmp_path / "wecom-double.jsonl"
    first = create_wecom_double(corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID, journal=journal)
    with ServerThread(first) as server:
        token = gettoken(server)["access_token"]
        for n in range(20):
            assert send(server, token, f"old {n}")["errcode"] == 0
        assert requests.delete(server.url + "/_double/messages", timeout=5).ok
        assert send(server, token, "kept")["errcode"] == 0
        assert requests.post(server.url + "/_double/expire-tokens", timeout=5).ok
    assert len(journal.read_text().splitlines()) == 24

    for _ in range(2):  # replaying a compacted journal gives the same state again
        again = create_wecom_double(
            corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID, journal=journal
        )
        kinds = [json.loads(line)["kind"] for line in journal.read_text().splitlines()]
        assert kinds == ["token", "message"]
        assert journal.stat().st_mode & 0o777 == 0o600
        with ServerThread(again) as server:
            assert send(server, token)["errcode"] == 42001  # still expired, not unknown (40014)
            messages = requests.get(server.url + "/_double/messages", timeout=5).json()
            assert [m["text"]["content"] for m in messages["messages"]] == ["kept"]


def test_tokens_expire_after_their_ttl() -> None:
    now = [0.0]
    app = create_wecom_double(corp_id=CORP_ID, secret=SECRET, token_ttl=60, clock=lambda: now[0])
    with ServerThread(app) as server:
        token = gettoken(server)["access_token"]
        assert send(server, token)["errcode"] == 0
        now[0] = 60.0
        assert send(server, token)["errcode"] == 42001


def test_send_validates_the_body(wecom: ServerThread) -> None:
    token = gettoken(wecom)["access_token"]
    url = wecom.url + "/cgi-bin/message/send"

    def post(body: dict) -> int:
        resp = requests.post(url, params={"access_token": token}, json=body, timeout=5)
        return resp.json()["errcode"]

    text = {"msgtype": "text", "text": {"content": "x"}, "touser": "u"}
    assert post({**text, "agentid": 999}) == 40056
    assert post({**text, "agentid": int(AGENT_ID), "touser": ""}) == 81013
    # An image message names an uploaded media_id (media/upload), else 40007.
    assert post({"msgtype": "image", "agentid": int(AGENT_ID), "touser": "u"}) == 40007
    assert post({"msgtype": "news", "agentid": int(AGENT_ID), "touser": "u"}) == 47001
    assert post({**text, "agentid": AGENT_ID, "text": {"content": ""}}) == 44004
    markdown = {"msgtype": "markdown", "markdown": {"content": "**b**"}, "touser": "u"}
    assert post({**markdown, "agentid": AGENT_ID}) == 0


def test_media_upload_takes_wecom_types_and_limits(wecom: ServerThread) -> None:
    """media/upload (doc 90389): multipart `media`, type image|voice|video|file, an image is
    JPG/PNG of at most 10 MB, a file at most 20 MB, everything more than 5 bytes; the media_id
    it returns is what an image/file message names."""
    token = gettoken(wecom)["access_token"]
    url = wecom.url + "/cgi-bin/media/upload"

    def upload(kind: str, data: bytes, name: str = "a.png") -> dict:
        params = {"access_token": token, "type": kind}
        files = {"media": (name, data, "application/octet-stream")}
        return requests.post(url, params=params, files=files, timeout=30).json()

    png = tiny_png()
    assert upload("sticker", png)["errcode"] == 40005
    assert upload("image", b"")["errcode"] == 44001
    assert upload("file", b"12345")["errcode"] == 40006
    assert upload("image", b"GIF89a" + bytes(100))["errcode"] == 40004
    assert upload("image", png + bytes(10 * 1024 * 1024))["errcode"] == 40009
    assert upload("file", bytes(20 * 1024 * 1024 + 1), "big.bin")["errcode"] == 40006
    done = upload("image", png)
    assert done["errcode"] == 0 and done["type"] == "image" and done["created_at"].isdigit()
    body = {"msgtype": "image", "agentid": AGENT_ID, "touser": "u"}
    sent = requests.post(
        wecom.url + "/cgi-bin/message/send",
        params={"access_token": token},
        json={**body, "image": {"media_id": done["media_id"]}},
        timeout=5,
    ).json()
    assert sent["errcode"] == 0
    (message,) = wecom.app.extensions["wecom_double"].snapshot()
    assert message["media"] == {"type": "image", "filename": "a.png", "bytes": len(png)}


def test_over_long_text_is_truncated_silently(wecom: ServerThread) -> None:
    token = gettoken(wecom)["access_token"]
    assert send(wecom, token, "长" * 700)["errcode"] == 0
    (message,) = wecom.app.extensions["wecom_double"].snapshot()
    assert message["truncated"] is True
    assert message["content_bytes"] == 2100
    assert message["text"]["content"] == "长" * 682


def test_rate_limit_drops_silently() -> None:
    now = [0.0]
    app = create_wecom_double(corp_id=CORP_ID, secret=SECRET, clock=lambda: now[0])
    with ServerThread(app) as server:
        token = gettoken(server)["access_token"]
        for i in range(31):
            assert send(server, token, f"m{i}")["errcode"] == 0
        assert send(server, token, "other user", user="u2")["errcode"] == 0
        stats = requests.get(server.url + "/_double/stats", timeout=5).json()
        assert stats["messages"] == 31
        assert stats["dropped"] == 1
        assert stats["dropped_messages"][0]["text"]["content"] == "m30"
        now[0] = 60.0
        assert send(server, token, "next minute")["errcode"] == 0
        assert server.app.extensions["wecom_double"].snapshot()[-1]["text"]["content"] == (
            "next minute"
        )


def test_faults_through_the_control_api(wecom: ServerThread) -> None:
    faults = {"gettoken": [60020], "send": [45009, 42001]}
    assert requests.post(wecom.url + "/_double/faults", json=faults, timeout=5).ok
    refused = gettoken(wecom)
    assert refused["errcode"] == 60020
    assert refused["errmsg"].startswith("not allow to access from your ip, hint: [")
    assert (
        ", from ip: 203.0.113.7, more info at https://open.work.weixin.qq.com/devtool/query?e=60020"
        in (refused["errmsg"])
    )
    token = gettoken(wecom)["access_token"]
    assert send(wecom, token)["errcode"] == 45009
    assert send(wecom, token)["errcode"] == 42001
    assert send(wecom, token)["errcode"] == 0
    bad = requests.post(wecom.url + "/_double/faults", json={"media": [1]}, timeout=5)
    assert bad.status_code == 400


def test_fail_next_rejects_unknown_api(wecom: ServerThread) -> None:
    with pytest.raises(ValueError, match="api"):
        wecom.app.extensions["wecom_double"].fail_next("media", 1)


def test_callback_ip(wecom: ServerThread) -> None:
    token = gettoken(wecom)["access_token"]
    ips = requests.get(
        wecom.url + "/cgi-bin/getcallbackip", params={"access_token": token}, timeout=5
    ).json()
    assert ips["errcode"] == 0
    assert ips["ip_list"]
    unauth = requests.get(wecom.url + "/cgi-bin/getcallbackip", timeout=5).json()
    assert unauth["errcode"] == 41001


def test_reset_keeps_tokens(wecom: ServerThread) -> None:
    state = wecom.app.extensions["wecom_double"]
    token = gettoken(wecom)["access_token"]
    send(wecom, token)
    state.fail_next("send", 45009)
    state.reset()
    assert state.stats()["gettoken_calls"] == 0
    assert send(wecom, token)["errcode"] == 0


def test_wecom_double_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WECOM_CORP_ID", CORP_ID)
    monkeypatch.setenv("WECOM_SECRET", SECRET)
    monkeypatch.setenv("WECOM_AGENT_ID", AGENT_ID)
    state = wecom_double_from_env().extensions["wecom_double"]
    assert (state.corp_id, state.secret, state.agent_id) == (CORP_ID, SECRET, AGENT_ID)
    monkeypatch.delenv("WECOM_SECRET")
    with pytest.raises(ConfigError, match="WECOM_SECRET"):
        wecom_double_from_env()


# --- Dify API double -------------------------------------------------------------------------


@pytest.fixture
def dify_mode() -> str:
    return "chat"


@pytest.fixture
def dify(dify_mode: str) -> Iterator[ServerThread]:
    with ServerThread(create_dify_double(api_key=DIFY_KEY, mode=dify_mode)) as server:
        yield server
        server.app.extensions["dify_double"].reset()


def v1(
    server: ServerThread,
    path: str,
    body: dict | None = None,
    key: str = DIFY_KEY,
    stream: bool = False,
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{server.url}/v1{path}"
    if body is None:
        return requests.get(url, headers=headers, timeout=5)
    return requests.post(url, json=body, headers=headers, timeout=5, stream=stream)


def sse(response: requests.Response) -> list[dict]:
    events = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            events.append(json.loads(block[6:]))
        elif block:
            events.append({"raw": block})
    return events


def chat(query: str = "q", user: str = "u", mode: str = "streaming", cid: str = "") -> dict:
    return {
        "inputs": {},
        "query": query,
        "user": user,
        "response_mode": mode,
        "conversation_id": cid,
    }


def test_dify_auth(dify: ServerThread) -> None:
    wrong = v1(dify, "/info", key="nope")
    assert wrong.status_code == 401
    assert wrong.json()["code"] == "unauthorized"
    missing = requests.get(dify.url + "/v1/info", timeout=5)
    assert missing.status_code == 401
    info = v1(dify, "/info").json()
    assert info["mode"] == "chat"
    assert set(info) == {"name", "description", "tags", "mode", "author_name"}
    assert "user_input_form" in v1(dify, "/parameters").json()


def test_dify_streaming_chat(dify: ServerThread) -> None:
    response = v1(dify, "/chat-messages", chat("你好"))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = sse(response)
    assert events[0] == {"raw": "event: ping"}
    messages = [e for e in events if e.get("event") == "message"]
    assert len(messages) > 1
    assert "".join(e["answer"] for e in messages) == "Dify double answer: 你好"
    end = events[-1]
    assert end["event"] == "message_end"
    assert end["metadata"]["usage"]["total_tokens"] > 0
    assert end["conversation_id"]


def test_dify_answers_with_signed_files_as_dify_does(dify: ServerThread) -> None:
    """message_file events (id, type, belongs_to, url) and markdown links carry relative URLs
    signed as Dify's api/core/file/helpers.py and api/core/tools/signature.py sign them; the
    files are served with the signature checked (no API key), 403 when wrong or expired, 404
    when unknown; GET /messages lists them as message_files."""
    events = sse(v1(dify, "/chat-messages", chat("看图 #image #md-image")))
    (attached,) = [e for e in events if e.get("event") == "message_file"]
    assert {"id", "type", "belongs_to", "url", "conversation_id"} <= set(attached)
    assert (attached["type"], attached["belongs_to"]) == ("image", "assistant")
    assert attached["url"].startswith(f"/files/tools/{attached['id']}.png?timestamp=")
    assert events.index(attached) < len(events) - 1 and events[-1]["event"] == "message_end"
    text = "".join(e["answer"] for e in events if e.get("event") == "message")
    assert "![chart](/files/tools/" in text
    image = requests.get(dify.url + attached["url"], timeout=5)
    assert image.status_code == 200 and image.content == tiny_png(1)
    assert image.headers["Content-Type"] == "image/png"
    forged = attached["url"].replace("sign=", "sign=x")
    assert requests.get(dify.url + forged, timeout=5).status_code == 403
    files: DifyAnswerFiles = dify.app.extensions["dify_double"].answer_files
    expired = files.tool_url(attached["id"], timestamp=int(time.time()) - 301)
    assert requests.get(dify.url + expired, timeout=5).status_code == 403
    unknown = files.preview_url("00000000-0000-0000-0000-000000000000")
    assert requests.get(dify.url + unknown, timeout=5).status_code == 404
    history = v1(dify, f"/messages?conversation_id={attached['conversation_id']}&user=u").json()
    stored = history["data"][-1]["message_files"]
    assert stored == [{k: attached[k] for k in ("id", "type", "url", "belongs_to")}]


def test_dify_blocking_chat_and_conversations(dify: ServerThread) -> None:
    first = v1(dify, "/chat-messages", chat("one", mode="blocking")).json()
    assert first["answer"] == "Dify double answer: one"
    cid = first["conversation_id"]
    again = v1(dify, "/chat-messages", chat("two", mode="blocking", cid=cid)).json()
    assert again["conversation_id"] == cid
    other_user = v1(dify, "/chat-messages", chat("x", user="someone-else", cid=cid))
    assert other_user.status_code == 404
    unknown = v1(dify, "/chat-messages", chat(cid="00000000-0000-4000-8000-000000000000"))
    assert unknown.status_code == 404
    assert unknown.json() == {
        "code": "not_found",
        "message": "Conversation Not Exists.",
        "status": 404,
    }
    assert requests.delete(dify.url + "/_double/conversations", timeout=5).ok
    assert v1(dify, "/chat-messages", chat(cid=cid)).status_code == 404


def test_dify_validation(dify: ServerThread) -> None:
    assert v1(dify, "/chat-messages", chat(user="")).status_code == 400
    assert v1(dify, "/chat-messages", chat(query="")).status_code == 400
    wrong_route = v1(dify, "/completion-messages", {"inputs": {"query": "q"}, "user": "u"})
    assert wrong_route.json()["code"] == "not_completion_app"


@pytest.mark.parametrize("dify_mode", ["agent-chat"])
def test_dify_agent_mode(dify: ServerThread) -> None:
    assert v1(dify, "/chat-messages", chat(mode="blocking")).status_code == 400
    events = sse(v1(dify, "/chat-messages", chat("tool")))
    kinds = {e.get("event") for e in events}
    assert {"agent_thought", "agent_message", "message_end"} <= kinds
    assert "message" not in kinds


@pytest.mark.parametrize("dify_mode", ["completion"])
def test_dify_completion_mode(dify: ServerThread) -> None:
    body = {"inputs": {"query": "诗"}, "user": "u", "response_mode": "blocking"}
    data = v1(dify, "/completion-messages", body).json()
    assert data["answer"] == "Dify double answer: 诗"
    assert data["conversation_id"] == ""
    assert v1(dify, "/chat-messages", chat()).json()["code"] == "not_chat_app"


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_dify_workflow_mode(dify: ServerThread) -> None:
    body = {"inputs": {"query": "run"}, "user": "u", "response_mode": "blocking"}
    data = v1(dify, "/workflows/run", body).json()
    assert data["data"]["status"] == "succeeded"
    assert data["data"]["outputs"] == {"answer": "Dify double answer: run"}
    streamed = sse(v1(dify, "/workflows/run", {**body, "response_mode": "streaming"}))
    assert streamed[-1]["event"] == "workflow_finished"
    assert "".join(e["data"]["text"] for e in streamed if e.get("event") == "text_chunk") == (
        "Dify double answer: run"
    )


def test_dify_control_api(dify: ServerThread) -> None:
    url = dify.url + "/_double"
    requests.post(
        url + "/faults",
        json={"status": 500, "code": "internal_server_error", "times": 2},
        timeout=5,
    )
    assert v1(dify, "/chat-messages", chat()).status_code == 500
    assert v1(dify, "/chat-messages", chat()).status_code == 500
    assert v1(dify, "/chat-messages", chat()).status_code == 200
    requests.post(url + "/answer", json={"text": "固定回答"}, timeout=5)
    assert v1(dify, "/chat-messages", chat(mode="blocking")).json()["answer"] == "固定回答"
    requests.post(url + "/answer", json={"text": None}, timeout=5)
    requests.post(url + "/delay", json={"seconds": 0.3}, timeout=5)
    started = time.monotonic()
    assert (
        v1(dify, "/chat-messages", chat("slow", mode="blocking")).json()["answer"].endswith("slow")
    )
    assert time.monotonic() - started >= 0.3
    requests.post(url + "/delay", json={"seconds": 0}, timeout=5)
    requests.post(url + "/faults", json={"hang": 0.4, "times": 1}, timeout=5)
    with pytest.raises(requests.Timeout):
        requests.post(
            dify.url + "/v1/chat-messages",
            json=chat(),
            headers={"Authorization": f"Bearer {DIFY_KEY}"},
            timeout=(2, 0.2),
        )
    recorded = requests.get(url + "/requests", timeout=5).json()["requests"]
    assert len(recorded) == 6
    assert recorded[0]["json"]["query"] == "q"
    assert all("Authorization" not in json.dumps(r) for r in recorded)
    assert requests.delete(url + "/requests", timeout=5).ok
    assert requests.get(url + "/requests", timeout=5).json() == {"requests": []}
    assert requests.post(url + "/faults", json={}, timeout=5).status_code == 400


def test_dify_error_event_in_stream(dify: ServerThread) -> None:
    dify.app.extensions["dify_double"].fail_next(
        400, "completion_request_error", "bad", in_stream=True
    )
    response = v1(dify, "/chat-messages", chat())
    assert response.status_code == 200
    last = sse(response)[-1]
    assert (last["event"], last["status"], last["code"]) == (
        "error",
        400,
        "completion_request_error",
    )


def test_dify_health_and_setup(dify: ServerThread) -> None:
    health = requests.get(dify.url + "/health", timeout=5).json()
    assert health["status"] == "ok"
    assert health["version"]
    setup = dify.url + "/console/api/setup"
    assert requests.get(setup, timeout=5).json() == {"step": "not_started"}
    admin = {"email": "admin@example.com", "name": "admin", "password": "Passw0rd-long"}
    assert requests.post(setup, json=admin, timeout=5).status_code == 201
    assert requests.get(setup, timeout=5).json()["step"] == "finished"
    assert requests.post(setup, json=admin, timeout=5).status_code == 403


def test_dify_setup_survives_a_restart_with_a_setup_file(tmp_path) -> None:
    admin = {"email": "admin@example.com", "name": "admin", "password": "Passw0rd-long"}
    setup_file = tmp_path / "dify-double-setup"
    with ServerThread(create_dify_double(api_key=DIFY_KEY, setup_file=setup_file)) as first:
        assert requests.post(first.url + "/console/api/setup", json=admin, timeout=5).ok
    with ServerThread(create_dify_double(api_key=DIFY_KEY, setup_file=setup_file)) as second:
        setup = second.url + "/console/api/setup"
        assert requests.get(setup, timeout=5).json()["step"] == "finished"
        assert requests.post(setup, json=admin, timeout=5).status_code == 403


def test_dify_double_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFY_API_KEY", DIFY_KEY)
    monkeypatch.setenv("DIFY_DOUBLE_MODE", "workflow")
    monkeypatch.setenv("DIFY_DOUBLE_DELAY_MS", "250")
    state = dify_double_from_env().extensions["dify_double"]
    assert (state.api_key, state.mode, state.delay) == (DIFY_KEY, "workflow", 0.25)
    assert state.answer_files.files_url == ""  # no FILES_URL: relative links, as in Dify
    monkeypatch.setenv("FILES_URL", "https://kb.example.com/")
    monkeypatch.setenv("SECRET_KEY", "sk-test")
    files = dify_double_from_env().extensions["dify_double"].answer_files
    assert (files.files_url, files.secret_key) == ("https://kb.example.com", "sk-test")
    file_id = files.add(tiny_png(), ".png", "image/png")
    assert files.tool_url(file_id).startswith(f"https://kb.example.com/files/tools/{file_id}.png?")
    monkeypatch.delenv("FILES_URL")
    monkeypatch.delenv("SECRET_KEY")
    with pytest.raises(ValueError, match="mode"):
        create_dify_double(api_key="k", mode="chatbot")
    monkeypatch.setenv("DIFY_DOUBLE_DELAY_MS", "soon")
    with pytest.raises(ConfigError, match="DIFY_DOUBLE_DELAY_MS"):
        dify_double_from_env()
    monkeypatch.delenv("DIFY_API_KEY")
    monkeypatch.setenv("DIFY_DOUBLE_DELAY_MS", "0")
    with pytest.raises(ConfigError, match="DIFY_API_KEY"):
        dify_double_from_env()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("0.0.0.0:9001", (ALL_INTERFACES, 9001)),
        ("[::1]:9002", ("::1", 9002)),
        (":9003", (ALL_INTERFACES, 9003)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


def test_parse_listen_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen("localhost")


# --- the Dify double follows Dify's server ----------------------------------------------------
# Sources (langgenius/dify, 2026, as summarised in the project's Dify facts): pings every ~10 s and
# blocking answers silent until the end — api/libs/helper.py (compact_generate_response) and
# api/core/app/apps/base_app_generate_response_converter.py; the message recorded before the model
# runs, listed by GET /v1/messages — api/core/app/apps/message_based_app_generator.py; workflow run
# statuses — api/core/workflow/enums.py; inputs kept to the app's form, required ones enforced,
# conversation ids as UUIDs — api/core/app/apps/base_app_generator.py and
# api/controllers/service_api/app/completion.py. The search tool held none of these files this
# session: re-read them against these tests when a real Dify is at hand.


def authed_get(server: ServerThread, path: str, **params: str) -> requests.Response:
    return requests.get(
        f"{server.url}/v1{path}",
        params=params,
        headers={"Authorization": f"Bearer {DIFY_KEY}"},
        timeout=5,
    )


def test_dify_streams_ping_while_the_model_thinks(dify: ServerThread) -> None:
    state = dify.app.extensions["dify_double"]
    state.ping_interval = 0.1
    state.set_delay(0.55)
    events = sse(v1(dify, "/chat-messages", chat()))
    pings = [e for e in events if e.get("raw") == "event: ping"]
    assert len(pings) >= 5  # the first one, then one per interval while the model runs
    assert events[-1]["event"] == "message_end"


def test_dify_blocking_answer_sends_nothing_until_the_end(dify: ServerThread) -> None:
    dify.app.extensions["dify_double"].set_delay(0.6)
    with pytest.raises(requests.Timeout):  # no byte within 0.3 s, not even headers
        requests.post(
            dify.url + "/v1/chat-messages",
            json=chat(mode="blocking"),
            headers={"Authorization": f"Bearer {DIFY_KEY}"},
            timeout=(2, 0.3),
        )


def test_dify_records_messages_and_lists_them(dify: ServerThread) -> None:
    first = v1(dify, "/chat-messages", chat("一", mode="blocking")).json()
    cid = first["conversation_id"]
    v1(dify, "/chat-messages", chat("二", mode="blocking", cid=cid))
    page = authed_get(dify, "/messages", conversation_id=cid, user="u").json()
    assert [m["query"] for m in page["data"]] == ["一", "二"]  # oldest first
    assert page["data"][0]["answer"] == "Dify double answer: 一"
    assert page["data"][0]["id"] == first["message_id"]
    assert page["data"][0]["status"] == "normal"
    assert page["has_more"] is False
    older = authed_get(
        dify, "/messages", conversation_id=cid, user="u", limit="1", first_id=page["data"][1]["id"]
    ).json()
    assert [m["query"] for m in older["data"]] == ["一"]
    assert authed_get(dify, "/messages", conversation_id=cid, user="other").status_code == 404
    assert authed_get(dify, "/messages", conversation_id="nope", user="u").status_code == 400


def test_dify_message_shows_its_answer_once_generation_ended(dify: ServerThread) -> None:
    """Dify records the message before the model runs and fills in the answer at the end,
    whether the client is still listening or not."""
    state = dify.app.extensions["dify_double"]
    state.hang_next(0.6, mid_stream=True)
    with pytest.raises(requests.RequestException):  # the stream stalls after its first chunk
        requests.post(
            dify.url + "/v1/chat-messages",
            json=chat("慢"),
            headers={"Authorization": f"Bearer {DIFY_KEY}"},
            timeout=(2, 0.3),
        )
    (message,) = state.messages
    cid = message["conversation_id"]
    running = authed_get(dify, "/messages", conversation_id=cid, user="u").json()["data"]
    assert running[0]["answer"] == ""
    time.sleep(0.7)
    done = authed_get(dify, "/messages", conversation_id=cid, user="u").json()["data"]
    assert done[0]["answer"] == "Dify double answer: 慢"


def test_dify_failed_message_is_recorded_as_an_error(dify: ServerThread) -> None:
    state = dify.app.extensions["dify_double"]
    state.fail_next(400, "completion_request_error", "rate limited", in_stream=True)
    assert sse(v1(dify, "/chat-messages", chat()))[-1]["event"] == "error"
    (message,) = state.messages
    assert (message["status"], message["error"], message["answer"]) == (
        "error",
        "rate limited",
        "",
    )


def test_dify_conversation_id_must_be_a_uuid(dify: ServerThread) -> None:
    refused = v1(dify, "/chat-messages", chat(cid="not-a-uuid"))
    assert refused.status_code == 400
    assert refused.json()["code"] == "invalid_param"
    assert "conversation_id" in refused.json()["message"]
    unknown = v1(dify, "/chat-messages", chat(cid="3f6d6b3e-0000-4000-8000-000000000000"))
    assert (unknown.status_code, unknown.json()["message"]) == (404, "Conversation Not Exists.")


def test_dify_keeps_only_declared_inputs_and_enforces_required_ones(dify: ServerThread) -> None:
    state = dify.app.extensions["dify_double"]
    assert v1(dify, "/parameters").json()["user_input_form"] == []
    form = [
        {"text-input": {"variable": "dept", "label": "部门", "required": True}},
        {"select": {"variable": "lang", "label": "语言", "required": False, "options": ["zh"]}},
    ]
    state.set_input_form(form)
    assert v1(dify, "/parameters").json()["user_input_form"] == form
    missing = v1(dify, "/chat-messages", chat(mode="blocking"))
    assert missing.status_code == 400
    assert missing.json() == {
        "code": "invalid_param",
        "message": "dept is required in input form",
        "status": 400,
    }
    body = {**chat(mode="blocking"), "inputs": {"dept": "HR", "typo": "dropped"}}
    assert v1(dify, "/chat-messages", body).status_code == 200
    assert state.messages[-1]["inputs"] == {"dept": "HR"}


@pytest.mark.parametrize("dify_mode", ["workflow"])
@pytest.mark.parametrize("status", ["succeeded", "partial-succeeded", "failed", "stopped"])
def test_dify_workflow_statuses(dify: ServerThread, status: str) -> None:
    state = dify.app.extensions["dify_double"]
    state.workflow_status_next(status)
    body = {"inputs": {"query": "run"}, "user": "u", "response_mode": "streaming"}
    events = sse(v1(dify, "/workflows/run", body))
    assert events[1]["event"] == "workflow_started"
    finished = events[-1]
    assert finished["event"] == "workflow_finished"
    assert finished["data"]["status"] == status
    ok = status in ("succeeded", "partial-succeeded")
    assert bool(finished["data"]["outputs"]) is ok
    assert bool(finished["data"]["error"]) is not ok
    run = authed_get(dify, f"/workflows/run/{finished['workflow_run_id']}").json()
    assert run["status"] == status


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_dify_workflow_paused_for_human_input(dify: ServerThread) -> None:
    state = dify.app.extensions["dify_double"]
    state.workflow_status_next("paused")
    body = {"inputs": {"query": "approve"}, "user": "u", "response_mode": "streaming"}
    last = sse(v1(dify, "/workflows/run", body))[-1]
    assert last["event"] == "workflow_paused"
    assert last["data"]["status"] == "paused"
    assert last["data"]["paused_nodes"]
    assert authed_get(dify, f"/workflows/run/{last['workflow_run_id']}").json()["status"] == (
        "paused"
    )


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_dify_workflow_requires_its_declared_input(dify: ServerThread) -> None:
    body = {"inputs": {"question": "run"}, "user": "u", "response_mode": "blocking"}
    refused = v1(dify, "/workflows/run", body)
    assert (refused.status_code, refused.json()["message"]) == (
        400,
        "query is required in input form",
    )


def test_dify_reasoning_and_control_api(dify: ServerThread) -> None:
    url = dify.url + "/_double"
    requests.post(url + "/reasoning", json={"text": "想一想"}, timeout=5)
    answer = v1(dify, "/chat-messages", chat(mode="blocking")).json()["answer"]
    assert answer.startswith("<think>\n想一想\n</think>")
    odd = requests.post(url + "/workflow-status", json={"status": "odd"}, timeout=5)
    assert odd.status_code == 400
    form = [{"text-input": {"variable": "x", "label": "x", "required": True}}]
    requests.post(url + "/input-form", json={"user_input_form": form}, timeout=5)
    assert v1(dify, "/chat-messages", chat(mode="blocking")).status_code == 400
    assert len(requests.get(url + "/messages", timeout=5).json()["messages"]) == 1


GOOD_ITEM = StreamImage.of(tiny_png(5)).item()


def test_the_ai_bot_double_takes_msg_item_images_as_wecom_documents_them() -> None:
    """WeCom doc 101031 (智能机器人 › 被动回复消息 › 流式消息回复): msg_item only with finish,
    at most 10, JPG/PNG up to 10 MB before base64, md5 of the raw bytes."""
    assert stream_images({"finish": True, "msg_item": [GOOD_ITEM]}) == [tiny_png(5)]
    assert stream_images({"finish": False}) == []


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param({"finish": False, "msg_item": [GOOD_ITEM]}, id="not-finishing"),
        pytest.param(
            {
                "finish": True,
                "msg_item": [{**GOOD_ITEM, "image": {**GOOD_ITEM["image"], "md5": "0"}}],
            },
            id="wrong-md5",
        ),
        pytest.param(
            {"finish": True, "msg_item": [StreamImage.of(b"GIF89a" + bytes(40)).item()]}, id="gif"
        ),
        pytest.param({"finish": True, "msg_item": [GOOD_ITEM] * 11}, id="eleven"),
        pytest.param(
            {"finish": True, "msg_item": [{"msgtype": "image", "image": {"base64": "%%"}}]},
            id="not-base64",
        ),
    ],
)
def test_the_ai_bot_double_refuses_msg_item_wecom_would_not_take(stream: dict) -> None:
    with pytest.raises(StreamImageError):
        stream_images(stream)
