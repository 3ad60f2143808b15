"""The production server (`wecom-bridge serve`, gunicorn gthread): connections that are open
but silent do not hold the threads callbacks need."""

from __future__ import annotations

import socket
import time

import requests
from conftest import BridgeProcess


def test_silent_connections_do_not_hold_the_web_threads(bridge_env: dict[str, str]) -> None:
    bridge = BridgeProcess({**bridge_env, "BRIDGE_WEB_THREADS": "2"}).start()
    silent = []
    try:
        for _ in range(6):  # three times the threads: connected, never sending
            silent.append(socket.create_connection(("127.0.0.1", bridge.port)))
        time.sleep(0.3)  # the server has accepted them
        started = time.monotonic()
        answer = requests.get(f"{bridge.url}/healthz", timeout=10)
        waited = time.monotonic() - started
    finally:
        for sock in silent:
            sock.close()
        bridge.stop()
    assert answer.status_code == 200
    # Each silent connection held a thread for 5 s before the fix (gthread's data wait).
    assert waited < 2.5, f"/healthz waited {waited:.1f} s behind silent connections"
