"""A small thread-safe Prometheus text-format registry (counters, gauges, histograms).

Each process keeps its own registry. To serve one /metrics for several processes (web workers
and the job process), every process publishes a `snapshot()` and the process that answers the
scrape renders its own values plus the others' (`render(others)`): counters and histograms add
up, gauges are read by the scraping process alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

LabelKey = tuple[tuple[str, str], ...]
# A registry's values as JSON-able data: {"values": {name: [[labels, value], …]},
# "hist": {name: [[labels, [bucket counts…, count, sum]], …]}}, labels as [[k, v], …].
Snapshot = dict[str, dict[str, list[list[object]]]]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Histograms that count things rather than seconds.
BUCKETS: dict[str, tuple[float, ...]] = {
    "wecom_bridge_dify_requests_per_message": (1.0, 2.0, 3.0, 4.0, 5.0, 10.0),
}


def buckets_of(name: str) -> tuple[float, ...]:
    return BUCKETS.get(name, LATENCY_BUCKETS)


# name -> (type, help)
DEFINITIONS: dict[str, tuple[str, str]] = {
    "wecom_bridge_callbacks_total": ("counter", "Callbacks received, by outcome."),
    "wecom_bridge_duplicates_total": ("counter", "Redelivered callbacks dropped by dedupe."),
    "wecom_bridge_queue_depth": ("gauge", "Jobs queued or in flight."),
    "wecom_bridge_dify_latency_seconds": ("histogram", "Dify request latency."),
    "wecom_bridge_dify_errors_total": ("counter", "Dify errors, by code."),
    "wecom_bridge_dify_requests_per_message": (
        "histogram",
        "Questions POSTed to Dify per member message (1 unless Dify failed before accepting).",
    ),
    "wecom_bridge_dify_recoveries_total": (
        "counter",
        "Broken Dify streams, by outcome of fetching the answer afterwards (recovered, lost).",
    ),
    "wecom_bridge_wecom_send_errors_total": ("counter", "WeCom message/send errors, by errcode."),
    "wecom_bridge_wecom_messages_sent_total": (
        "counter",
        "Messages (parts) sent through message/send.",
    ),
    "wecom_bridge_wecom_undelivered_total": (
        "counter",
        "Parts WeCom accepted but could not deliver to anyone named, by reason.",
    ),
    "wecom_bridge_token_refreshes_total": ("counter", "WeCom access token refreshes."),
    "wecom_bridge_jobs_total": ("counter", "Jobs finished, by final status."),
    "wecom_bridge_aibot_links_unsubscribed": (
        "gauge",
        "AI bots whose long connection is not subscribed now (wrong secret, taken over, down).",
    ),
    "wecom_bridge_aibot_link_changes_total": (
        "counter",
        "AI-bot long connection state changes, by state (subscribed, auth_failed, taken_over, …).",
    ),
    "wecom_bridge_aibot_stream_updates_total": ("counter", "AI-bot stream updates sent."),
    "wecom_bridge_aibot_messages_sent_total": (
        "counter",
        "AI-bot answers (or parts) sent as new messages: beyond 20480 bytes, or the stream gone.",
    ),
    "wecom_bridge_send_api_requests_total": (
        "counter",
        "Send API requests (POST /api/v1/messages), by outcome.",
    ),
    "wecom_bridge_media_out_total": (
        "counter",
        "Dify's images and files: sent as media, or degraded to a text (by reason).",
    ),
    "wecom_bridge_media_uploads_total": ("counter", "WeCom media/upload calls accepted, by type."),
    "wecom_bridge_media_in_total": (
        "counter",
        "Members' media handed to Dify, by kind (image, file: uploaded; voice: transcribed).",
    ),
    "wecom_bridge_media_refused_total": (
        "counter",
        "Members' media refused with a text, by reason (type, too_large, corrupt, expired, …).",
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
            bounds = buckets_of(name)
            counts = series.setdefault(_key(labels), [0.0] * (len(bounds) + 2))
            for i, bound in enumerate(bounds):
                if value <= bound:
                    counts[i] += 1
            counts[-2] += 1
            counts[-1] += value

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_key(labels), 0.0)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return {
                "values": {
                    name: [[list(map(list, key)), val] for key, val in series.items()]
                    for name, series in self._values.items()
                },
                "hist": {
                    name: [[list(map(list, key)), list(counts)] for key, counts in series.items()]
                    for name, series in self._hist.items()
                },
            }

    def render(self, others: Iterable[Snapshot] = ()) -> str:
        """The text format of this registry plus the snapshots of other processes."""
        values, hist = self._copy_values(), self._copy_hist()
        for other in others:
            _add_snapshot(other, values, hist)
        gauges = {name: fn() for name, fn in self._gauge_fns.items()}
        lines: list[str] = []
        for name, (kind, help_text) in DEFINITIONS.items():
            if name not in gauges and not values.get(name) and not hist.get(name):
                continue  # nothing counted yet
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if name in gauges:
                lines.append(f"{name} {gauges[name]:g}")
            for key, val in sorted(values.get(name, {}).items()):
                lines.append(f"{name}{_fmt_labels(key)} {val:g}")
            for key, counts in sorted(hist.get(name, {}).items()):
                lines += _histogram_lines(name, key, counts)
        return "\n".join(lines) + "\n"

    def _copy_values(self) -> dict[str, dict[LabelKey, float]]:
        with self._lock:
            return {name: dict(series) for name, series in self._values.items()}

    def _copy_hist(self) -> dict[str, dict[LabelKey, list[float]]]:
        with self._lock:
            return {name: {k: list(c) for k, c in s.items()} for name, s in self._hist.items()}


def _histogram_lines(name: str, key: LabelKey, counts: list[float]) -> list[str]:
    lines = [
        f"{name}_bucket{_fmt_labels(key, (('le', f'{bound:g}'),))} {count:g}"
        for bound, count in zip(buckets_of(name), counts, strict=False)
    ]
    lines.append(f"{name}_bucket{_fmt_labels(key, (('le', '+Inf'),))} {counts[-2]:g}")
    lines.append(f"{name}_count{_fmt_labels(key)} {counts[-2]:g}")
    lines.append(f"{name}_sum{_fmt_labels(key)} {counts[-1]:g}")
    return lines


def _label_key(raw: object) -> LabelKey:
    if not isinstance(raw, list):
        raise ValueError("labels must be a list of pairs")
    return tuple(sorted((str(pair[0]), str(pair[1])) for pair in raw))


def _add_snapshot(
    snapshot: Snapshot,
    values: dict[str, dict[LabelKey, float]],
    hist: dict[str, dict[LabelKey, list[float]]],
) -> None:
    """Adds another process's counters and histograms (a malformed snapshot raises ValueError)."""
    for name, series in snapshot.get("values", {}).items():
        target = values.setdefault(name, {})
        for raw_key, value in series:
            key = _label_key(raw_key)
            target[key] = target.get(key, 0.0) + float(value)  # type: ignore[arg-type]
    for name, series in snapshot.get("hist", {}).items():
        target_hist = hist.setdefault(name, {})
        for raw_key, counts in series:
            key = _label_key(raw_key)
            mine = target_hist.setdefault(key, [0.0] * (len(buckets_of(name)) + 2))
            if not isinstance(counts, list) or len(counts) != len(mine):
                raise ValueError("histogram series of another bucket layout")
            target_hist[key] = [a + float(b) for a, b in zip(mine, counts, strict=True)]
