"""The Store on PostgreSQL: one queue shared by any number of bridges on any number of hosts.

Same behaviour as the SQLite store (one test suite runs against both), plus what sharing needs:
- claims take a job with `FOR UPDATE SKIP LOCKED`: bridges never wait for each other's claims,
  and a member's next job is runnable only once nothing older of theirs is queued or running,
  whichever bridge holds it (per-member order across bridges);
- every commit that stores jobs sends a NOTIFY (delivered at commit): `JobNotifications`
  LISTENs and wakes the local workers, so idle bridges poll only as a safety net;
- leases and heartbeats are rows: any bridge's housekeeping requeues a dead host's jobs;
- dedupe keys are a primary key: a redelivery that reaches another bridge is still dropped;
- the access token is refreshed under an advisory lock (one bridge calls gettoken, the others
  take its token) and the per-member send pacing is booked in a table (`SharedSendPacing`).

Schema changes are numbered migrations applied at start under an advisory lock, so bridges
starting together apply each exactly once. They must stay additive: during a rolling upgrade
the previous release still runs against the new schema.

Connections come from a psycopg pool that checks each one before use, so a restarted server is
reconnected to without restarting the bridge; while it is unreachable every call raises
StoreUnavailableError (callbacks answer 503 and WeCom redelivers). Lease times are the hosts'
clocks: keep the bridge hosts in NTP sync (skew eats into the 15 s lease).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from wecom_bridge.errors import IdempotencyConflictError, StoreUnavailableError
from wecom_bridge.jobs.pacing import DEFAULT_LIMITS
from wecom_bridge.jobs.store import (
    TURN_WAIT_SECONDS,
    Arrival,
    Conversation,
    Job,
    JobRecord,
    LinkStatus,
    NewJob,
    SentPart,
    StoreSnapshot,
    StreamProgress,
    images_json,
    images_of,
)
from wecom_bridge.wecom.aibot_frames import StreamImage

log = logging.getLogger("wecom_bridge.store")

JOBS_CHANNEL = "wecom_bridge_jobs"
# Advisory lock keys (one 64-bit space per database): the migrations', and the token refresh's
# derived from the token's cache key.
MIGRATION_LOCK = 0x7765_636F_6D00_0001
RECONNECT_SECONDS = 4.0
_TOKEN_LOCK_SQL = "hashtextextended('wecom-bridge token ' || %s, 0)"  # noqa: S105 - a lock key

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "jobs, dedupe keys, send keys, conversations, tokens, heartbeats, send pacing",
        """
CREATE TABLE dedupe (
    app text NOT NULL, key text NOT NULL, seen_at double precision NOT NULL,
    PRIMARY KEY (app, key)
);
CREATE INDEX dedupe_seen ON dedupe (seen_at);
CREATE TABLE jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app text NOT NULL,
    member text NOT NULL,
    kind text NOT NULL,
    payload jsonb NOT NULL,
    status text NOT NULL DEFAULT 'queued',
    attempts integer NOT NULL DEFAULT 0,
    available_at double precision NOT NULL,
    lease_owner text,
    lease_until double precision,
    parts jsonb,
    parts_sent integer NOT NULL DEFAULT 0,
    result jsonb,
    error text,
    errcode integer,
    received_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
-- The claim walks queued jobs in id order; a member's line is what is queued or running.
CREATE INDEX jobs_queued ON jobs (id) WHERE status = 'queued';
CREATE INDEX jobs_line ON jobs (app, member, id) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX jobs_finished ON jobs (updated_at) WHERE status IN ('done', 'failed');
CREATE TABLE send_keys (
    key text PRIMARY KEY, fingerprint text NOT NULL, job_id bigint NOT NULL,
    seen_at double precision NOT NULL
);
CREATE INDEX send_keys_seen ON send_keys (seen_at);
CREATE TABLE conversations (
    corp text NOT NULL, agent text NOT NULL, member text NOT NULL,
    conversation_id text NOT NULL, updated_at double precision NOT NULL,
    PRIMARY KEY (corp, agent, member)
);
CREATE TABLE tokens (
    key text PRIMARY KEY, token text NOT NULL, expires_at double precision NOT NULL
);
CREATE TABLE probe (id integer PRIMARY KEY CHECK (id = 1), at double precision NOT NULL);
CREATE TABLE worker_heartbeats (owner text PRIMARY KEY, at double precision NOT NULL);
CREATE TABLE send_bookings (key text NOT NULL, at double precision NOT NULL);
CREATE INDEX send_bookings_key ON send_bookings (key, at);
""",
    ),
    (
        2,
        "jobs copied from a SQLite store (migrate-store), so a second run copies none twice",
        """
CREATE TABLE store_imports (
    source text NOT NULL, source_job_id bigint NOT NULL, job_id bigint NOT NULL,
    PRIMARY KEY (source, source_job_id)
);
""",
    ),
)
MIGRATIONS += (
    (
        3,
        "微信客服: the sync_msg cursor of each kf account",
        """
CREATE TABLE kf_cursors (
    app text NOT NULL, open_kfid text NOT NULL, cursor text NOT NULL,
    updated_at double precision NOT NULL, PRIMARY KEY (app, open_kfid)
);
""",
    ),
)
MIGRATIONS += (
    (
        4,
        "the AI bot: its long connections' reports and its webhook streams",
        """
CREATE TABLE links (
    name text PRIMARY KEY, owner text NOT NULL, state text NOT NULL, detail text NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE streams (
    app text NOT NULL, stream_id text NOT NULL, content text NOT NULL,
    finished boolean NOT NULL DEFAULT false, response_url_used boolean NOT NULL DEFAULT false,
    updated_at double precision NOT NULL, PRIMARY KEY (app, stream_id)
);
CREATE INDEX streams_updated ON streams (updated_at);
""",
    ),
)
MIGRATIONS += (
    (
        5,
        "the AI bot: the images a webhook stream's finishing reply carries",
        "ALTER TABLE streams ADD COLUMN images text NOT NULL DEFAULT '';",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_JOB_COLUMNS = (
    "id, app, member, kind, payload, status, attempts, parts, parts_sent, received_at,"
    " result, error, errcode"
)
_RUNNABLE = """
    j.status = 'queued' AND NOT EXISTS (
        SELECT 1 FROM jobs o WHERE o.app = j.app AND o.member = j.member
          AND o.status IN ('queued', 'running') AND o.id < j.id)
"""


def _job(row: Sequence[Any]) -> Job:
    return Job(
        id=row[0],
        app=row[1],
        user=row[2],
        kind=row[3],
        payload=row[4],
        status=row[5],
        attempts=row[6],
        parts=row[7],
        parts_sent=row[8],
        received_at=row[9],
        result=row[10] or None,
        error=row[11],
        errcode=row[12],
    )


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the migrations this database lacks, each once even when several bridges start at
    the same moment (they queue on the advisory lock). Returns the versions applied."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            conn.execute(sql.encode())  # no parameters: several statements in one go
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
            )
            applied.append(version)
    newer = sorted(v for v in done if v > SCHEMA_VERSION)
    if newer:
        log.warning(
            "the database has schema migrations this release does not know (a newer bridge "
            "applied them); running with them, as migrations are additive",
            extra={"versions": ",".join(map(str, newer))},
        )
    if applied:
        log.info("store schema migrated", extra={"versions": ",".join(map(str, applied))})
    return applied


class PostgresStore:
    """The Store in PostgreSQL (BRIDGE_DATABASE_URL)."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        busy_timeout: float = 2.0,
        durable_commits: bool = True,
        clock: Callable[[], float] = time.time,
        name: str = "wecom-bridge",
    ) -> None:
        """`busy_timeout`: how long a call waits for a connection before it is unavailable.
        `durable_commits=False` (the job side's progress) commits without waiting for the WAL
        flush, as on SQLite: a crash of the server may lose the last progress writes, never an
        acknowledged callback (those are committed by the web side, durably)."""
        self._url = url
        self._timeout = busy_timeout
        self._clock = clock
        options = "" if durable_commits else "-c synchronous_commit=off"
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(2, pool_size),
            open=False,
            timeout=busy_timeout,
            check=ConnectionPool.check_connection,
            # Reconnecting backs off exponentially until this; then the attempt ends and the
            # next call starts a fresh one: a server back after a long outage is used at once.
            reconnect_timeout=RECONNECT_SECONDS,
            kwargs={
                "autocommit": True,
                "application_name": name,
                "connect_timeout": max(1, round(busy_timeout)),
                "options": options,
                # A server host that vanished (no RST) is noticed in seconds, not hours.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": 15000,
            },
            name=name,
        )
        self._pool.open(wait=False)
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    # --- connections and transactions -----------------------------------------------------

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection(timeout=self._timeout) as conn:
                if not self._schema_ready:
                    self._ensure_schema(conn)
                yield conn
        except psycopg.Error as exc:  # PoolTimeout is one too: the server is out of reach
            raise StoreUnavailableError(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        with self._schema_lock:
            if not self._schema_ready:
                migrate(conn)
                self._schema_ready = True

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        with self._conn() as conn, conn.transaction():
            yield conn

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            return conn.execute(sql, args).fetchall()

    def close(self) -> None:
        self._pool.close()

    # --- intake ---------------------------------------------------------------------------

    def accept(self, app: str, dedupe_key: str, job: NewJob | None) -> int | None:
        return self.accept_many([Arrival(app, dedupe_key, job)])[0]

    def accept_many(self, arrivals: Sequence[Arrival]) -> list[int | None]:
        """All arrivals in one transaction (one WAL flush); a key another bridge stored first,
        even in a transaction still open, is a redelivery once that one commits."""
        now = self._clock()
        with self._tx() as db:
            results = [self._accept_one(db, arrival, now) for arrival in arrivals]
            self._notify(db, sum(1 for r in results if r))
        return results

    def _accept_one(self, db: psycopg.Connection[Any], arrival: Arrival, now: float) -> int | None:
        cur = db.execute(
            "INSERT INTO dedupe (app, key, seen_at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (arrival.app, arrival.dedupe_key, now),
        )
        if cur.rowcount == 0:
            return None
        if arrival.job is None:
            return 0
        return self._insert_job(db, arrival.app, arrival.job, now)

    def enqueue(self, app: str, job: NewJob) -> int:
        with self._tx() as db:
            job_id = self._insert_job(db, app, job, self._clock())
            self._notify(db, 1)
        return job_id

    def enqueue_once(self, app: str, job: NewJob, key: str, fingerprint: str) -> tuple[int, bool]:
        now = self._clock()
        with self._tx() as db:
            # Serialises two bridges taking the same key: the second sees the first's job.
            db.execute("SELECT pg_advisory_xact_lock(hashtextextended('send ' || %s, 0))", (key,))
            seen = db.execute(
                "SELECT job_id, fingerprint FROM send_keys WHERE key = %s", (key,)
            ).fetchone()
            if seen is not None:
                if seen[1] != fingerprint:
                    raise IdempotencyConflictError(int(seen[0]))
                return int(seen[0]), True
            job_id = self._insert_job(db, app, job, now)
            db.execute(
                "INSERT INTO send_keys (key, fingerprint, job_id, seen_at) VALUES (%s, %s, %s, %s)",
                (key, fingerprint, job_id, now),
            )
            self._notify(db, 1)
            return job_id, False

    @staticmethod
    def _insert_job(db: psycopg.Connection[Any], app: str, job: NewJob, now: float) -> int:
        row = db.execute(
            "INSERT INTO jobs (app, member, kind, payload, available_at, received_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (app, job.user, job.kind, Jsonb(job.payload), now, now, now),
        ).fetchone()
        assert row is not None  # noqa: S101 - INSERT … RETURNING returns its row
        return int(row[0])

    @staticmethod
    def _notify(db: psycopg.Connection[Any], jobs: int) -> None:
        """Delivered to every listening bridge when (and only if) the transaction commits."""
        if jobs:
            db.execute("SELECT pg_notify(%s, %s)", (JOBS_CHANNEL, str(jobs)))

    def yield_turn(self, max_wait: float = TURN_WAIT_SECONDS) -> None:
        """Nothing to yield: PostgreSQL writers do not share one file lock."""

    # --- workers --------------------------------------------------------------------------

    def claim(
        self, owner: str, lease_seconds: float, *, skip_apps: Collection[str] = ()
    ) -> Job | None:
        """The oldest runnable job no other claim holds (SKIP LOCKED: never waits on another
        bridge's claim). A member's later job stays out while an older one is queued or
        running, as this statement's snapshot sees it, which is the safe side: a job being
        claimed right now is still 'queued' in it. `skip_apps`: apps at their concurrency
        limit in this bridge."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                f"""
                UPDATE jobs SET status = 'running', lease_owner = %s, lease_until = %s,
                    attempts = attempts + 1, updated_at = %s
                WHERE id = (
                    SELECT j.id FROM jobs j WHERE {_RUNNABLE} AND j.available_at <= %s
                      AND j.app <> ALL(%s)
                    ORDER BY j.id LIMIT 1 FOR UPDATE OF j SKIP LOCKED)
                RETURNING {_JOB_COLUMNS}
                """,  # noqa: S608 - constant fragments only
                (owner, now + lease_seconds, now, now, list(skip_apps)),
            ).fetchone()
        return _job(row) if row is not None else None

    def renew_leases(
        self, owner: str, lease_seconds: float, job_ids: Sequence[int] | None = None
    ) -> None:
        until = self._clock() + lease_seconds
        with self._tx() as db:
            if job_ids is None:
                db.execute(
                    "UPDATE jobs SET lease_until = %s WHERE status = 'running'"
                    " AND lease_owner = %s",
                    (until, owner),
                )
            elif job_ids:
                db.execute(
                    "UPDATE jobs SET lease_until = %s WHERE id = ANY(%s) AND status = 'running'"
                    " AND lease_owner = %s",
                    (until, list(job_ids), owner),
                )

    def heartbeat(self, owner: str) -> None:
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO worker_heartbeats (owner, at) VALUES (%s, %s)"
                " ON CONFLICT (owner) DO UPDATE SET at = excluded.at",
                (owner, now),
            )
            db.execute("DELETE FROM worker_heartbeats WHERE at < %s", (now - 3600,))

    def live_workers(self, max_age: float) -> int:
        rows = self._read(
            "SELECT count(*) FROM worker_heartbeats WHERE at >= %s", (self._clock() - max_age,)
        )
        return int(rows[0][0])

    def requeue_expired(self) -> int:
        now = self._clock()
        with self._tx() as db:
            count = db.execute(
                "UPDATE jobs SET status = 'queued', lease_owner = NULL, updated_at = %s"
                " WHERE status = 'running' AND lease_until < %s",
                (now, now),
            ).rowcount
            self._notify(db, count)
        return count

    def release_owned(self, owner: str) -> None:
        with self._tx() as db:
            count = db.execute(
                "UPDATE jobs SET status = 'queued', lease_owner = NULL WHERE status = 'running'"
                " AND lease_owner = %s",
                (owner,),
            ).rowcount
            self._notify(db, count)

    def save_parts(
        self,
        job_id: int,
        parts: list[str],
        result: dict[str, object],
        *,
        conversation: Conversation | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                # merged: facts noted earlier (note_result) stay
                "UPDATE jobs SET parts = %s, result = coalesce(result, '{}') || %s,"
                " updated_at = %s WHERE id = %s",
                (Jsonb(parts), Jsonb(result), self._clock(), job_id),
            )
            if conversation is not None:
                self._set_conversation(db, conversation)

    def note_result(self, job_id: int, key: str, value: object) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET result = jsonb_set(coalesce(result, '{}'), ARRAY[%s], %s),"
                " updated_at = %s WHERE id = %s",
                (key, Jsonb(value), self._clock(), job_id),
            )

    def mark_part_sent(self, job_id: int, part: SentPart) -> None:
        with self._tx() as db:
            self._mark_sent(db, job_id, part)

    def _mark_sent(self, db: psycopg.Connection[Any], job_id: int, part: SentPart) -> None:
        """Once per part: the retry of a commit whose reply was lost finds the count there."""
        db.execute(
            "UPDATE jobs SET parts_sent = %s, updated_at = %s,"
            " result = jsonb_set(coalesce(result, '{}'), '{msgids}',"
            " coalesce(result -> 'msgids', '[]') || jsonb_build_array(%s::text)) || %s"
            " WHERE id = %s AND parts_sent < %s",
            (
                part.parts_sent,
                self._clock(),
                part.msgid,
                Jsonb(part.facts()),
                job_id,
                part.parts_sent,
            ),
        )

    def finish(
        self, job_id: int, *, error: str | None = None, last_part: SentPart | None = None
    ) -> None:
        with self._tx() as db:
            if last_part is not None:
                self._mark_sent(db, job_id, last_part)
            db.execute(
                "UPDATE jobs SET status = 'done', error = %s, lease_owner = NULL, updated_at = %s"
                " WHERE id = %s",
                (error, self._clock(), job_id),
            )

    def fail(self, job_id: int, error: str, errcode: int | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'failed', error = %s, errcode = %s, lease_owner = NULL,"
                " updated_at = %s WHERE id = %s",
                (error, errcode, self._clock(), job_id),
            )

    def retry_later(self, job_id: int, delay: float, error: str, errcode: int | None) -> None:
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'queued', available_at = %s, error = %s, errcode = %s,"
                " lease_owner = NULL, updated_at = %s WHERE id = %s",
                (now + delay, error, errcode, now, job_id),
            )

    def retry_after_error(self, job_id: int, delay: float, error: str) -> int:
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'queued', available_at = %s, error = %s, errcode = NULL,"
                " lease_owner = NULL, updated_at = %s, result = jsonb_set(coalesce(result, '{}'),"
                " '{internal_errors}', to_jsonb(coalesce((result ->> 'internal_errors')::int, 0)"
                " + 1)) WHERE id = %s RETURNING (result ->> 'internal_errors')::int",
                (now + delay, error, now, job_id),
            ).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def get_job(self, job_id: int) -> Job | None:
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s",  # noqa: S608 - constant columns
            (job_id,),
        )
        return _job(rows[0]) if rows else None

    def next_in_line(self, app: str, user: str, after_id: int) -> Job | None:
        """The user's queued job right after `after_id` (a media job's caption, perhaps)."""
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE app = %s AND member = %s AND id > %s"  # noqa: S608 - constant columns
            " AND status = 'queued' ORDER BY id LIMIT 1",
            (app, user, after_id),
        )
        return _job(rows[0]) if rows else None

    def jobs(self, status: str | None = None) -> list[Job]:
        select = f"SELECT {_JOB_COLUMNS} FROM jobs"  # noqa: S608 - constant columns
        if status is None:
            return [_job(r) for r in self._read(f"{select} ORDER BY id")]
        return [_job(r) for r in self._read(f"{select} WHERE status = %s ORDER BY id", (status,))]

    def queue_depth(self) -> int:
        rows = self._read("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
        return int(rows[0][0])

    def next_available_in(self, *, skip_apps: Collection[str] = ()) -> float | None:
        rows = self._read(
            f"SELECT min(j.available_at) FROM jobs j WHERE {_RUNNABLE} AND j.app <> ALL(%s)",  # noqa: S608
            (list(skip_apps),),
        )
        earliest = rows[0][0]
        return None if earliest is None else max(0.0, earliest - self._clock())

    # --- the AI bot (see SqliteStore) ------------------------------------------------------

    def set_link_state(self, name: str, owner: str, state: str, detail: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO links (name, owner, state, detail, updated_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET"
                " owner = excluded.owner, state = excluded.state, detail = excluded.detail,"
                " updated_at = excluded.updated_at",
                (name, owner, state, detail, self._clock()),
            )

    def link_states(self) -> list[LinkStatus]:
        rows = self._read("SELECT name, owner, state, detail, updated_at FROM links ORDER BY name")
        return [LinkStatus(*row) for row in rows]

    def save_stream(
        self,
        app: str,
        stream_id: str,
        content: str,
        *,
        finished: bool,
        images: Sequence[StreamImage] = (),
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO streams (app, stream_id, content, finished, updated_at, images)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (app, stream_id) DO UPDATE SET"
                " content = excluded.content, finished = excluded.finished,"
                " updated_at = excluded.updated_at, images = excluded.images"
                " WHERE NOT streams.finished",
                (app, stream_id, content, finished, self._clock(), images_json(images)),
            )

    def get_stream(self, app: str, stream_id: str) -> StreamProgress | None:
        rows = self._read(
            "SELECT content, finished, response_url_used, images FROM streams"
            " WHERE app = %s AND stream_id = %s",
            (app, stream_id),
        )
        if not rows:
            return None
        content, finished, used, images = rows[0]
        return StreamProgress(content, finished, used, images_of(images))

    def use_response_url(self, app: str, stream_id: str) -> bool:
        with self._tx() as db:
            db.execute(
                "INSERT INTO streams (app, stream_id, content, updated_at)"
                " VALUES (%s, %s, '', %s) ON CONFLICT (app, stream_id) DO NOTHING",
                (app, stream_id, self._clock()),
            )
            cur = db.execute(
                "UPDATE streams SET response_url_used = true WHERE app = %s AND stream_id = %s"
                " AND NOT response_url_used",
                (app, stream_id),
            )
            return cur.rowcount == 1

    # --- 微信客服 pulls ----------------------------------------------------------------------

    def kf_cursor(self, app: str, open_kfid: str) -> str | None:
        rows = self._read(
            "SELECT cursor FROM kf_cursors WHERE app = %s AND open_kfid = %s", (app, open_kfid)
        )
        return str(rows[0][0]) if rows else None

    def accept_pulled(
        self, app: str, open_kfid: str, cursor: str, arrivals: Sequence[Arrival]
    ) -> list[int | None]:
        """A page's messages and the account's cursor in one transaction (see SqliteStore)."""
        now = self._clock()
        with self._tx() as db:
            results = [self._accept_one(db, arrival, now) for arrival in arrivals]
            db.execute(
                "INSERT INTO kf_cursors (app, open_kfid, cursor, updated_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (app, open_kfid) DO UPDATE SET"
                " cursor = excluded.cursor, updated_at = excluded.updated_at",
                (app, open_kfid, cursor, now),
            )
            self._notify(db, sum(1 for r in results if r))
        return results

    # --- conversations and tokens ---------------------------------------------------------

    def get_conversation(self, corp: str, agent: str, user: str) -> str:
        rows = self._read(
            "SELECT conversation_id FROM conversations WHERE corp = %s AND agent = %s"
            " AND member = %s",
            (corp, agent, user),
        )
        return str(rows[0][0]) if rows else ""

    def set_conversation(self, corp: str, agent: str, user: str, conversation_id: str) -> None:
        with self._tx() as db:
            self._set_conversation(db, Conversation(corp, agent, user, conversation_id))

    def _set_conversation(self, db: psycopg.Connection[Any], conversation: Conversation) -> None:
        c = conversation
        db.execute(
            "INSERT INTO conversations (corp, agent, member, conversation_id, updated_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (corp, agent, member) DO UPDATE SET"
            " conversation_id = excluded.conversation_id, updated_at = excluded.updated_at",
            (c.corp, c.agent, c.user, c.conversation_id, self._clock()),
        )

    def forget_conversation(self, corp: str, agent: str, user: str) -> None:
        with self._tx() as db:
            db.execute(
                "DELETE FROM conversations WHERE corp = %s AND agent = %s AND member = %s",
                (corp, agent, user),
            )

    def get_token(self, key: str) -> tuple[str, float] | None:
        rows = self._read("SELECT token, expires_at FROM tokens WHERE key = %s", (key,))
        return (str(rows[0][0]), float(rows[0][1])) if rows else None

    def put_token(self, key: str, token: str, expires_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (key, token, expires_at) VALUES (%s, %s, %s) ON CONFLICT (key)"
                " DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at",
                (key, token, expires_at),
            )

    def drop_token(self, key: str, token: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM tokens WHERE key = %s AND token = %s", (key, token))

    @contextmanager
    def refresh_lock(self, key: str) -> Iterator[None]:
        """A session advisory lock on a connection of its own, held while this bridge calls
        gettoken: the other bridges wait, then find the token it stored. A bridge that dies
        holding it loses its connection, and with it the lock."""
        with self._conn() as conn:
            conn.execute(f"SELECT pg_advisory_lock({_TOKEN_LOCK_SQL})", (key,))
            try:
                yield
            finally:
                conn.execute(f"SELECT pg_advisory_unlock({_TOKEN_LOCK_SQL})", (key,))

    def exclusive(self, name: str) -> SessionExclusive:
        return SessionExclusive(self._url, name)

    # --- send pacing across bridges -------------------------------------------------------

    def book_sends(self, keys: Iterable[str], limits: tuple[tuple[int, float], ...]) -> float:
        """One send counted for every key, at the earliest time all keys' limits allow, booked
        in the shared table; returns the seconds to wait (see SlidingWindowLimiter)."""
        keys = sorted(set(keys))  # one lock order for all bridges: no deadlock
        keep = max(count for count, _ in limits)
        now = self._clock()
        with self._tx() as db:
            at = now
            for key in keys:
                db.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('pacing ' || %s, 0))", (key,)
                )
                booked = [
                    float(r[0])
                    for r in db.execute(
                        "SELECT at FROM send_bookings WHERE key = %s ORDER BY at DESC LIMIT %s",
                        (key, keep),
                    )
                ]
                if booked:
                    at = max(at, booked[0])
                for count, window in limits:
                    if len(booked) >= count:
                        at = max(at, booked[count - 1] + window)
            with db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO send_bookings (key, at) VALUES (%s, %s)", [(k, at) for k in keys]
                )
        return at - now

    # --- moving up from SQLite -------------------------------------------------------------

    def import_snapshot(self, snapshot: StoreSnapshot, source: str) -> dict[str, int]:
        """Copy another store's content in one transaction; returns what was new, by kind.
        Safe to repeat: jobs already copied from `source` are skipped, keys and conversations
        merge (the later conversation and the later-expiring token win). A job that was
        running is queued again: its worker was the old bridge's."""
        counts = dict.fromkeys(("jobs", "dedupe", "send_keys", "conversations", "tokens"), 0)
        with self._tx() as db:
            db.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('import ' || %s, 0))", (source,)
            )
            ids = dict(
                db.execute(
                    "SELECT source_job_id, job_id FROM store_imports WHERE source = %s", (source,)
                ).fetchall()
            )
            for record in snapshot.jobs:
                if record.job.id not in ids:
                    ids[record.job.id] = self._import_job(db, record, source)
                    counts["jobs"] += 1
            counts["dedupe"] = self._insert_new(
                db, "dedupe (app, key, seen_at) VALUES (%s, %s, %s)", snapshot.dedupe
            )
            counts["send_keys"] = self._insert_new(
                db,
                "send_keys (key, fingerprint, job_id, seen_at) VALUES (%s, %s, %s, %s)",
                [(k, f, ids[j], at) for k, f, j, at in snapshot.send_keys if j in ids],
            )
            counts["conversations"] = self._insert_new(
                db,
                "conversations (corp, agent, member, conversation_id, updated_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (corp, agent, member) DO UPDATE SET"
                " conversation_id = excluded.conversation_id, updated_at = excluded.updated_at"
                " WHERE excluded.updated_at > conversations.updated_at",
                snapshot.conversations,
            )
            counts["tokens"] = self._insert_new(
                db,
                "tokens (key, token, expires_at) VALUES (%s, %s, %s) ON CONFLICT (key) DO UPDATE"
                " SET token = excluded.token, expires_at = excluded.expires_at"
                " WHERE excluded.expires_at > tokens.expires_at",
                snapshot.tokens,
            )
            self._notify(db, counts["jobs"])
        return counts

    @staticmethod
    def _import_job(db: psycopg.Connection[Any], record: JobRecord, source: str) -> int:
        job = record.job
        status = "queued" if job.status == "running" else job.status
        row = db.execute(
            "INSERT INTO jobs (app, member, kind, payload, status, attempts, available_at, parts,"
            " parts_sent, result, error, errcode, received_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                job.app,
                job.user,
                job.kind,
                Jsonb(job.payload),
                status,
                job.attempts,
                record.available_at,
                Jsonb(job.parts) if job.parts is not None else None,
                job.parts_sent,
                Jsonb(job.result) if job.result is not None else None,
                job.error,
                job.errcode,
                job.received_at,
                record.updated_at,
            ),
        ).fetchone()
        assert row is not None  # noqa: S101 - INSERT … RETURNING returns its row
        db.execute(
            "INSERT INTO store_imports (source, source_job_id, job_id) VALUES (%s, %s, %s)",
            (source, job.id, row[0]),
        )
        return int(row[0])

    @staticmethod
    def _insert_new(
        db: psycopg.Connection[Any], insert: str, rows: Sequence[Sequence[object]]
    ) -> int:
        """INSERT INTO `insert` for each row; returns how many rows changed anything."""
        if " ON CONFLICT " not in insert:
            insert += " ON CONFLICT DO NOTHING"
        changed = 0
        for row in rows:
            changed += db.execute(f"INSERT INTO {insert}", row).rowcount
        return changed

    # --- maintenance ----------------------------------------------------------------------

    def sweep(self, dedupe_ttl: float, job_retention: float) -> tuple[int, int]:
        now = self._clock()
        horizon = max(window for _, window in DEFAULT_LIMITS)
        with self._tx() as db:
            keys = db.execute("DELETE FROM dedupe WHERE seen_at < %s", (now - dedupe_ttl,)).rowcount
            keys += db.execute(
                "DELETE FROM send_keys WHERE seen_at < %s", (now - dedupe_ttl,)
            ).rowcount
            jobs = db.execute(
                "DELETE FROM jobs WHERE status IN ('done', 'failed') AND updated_at < %s",
                (now - job_retention,),
            ).rowcount
            db.execute("DELETE FROM send_bookings WHERE at < %s", (now - horizon,))
            db.execute("DELETE FROM streams WHERE updated_at < %s", (now - dedupe_ttl,))
        return keys, jobs

    def check_open(self) -> None:
        self._read("SELECT 1")

    def probe_write(self) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO probe (id, at) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                (self._clock(),),
            )


class SessionExclusive:
    """Exclusive through a session advisory lock on a connection of its own, outside the pool:
    held while that connection lives, so a bridge that dies (or loses the server) loses it and
    another bridge's next try_acquire() takes over."""

    def __init__(self, url: str, name: str) -> None:
        self._url = url
        self._name = name
        self._conn: psycopg.Connection[Any] | None = None

    def try_acquire(self) -> bool:
        if self.held():
            return True
        try:
            conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=5, application_name="wecom-bridge-lead"
            )
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended('exclusive ' || %s, 0))",
                (self._name,),
            ).fetchone()
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
        if row is None or not row[0]:
            conn.close()
            return False
        self._conn = conn
        return True

    def held(self) -> bool:
        """Asks the server: the connection (and with it the lock) may have gone."""
        if self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            self._conn.close()  # the session's advisory lock goes with it
            self._conn = None


class SharedSendPacing:
    """The per-member send limits (30/min, 1000/h) booked in PostgreSQL, so that all bridges
    together stay within them (a Pacer, like SlidingWindowLimiter for one process)."""

    def __init__(
        self, store: PostgresStore, limits: tuple[tuple[int, float], ...] = DEFAULT_LIMITS
    ) -> None:
        if not limits or any(count < 1 or window <= 0 for count, window in limits):
            raise ValueError("limits must be non-empty (count >= 1, window > 0) pairs")
        self._store = store
        self._limits = limits

    def reserve_all(self, keys: Iterable[str]) -> float:
        return self._store.book_sends(keys, self._limits)


class JobNotifications:
    """LISTENs for the NOTIFY of stored jobs and calls `on_wake(jobs)`; reconnects when the
    server goes away, and wakes the workers once after each (re)connect for what it missed."""

    def __init__(
        self,
        url: str,
        on_wake: Callable[[int], None],
        *,
        retry_seconds: float = 1.0,
        until: Callable[[], bool] = lambda: False,
    ) -> None:
        """`until`: checked every second; once true the listener ends (its workers stopped)."""
        self._url = url
        self._on_wake = on_wake
        self._retry = retry_seconds
        self._until = until
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bridge-listen", daemon=True)
        self.listening = threading.Event()  # set while LISTEN is active (tests wait on it)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def _stopped(self) -> bool:
        if self._until():
            self._stopping.set()
        return self._stopping.is_set()

    def _run(self) -> None:
        while not self._stopped():
            try:
                self._listen()
            except psycopg.Error as exc:
                log.warning("job notifications lost, reconnecting", extra={"error": str(exc)})
            self.listening.clear()
            self._stopping.wait(self._retry)

    def _listen(self) -> None:
        with psycopg.connect(
            self._url, autocommit=True, connect_timeout=5, application_name="wecom-bridge-listen"
        ) as conn:
            conn.execute(f"LISTEN {JOBS_CHANNEL}")
            self.listening.set()
            self._on_wake(1)
            while not self._stopped():
                for note in conn.notifies(timeout=1.0):
                    self._on_wake(int(note.payload) if note.payload.isdigit() else 1)
