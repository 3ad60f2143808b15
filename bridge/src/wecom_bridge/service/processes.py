"""The process model: what runs where in `wecom-bridge serve`, what the processes share, and how
they wake each other.

```
wecom-bridge serve ── granian main ──┬── web worker(s)   HTTP: callbacks, send API, ops
                                     │      │  store: SQLite in BRIDGE_DATA_DIR (synced commits)
                                     │      │  wake.sock ──▶ "jobs were stored"
                                     │      ▼
                                     └── job process (`wecom-bridge work`, supervised)
                                            dispatcher ─▶ workers ─▶ Dify ─▶ WeCom; heartbeats
                       metrics.d/<role>-<pid>.json: every process's counters, merged by /metrics
```

The two sides share nothing but the data directory: the store (the durable queue and its
dedupe keys; or PostgreSQL, BRIDGE_DATABASE_URL, shared with other bridges, whose NOTIFY then
replaces the socket), the wake-up socket (a best-effort poke: a lost one only delays a job until the
workers' next poll, 1 s) and the metrics exchange. So answering Dify never competes with
acknowledging WeCom for one interpreter lock, and either side can die and restart alone:
granian's main process restarts a dead web worker, the supervisor thread a dead job process
(with backoff), and jobs a dead job process held are taken up again when their leases run out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from granian.constants import HTTPModes, Interfaces
from granian.log import LogLevels
from granian.server.mp import MPServer

from wecom_bridge.config import BridgeConfig, parse_listen
from wecom_bridge.logs import setup_logging
from wecom_bridge.metrics import Metrics, Snapshot

log = logging.getLogger("wecom_bridge.processes")

HEARTBEAT_SECONDS = 5.0  # the job process's heartbeat; /readyz wants one within 3 of these
METRICS_PUBLISH_SECONDS = 1.0
RESTART_DELAY_MIN = 1.0
RESTART_DELAY_MAX = 30.0
HEALTHY_RUN_SECONDS = 60.0  # a job process that lived this long resets the restart backoff
WAKE_SOCKET = "wake.sock"
METRICS_DIR = "metrics.d"


# --- waking the job side ------------------------------------------------------------------------


class WakeupSender:
    """The web side's poke after storing a job: a datagram to the job process's socket."""

    def __init__(self, data_dir: Path) -> None:
        self._path = str(data_dir / WAKE_SOCKET)
        self._local = threading.local()

    def send(self, jobs: int = 1) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._local.sock = sock
        with contextlib.suppress(OSError):  # job process not up, or its buffer full: it polls
            sock.sendto(str(jobs).encode(), self._path)


class WakeupListener:
    """Calls `on_wake(jobs)` for every poke; runs in a daemon thread of the job process."""

    def __init__(self, data_dir: Path, on_wake: Callable[[int], None]) -> None:
        self._path = data_dir / WAKE_SOCKET
        self._on_wake = on_wake
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()  # left by a process that was killed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self._path))
        os.chmod(self._path, 0o600)
        self._thread = threading.Thread(target=self._run, name="bridge-wakeup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(64)
            except OSError:
                return
            self._on_wake(int(data) if data.isdigit() else 1)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()


# --- one /metrics for all processes -------------------------------------------------------------


class MetricsExchange:
    """Each process publishes its counters to `metrics.d/<role>-<pid>.json`; the web worker that
    answers a scrape adds everyone else's to its own. A dead process's last file stays until the
    service restarts (`reset`), so counters never go down while it runs."""

    def __init__(self, data_dir: Path, role: str) -> None:
        self._dir = data_dir / METRICS_DIR
        self._role = role
        self._ok = True

    def _own(self) -> Path:
        return self._dir / f"{self._role}-{os.getpid()}.json"

    def publish(self, metrics: Metrics) -> None:
        """Best effort: a full or read-only data dir must not take the process down. Logs once
        when writing starts failing, not at every publish."""
        target = self._own()
        tmp = target.with_suffix(".tmp")
        try:
            self._dir.mkdir(mode=0o700, exist_ok=True)
            tmp.write_text(json.dumps(metrics.snapshot()), encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            if self._ok:
                log.warning(
                    "cannot publish metrics", extra={"path": str(target), "error": str(exc)}
                )
            self._ok = False
            return
        self._ok = True

    def collect(self) -> list[Snapshot]:
        """The other processes' snapshots (unreadable or half-written files are skipped)."""
        own = self._own()
        snapshots = []
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else ():
            if path == own:
                continue
            with contextlib.suppress(OSError, ValueError):
                snapshots.append(json.loads(path.read_text(encoding="utf-8")))
        return snapshots

    def reset(self) -> None:
        """At service start: the previous run's files would count twice."""
        for path in self._dir.glob("*") if self._dir.is_dir() else ():
            with contextlib.suppress(OSError):
                path.unlink()


def publish_metrics_in_background(exchange: MetricsExchange, metrics: Metrics) -> None:
    def run() -> None:
        while True:
            exchange.publish(metrics)
            time.sleep(METRICS_PUBLISH_SECONDS)

    threading.Thread(target=run, name="metrics-publisher", daemon=True).start()


class JobProcessSupervisor:
    """Runs `python -m wecom_bridge work` and restarts it when it dies (from the main process)."""

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


# --- the HTTP side ------------------------------------------------------------------------------

# Where granian's workers find the app: a factory that reads the same environment `serve` did.
WEB_APP_FACTORY = "wecom_bridge.service.app:web_app"
# How long a stopping web worker may finish the requests it has (then it is killed).
GRACEFUL_SECONDS = 10
# granian's own lines go through the bridge's handlers (its format, its level, stderr).
_GRANIAN_LOGGING: dict[str, Any] = {
    "loggers": {
        "_granian": {"handlers": [], "propagate": True},
        "granian.access": {"handlers": [], "propagate": True, "level": "WARNING"},
    },
}


class _KnownThreadCount(logging.Filter):
    """granian warns at every start when a worker has more threads than 2 x cores + 1. The
    bridge's threads mostly wait for the group commit's fsync, not for the CPU: that many is
    intended (BRIDGE_WEB_THREADS), and a warning nobody should act on teaches to ignore them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Configuration allows spawning up to")


def build_web_server(config: BridgeConfig) -> MPServer:
    """granian: HTTP/1.1 parsed and connections kept in Rust, outside the interpreter lock; each
    worker process calls the WSGI app from `web_threads` threads. A connection that is open but
    silent holds no thread (gunicorn gthread's did, for up to 5 s: the 1 s p99 of the paced
    benchmark), and the acknowledgement path does about twice the callbacks per second."""
    host, port = parse_listen(config.listen, "BRIDGE_LISTEN")
    # Worker processes (not threads of one interpreter): the CPython the image ships has a GIL.
    return MPServer(
        WEB_APP_FACTORY,
        factory=True,
        interface=Interfaces.WSGI,
        address=host,
        port=port,
        workers=config.web_workers,
        blocking_threads=config.web_threads,
        http=HTTPModes.http1,
        websockets=False,
        respawn_failed_workers=True,
        workers_kill_timeout=GRACEFUL_SECONDS,
        log_level=LogLevels.info,
        log_dictconfig=_GRANIAN_LOGGING,
        log_access=False,
    )


def run_server(config: BridgeConfig) -> None:
    """The `serve` command: the HTTP side in granian's workers, the job side as a process
    supervised from granian's main process; SIGTERM stops both gracefully."""
    # An unusable data dir is reported by the store (503, /readyz), not fatal here.
    with contextlib.suppress(OSError):
        config.data_dir.mkdir(parents=True, exist_ok=True)
    MetricsExchange(config.data_dir, "web").reset()
    logging.getLogger("_granian").addFilter(_KnownThreadCount())
    server = build_web_server(config)
    # granian configured logging for itself; the bridge's own set-up comes back on top.
    setup_logging(config.log_format, config.log_level, background=True)
    jobs = JobProcessSupervisor()
    server.on_startup(jobs.start)
    server.on_shutdown(jobs.stop)
    server.serve()
