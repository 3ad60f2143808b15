"""kill -9 of the serving process: every acknowledged message is answered exactly once."""

from __future__ import annotations

import time
from collections import Counter

import requests
from conftest import AppSecrets, BridgeProcess, dify_state, wait_for, wecom_state

from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.server import ServerThread


def test_kill9_mid_burst_resumes_exactly_once(
    bridge_env: dict[str, str],
    secrets: AppSecrets,
    wecom_double: ServerThread,
    dify_double: ServerThread,
) -> None:
    dify_state(dify_double).delay = 1.5  # the kill lands while answers are being prepared
    first = BridgeProcess(bridge_env).start()
    client = CallbackClient(f"{first.url}/wxcomapp", secrets.crypto(), secrets.agent_id)
    questions = {f"user{n}": f"question number {n}" for n in range(12)}
    acked = [
        u
        for n, (u, q) in enumerate(questions.items())
        if client.send_text(u, q, msg_id=f"9000{n}").status_code == 200
    ]
    first.kill9()
    assert len(acked) == 12
    answered_before = len(wecom_state(wecom_double).snapshot())

    dify_state(dify_double).delay = 0.0
    second = BridgeProcess(bridge_env).start()
    try:
        wait_for(lambda: len(wecom_state(wecom_double).snapshot()) >= 12, timeout=60)
        # WeCom's redelivery of an acknowledged message after the restart adds nothing.
        client.url = f"{second.url}/wxcomapp"
        assert client.send_text("user0", questions["user0"], msg_id="90000").status_code == 200
        time.sleep(1.0)
        # The job process's metrics reach the web side's /metrics (written every second).
        wait_for(
            lambda: (
                "wecom_bridge_wecom_messages_sent_total"
                in requests.get(f"{second.url}/metrics", timeout=5).text
            )
        )
    finally:
        log = second.stop()
    per_user = Counter(m["touser"] for m in wecom_state(wecom_double).snapshot())
    assert answered_before < 12, "the kill came too late to test anything"
    assert {u: per_user[u] for u in questions} == dict.fromkeys(questions, 1), log
