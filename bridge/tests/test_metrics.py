"""One /metrics for every process: snapshots merge, and a 2-worker `serve` counts each
callback once whichever worker took it."""

from __future__ import annotations

import re

import requests
from conftest import AppSecrets, BridgeProcess, wait_for, wecom_state

from wecom_bridge.metrics import Metrics
from wecom_bridge.service.processes import MetricsExchange
from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.server import ServerThread


def test_snapshots_add_up_counters_and_histograms() -> None:
    web, jobs = Metrics(), Metrics()
    web.inc("wecom_bridge_callbacks_total", {"outcome": "accepted"}, 3)
    jobs.inc("wecom_bridge_callbacks_total", {"outcome": "accepted"}, 2)
    jobs.inc("wecom_bridge_jobs_total", {"status": "done"})
    jobs.observe("wecom_bridge_dify_latency_seconds", 0.2)
    web.observe("wecom_bridge_dify_latency_seconds", 3.0)
    text = web.render([jobs.snapshot()])
    assert 'wecom_bridge_callbacks_total{outcome="accepted"} 5' in text
    assert 'wecom_bridge_jobs_total{status="done"} 1' in text
    assert "wecom_bridge_dify_latency_seconds_count 2" in text
    assert 'wecom_bridge_dify_latency_seconds_bucket{le="0.25"} 1' in text
    assert "wecom_bridge_dify_latency_seconds_sum 3.2" in text


def test_exchange_skips_its_own_and_broken_files(tmp_path) -> None:
    mine, other = MetricsExchange(tmp_path, "web"), MetricsExchange(tmp_path, "jobs")
    registry = Metrics()
    registry.inc("wecom_bridge_token_refreshes_total")
    mine.publish(registry)  # same pid, other role: a file of its own
    other.publish(registry)
    (tmp_path / "metrics.d" / "web-1.json").write_text("{half a fi", encoding="utf-8")
    assert len(mine.collect()) == 1  # the jobs file; not its own, not the broken one
    mine.reset()
    assert mine.collect() == []


def _accepted(url: str) -> int:
    text = requests.get(f"{url}/metrics", timeout=5).text
    match = re.search(r'wecom_bridge_callbacks_total\{outcome="accepted"\} (\d+)', text)
    return int(match.group(1)) if match else 0


def test_two_web_workers_report_every_callback_once(
    bridge_env: dict[str, str], secrets: AppSecrets, wecom_double: ServerThread
) -> None:
    bridge = BridgeProcess({**bridge_env, "BRIDGE_WEB_WORKERS": "2"}).start()
    try:
        client = CallbackClient(f"{bridge.url}/wxcomapp", secrets.crypto(), secrets.agent_id)
        for n in range(20):
            # A new connection each time, so both workers take some of them.
            client.session = requests.Session()
            assert client.send_text(f"m{n}", f"q{n}", msg_id=f"7700{n}").status_code == 200
        wait_for(lambda: len(wecom_state(wecom_double).snapshot()) == 20, timeout=30)
        # Every scrape, whichever worker answers it, sees all 20 once published (1 s).
        wait_for(lambda: all(_accepted(bridge.url) == 20 for _ in range(6)), timeout=10)
        # The job process's counters arrive through the same exchange.
        done = 'wecom_bridge_jobs_total{status="done"} 20'
        wait_for(lambda: done in requests.get(f"{bridge.url}/metrics", timeout=5).text)
    finally:
        log = bridge.stop()
    assert "Traceback" not in log, log
