"""Production WSGI serving through gunicorn (threaded workers)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from wecom_bridge.app import create_app
from wecom_bridge.config import BridgeConfig


def _stop_pool(server: Any, worker: Any) -> None:
    """Hand unfinished jobs back at once on a clean stop instead of waiting for the lease."""
    runtime = getattr(worker.wsgi, "extensions", {}).get("wecom_bridge")
    if runtime is not None:
        runtime.pool.stop()


class BridgeServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: BridgeConfig) -> None:
        self.bridge_config = config
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
            "worker_exit": _stop_pool,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.bridge_config)


def run_server(config: BridgeConfig) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    BridgeServer(config).run()
