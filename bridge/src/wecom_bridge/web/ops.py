"""Operations endpoints: /healthz (alive), /readyz (can take work), /metrics (Prometheus)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flask import Flask, Response, jsonify

from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.store import Store
from wecom_bridge.metrics import Metrics, Snapshot

# A queue this deep means the workers cannot keep up; report not-ready so load balancers and
# operators notice before WeCom's users do.
MAX_READY_QUEUE_DEPTH = 10_000


@dataclass(frozen=True)
class Ops:
    store: Store
    metrics: Metrics
    workers_alive: Callable[[], bool]  # the job side, in this process or another
    other_metrics: Callable[[], Iterable[Snapshot]]  # what the other processes published

    def readiness(self) -> tuple[bool, dict[str, object]]:
        status: dict[str, object] = {}
        depth = None
        try:
            self.store.probe_write()
            status["db"] = "writable"
            status["workers"] = self.workers_alive()
            depth = self.store.queue_depth()
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
