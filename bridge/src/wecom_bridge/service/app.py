"""The app factory and the job process: wires config, store, clients and workers together.

Production (`serve`) runs the HTTP side (gunicorn) and the job side (`work`) as separate
processes sharing only the store, so answering Dify never competes with acknowledging WeCom for
one interpreter lock. Tests and small setups can run both in one process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, jsonify

from wecom_bridge.channels.wecom_app import CallbackHandler, register_callback
from wecom_bridge.config import BridgeConfig
from wecom_bridge.dify.client import DifyClient
from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.intake import GroupCommitter
from wecom_bridge.jobs.pacing import SlidingWindowLimiter
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor, WorkerPool
from wecom_bridge.jobs.store import Store
from wecom_bridge.metrics import Metrics
from wecom_bridge.service.wakeup import WakeupListener, WakeupSender
from wecom_bridge.web.send_api import SendApi, register_send_api
from wecom_bridge.wecom.api import WeComClient
from wecom_bridge.wecom.crypto import WeComCrypto

log = logging.getLogger("wecom_bridge.service.app")

# A queue this deep means the workers cannot keep up; report not-ready so load balancers and
# operators notice before WeCom's users do.
MAX_READY_QUEUE_DEPTH = 10_000
HEARTBEAT_SECONDS = 5.0
WORKER_METRICS_FILE = "worker-metrics.prom"


@dataclass
class Runtime:
    config: BridgeConfig
    store: Store
    metrics: Metrics
    pool: WorkerPool | None  # None: the job side is a separate process


def build_pool(config: BridgeConfig, metrics: Metrics) -> WorkerPool:
    # Worker progress commits without fsync: it survives a crash of the process, and the next
    # acknowledged callback's synced commit makes it durable. Callbacks keep full durability.
    store = Store(
        config.data_dir,
        busy_timeout=config.db_busy_timeout,
        durable_commits=False,
    )
    apps = {
        app.name: AppRuntime(
            config=app,
            dify=DifyClient(app.dify, metrics=metrics) if app.dify else None,
            wecom=WeComClient(
                api_base=config.wecom_api_base,
                corp_id=app.corp_id,
                secret=app.secret,
                token_cache=store,
                metrics=metrics,
                config_error_cooldown=config.config_error_cooldown,
            ),
        )
        for app in config.apps
    }
    processor = JobProcessor(
        store,
        apps,
        metrics,
        limiter=SlidingWindowLimiter(),
        send_max_age=config.send_max_age_seconds,
    )
    return WorkerPool(
        store,
        processor,
        size=config.job_workers,
        heartbeat_seconds=HEARTBEAT_SECONDS,
        dedupe_ttl=config.dedupe_ttl_seconds,
        job_retention=config.job_retention_seconds,
    )


def _queue_depth(store: Store) -> float:
    try:
        return float(store.queue_depth())
    except StoreUnavailableError:
        return float("nan")


def create_app(config: BridgeConfig, *, in_process_workers: bool = True) -> Flask:
    store = Store(
        config.data_dir,
        busy_timeout=config.db_busy_timeout,
        min_free_bytes=config.min_free_bytes,
    )
    metrics = Metrics()
    metrics.gauge_from("wecom_bridge_queue_depth", lambda: _queue_depth(store))
    pool = build_pool(config, metrics) if in_process_workers else None
    notify = pool.notify if pool else WakeupSender(config.data_dir).send
    runtime = Runtime(config, store, metrics, pool)
    flask_app = Flask("wecom_bridge")
    flask_app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    flask_app.extensions["wecom_bridge"] = runtime
    acceptor = GroupCommitter(store)
    for app in config.apps:
        handler = CallbackHandler(
            app=app,
            crypto=WeComCrypto(app.token, app.encoding_aes_key, app.corp_id),
            acceptor=acceptor,
            metrics=metrics,
            notify=notify,
            max_body_bytes=config.max_body_bytes,
        )
        register_callback(flask_app, handler, metrics)
    if config.api_token:
        register_send_api(
            flask_app,
            SendApi(
                config=config,
                store=store,
                metrics=metrics,
                notify=notify,
                token=config.api_token,
            ),
        )
    _register_ops(flask_app, runtime)
    if pool:
        pool.start()
    log.info(
        "bridge ready to serve",
        extra={
            "paths": ",".join(a.callback_path for a in config.apps),
            "send_api": "on" if config.api_token else "off (BRIDGE_API_TOKEN not set)",
        },
    )
    return flask_app


def readiness(runtime: Runtime) -> tuple[bool, dict[str, object]]:
    status: dict[str, object] = {}
    depth = None
    try:
        runtime.store.probe_write()
        status["db"] = "writable"
        if runtime.pool is not None:
            status["workers"] = runtime.pool.alive()
        else:
            status["workers"] = runtime.store.live_workers(3 * HEARTBEAT_SECONDS) > 0
        depth = runtime.store.queue_depth()
        status["queue_depth"] = depth
    except StoreUnavailableError as exc:
        status["db"] = f"unavailable: {exc}"
        status.setdefault("workers", False)
    ready = (
        status["db"] == "writable"
        and bool(status["workers"])
        and depth is not None
        and depth < MAX_READY_QUEUE_DEPTH
    )
    status["ready"] = ready
    return ready, status


def _worker_metrics(data_dir: Path) -> str:
    try:
        return (data_dir / WORKER_METRICS_FILE).read_text(encoding="utf-8")
    except OSError:
        return ""


def _register_ops(flask_app: Flask, runtime: Runtime) -> None:
    @flask_app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", mimetype="text/plain")

    @flask_app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        ready, status = readiness(runtime)
        return jsonify(status), 200 if ready else 503

    @flask_app.get("/metrics")
    def metrics() -> Response:
        text = runtime.metrics.render()
        if runtime.pool is None:
            text += _worker_metrics(runtime.config.data_dir)
        return Response(text, mimetype="text/plain; version=0.0.4")


def _write_worker_metrics(target: Path, metrics: Metrics, *, was_ok: bool) -> bool:
    """Best effort: a full or read-only data dir must not take the job process down.
    Logs once when writing starts failing, not at every heartbeat."""
    tmp = target.with_suffix(".tmp")
    try:
        tmp.write_text(metrics.render(), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        if was_ok:
            log.warning(
                "cannot write worker metrics", extra={"path": str(target), "error": str(exc)}
            )
        return False
    return True


def run_job_process(config: BridgeConfig) -> None:
    """The `work` command: the worker pool in the foreground until SIGTERM/SIGINT."""
    metrics = Metrics()
    pool = build_pool(config, metrics)
    listener = WakeupListener(config.data_dir, pool.notify)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    pool.start()
    listener.start()
    log.info("job workers started", extra={"workers": config.job_workers})
    target = config.data_dir / WORKER_METRICS_FILE
    metrics_ok = True
    while not stop.wait(HEARTBEAT_SECONDS / 5):
        # The web side serves these with its own on /metrics.
        metrics_ok = _write_worker_metrics(target, metrics, was_ok=metrics_ok)
    listener.close()
    pool.stop()
    log.info("job workers stopped")
