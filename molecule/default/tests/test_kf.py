"""微信客服 on the deployed stack: the WeCom double's customer → signed kf callback through the
edge nginx (/wxcomkf) → the bridge pulls kf/sync_msg → Dify stand-in → kf/send_msg at the double.

A customer's burst of five is answered in order, a restart of the bridge between two pulls
neither loses nor repeats a message (the cursor is stored), and a hand-over to a human servicer
silences the bot until the session returns. Each test is its own customer.
"""

import json
import secrets
import time

import pytest
from conftest import TEST_VARS, WECOM_DOUBLE
from wecom_bridge.testing.callbacks import build_url_verification
from wecom_bridge.wecom.crypto import WeComCrypto

KF_PATH = TEST_VARS["wecom_edge_kf_callback_path"]
READY_URL = "http://127.0.0.1:8400/readyz"
JSON = ("-H", "Content-Type: application/json")


def customer():
    return f"wmMOLECULE{secrets.token_hex(6)}"


def double(edge, path, spec=None):
    """A control call to the WeCom double's kf part (GET without spec, POST with)."""
    if spec is None:
        res = edge.request(f"{WECOM_DOUBLE}{path}")
    else:
        body = json.dumps(spec, ensure_ascii=False).encode()
        res = edge.request(f"{WECOM_DOUBLE}{path}", method="POST", body=body, extra=JSON)
    assert res.status == 200, res
    return json.loads(res.body)


def says(edge, user, text):
    """The customer writes; the double signals the bridge through the edge (its answer: 200)."""
    result = double(edge, "/_double/kf/customer", {"external_userid": user, "text": text})
    assert result["callback_status"] == 200, result


def received(edge, user):
    return [
        m["text"]["content"]
        for m in double(edge, f"/_double/kf/sent?external_userid={user}")["messages"]
    ]


def wait_received(edge, user, count, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        got = received(edge, user)
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def session_state(edge, kfid_user_suffix):
    sessions = double(edge, "/_double/kf/stats")["sessions"]
    return next(s["state"] for key, s in sessions.items() if key.endswith(f":{kfid_user_suffix}"))


def test_kf_url_verification_through_the_edge(edge):
    crypto = WeComCrypto(
        TEST_VARS["wecom_test_kf_token"],
        TEST_VARS["wecom_test_kf_encoding_aes_key"],
        TEST_VARS["wecom_test_corp_id"],
    )
    echostr = str(secrets.randbelow(10**19))
    res = edge.https(KF_PATH, query=build_url_verification(crypto, echostr))
    assert res.status == 200 and res.body == echostr


def test_kf_burst_of_five_answered_in_order(edge):
    user = customer()
    questions = [f"kf burst {n} {secrets.token_hex(3)}" for n in range(5)]
    for question in questions:
        says(edge, user, question)
    got = wait_received(edge, user, 5)
    assert len(got) == 5, got
    assert all(q in answer for q, answer in zip(questions, got, strict=True)), got
    time.sleep(3)  # the later pulls find nothing new: still five
    assert len(received(edge, user)) == 5


def test_kf_welcome_on_enter_session(edge):
    user = customer()
    result = double(edge, "/_double/kf/customer", {"external_userid": user, "event": "enter"})
    assert result["callback_status"] == 200
    assert wait_received(edge, user, 1) == [TEST_VARS["wecom_test_kf_welcome_text"]]


def test_kf_handover_silences_the_bot_until_the_session_returns(edge):
    user = customer()
    says(edge, user, "转人工")
    got = wait_received(edge, user, 1)
    assert len(got) == 1 and "人工" in got[0], got
    deadline = time.monotonic() + 20
    while session_state(edge, user) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert session_state(edge, user) == 2  # in the servicer pool
    double(edge, "/_double/kf/servicer", {"external_userid": user, "action": "take"})
    says(edge, user, "人工客服在吗")
    time.sleep(4)
    assert len(received(edge, user)) == 1  # a human holds the session: the bot stays silent
    double(edge, "/_double/kf/servicer", {"external_userid": user, "action": "end"})
    question = f"kf after the human {secrets.token_hex(3)}"
    says(edge, user, question)
    got = wait_received(edge, user, 2)
    assert len(got) == 2 and question in got[1], got


@pytest.mark.disruptive
def test_kf_bridge_restart_between_pulls(edge, host):
    user = customer()
    first = f"kf before the restart {secrets.token_hex(3)}"
    says(edge, user, first)
    assert len(wait_received(edge, user, 1)) == 1
    host.check_output("docker restart wecom-bridge")
    deadline = time.monotonic() + 90
    while host.run(f"curl -sf -o /dev/null {READY_URL}").rc != 0:
        assert time.monotonic() < deadline, "the bridge did not become ready after the restart"
        time.sleep(1)
    second = f"kf after the restart {secrets.token_hex(3)}"
    says(edge, user, second)
    got = wait_received(edge, user, 2)
    time.sleep(3)
    got = received(edge, user)
    assert len(got) == 2, got  # the stored cursor: nothing pulled again, nothing lost
    assert first in got[0] and second in got[1], got
