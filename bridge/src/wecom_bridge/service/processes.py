"""Production serving: gunicorn for HTTP plus one supervised job process (`work`)."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from typing import Any

from gunicorn.app.base import BaseApplication

from wecom_bridge.config import BridgeConfig
from wecom_bridge.logs import setup_logging
from wecom_bridge.service.app import create_app

log = logging.getLogger("wecom_bridge.service.processes")
RESTART_DELAY_MIN = 1.0
RESTART_DELAY_MAX = 30.0
HEALTHY_RUN_SECONDS = 60.0  # a job process that lived this long resets the restart backoff


class JobProcessSupervisor:
    """Runs `python -m wecom_bridge work` and restarts it when it dies (from gunicorn's master)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._supervise, name="job-supervisor", daemon=True).start()

    def _supervise(self) -> None:
        delay = RESTART_DELAY_MIN
        while not self._stopping.is_set():
            started = time.monotonic()
            self._proc = subprocess.Popen([sys.executable, "-m", "wecom_bridge", "work"])
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            # A process that keeps dying at start (e.g. an unwritable data dir) is retried ever
            # more slowly; one that ran a while is restarted after the shortest delay.
            if time.monotonic() - started > HEALTHY_RUN_SECONDS:
                delay = RESTART_DELAY_MIN
            log.error(
                "job process exited, restarting",
                extra={"exit_code": code, "restart_in_seconds": delay},
            )
            self._stopping.wait(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    def stop(self) -> None:
        self._stopping.set()
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class BridgeServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: BridgeConfig) -> None:
        self.bridge_config = config
        self.jobs = JobProcessSupervisor()
        super().__init__()

    def load_config(self) -> None:
        config = self.bridge_config
        options = {
            "bind": config.listen,
            "workers": config.web_workers,
            "threads": config.web_threads,
            "worker_class": "gthread",
            # WeCom gives up after 5 s; nothing a callback does should come near this.
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "when_ready": lambda server: self.jobs.start(),
            # The master's log writer thread is not forked: each web worker starts its own.
            "post_fork": lambda server, worker: setup_logging(
                config.log_format, config.log_level, background=True
            ),
            "on_exit": lambda server: self.jobs.stop(),
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.bridge_config, in_process_workers=False)


def run_server(config: BridgeConfig) -> None:
    # An unusable data dir is reported by the store (503, /readyz), not fatal here.
    with contextlib.suppress(OSError):
        config.data_dir.mkdir(parents=True, exist_ok=True)
    BridgeServer(config).run()
