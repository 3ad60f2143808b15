"""The app factory: builds the bridge from its configuration (the one place that wires it).

Configuration → the store → per app: its channel (inbound adapter, outbound sender), its Dify
client → the job processor and workers → the Flask app with the callback, send API and ops
routes. `create_app(config)` runs the job side in the same process (tests, small setups);
`wecom-bridge serve` passes `in_process_workers=False` and runs it as a process of its own
(service.processes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import requests
from flask import Flask

from wecom_bridge.channels.aibot import AibotOutbound
from wecom_bridge.channels.aibot_webhook import AibotWebhookInbound, AibotWebhookOutbound
from wecom_bridge.channels.base import Outbound
from wecom_bridge.channels.kf import KfInbound, KfOutbound
from wecom_bridge.channels.wecom_app import WeComAppInbound, WeComAppOutbound
from wecom_bridge.config import AppConfig, BridgeConfig, KfConfig, load_config
from wecom_bridge.dify.client import DifyClient
from wecom_bridge.errors import DifyError, StoreUnavailableError
from wecom_bridge.jobs.backends import Role, job_notifications, open_pacer, open_store, poll_seconds
from wecom_bridge.jobs.intake import GroupCommitter
from wecom_bridge.jobs.kf import KfJobs
from wecom_bridge.jobs.media import AibotMediaFetcher, MediaFetcher, MediaStage, WeComMediaFetcher
from wecom_bridge.jobs.media_out import MEDIA_DIR
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import Store
from wecom_bridge.jobs.workers import WorkerPool
from wecom_bridge.logs import setup_logging
from wecom_bridge.metrics import Metrics, Snapshot
from wecom_bridge.service.aibot import AibotLink, link_name
from wecom_bridge.service.job_process import JobSide, Link
from wecom_bridge.service.processes import (
    HEARTBEAT_SECONDS,
    MetricsExchange,
    WakeupSender,
    publish_metrics_in_background,
)
from wecom_bridge.web.aibot_callbacks import AibotWebhookEndpoint
from wecom_bridge.web.callbacks import CallbackEndpoint, CallbackRouter, Endpoint, IntakeTally
from wecom_bridge.web.kf_callback import KfCallbackEndpoint
from wecom_bridge.web.ops import Ops, register_ops
from wecom_bridge.web.send_api import SendApi, register_send_api
from wecom_bridge.wecom.api import WeComClient
from wecom_bridge.wecom.kf_api import KfClient

log = logging.getLogger("wecom_bridge.app")


@dataclass
class Runtime:
    """What a running app holds (tests reach the store and the in-process pool through it)."""

    config: BridgeConfig
    store: Store
    metrics: Metrics
    pool: WorkerPool | None  # None: the job side is a separate process
    links: Sequence[Link] = ()  # the AI bots' long connections of the in-process side


def long_connection_apps(config: BridgeConfig) -> list[AppConfig]:
    return [a for a in config.apps if a.aibot is not None and a.aibot.mode == "ws"]


def build_links(config: BridgeConfig, metrics: Metrics) -> dict[str, AibotLink]:
    """A long connection per AI bot in ws mode; arrivals are stored with synced commits."""
    if not long_connection_apps(config):
        return {}
    intake = open_store(config, Role.WEB)
    return {app.name: AibotLink(app, intake, metrics) for app in long_connection_apps(config)}


def _outbound(
    config: BridgeConfig,
    app: AppConfig,
    store: Store,
    metrics: Metrics,
    links: dict[str, AibotLink],
) -> Outbound:
    if app.aibot is not None and app.aibot.mode == "webhook":
        return AibotWebhookOutbound(app, store, metrics)
    if app.aibot is not None:
        return AibotOutbound(app, links[app.name].connection, metrics)
    wecom = WeComClient(
        api_base=config.wecom_api_base,
        corp_id=app.corp_id,
        secret=app.secret,
        token_cache=store,
        metrics=metrics,
        config_error_cooldown=config.config_error_cooldown,
        connections=config.job_workers,
    )
    return WeComAppOutbound(app, wecom)


def build_apps(
    config: BridgeConfig,
    store: Store,
    metrics: Metrics,
    links: dict[str, AibotLink] | None = None,
) -> dict[str, AppRuntime]:
    """Each configured app with its clients and its channel's outbound."""
    apps = {}
    for app in config.apps:
        dify = DifyClient(app.dify, metrics=metrics) if app.dify else None
        outbound = _outbound(config, app, store, metrics, links or {})
        apps[app.name] = AppRuntime(config=app, dify=dify, outbound=outbound)
    return apps


def build_media(config: BridgeConfig, store: Store, apps: dict[str, AppRuntime]) -> MediaStage:
    """The media stage, with each app's way of fetching what members send; what a killed
    process left in its temporary dir is removed now."""
    fetchers: dict[str, MediaFetcher] = {}
    for name, runtime in apps.items():
        if runtime.config.aibot is not None:
            aes_key = runtime.config.aibot.encoding_aes_key
            fetchers[name] = AibotMediaFetcher(aes_key, requests.Session())
        elif isinstance(runtime.outbound, WeComAppOutbound):
            fetchers[name] = WeComMediaFetcher(runtime.outbound.client)
    stage = MediaStage(store, config.data_dir, fetchers)
    stage.clean()
    return stage


def build_job_side(config: BridgeConfig, metrics: Metrics) -> JobSide:
    """The workers and the AI bots' long connections, which wake them."""
    links = build_links(config, metrics)
    pool = build_pool(config, metrics, links)
    for link in links.values():
        link.notify = pool.notify
    return JobSide(pool, tuple(links.values()))


def kf_client(config: BridgeConfig, kf: KfConfig, store: Store, metrics: Metrics) -> KfClient:
    """The kf API with the 微信客服 secret's own access token."""
    return KfClient(
        WeComClient(
            api_base=config.wecom_api_base,
            corp_id=kf.corp_id,
            secret=kf.secret,
            token_cache=store,
            metrics=metrics,
            config_error_cooldown=config.config_error_cooldown,
            connections=config.job_workers,
        )
    )


def build_kf(
    config: BridgeConfig, kf: KfConfig, store: Store, metrics: Metrics
) -> tuple[AppRuntime, KfJobs]:
    """The kf channel as the pipeline runs it: its runtime and its job kinds' handlers."""
    client = kf_client(config, kf, store, metrics)
    dify = DifyClient(kf.dify, metrics=metrics) if kf.dify else None
    runtime = AppRuntime(config=kf.pipeline_app(), dify=dify, outbound=KfOutbound(kf.name, client))
    return runtime, KfJobs(store, kf, client)


def build_pool(
    config: BridgeConfig, metrics: Metrics, links: dict[str, AibotLink] | None = None
) -> WorkerPool:
    """The job side: its own store connection, the processor and the worker threads."""
    # Worker progress commits without fsync: it survives a crash of the process, and the next
    # acknowledged callback's synced commit makes it durable. Callbacks keep full durability.
    store = open_store(config, Role.JOBS)
    apps = build_apps(config, store, metrics, links)
    kf_jobs = None
    if config.kf is not None:
        apps[config.kf.name], kf_jobs = build_kf(config, config.kf, store, metrics)
    processor = JobProcessor(
        store,
        apps,
        metrics,
        limiter=open_pacer(store),
        send_max_age=config.send_max_age_seconds,
        channel_handlers=kf_jobs.handlers() if kf_jobs else None,
        media_dir=config.data_dir / MEDIA_DIR,
        media=build_media(config, store, apps),
    )
    pool = WorkerPool(
        store,
        processor,
        size=config.job_workers,
        app_limits={
            name: runtime.config.dify.max_concurrency
            for name, runtime in apps.items()
            if runtime.config.dify
        },
        heartbeat_seconds=HEARTBEAT_SECONDS,
        poll_seconds=poll_seconds(config),
        dedupe_ttl=config.dedupe_ttl_seconds,
        job_retention=config.job_retention_seconds,
        # A bot's answers go out on its long connection: only its holder runs its jobs.
        held_elsewhere=lambda: {name for name, link in (links or {}).items() if not link.holding},
    )
    if kf_jobs is not None:
        kf_jobs.wake = pool.notify
    return pool


def build_job_process_side(config: BridgeConfig, metrics: Metrics) -> JobSide:
    """The `work` process's side; it also checks each Dify app's inputs once, in the
    background (Dify may be slow or down at start: the answers do not wait for it)."""
    side = build_job_side(config, metrics)
    threading.Thread(
        target=report_dify_inputs,
        args=(side.pool.processor.apps,),
        name="dify-inputs",
        daemon=True,
    ).start()
    return side


def report_dify_inputs(apps: dict[str, AppRuntime]) -> None:
    """At the job process's start: name the inputs an app needs that nobody configured (Dify
    would refuse every message with 400; the bridge sends the fallback without asking)."""
    for name, runtime in apps.items():
        if runtime.dify is None:
            continue
        try:
            problems, warnings = runtime.dify.input_problems(refresh=True)
        except DifyError as exc:
            log.warning(
                "could not check the Dify app's inputs",
                extra={"app": name, "event": "dify_inputs_unchecked", "code": exc.code},
            )
            continue
        for problem in problems:
            log.error(
                f"configuration error: {problem}",
                extra={"app": name, "event": "dify_inputs", "variable": "DIFY_INPUTS"},
            )
        for warning in warnings:
            log.warning(warning, extra={"app": name, "event": "dify_inputs"})


def _queue_depth(store: Store) -> float:
    try:
        return float(store.queue_depth())
    except StoreUnavailableError:
        return float("nan")


def _unsubscribed(ops: Ops) -> float:
    try:
        return float(len(ops.link_problems()))
    except StoreUnavailableError:
        return float("nan")


def _workers_alive(store: Store, pool: WorkerPool | None) -> Callable[[], bool]:
    if pool is not None:
        return pool.alive
    return lambda: store.live_workers(3 * HEARTBEAT_SECONDS) > 0


def _wake_job_side(config: BridgeConfig, pool: WorkerPool | None) -> Callable[..., None]:
    """What the web side calls after storing jobs. On PostgreSQL the commit's NOTIFY already
    wakes every bridge's job side (a separate `work` process listens for it)."""
    if pool is not None:
        return pool.notify
    if config.database_url:
        return lambda jobs=1: None
    return WakeupSender(config.data_dir).send


def create_app(config: BridgeConfig, *, in_process_workers: bool = True) -> Flask:
    store = open_store(config, Role.WEB)
    metrics = Metrics()
    metrics.gauge_from("wecom_bridge_queue_depth", lambda: _queue_depth(store))
    side = build_job_side(config, metrics) if in_process_workers else None
    pool = side.pool if side else None
    notify = _wake_job_side(config, pool)
    # In `serve`, the processes share their counters through the data dir (service.processes).
    others: Callable[[], list[Snapshot]] = list
    if pool is None:
        exchange = MetricsExchange(config.data_dir, "web")
        publish_metrics_in_background(exchange, metrics)
        others = exchange.collect
    flask_app = Flask("wecom_bridge")
    flask_app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    flask_app.extensions["wecom_bridge"] = Runtime(
        config, store, metrics, pool, side.links if side else ()
    )
    acceptor = GroupCommitter(store, on_stored=notify)
    tally = IntakeTally()
    tally.start()
    endpoints: list[Endpoint] = [
        CallbackEndpoint(
            app=app.name,
            inbound=WeComAppInbound(app),
            replies=app.replies,
            acceptor=acceptor,
            metrics=metrics,
            max_body_bytes=config.max_body_bytes,
            tally=tally,
        )
        for app in config.apps
        if app.aibot is None
    ]
    endpoints += [
        AibotWebhookEndpoint(
            app=app,
            inbound=AibotWebhookInbound(app),
            acceptor=acceptor,
            board=store,
            metrics=metrics,
            max_body_bytes=config.max_body_bytes,
        )
        for app in config.apps
        if app.aibot is not None and app.aibot.mode == "webhook"
    ]
    if config.kf is not None:
        inbound = KfInbound(config.kf)
        endpoints.append(
            KfCallbackEndpoint(
                app=config.kf.name,
                inbound=inbound,
                replies=config.kf.replies,
                acceptor=acceptor,
                metrics=metrics,
                max_body_bytes=config.max_body_bytes,
                tally=tally,
                kf=inbound,
            )
        )
    flask_app.wsgi_app = CallbackRouter(endpoints, flask_app.wsgi_app)  # type: ignore[method-assign]
    if config.api_token:
        api = SendApi(
            config=config, store=store, metrics=metrics, notify=notify, token=config.api_token
        )
        register_send_api(flask_app, api)
    links = tuple(link_name(app) for app in long_connection_apps(config))
    ops = Ops(store, metrics, _workers_alive(store, pool), others, links)
    if links:
        metrics.gauge_from("wecom_bridge_aibot_links_unsubscribed", lambda: _unsubscribed(ops))
    register_ops(flask_app, ops)
    if side:
        side.start()
        running = side.pool
        # Other bridges' jobs too; the listener ends with the pool.
        listener = job_notifications(config, running.notify, until=lambda: not running.alive())
        if listener is not None:
            listener.start()
    log.info(
        "bridge ready to serve",
        extra={
            "paths": ",".join(
                [a.callback_path for a in config.apps if a.takes_callbacks]
                + ([config.kf.callback_path] if config.kf else [])
            ),
            "long_connections": ",".join(links) or "none",
            "send_api": "on" if config.api_token else "off (BRIDGE_API_TOKEN not set)",
        },
    )
    return flask_app


def web_app() -> Flask:
    """What each web worker of `serve` runs: the configuration is read again from the
    environment `serve` was started with (and checked there already)."""
    config = load_config()
    setup_logging(config.log_format, config.log_level, background=True)
    return create_app(config, in_process_workers=False)
