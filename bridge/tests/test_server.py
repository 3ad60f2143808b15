"""The production server (`wecom-bridge serve`, granian): connections that are open
but silent do not hold the threads callbacks need; the job process gives way to them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from conftest import BridgeProcess

from wecom_bridge.service.job_process import JOB_PROCESS_NICENESS


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


def test_the_main_process_does_not_load_the_tools_or_the_web_app() -> None:
    """granian's main process only supervises; it forks the web workers, so every module it
    loads is memory the container pays for again in each worker once refcounts touch it."""
    probe = (
        "import sys\n"
        "import wecom_bridge.cli\n"
        "import wecom_bridge.service.processes\n"  # what cmd_serve adds before granian forks
        "heavy = ('flask', 'werkzeug', 'psycopg', 'sqlite3', 'wecom_bridge.testing',"
        " 'wecom_bridge.tools', 'wecom_bridge.web', 'wecom_bridge.jobs')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", f"`serve` loaded: {out.strip()}"
