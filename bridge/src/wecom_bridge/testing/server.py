"""Run a WSGI app (a double) as a real HTTP server on loopback."""

from __future__ import annotations

import os
import threading
from types import TracebackType
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from wecom_bridge import config
from wecom_bridge.errors import ConfigError


class RedactingRequestHandler(WSGIRequestHandler):
    """Access log without query strings: WeCom's API carries the secret and tokens there."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = getattr(self, "path", "").split("?", 1)[0]
        self.log("info", '"%s %s" %s %s', self.command, path, code, size)


ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a double's bare ":port" listens everywhere


def parse_listen(listen: str) -> tuple[str, int]:
    """ "host:port" (IPv6 as "[::1]:9001") into (host, port), by the bridge's own rule."""
    try:
        return config.parse_listen(listen, "--listen", empty_host=ALL_INTERFACES)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class ServerThread:
    """A threaded werkzeug server in a daemon thread; port 0 picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server: BaseWSGIServer = make_server(
            host, port, app, threaded=True, request_handler=RedactingRequestHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits up to one poll interval
            name=f"double-{self._server.port}",
            daemon=True,
        )
        self.app = app
        self.host = host
        self.port = self._server.port
        display = f"[{host}]" if ":" in host else host
        self.url = f"http://{display}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop never started
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_forever(app: Any, listen: str) -> None:
    """Serve `app` on "host:port" until interrupted (the doubles' CLI subcommands)."""
    host, port = parse_listen(listen)
    make_server(
        host, port, app, threaded=True, request_handler=RedactingRequestHandler
    ).serve_forever()


def required_env(name: str) -> str:
    """A variable the doubles' CLI entry points cannot do without."""
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(name, "must be set")
    return value
