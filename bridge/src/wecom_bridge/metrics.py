"""A small thread-safe Prometheus text-format registry (counters, gauges, histograms)."""

from __future__ import annotations

import threading
from collections.abc import Callable

LabelKey = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# name -> (type, help)
DEFINITIONS: dict[str, tuple[str, str]] = {
    "wecom_bridge_callbacks_total": ("counter", "Callbacks received, by outcome."),
    "wecom_bridge_duplicates_total": ("counter", "Redelivered callbacks dropped by dedupe."),
    "wecom_bridge_queue_depth": ("gauge", "Jobs queued or in flight."),
    "wecom_bridge_dify_latency_seconds": ("histogram", "Dify request latency."),
    "wecom_bridge_dify_errors_total": ("counter", "Dify errors, by code."),
    "wecom_bridge_wecom_send_errors_total": ("counter", "WeCom message/send errors, by errcode."),
    "wecom_bridge_wecom_messages_sent_total": (
        "counter",
        "Messages (parts) sent through message/send.",
    ),
    "wecom_bridge_token_refreshes_total": ("counter", "WeCom access token refreshes."),
    "wecom_bridge_jobs_total": ("counter", "Jobs finished, by final status."),
    "wecom_bridge_send_api_requests_total": (
        "counter",
        "Send API requests (POST /api/v1/messages), by outcome.",
    ),
}


def _key(labels: dict[str, str] | None) -> LabelKey:
    return tuple(sorted((labels or {}).items()))


def _fmt_labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = key + extra
    if not items:
        return ""
    escaped = (f'{k}="{v}"'.replace("\n", "\\n") for k, v in items)
    return "{" + ",".join(escaped) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[LabelKey, float]] = {}
        self._hist: dict[str, dict[LabelKey, list[float]]] = {}
        self._gauge_fns: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        with self._lock:
            series = self._values.setdefault(name, {})
            series[_key(labels)] = series.get(_key(labels), 0.0) + value

    def gauge_from(self, name: str, fn: Callable[[], float]) -> None:
        """Read a gauge at scrape time (e.g. queue depth from the store)."""
        self._gauge_fns[name] = fn

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            series = self._hist.setdefault(name, {})
            # per series: one count per bucket, then +Inf count, then sum
            counts = series.setdefault(_key(labels), [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if value <= bound:
                    counts[i] += 1
            counts[-2] += 1
            counts[-1] += value

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_key(labels), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        gauges = {name: fn() for name, fn in self._gauge_fns.items()}
        with self._lock:
            for name, (kind, help_text) in DEFINITIONS.items():
                if name not in gauges and not self._values.get(name) and not self._hist.get(name):
                    continue  # the other process (web or jobs) owns this family
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if name in gauges:
                    lines.append(f"{name} {gauges[name]:g}")
                for key, val in sorted(self._values.get(name, {}).items()):
                    lines.append(f"{name}{_fmt_labels(key)} {val:g}")
                for key, counts in sorted(self._hist.get(name, {}).items()):
                    for bound, count in zip(LATENCY_BUCKETS, counts, strict=False):
                        lines.append(
                            f"{name}_bucket{_fmt_labels(key, (('le', f'{bound:g}'),))} {count:g}"
                        )
                    lines.append(
                        f"{name}_bucket{_fmt_labels(key, (('le', '+Inf'),))} {counts[-2]:g}"
                    )
                    lines.append(f"{name}_count{_fmt_labels(key)} {counts[-2]:g}")
                    lines.append(f"{name}_sum{_fmt_labels(key)} {counts[-1]:g}")
        return "\n".join(lines) + "\n"
