"""Proactive messages: the send API and the `send` CLI, over real HTTP against the WeCom double."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import AppSecrets, BridgeProcess, wait_for, wecom_env, wecom_state

from wecom_bridge.config import load_config
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.server import ServerThread

API_TOKEN = "test-api-token-0123456789abcdef"
TASK_NOTICE = "### 任务通知 \n **任务名称:** 开发测试 \n **状态:** 进行中 🚀"


def five_thousand_bytes() -> str:
    """Exactly 5,000 bytes of mixed Chinese, ASCII and emoji, few natural break points."""
    text = ""
    n = 0
    while len(text.encode()) < 4990:
        text += f"部署{n}完成deploy-ok🚀，"
        n += 1
    text = text.encode()[:4990].decode("utf-8", "ignore")
    text += "x" * (5000 - len(text.encode()))
    assert len(text.encode()) == 5000
    return text


# --- API fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def api_env(bridge_env: dict[str, str]) -> dict[str, str]:
    return {**bridge_env, "BRIDGE_API_TOKEN": API_TOKEN}


@pytest.fixture
def api_bridge(api_env: dict[str, str]) -> Iterator[ServerThread]:
    app = create_app(load_config(api_env))
    with ServerThread(app) as server:
        yield server
    app.extensions["wecom_bridge"].pool.stop()


def post(
    base: str, body: Any, token: str | None = API_TOKEN, key: str | None = None, **kwargs: Any
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if isinstance(body, bytes):
        return requests.post(
            f"{base}/api/v1/messages", data=body, headers=headers, timeout=10, **kwargs
        )
    return requests.post(f"{base}/api/v1/messages", json=body, headers=headers, timeout=10)


def status(base: str, job_id: int, token: str = API_TOKEN) -> dict[str, Any]:
    resp = requests.get(
        f"{base}/api/v1/messages/{job_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def jobs(server: ServerThread) -> list:
    return server.app.extensions["wecom_bridge"].store.jobs()


def wait_status(base: str, job_id: int, wanted: str, timeout: float = 20) -> dict[str, Any]:
    return wait_for(  # type: ignore[return-value]
        lambda: (s := status(base, job_id))["status"] == wanted and s, timeout=timeout
    )


# --- API: authentication ----------------------------------------------------------------------


def test_api_disabled_without_token(bridge: ServerThread) -> None:
    body = {"touser": "zhangsan", "msgtype": "text", "content": "hi"}
    assert post(bridge.url, body).status_code == 404
    assert post(bridge.url, body, token=None).status_code == 404
    assert requests.get(f"{bridge.url}/api/v1/messages/1", timeout=5).status_code == 404
    assert jobs(bridge) == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {API_TOKEN}x"},
        {"Authorization": f"Basic {API_TOKEN}"},
        {"Authorization": API_TOKEN},
        {"X-Api-Token": API_TOKEN},
    ],
)
def test_api_refuses_missing_or_wrong_token(
    api_bridge: ServerThread, wecom_double: ServerThread, headers: dict[str, str]
) -> None:
    body = {"touser": "zhangsan", "msgtype": "text", "content": "hi"}
    resp = requests.post(f"{api_bridge.url}/api/v1/messages", json=body, headers=headers, timeout=5)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.json()["error"]
    get = requests.get(f"{api_bridge.url}/api/v1/messages/1", headers=headers, timeout=5)
    assert get.status_code == 401
    time.sleep(0.3)
    assert jobs(api_bridge) == []
    assert wecom_state(wecom_double).snapshot() == []


# --- API: validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"msgtype": "text", "content": "hi"}, "touser"),
        ({"touser": "", "toparty": "", "msgtype": "text", "content": "hi"}, "touser"),
        ({"touser": "a b", "msgtype": "text", "content": "hi"}, "touser"),
        ({"toparty": "sales", "msgtype": "text", "content": "hi"}, "toparty"),
        ({"totag": [1, "x"], "msgtype": "text", "content": "hi"}, "totag"),
        ({"touser": "zhangsan", "content": "hi"}, "msgtype"),
        ({"touser": "zhangsan", "msgtype": "image", "content": "hi"}, "msgtype"),
        ({"touser": "zhangsan", "msgtype": "text", "content": "  "}, "content"),
        ({"touser": "zhangsan", "msgtype": "text", "content": 5}, "content"),
        ({"touser": "zhangsan", "msgtype": "text", "content": "hi", "safe": 2}, "safe"),
        (
            {"touser": "zhangsan", "msgtype": "text", "content": "hi", "enable_duplicate_check": 3},
            "enable_duplicate_check",
        ),
        (
            {"touser": "u", "msgtype": "text", "content": "hi", "duplicate_check_interval": 0},
            "duplicate_check_interval",
        ),
        ({"touser": "zhangsan", "msgtype": "text", "content": "hi", "app": "nope"}, "app"),
        ({"to_user": "zhangsan", "msgtype": "text", "content": "hi"}, "to_user"),
        (["zhangsan"], None),
        (b"{not json", None),
    ],
)
def test_api_validation_errors(api_bridge: ServerThread, body: Any, field: str | None) -> None:
    resp = post(api_bridge.url, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field
    assert resp.json()["error"]
    assert jobs(api_bridge) == []


# --- API: sending -----------------------------------------------------------------------------


def test_api_markdown_notice_is_sent_with_msgid(
    api_bridge: ServerThread, wecom_double: ServerThread, secrets: AppSecrets
) -> None:
    body = {
        "touser": "zhangsan|lisi",
        "msgtype": "markdown",
        "content": TASK_NOTICE,
        "enable_duplicate_check": 1,
        "duplicate_check_interval": 600,
    }
    resp = post(api_bridge.url, body)
    assert resp.status_code == 202
    accepted = resp.json()
    assert accepted == {"id": accepted["id"], "status": "queued"}
    assert resp.headers["Location"] == f"/api/v1/messages/{accepted['id']}"
    done = wait_status(api_bridge.url, accepted["id"], "sent")
    (message,) = wecom_state(wecom_double).snapshot()
    assert message["touser"] == "zhangsan|lisi"
    assert message["msgtype"] == "markdown"
    assert message["markdown"]["content"] == TASK_NOTICE
    assert str(message["agentid"]) == secrets.agent_id
    assert (message["safe"], message["enable_duplicate_check"]) == (0, 1)
    assert message["duplicate_check_interval"] == 600
    assert done["msgids"] == [message["msgid"]]
    assert (done["parts"], done["parts_sent"], done["errcode"], done["error"]) == (1, 1, 0, None)
    assert done["invaliduser"] == ""


def test_api_5000_bytes_arrive_as_ordered_parts(
    api_bridge: ServerThread, wecom_double: ServerThread
) -> None:
    content = five_thousand_bytes()
    resp = post(api_bridge.url, {"touser": "wangwu", "msgtype": "text", "content": content})
    assert resp.status_code == 202
    done = wait_status(api_bridge.url, resp.json()["id"], "sent")
    messages = wecom_state(wecom_double).snapshot()
    parts = [m["text"]["content"] for m in messages]
    assert len(parts) == 3
    assert all(len(p.encode()) <= 2048 for p in parts)
    assert not any(m.get("truncated") for m in messages)
    assert "".join(parts) == content
    assert done["parts"] == done["parts_sent"] == 3
    assert done["msgids"] == [m["msgid"] for m in messages]


def test_api_party_tag_and_invalid_users_reported(
    api_bridge: ServerThread, wecom_double: ServerThread
) -> None:
    wecom_state(wecom_double).set_unknown_users("ghost")
    body = {"touser": ["ghost", "zhaoliu"], "toparty": 2, "totag": "7|8", "msgtype": "text"}
    resp = post(api_bridge.url, {**body, "content": "全员通知", "safe": True})
    assert resp.status_code == 202
    done = wait_status(api_bridge.url, resp.json()["id"], "sent")
    (message,) = wecom_state(wecom_double).snapshot()
    recipients = (message["touser"], message["toparty"], message["totag"])
    assert recipients == ("ghost|zhaoliu", "2", "7|8")
    assert message["safe"] == 1
    assert done["invaliduser"] == "ghost"


def test_api_all_recipients_invalid_fails_with_81013(
    api_bridge: ServerThread, wecom_double: ServerThread
) -> None:
    wecom_state(wecom_double).set_unknown_users("ghost")
    resp = post(api_bridge.url, {"touser": "ghost", "msgtype": "text", "content": "hello"})
    failed = wait_status(api_bridge.url, resp.json()["id"], "failed")
    assert failed["errcode"] == 81013 and "81013" in failed["error"]
    assert failed["attempts"] == 1  # not retried: no recipient will become valid by waiting
    assert failed["msgids"] == [] and failed["parts_sent"] == 0


def test_api_shows_only_send_jobs(
    api_bridge: ServerThread, wecom_double: ServerThread, secrets: AppSecrets
) -> None:
    chats = CallbackClient(f"{api_bridge.url}/wxcomapp", secrets.crypto(), secrets.agent_id)
    assert chats.send_text("sunqi", "年假怎么请？").status_code == 200
    wait_for(lambda: wecom_state(wecom_double).snapshot())
    (chat,) = jobs(api_bridge)
    for job_id in (chat.id, 999):
        resp = requests.get(
            f"{api_bridge.url}/api/v1/messages/{job_id}",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=5,
        )
        assert resp.status_code == 404


def test_api_send_and_chat_answer_to_one_member_keep_order(
    api_bridge: ServerThread, wecom_double: ServerThread, secrets: AppSecrets
) -> None:
    chats = CallbackClient(f"{api_bridge.url}/wxcomapp", secrets.crypto(), secrets.agent_id)
    assert chats.send_text("qianba", "first question").status_code == 200
    first = post(api_bridge.url, {"touser": "qianba", "msgtype": "text", "content": "notice 1"})
    second = post(api_bridge.url, {"touser": "qianba", "msgtype": "text", "content": "notice 2"})
    wait_status(api_bridge.url, second.json()["id"], "sent")
    assert first.json()["id"] < second.json()["id"]
    texts = [m["text"]["content"] for m in wecom_state(wecom_double).snapshot()]
    assert len(texts) == 3
    assert "first question" in texts[0]
    assert texts[1:] == ["notice 1", "notice 2"]


# --- API: idempotency -------------------------------------------------------------------------


def test_api_retries_with_an_idempotency_key_send_once(
    api_bridge: ServerThread, wecom_double: ServerThread
) -> None:
    body = {"touser": "zhangsan", "msgtype": "text", "content": "部署完成"}
    first = post(api_bridge.url, body, key="deploy-42")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    job_id = first.json()["id"]
    wait_status(api_bridge.url, job_id, "sent")
    # A client that timed out retries, several times and at once: nothing new is queued.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        retries = list(pool.map(lambda _: post(api_bridge.url, body, key="deploy-42"), range(4)))
    for retry in retries:
        assert retry.status_code == 202
        assert retry.json() == {"id": job_id, "status": "sent"}
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.headers["Location"] == f"/api/v1/messages/{job_id}"
    without_key = post(api_bridge.url, body)  # no key: a new message, as before
    assert without_key.json()["id"] != job_id
    wait_status(api_bridge.url, without_key.json()["id"], "sent")
    sent = [m["text"]["content"] for m in wecom_state(wecom_double).snapshot()]
    assert sent == ["部署完成", "部署完成"]


def test_api_replay_after_the_job_was_swept_says_expired(
    api_bridge: ServerThread, wecom_double: ServerThread
) -> None:
    body = {"touser": "zhangsan", "msgtype": "text", "content": "hi"}
    job_id = post(api_bridge.url, body, key="old-notice").json()["id"]
    wait_status(api_bridge.url, job_id, "sent")
    store = api_bridge.app.extensions["wecom_bridge"].store
    store.sweep(dedupe_ttl=3600, job_retention=-1)  # the job is past its retention, the key not
    replay = post(api_bridge.url, body, key="old-notice")
    assert (replay.status_code, replay.json()) == (202, {"id": job_id, "status": "expired"})
    assert len(wecom_state(wecom_double).snapshot()) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "two words", "tab\there"])
def test_api_refuses_a_malformed_idempotency_key(api_bridge: ServerThread, key: str) -> None:
    body = {"touser": "zhangsan", "msgtype": "text", "content": "hi"}
    resp = post(api_bridge.url, body, key=key)
    assert resp.status_code == 400
    assert resp.json()["field"] == "Idempotency-Key"
    assert jobs(api_bridge) == []


def test_api_idempotency_key_reused_for_another_message_is_a_conflict(
    api_bridge: ServerThread,
) -> None:
    first = post(api_bridge.url, {"touser": "zhangsan", "msgtype": "text", "content": "A"}, key="k")
    other = post(api_bridge.url, {"touser": "zhangsan", "msgtype": "text", "content": "B"}, key="k")
    assert other.status_code == 409
    assert other.json()["field"] == "Idempotency-Key"
    assert str(first.json()["id"]) in other.json()["error"]
    assert [job.id for job in jobs(api_bridge)] == [first.json()["id"]]


# --- API: durability --------------------------------------------------------------------------


def test_queued_messages_survive_restart_and_are_sent_once(
    api_env: dict[str, str], wecom_double: ServerThread
) -> None:
    state = wecom_state(wecom_double)
    # The job side cannot send (server IP not trusted) until the admin fixes it.
    state.fail_next("gettoken", *[60020] * 200)
    first = BridgeProcess(api_env).start()
    bodies = [
        {"touser": f"member{n}", "msgtype": "text", "content": f"通知 {n}"} for n in range(4)
    ] + [{"touser": "member0", "msgtype": "text", "content": "通知 0 的后续"}]
    try:
        accepted = [post(first.url, body) for body in bodies]
        assert [r.status_code for r in accepted] == [202] * len(bodies)
        ids = [r.json()["id"] for r in accepted]
        # Every member's first message was tried and refused, and waits in the store.
        wait_for(lambda: all(status(first.url, i)["errcode"] == 60020 for i in ids[:4]))
        assert {status(first.url, i)["status"] for i in ids} <= {"queued", "running"}
    finally:
        first.kill9()
    assert state.snapshot() == []

    state.reset()  # the admin added the IP to 企业可信IP
    second = BridgeProcess(api_env).start()
    try:
        wait_for(lambda: all(status(second.url, i)["status"] == "sent" for i in ids), timeout=60)
        time.sleep(1.0)  # a duplicate send would show up now
    finally:
        log = second.stop()
    sent = state.snapshot()
    assert sorted(m["text"]["content"] for m in sent) == sorted(b["content"] for b in bodies), log
    member0 = [m["text"]["content"] for m in sent if m["touser"] == "member0"]
    assert member0 == ["通知 0", "通知 0 的后续"]


# --- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, secrets: AppSecrets, wecom_double: ServerThread) -> dict[str, str]:
    """Only the WeCom part of the configuration: no DIFY_* at all."""
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("DIFY_", "WECOM_", "BRIDGE_"))
    }
    return {
        **inherited,
        **wecom_env(secrets, wecom_double.url),
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
    }


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "wecom_bridge", "send", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_sends_text_then_markdown_with_one_token(
    cli_env: dict[str, str], wecom_double: ServerThread, secrets: AppSecrets
) -> None:
    state = wecom_state(wecom_double)
    first = run_cli(cli_env, "--to", "zhangsan|lisi", "--text", "你想吃什么")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("part 1/1: sent (errcode 0) msgid=double-")
    assert "invaliduser=- invalidparty=- invalidtag=-" in first.stdout
    second = run_cli(cli_env, "--to", "zhangsan", "--markdown", TASK_NOTICE, "--safe")
    assert second.returncode == 0, second.stderr
    text, markdown = state.snapshot()
    assert (text["touser"], text["msgtype"], text["text"]["content"]) == (
        "zhangsan|lisi",
        "text",
        "你想吃什么",
    )
    assert str(text["agentid"]) == secrets.agent_id and text["safe"] == 0
    assert (markdown["msgtype"], markdown["markdown"]["content"]) == ("markdown", TASK_NOTICE)
    assert markdown["safe"] == 1
    assert text["msgid"] in first.stdout
    assert state.gettoken_calls == 1  # the second run used the cached token


def test_cli_shares_the_token_cache_with_the_bridge(
    cli_env: dict[str, str], api_env: dict[str, str], wecom_double: ServerThread
) -> None:
    assert cli_env["BRIDGE_DATA_DIR"] == api_env["BRIDGE_DATA_DIR"]
    assert run_cli(cli_env, "--to", "zhangsan", "--text", "from the CLI").returncode == 0
    app = create_app(load_config(api_env))
    try:
        with ServerThread(app) as server:
            resp = post(server.url, {"touser": "lisi", "msgtype": "text", "content": "from API"})
            wait_status(server.url, resp.json()["id"], "sent")
    finally:
        app.extensions["wecom_bridge"].pool.stop()
    assert wecom_state(wecom_double).gettoken_calls == 1


def test_cli_long_markdown_from_stdin_in_parts(
    cli_env: dict[str, str], wecom_double: ServerThread
) -> None:
    content = five_thousand_bytes()
    args = ("--to", "wangwu", "--file", "-", "--msgtype", "markdown")
    result = run_cli(cli_env, *args, stdin=content)
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "part 1/3",
        "part 2/3",
        "part 3/3",
    ]
    parts = [m["markdown"]["content"] for m in wecom_state(wecom_double).snapshot()]
    assert all(len(p.encode()) <= 2048 for p in parts)
    assert "".join(parts) == content


def test_cli_file_and_party_and_invalid_users(
    cli_env: dict[str, str], wecom_double: ServerThread, tmp_path: Path
) -> None:
    state = wecom_state(wecom_double)
    state.set_unknown_users("ghost")
    notice = tmp_path / "notice.txt"
    notice.write_text("部署完成", encoding="utf-8")
    result = run_cli(
        cli_env, "--to", "ghost|zhaoliu", "--party", "2", "--tag", "5", "--file", str(notice)
    )
    assert result.returncode == 0, result.stderr
    assert "invaliduser=ghost invalidparty=- invalidtag=-" in result.stdout
    assert "could not deliver to: invaliduser ghost" in result.stderr
    (message,) = state.snapshot()
    assert (message["toparty"], message["totag"], message["text"]["content"]) == (
        "2",
        "5",
        "部署完成",
    )


@pytest.mark.parametrize(
    ("api", "errcode", "explained"),
    [
        ("gettoken", 40001, ["errcode 40001", "wrong secret", "WECOM_SECRET"]),
        ("gettoken", 60020, ["errcode 60020", "not trusted", "企业可信IP", "add: 203.0.113.7"]),
        ("send", 81013, ["errcode 81013", "no valid recipient"]),
        ("send", 45009, ["errcode 45009", "rate limit", "try again later"]),
        ("send", 40056, ["errcode 40056: invalid agentid"]),
    ],
)
def test_cli_failures_are_explained(
    cli_env: dict[str, str],
    wecom_double: ServerThread,
    api: str,
    errcode: int,
    explained: list[str],
) -> None:
    state = wecom_state(wecom_double)
    state.fail_next(api, errcode)
    result = run_cli(cli_env, "--to", "zhangsan", "--text", "hello", "--attempts", "1")
    assert result.returncode == 1
    assert f"part 1/1: failed (errcode {errcode})" in result.stdout
    for words in explained:
        assert words in result.stderr
    assert cli_env["WECOM_SECRET"] not in result.stderr + result.stdout
    assert state.snapshot() == []


def test_cli_transient_error_retried_then_sent(
    cli_env: dict[str, str], wecom_double: ServerThread
) -> None:
    """45033 (too many concurrent calls) clears in seconds; 45009, a frequency block of a
    minute to a day, is reported at once (test_cli_explains_errcodes) instead."""
    wecom_state(wecom_double).fail_next("send", 45033)
    result = run_cli(cli_env, "--to", "zhangsan", "--text", "hello", "--attempts", "2")
    assert result.returncode == 0, result.stderr
    assert len(wecom_state(wecom_double).snapshot()) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--text", "hi"], "--to: give at least one of"),
        (["--to", "a b", "--text", "hi"], "--to:"),
        (["--to", "u", "--text", " "], "--text/--markdown/--file: must be a non-empty string"),
        (["--to", "u", "--file", "/nonexistent/notice.txt"], "cannot read /nonexistent"),
        (["--to", "u", "--text", "hi", "--msgtype", "markdown"], "--msgtype goes with --file"),
        (["--to", "u", "--text", "hi", "--app", "other"], "--app: no app named 'other'"),
    ],
)
def test_cli_usage_errors(cli_env: dict[str, str], args: list[str], expected: str) -> None:
    result = run_cli(cli_env, *args)
    assert result.returncode == 2
    assert expected in result.stderr


def test_cli_config_error_names_the_variable(cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "WECOM_SECRET"}
    result = run_cli(env, "--to", "u", "--text", "hi")
    assert result.returncode == 2
    assert "WECOM_SECRET: is required" in result.stderr


def test_cli_unusable_data_dir_says_what_to_do(cli_env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli(
        {**cli_env, "BRIDGE_DATA_DIR": str(blocker / "data")}, "--to", "u", "--text", "hi"
    )
    assert result.returncode == 2
    assert "run as the bridge's user" in result.stderr


def test_api_body_too_large(api_bridge: ServerThread) -> None:
    body = {"touser": "u", "msgtype": "text", "content": "x" * 70_000}
    resp = post(api_bridge.url, body)
    assert resp.status_code == 413
    assert resp.json()["error"]
    assert jobs(api_bridge) == []
