"""WeCom -> nginx -> bridge -> Dify double -> WeCom double, with real signatures and encryption."""

import secrets
import time

from conftest import CALLBACK_PATH, TEST_VARS, text_of
from wecom_bridge.testing.callbacks import build_text_callback, build_url_verification


def text_callback(crypto, content, msg_id):
    return build_text_callback(
        crypto,
        from_user="molecule-user",
        content=content,
        msg_id=msg_id,
        agent_id=TEST_VARS["wecom_test_agent_id"],
    )


def test_url_verification_returns_echostr(edge, crypto):
    echostr = str(secrets.randbelow(10**19))
    res = edge.https(CALLBACK_PATH, query=build_url_verification(crypto, echostr))
    assert res.status == 200
    assert res.content_type.startswith("text/plain")
    assert res.body == echostr


def test_message_answered_once(edge, crypto):
    text = f"molecule question {secrets.token_hex(4)}"
    msg_id = str(secrets.randbits(62))
    query, body = text_callback(crypto, text, msg_id)

    res = edge.https(CALLBACK_PATH, method="POST", query=query, body=body)
    assert res.status == 200
    assert res.body == ""

    sends = edge.wait_for_send(text)
    assert len(sends) == 1, sends
    assert sends[0]["touser"] == "molecule-user"
    assert str(sends[0]["agentid"]) == TEST_VARS["wecom_test_agent_id"]

    # WeCom redelivers when it misses the 200: the same MsgId must not be answered twice.
    res = edge.https(CALLBACK_PATH, method="POST", query=query, body=body)
    assert res.status == 200
    time.sleep(3)
    assert len([m for m in edge.sent_messages() if text in text_of(m)]) == 1


def test_forged_signature_refused(edge, crypto):
    query, body = text_callback(crypto, "forged", str(secrets.randbits(62)))
    query["msg_signature"] = "0" * 40
    res = edge.https(CALLBACK_PATH, method="POST", query=query, body=body)
    assert res.status == 403
