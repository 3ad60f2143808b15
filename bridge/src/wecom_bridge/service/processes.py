"""The process model: what runs where in `wecom-bridge serve`, what the processes share, and how
they wake each other.

```
wecom-bridge serve ── gunicorn master ──┬── web worker(s)   HTTP: callbacks, send API, ops
                                         │      │  store: SQLite in BRIDGE_DATA_DIR (synced commits)
                                         │      │  wake.sock ──▶ "jobs were stored"
                                         │      ▼
                                         └── job process (`wecom-bridge work`, supervised)
                                                workers ─▶ Dify ─▶ WeCom; heartbeats in the store
                       metrics.d/<role>-<pid>.json: every process's counters, merged by /metrics
```

The two sides share nothing but the data directory: the store (the durable queue and its
dedupe keys), the wake-up socket (a best-effort poke: a lost one only delays a job until the
workers' next poll, 1 s) and the metrics exchange. So answering Dify never competes with
acknowledging WeCom for one interpreter lock, and either side can die and restart alone: the
master restarts a dead web worker, the supervisor thread a dead job process (with backoff), and
jobs a dead job process held are taken up again when their leases run out.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.workers import gthread

from wecom_bridge.config import BridgeConfig
from wecom_bridge.jobs.workers import WorkerPool
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


# --- the job process ----------------------------------------------------------------------------


class Link(Protocol):
    """A connection the job process holds (the AI bot's long connection)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class JobSide:
    """What the job process runs: the workers and the long connections that feed them."""

    pool: WorkerPool
    links: Sequence[Link] = ()

    def start(self) -> None:
        self.pool.start()
        for link in self.links:
            link.start()

    def stop(self) -> None:
        for link in self.links:  # first: a successor process can take the connection over
            link.stop()
        self.pool.stop()


def run_job_process(
    config: BridgeConfig, build_side: Callable[[BridgeConfig, Metrics], JobSide]
) -> None:
    """The `work` command: the worker pool (and the AI bots' long connections) in the
    foreground until SIGTERM/SIGINT. Exactly one such process runs per `serve`, so one holds
    each bot's connection however many web workers there are."""
    metrics = Metrics()
    side = build_side(config, metrics)
    pool = side.pool
    listener = WakeupListener(config.data_dir, pool.notify)
    exchange = MetricsExchange(config.data_dir, "jobs")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    side.start()
    listener.start()
    log.info("job workers started", extra={"workers": config.job_workers})
    while not stop.wait(METRICS_PUBLISH_SECONDS):
        exchange.publish(metrics)
    listener.close()
    side.stop()
    log.info("job workers stopped")


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


# --- the HTTP side ------------------------------------------------------------------------------


class CallbackWorker(gthread.ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, except that a new connection waits on the poller, not in a
    thread, until its first request arrives.

    gthread hands each new connection to a thread that waits up to 5 s for the request: a
    few connections opened but not yet sending held every thread, and the callbacks on the
    other connections waited up to a second (the p99 of the paced benchmark, 200 senders).
    Here a new connection goes where gthread itself parks a silent one (its pending
    connections: closed after the keep-alive timeout if nothing comes) and gets a thread
    when it becomes readable.
    """

    def accept(self, listener: socket.socket) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = gthread.TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.set_timeout()
        self.pending_conns.append(conn)
        when_readable = functools.partial(self.on_pending_socket_readable, conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, when_readable)


class BridgeServer(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn (gthread) serving the app factory, with the job process supervised from its
    master."""

    def __init__(self, config: BridgeConfig, app_factory: Callable[[BridgeConfig], Flask]) -> None:
        self.bridge_config = config
        self.app_factory = app_factory
        self.jobs = JobProcessSupervisor()
        super().__init__()

    def load_config(self) -> None:
        config = self.bridge_config
        options = {
            "bind": config.listen,
            "workers": config.web_workers,
            "threads": config.web_threads,
            "worker_class": CallbackWorker,
            # WeCom gives up after 5 s; nothing a callback does should come near this.
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "when_ready": lambda server: self.jobs.start(),
            "post_fork": lambda server, worker: self._in_each_web_worker(),
            "on_exit": lambda server: self.jobs.stop(),
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def _in_each_web_worker(self) -> None:
        config = self.bridge_config
        # The master's log writer thread is not forked: each web worker starts its own.
        setup_logging(config.log_format, config.log_level, background=True)

    def load(self) -> Any:
        return self.app_factory(self.bridge_config)


def run_server(config: BridgeConfig, app_factory: Callable[[BridgeConfig], Flask]) -> None:
    """The `serve` command: the HTTP side in gunicorn, the job side as a supervised process."""
    # An unusable data dir is reported by the store (503, /readyz), not fatal here.
    with contextlib.suppress(OSError):
        config.data_dir.mkdir(parents=True, exist_ok=True)
    MetricsExchange(config.data_dir, "web").reset()
    BridgeServer(config, app_factory).run()
