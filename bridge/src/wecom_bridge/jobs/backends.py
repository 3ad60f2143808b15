"""Which store a bridge uses: SQLite in the data dir, or PostgreSQL when BRIDGE_DATABASE_URL
is set, and what goes with each (send pacing, how the job side is woken)."""

from __future__ import annotations

import enum
from collections.abc import Callable

from wecom_bridge.config import BridgeConfig
from wecom_bridge.jobs.pacing import Pacer, SlidingWindowLimiter
from wecom_bridge.jobs.postgres_store import JobNotifications, PostgresStore, SharedSendPacing
from wecom_bridge.jobs.store import SqliteStore, Store

# Idle workers look for work this often besides being woken. With PostgreSQL a NOTIFY wakes
# them on every bridge, so the poll is only a safety net and many bridges do not hammer it.
POLL_SECONDS_SQLITE = 1.0
POLL_SECONDS_POSTGRES = 5.0
JOB_SIDE_POOL_MAX = 16


class Role(enum.Enum):
    """Who opens the store; decides durability and sizes."""

    WEB = "web"  # callbacks and the send API: synced commits, the free-space floor
    JOBS = "jobs"  # the workers' progress: commits not waited for, see the stores
    TOOL = "tool"  # one-shot CLI commands


def open_store(config: BridgeConfig, role: Role) -> Store:
    if config.database_url:
        pool_size = config.db_pool_size
        if role is Role.JOBS:
            # Workers hold a connection only for their short writes (they mostly wait on Dify):
            # a few dozen threads share a bounded pool, leaving the server room for more bridges.
            pool_size = max(pool_size, min(config.job_workers, JOB_SIDE_POOL_MAX) + 3)
        return PostgresStore(
            config.database_url,
            pool_size=2 if role is Role.TOOL else pool_size,
            busy_timeout=config.db_busy_timeout,
            durable_commits=role is not Role.JOBS,
            name=f"wecom-bridge-{role.value}",
        )
    return SqliteStore(
        config.data_dir,
        busy_timeout=config.db_busy_timeout,
        durable_commits=role is not Role.JOBS,
        min_free_bytes=config.min_free_bytes if role is Role.WEB else 0,
        takes_turns=role is Role.JOBS,
    )


def open_pacer(store: Store) -> Pacer:
    """Shared by all bridges on PostgreSQL; per process on SQLite (one host, one job process)."""
    if isinstance(store, PostgresStore):
        return SharedSendPacing(store)
    return SlidingWindowLimiter()


def poll_seconds(config: BridgeConfig) -> float:
    return POLL_SECONDS_POSTGRES if config.database_url else POLL_SECONDS_SQLITE


def job_notifications(
    config: BridgeConfig,
    on_wake: Callable[[int], None],
    until: Callable[[], bool] = lambda: False,
) -> JobNotifications | None:
    """The PostgreSQL wake-ups for a job side (None on SQLite: the web side pokes it through
    the data dir's socket, service.processes); it ends once `until()` is true."""
    if not config.database_url:
        return None
    return JobNotifications(config.database_url, on_wake, until=until)
