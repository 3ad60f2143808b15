"""The job process (`wecom-bridge work`, started and supervised by `serve`): the worker pool and
the AI bots' long connections, woken by the web side (service/processes.py)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from wecom_bridge.config import BridgeConfig
from wecom_bridge.jobs.backends import job_notifications
from wecom_bridge.jobs.workers import WorkerPool
from wecom_bridge.metrics import Metrics
from wecom_bridge.service.processes import (
    METRICS_PUBLISH_SECONDS,
    MetricsExchange,
    WakeupListener,
)

log = logging.getLogger("wecom_bridge.processes")

# When the box is short of CPU, the acknowledgements (WeCom's 5 s) come before the answers,
# which wait on Dify for seconds anyway; the job process runs at this niceness.
JOB_PROCESS_NICENESS = 5


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
    os.nice(JOB_PROCESS_NICENESS)
    metrics = Metrics()
    side = build_side(config, metrics)
    pool = side.pool
    listener = job_notifications(config, pool.notify) or WakeupListener(
        config.data_dir, pool.notify
    )
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
