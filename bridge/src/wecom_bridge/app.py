"""The app factory: wires config, store, clients, workers and the HTTP endpoints together."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, Response, jsonify

from wecom_bridge.callback import CallbackHandler, register_callback
from wecom_bridge.config import BridgeConfig
from wecom_bridge.crypto import WeComCrypto
from wecom_bridge.dify import DifyClient
from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.metrics import Metrics
from wecom_bridge.ratelimit import SlidingWindowLimiter
from wecom_bridge.store import Store
from wecom_bridge.wecom import WeComClient
from wecom_bridge.worker import AppRuntime, JobProcessor, WorkerPool

log = logging.getLogger("wecom_bridge.app")

# A queue this deep means the workers cannot keep up; report not-ready so load balancers and
# operators notice before WeCom's users do.
MAX_READY_QUEUE_DEPTH = 10_000


@dataclass
class Runtime:
    config: BridgeConfig
    store: Store
    metrics: Metrics
    pool: WorkerPool
    apps: dict[str, AppRuntime]


def build_runtime(config: BridgeConfig) -> Runtime:
    store = Store(config.data_dir, busy_timeout=config.db_busy_timeout)
    worker_store = Store(
        config.data_dir, busy_timeout=config.db_busy_timeout, durable_commits=False
    )
    metrics = Metrics()
    apps = {
        app.name: AppRuntime(
            config=app,
            dify=DifyClient(app.dify, metrics=metrics),
            wecom=WeComClient(
                api_base=config.wecom_api_base,
                corp_id=app.corp_id,
                secret=app.secret,
                token_cache=worker_store,
                metrics=metrics,
                config_error_cooldown=config.config_error_cooldown,
            ),
        )
        for app in config.apps
    }
    processor = JobProcessor(
        worker_store,
        apps,
        metrics,
        limiter=SlidingWindowLimiter(),
        send_max_age=config.send_max_age_seconds,
    )
    pool = WorkerPool(
        worker_store,
        processor,
        size=config.job_workers,
        dedupe_ttl=config.dedupe_ttl_seconds,
        job_retention=config.job_retention_seconds,
    )
    metrics.gauge_from("wecom_bridge_queue_depth", lambda: _queue_depth(store))
    return Runtime(config, store, metrics, pool, apps)


def _queue_depth(store: Store) -> float:
    try:
        return float(store.queue_depth())
    except StoreUnavailableError:
        return float("nan")


def create_app(config: BridgeConfig, *, start_workers: bool = True) -> Flask:
    runtime = build_runtime(config)
    flask_app = Flask("wecom_bridge")
    flask_app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    flask_app.extensions["wecom_bridge"] = runtime
    for app in config.apps:
        handler = CallbackHandler(
            app=app,
            crypto=WeComCrypto(app.token, app.encoding_aes_key, app.corp_id),
            store=runtime.store,
            metrics=runtime.metrics,
            notify=runtime.pool.notify,
            max_body_bytes=config.max_body_bytes,
        )
        register_callback(flask_app, handler, runtime.metrics)
    _register_ops(flask_app, runtime)
    if start_workers:
        runtime.pool.start()
    log.info(
        "bridge ready to serve",
        extra={
            "apps": ",".join(a.name for a in config.apps),
            "paths": ",".join(a.callback_path for a in config.apps),
        },
    )
    return flask_app


def readiness(runtime: Runtime) -> tuple[bool, dict[str, object]]:
    status: dict[str, object] = {"workers": runtime.pool.alive()}
    try:
        runtime.store.probe_write()
        status["db"] = "writable"
        depth = runtime.store.queue_depth()
        status["queue_depth"] = depth
    except StoreUnavailableError as exc:
        status["db"] = f"unavailable: {exc}"
        depth = None
    ready = (
        status["db"] == "writable"
        and bool(status["workers"])
        and (depth is not None and depth < MAX_READY_QUEUE_DEPTH)
    )
    status["ready"] = ready
    return ready, status


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
        return Response(runtime.metrics.render(), mimetype="text/plain; version=0.0.4")
