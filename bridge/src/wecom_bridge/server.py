"""Production serving: gunicorn for HTTP plus one supervised job process (`work`)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from typing import Any

from gunicorn.app.base import BaseApplication

from wecom_bridge.app import create_app
from wecom_bridge.config import BridgeConfig

log = logging.getLogger("wecom_bridge.server")


class JobProcessSupervisor:
    """Runs `python -m wecom_bridge work` and restarts it when it dies (from gunicorn's master)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._supervise, name="job-supervisor", daemon=True).start()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            self._proc = subprocess.Popen([sys.executable, "-m", "wecom_bridge", "work"])
            code = self._proc.wait()
            if not self._stopping.is_set():
                log.error("job process exited, restarting", extra={"exit_code": code})
                time.sleep(1.0)

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
            "on_exit": lambda server: self.jobs.stop(),
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.bridge_config, in_process_workers=False)


def run_server(config: BridgeConfig) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    BridgeServer(config).run()
