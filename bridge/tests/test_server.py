"""The production server (`wecom-bridge serve`, granian): connections that are open
but silent do not hold the threads callbacks need; the job process gives way to them."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import requests
from conftest import BridgeProcess

from wecom_bridge.service.processes import JOB_PROCESS_NICENESS


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
    # On gunicorn gthread each silent connection held a thread for 5 s (its data wait).
    assert waited < 2.5, f"/healthz waited {waited:.1f} s behind silent connections"


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found = []
    for task in tasks.iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_the_job_process_yields_the_cpu_to_the_callbacks(bridge_env: dict[str, str]) -> None:
    bridge = BridgeProcess(bridge_env).start()
    try:
        assert bridge.proc is not None
        jobs = [pid for pid in _children(bridge.proc.pid) if "work" in _cmdline(pid)]
        assert len(jobs) == 1
        niceness = int(Path(f"/proc/{jobs[0]}/stat").read_text().rsplit(")", 1)[1].split()[16])
        web = os.getpriority(os.PRIO_PROCESS, bridge.proc.pid)
    finally:
        bridge.stop()
    assert niceness == web + JOB_PROCESS_NICENESS
