"""Operations endpoints: /healthz (alive), /readyz (can take work), /metrics (Prometheus)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flask import Flask, Response, jsonify

from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.store import Store
from wecom_bridge.metrics import Metrics, Snapshot

# A queue this deep means the workers cannot keep up; report not-ready so load balancers and
# operators notice before WeCom's users do.
MAX_READY_QUEUE_DEPTH = 10_000
# A long connection's holder reports its state every few seconds (service.aibot.REPORT_SECONDS):
# a report older than this means no process holds the connection.
LINK_REPORT_MAX_AGE = 20.0


@dataclass(frozen=True)
class Ops:
    store: Store
    metrics: Metrics
    workers_alive: Callable[[], bool]  # the job side, in this process or another
    other_metrics: Callable[[], Iterable[Snapshot]]  # what the other processes published
    links: tuple[str, ...] = ()  # the AI bots' long connections the job side must hold

    def link_problems(self) -> dict[str, str]:
        """Each long connection that is not subscribed now, and why (its holder's report)."""
        now = time.time()
        reported = {s.name: s for s in self.store.link_states()}
        problems = {}
        for name in self.links:
            status = reported.get(name)
            if status is None:
                problems[name] = "not connected yet"
            elif status.updated_at < now - LINK_REPORT_MAX_AGE:
                problems[name] = "no process holds the connection"
            elif status.state != "subscribed":
                problems[name] = f"{status.state}: {status.detail}".rstrip(": ")
        return problems

    def readiness(self) -> tuple[bool, dict[str, object]]:
        status: dict[str, object] = {}
        depth = None
        links_ok = True
        try:
            self.store.probe_write()
            status["db"] = "writable"
            status["workers"] = self.workers_alive()
            depth = self.store.queue_depth()
            status["queue_depth"] = depth
            if self.links:
                problems = self.link_problems()
                status["aibot"] = {n: problems.get(n, "subscribed") for n in self.links}
                links_ok = not problems
        except StoreUnavailableError as exc:
            status["db"] = f"unavailable: {exc}"
            status.setdefault("workers", False)
        ready = (
            status["db"] == "writable"
            and bool(status["workers"])
            and depth is not None
            and depth < MAX_READY_QUEUE_DEPTH
            and links_ok
        )
        status["ready"] = ready
        return ready, status


def register_ops(flask_app: Flask, ops: Ops) -> None:
    @flask_app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", mimetype="text/plain")

    @flask_app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        ready, status = ops.readiness()
        return jsonify(status), 200 if ready else 503

    @flask_app.get("/metrics")
    def metrics() -> Response:
        text = ops.metrics.render(ops.other_metrics())
        return Response(text, mimetype="text/plain; version=0.0.4")
