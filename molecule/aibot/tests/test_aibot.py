"""The AI bot on its long connection, deployed by site.yml on a server without a public name: the
bridge subscribed to the AI-bot double over WebSocket, a member's group-chat question answered by
streaming, and a kill -9 of the bridge mid-answer still answered exactly once."""

import json
import shlex
import time

import pytest

CONTROL = "http://127.0.0.1:9301/control"
ANSWER = "年假按工龄计算：满一年五天，满十年十天，满二十年十五天。" * 12


def curl(host, url, body=None):
    args = ["curl", "-sS", "--max-time", "10", url]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    result = host.run(shlex.join(args))
    if result.rc != 0:  # the bridge restarting: nothing answers for a moment
        return {}
    out = result.stdout
    return json.loads(out) if out.strip().startswith(("{", "[")) else out


def dify_double(host, path, body):
    """The Dify stand-in's double (in Dify's api container) takes its control calls locally."""
    script = (
        "import json,sys,urllib.request;"
        f"urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:5001{path}',"
        "data=sys.argv[1].encode(),headers={'Content-Type':'application/json'}))"
    )
    host.check_output(
        shlex.join(
            [
                "docker",
                "exec",
                "dify-api-1",
                "/opt/wecom-bridge/venv/bin/python",
                "-c",
                script,
                json.dumps(body),
            ]
        )
    )


def wait(predicate, timeout=90.0, step=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {timeout}s")


@pytest.fixture(autouse=True)
def paced_dify(host):
    dify_double(host, "/_double/answer", {"text": ANSWER})
    dify_double(host, "/_double/pace", {"chunk_chars": 8, "chunk_interval": 0.1})
    yield
    dify_double(host, "/_double/reset", {})


def test_no_edge_and_the_bot_subscribed(host):
    assert not host.package("nginx").is_installed
    assert not host.socket("tcp://0.0.0.0:443").is_listening
    ready = curl(host, "http://127.0.0.1:8400/readyz")
    assert ready["ready"] is True
    assert ready["aibot"] == {"aibot:aibot-molecule-0001": "subscribed"}
    assert curl(host, f"{CONTROL}/status")["connected"] is True


def test_a_group_chat_question_is_answered_by_streaming(host):
    msgid = curl(
        host,
        f"{CONTROL}/messages",
        {"userid": "zhangsan", "text": "@知识库助手 年假怎么算？", "chatid": "grp-hr"},
    )["msgid"]
    view = wait(lambda: (v := curl(host, f"{CONTROL}/messages/{msgid}"))["finished"] and v)
    assert view["finished"] == ANSWER
    growing = [u["content"] for u in view["updates"] if not u["finish"] and u["content"] != "…"]
    assert len(growing) >= 2  # the member saw the answer being written
    assert all(ANSWER.startswith(text) for text in growing)


def test_kill_9_of_the_bridge_mid_answer_is_still_answered_exactly_once(host):
    msgid = curl(
        host,
        f"{CONTROL}/messages",
        {"userid": "lisi", "text": "@知识库助手 加班怎么算？", "chatid": "grp-it"},
    )["msgid"]
    wait(lambda: len(curl(host, f"{CONTROL}/messages/{msgid}")["updates"]) >= 3, step=0.1)
    pid = host.check_output("docker inspect -f '{{.State.Pid}}' wecom-bridge")
    host.check_output(f"kill -9 {pid}")  # the whole container dies; its restart policy restarts it
    assert curl(host, f"{CONTROL}/messages/{msgid}")["finished"] is None
    answers = wait(lambda: curl(host, f"{CONTROL}/messages/{msgid}").get("answers"), timeout=150)
    time.sleep(5)
    assert curl(host, f"{CONTROL}/messages/{msgid}")["answers"] == [ANSWER] == answers
    wait(lambda: curl(host, "http://127.0.0.1:8400/readyz").get("ready"), timeout=60)
