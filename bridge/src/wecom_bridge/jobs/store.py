"""The durable store: the only state shared by callbacks and workers.

`Store` is the interface; two implementations behave the same (one test suite runs against
both): `SqliteStore` here, SQLite in WAL mode in the data dir (the embedded default, one host),
and `PostgresStore` (jobs.postgres_store: several bridges on several hosts share one queue).

Holds inbound jobs with status, dedupe keys, per-user Dify conversation ids and cached access
tokens. Every method is one short transaction; a failure to write raises StoreUnavailableError
so the callback can answer non-200 and WeCom redelivers. On SQLite, new work (callbacks, send
requests) is also refused while the data directory's free space is below a floor: what is
already accepted keeps the rest to finish with, and a full disk never half-stores a message.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from wecom_bridge.errors import IdempotencyConflictError, StoreUnavailableError
from wecom_bridge.wecom.aibot_frames import StreamImage

# Fair turns for the write lock. SQLite's busy handler polls a locked database in steps of up
# to 100 ms, so a writer that keeps re-taking the lock at once (the web side's group commit
# under a burst of callbacks) starves the others: the job side's "part sent" write waited out
# its busy timeout and the job resent a part WeCom had already accepted. So every writer polls
# for the lock itself, every millisecond, and the job side announces that it wants the lock (a
# file per waiting thread in TURNS_DIR); the group committer lets it go first (`yield_turn`),
# waiting at most a bounded time per batch so a stale announcement cannot stall callbacks. It
# waits only for the announcements it found, not for later ones: waiting until none was left let
# writers whose announcements overlap (job-side stores with their own locks) hold every batch
# for the whole bound. So writers alternate: the job-side transactions announced, then a batch.
TURNS_DIR = "write-turns"
STALE_TURN_SECONDS = 30.0
TURN_WAIT_SECONDS = 0.05
_LOCK_POLL_SECONDS = 0.001

SCHEMA = """
CREATE TABLE IF NOT EXISTS dedupe (
    app TEXT NOT NULL, key TEXT NOT NULL, seen_at REAL NOT NULL, PRIMARY KEY (app, key)
);
CREATE INDEX IF NOT EXISTS dedupe_seen ON dedupe (seen_at);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    available_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    parts TEXT,
    parts_sent INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    errcode INTEGER,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, app, user, id);
-- Lets the claim walk queued jobs in id order and stop at the first runnable one, instead of
-- sorting the whole queue while holding the write lock (5 ms at 3000 queued; now microseconds).
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, id);
-- Send API requests made idempotent by the client's Idempotency-Key: key -> the job it queued.
CREATE TABLE IF NOT EXISTS send_keys (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, job_id INTEGER NOT NULL, seen_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS send_keys_seen ON send_keys (seen_at);
CREATE TABLE IF NOT EXISTS conversations (
    corp TEXT NOT NULL, agent TEXT NOT NULL, user TEXT NOT NULL,
    conversation_id TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (corp, agent, user)
);
CREATE TABLE IF NOT EXISTS tokens (
    key TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS worker_heartbeats (owner TEXT PRIMARY KEY, at REAL NOT NULL);
-- The AI bot's long connections as their holders (Store.exclusive) last reported them, for
-- /readyz; a holder reports again every few seconds, so a stale row means none holds it.
CREATE TABLE IF NOT EXISTS links (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL,
    updated_at REAL NOT NULL
);
-- The AI bot's webhook streams: what WeCom's stream-refresh callbacks are answered with (the job
-- side writes the text as Dify writes it, the web side reads it), and whether the message's
-- one-time response_url was used.
CREATE TABLE IF NOT EXISTS streams (
    app TEXT NOT NULL, stream_id TEXT NOT NULL, content TEXT NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0, response_url_used INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL, images TEXT NOT NULL DEFAULT '', PRIMARY KEY (app, stream_id)
);
CREATE INDEX IF NOT EXISTS streams_updated ON streams (updated_at);
-- 微信客服: where the last kf/sync_msg of each kf account stopped (its next_cursor).
CREATE TABLE IF NOT EXISTS kf_cursors (
    app TEXT NOT NULL, open_kfid TEXT NOT NULL, cursor TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (app, open_kfid)
);
"""

# Columns added after a table was first shipped: CREATE TABLE IF NOT EXISTS leaves an older
# store's table as it was, so each is added to it when missing (table, column, definition).
ADDED_COLUMNS = (("streams", "images", "TEXT NOT NULL DEFAULT ''"),)

INVALID_KEYS = ("invaliduser", "invalidparty", "invalidtag", "unlicenseduser")


@dataclass(frozen=True)
class NewJob:
    """A job as the store keeps it: kind and payload as jobs.kinds encodes them."""

    kind: str  # one of jobs.kinds
    user: str
    payload: dict[str, object]


@dataclass(frozen=True)
class Arrival:
    """One inbound message to record: its dedupe key and the job it asks for (None: nothing)."""

    app: str
    dedupe_key: str
    job: NewJob | None


@dataclass(frozen=True)
class Job:
    id: int
    app: str
    user: str
    kind: str
    payload: dict[str, object]
    status: str
    attempts: int
    parts: list[str] | None
    parts_sent: int
    received_at: float
    result: dict[str, object] | None = None
    error: str | None = None
    errcode: int | None = None


@dataclass(frozen=True)
class SentPart:
    """A part WeCom accepted: the count of the job's parts sent with it, its msgid, and the
    recipients WeCom reported it could not deliver to (invaliduser / invalidparty / ...)."""

    parts_sent: int
    msgid: str = ""
    invalid: Mapping[str, str] = field(default_factory=dict)

    def facts(self) -> dict[str, str]:
        """The invalid-recipient fields WeCom filled in (a wrong key is a programming error)."""
        for key in self.invalid:
            if key not in INVALID_KEYS:
                raise ValueError(f"not a WeCom invalid-recipient field: {key}")
        return {key: value for key, value in self.invalid.items() if value}


@dataclass(frozen=True)
class Conversation:
    """The Dify conversation a member's next question continues."""

    corp: str
    agent: str
    user: str
    conversation_id: str


@dataclass(frozen=True)
class StreamProgress:
    """An AI bot's webhook stream: its text so far, whether its response_url was used, and
    the images its finishing reply carries."""

    content: str
    finished: bool
    response_url_used: bool
    images: tuple[StreamImage, ...] = ()


def images_json(images: Sequence[StreamImage]) -> str:
    """A stream's images as the streams table keeps them ('' for none)."""
    return json.dumps([[i.base64, i.md5] for i in images]) if images else ""


def images_of(stored: str) -> tuple[StreamImage, ...]:
    return tuple(StreamImage(str(b), str(m)) for b, m in json.loads(stored)) if stored else ()


@dataclass(frozen=True)
class LinkStatus:
    """One long connection as its holder last reported it."""

    name: str
    owner: str
    state: str
    detail: str
    updated_at: float


@dataclass(frozen=True)
class JobRecord:
    """A job with its scheduling times, as `migrate-store` copies it."""

    job: Job
    available_at: float
    updated_at: float


@dataclass(frozen=True)
class StoreSnapshot:
    """Everything a store holds that must move with it to another (`migrate-store`): the jobs
    with their progress, dedupe and idempotency keys, conversations and access tokens."""

    jobs: list[JobRecord]
    dedupe: list[tuple[str, str, float]]  # app, key, seen_at
    send_keys: list[tuple[str, str, int, float]]  # key, fingerprint, job id, seen_at
    conversations: list[tuple[str, str, str, str, float]]  # corp, agent, user, id, updated_at
    tokens: list[tuple[str, str, float]]  # key, token, expires_at


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        app=row["app"],
        user=row["user"],
        kind=row["kind"],
        payload=json.loads(row["payload"]),
        status=row["status"],
        attempts=row["attempts"],
        parts=json.loads(row["parts"]) if row["parts"] is not None else None,
        parts_sent=row["parts_sent"],
        received_at=row["received_at"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
        errcode=row["errcode"],
    )


# SQLite's primary result codes that mean the file or disk, not the statement, failed.
_DISK_ERRORS = {
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
}


def _not_in(column: str, values: Collection[str]) -> str:
    """An `AND column NOT IN (?, …)` clause for `values` (empty: no clause)."""
    if not values:
        return ""
    return f" AND {column} NOT IN ({', '.join('?' * len(values))})"


def _is_disk_error(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _DISK_ERRORS


class FreeSpaceFloor:
    """Refuses new work while the data directory has less than `min_free_bytes` available.

    statvfs is cheap but runs on every callback, so its answer is reused for `ttl` seconds.
    """

    def __init__(
        self,
        directory: Path,
        min_free_bytes: int,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.min_free_bytes = min_free_bytes
        self._ttl = ttl
        self._clock = clock
        self._checked_at = float("-inf")
        self._free = 0

    def free_bytes(self) -> int:
        now = self._clock()
        if now - self._checked_at >= self._ttl:
            try:
                stat = os.statvfs(self.directory)
            except OSError as exc:
                raise StoreUnavailableError(f"cannot stat {self.directory}: {exc}") from exc
            self._free = stat.f_bavail * stat.f_frsize
            self._checked_at = now
        return self._free

    def check(self) -> None:
        if not self.min_free_bytes:
            return
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise StoreUnavailableError(
                f"{free // 2**20} MiB free in {self.directory}, below the "
                f"{self.min_free_bytes // 2**20} MiB floor (BRIDGE_MIN_FREE_MB): new work refused"
            )


class Exclusive(Protocol):
    """A role only one holder may have at a time across every process sharing the store (e.g.
    the one bridge that holds the AI bot's long connection). Whoever holds it must check
    `held()` now and then: a holder whose process or connection died has lost it, and another
    one's `try_acquire()` then succeeds."""

    def try_acquire(self) -> bool: ...
    def held(self) -> bool: ...
    def release(self) -> None: ...


class Store(Protocol):
    """What the bridge asks of its store, whichever database holds it."""

    # --- intake (callbacks, send API) ---
    def accept(self, app: str, dedupe_key: str, job: NewJob | None) -> int | None: ...
    def accept_many(self, arrivals: Sequence[Arrival]) -> list[int | None]: ...
    def enqueue(self, app: str, job: NewJob) -> int: ...
    def enqueue_once(
        self, app: str, job: NewJob, key: str, fingerprint: str
    ) -> tuple[int, bool]: ...
    def yield_turn(self, max_wait: float = TURN_WAIT_SECONDS) -> None: ...

    # --- workers ---
    def claim(
        self, owner: str, lease_seconds: float, *, skip_apps: Collection[str] = ()
    ) -> Job | None: ...
    def renew_leases(
        self, owner: str, lease_seconds: float, job_ids: Sequence[int] | None = None
    ) -> None: ...
    def heartbeat(self, owner: str) -> None: ...
    def live_workers(self, max_age: float) -> int: ...
    def requeue_expired(self) -> int: ...
    def release_owned(self, owner: str) -> None: ...
    def save_parts(
        self,
        job_id: int,
        parts: list[str],
        result: dict[str, object],
        *,
        conversation: Conversation | None = None,
    ) -> None: ...
    def note_result(self, job_id: int, key: str, value: object) -> None: ...
    def mark_part_sent(self, job_id: int, part: SentPart) -> None: ...
    def finish(
        self, job_id: int, *, error: str | None = None, last_part: SentPart | None = None
    ) -> None: ...
    def fail(self, job_id: int, error: str, errcode: int | None = None) -> None: ...
    def retry_later(self, job_id: int, delay: float, error: str, errcode: int | None) -> None: ...
    def retry_after_error(self, job_id: int, delay: float, error: str) -> int: ...
    def get_job(self, job_id: int) -> Job | None: ...
    def next_in_line(self, app: str, user: str, after_id: int) -> Job | None: ...
    def jobs(self, status: str | None = None) -> list[Job]: ...
    def queue_depth(self) -> int: ...
    def next_available_in(self, *, skip_apps: Collection[str] = ()) -> float | None: ...

    # --- the AI bot: its long connections' reports, its webhook streams ---
    def set_link_state(self, name: str, owner: str, state: str, detail: str) -> None: ...
    def link_states(self) -> list[LinkStatus]: ...
    def save_stream(
        self,
        app: str,
        stream_id: str,
        content: str,
        *,
        finished: bool,
        images: Sequence[StreamImage] = (),
    ) -> None: ...
    def get_stream(self, app: str, stream_id: str) -> StreamProgress | None: ...
    def use_response_url(self, app: str, stream_id: str) -> bool: ...

    # --- 微信客服 pulls (jobs/kf.py) ---
    def kf_cursor(self, app: str, open_kfid: str) -> str | None: ...
    def accept_pulled(
        self, app: str, open_kfid: str, cursor: str, arrivals: Sequence[Arrival]
    ) -> list[int | None]: ...

    # --- conversations and tokens (the TokenCache of wecom.WeComClient) ---
    def get_conversation(self, corp: str, agent: str, user: str) -> str: ...
    def set_conversation(self, corp: str, agent: str, user: str, conversation_id: str) -> None: ...
    def forget_conversation(self, corp: str, agent: str, user: str) -> None: ...
    def get_token(self, key: str) -> tuple[str, float] | None: ...
    def put_token(self, key: str, token: str, expires_at: float) -> None: ...
    def drop_token(self, key: str, token: str) -> None: ...
    def refresh_lock(self, key: str) -> AbstractContextManager[None]: ...
    def exclusive(self, name: str) -> Exclusive: ...

    # --- maintenance ---
    def sweep(self, dedupe_ttl: float, job_retention: float) -> tuple[int, int]: ...
    def check_open(self) -> None: ...
    def probe_write(self) -> None: ...
    def close(self) -> None: ...


class FileExclusive:
    """Exclusive through flock(2) on an open file (per open file, so two holders in one process
    exclude each other too)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot open {self._path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None


def _touch(mark: Path) -> None:
    """Create `mark`, and its directory the first time (not a mkdir per transaction)."""
    try:
        mark.touch()
    except FileNotFoundError:
        mark.parent.mkdir(exist_ok=True)
        mark.touch()


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a store made by an older release up to this one's tables (ADDED_COLUMNS)."""
    for table, column, definition in ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column in present:
            continue
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it first
                raise


class SqliteStore:
    """The Store in one SQLite file in the data dir (WAL, synced commits for callbacks)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        busy_timeout: float = 2.0,
        durable_commits: bool = True,
        min_free_bytes: int = 0,
        clock: Callable[[], float] = time.time,
        takes_turns: bool = False,
    ) -> None:
        """`takes_turns`: this store's writers (the job side) announce that they wait for the
        write lock, and the group commit lets them go first."""
        with contextlib.suppress(OSError):  # a missing, unwritable dir fails at first use
            data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "bridge.sqlite3"
        self._turns = data_dir / TURNS_DIR
        self._takes_turns = takes_turns
        self.space = FreeSpaceFloor(data_dir, min_free_bytes)
        self._busy_timeout = busy_timeout
        self._synchronous = "FULL" if durable_commits else "NORMAL"
        self._clock = clock
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._turn_numbers = itertools.count()  # each announcement its own name
        self._schema_ready = False
        # A store that cannot be opened yet (read-only or full disk) is not fatal: every use
        # raises StoreUnavailableError (callbacks 503, /readyz not ready) until it works.
        with contextlib.suppress(sqlite3.Error, StoreUnavailableError):
            self._conn()

    # --- connections and transactions -----------------------------------------------------

    def _check_writable(self) -> None:
        """SQLite opens a file it cannot write read-only, and the process then shares that
        read-only WAL index with every later connection: better not to open it at all."""
        paths = [
            self.path.parent,
            self.path,
            *(self.path.with_name(self.path.name + x) for x in ("-wal", "-shm")),
        ]
        for path in paths:
            if path.exists() and not os.access(path, os.W_OK):
                raise StoreUnavailableError(f"{path} is not writable by uid {os.getuid()}")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self._check_writable()
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL syncs the WAL at every commit, so an acknowledged callback survives power
            # loss; NORMAL (worker progress) survives a process crash and is made durable by
            # the next FULL commit. One fsync per worker step would starve the callbacks.
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            self._local.conn = conn
        if not self._schema_ready:
            conn.executescript(SCHEMA)  # executescript manages its own transaction
            _add_missing_columns(conn)
            self._schema_ready = True
        if not getattr(self._local, "polls", False):
            # Short from here: BEGIN polls for the lock itself (see TURNS_DIR); this only
            # covers the rare busy moments inside a transaction.
            conn.execute(f"PRAGMA busy_timeout={int(min(self._busy_timeout, 0.02) * 1000)}")
            self._local.polls = True
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        self._local.polls = False
        if conn is not None:
            conn.close()

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, polling for the write lock every millisecond up to the busy
        timeout (SQLite's own handler sleeps up to 100 ms between tries)."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
            time.sleep(_LOCK_POLL_SECONDS)

    @contextmanager
    def _my_turn(self) -> Iterator[None]:
        """While this thread waits for (and holds) the write lock, others can see it wants it."""
        if not self._takes_turns:
            yield
            return
        mark = self._turns / f"{os.getpid()}-{threading.get_ident()}-{next(self._turn_numbers)}"
        try:
            _touch(mark)
        except OSError:  # no announcement: the lock is still taken, only less fairly
            yield
            return
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                mark.unlink()

    def writers_waiting(self) -> bool:
        """Whether a job-side writer announced it waits for the write lock (recently)."""
        return bool(self._announced())

    def _announced(self) -> set[str]:
        try:
            entries = os.scandir(self._turns)
        except OSError:
            return set()
        now = time.time()
        fresh = set()
        with entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime < STALE_TURN_SECONDS:
                        fresh.add(entry.name)
        return fresh

    def yield_turn(self, max_wait: float = TURN_WAIT_SECONDS) -> None:
        """Let the job-side writers announced now take the write lock first (not those that
        announce meanwhile), waiting at most `max_wait` (called by the group commit before
        each batch)."""
        deadline = time.monotonic() + max_wait
        waiting = self._announced()
        while waiting and time.monotonic() < deadline:
            time.sleep(_LOCK_POLL_SECONDS / 2)
            waiting &= self._announced()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # One writer of this process at a time: SQLite takes only one anyway, and 64 job
        # threads each polling for the lock every millisecond burnt the CPU the callbacks
        # needed (ack throughput fell to a third with a 64-thread pool).
        with self._write_lock, self._my_turn(), self._tx_inner() as conn:
            yield conn

    @contextmanager
    def _tx_inner(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._conn()
            self._begin(conn)
        except sqlite3.Error as exc:
            self._drop_conn()
            raise StoreUnavailableError(f"cannot open a write transaction: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            if _is_disk_error(exc):  # a connection opened while the disk was read-only stays so
                self._drop_conn()
            raise StoreUnavailableError(f"write failed: {exc}") from exc
        except BaseException:
            self._rollback(conn)
            raise

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._drop_conn()

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            self._drop_conn()
            raise StoreUnavailableError(f"read failed: {exc}") from exc

    # --- callbacks ------------------------------------------------------------------------

    def accept(self, app: str, dedupe_key: str, job: NewJob | None) -> int | None:
        """Record an arrival once. Returns the new job id, 0 when nothing is to be done,
        or None when the key was seen before (a redelivery)."""
        return self.accept_many([Arrival(app, dedupe_key, job)])[0]

    def accept_many(self, arrivals: Sequence[Arrival]) -> list[int | None]:
        """accept() for several arrivals in one transaction: one fsync for all of them."""
        self.space.check()
        now = self._clock()
        with self._tx() as db:
            return [self._accept_one(db, d, now) for d in arrivals]

    def _accept_one(self, db: sqlite3.Connection, arrival: Arrival, now: float) -> int | None:
        cur = db.execute(
            "INSERT OR IGNORE INTO dedupe (app, key, seen_at) VALUES (?, ?, ?)",
            (arrival.app, arrival.dedupe_key, now),
        )
        if cur.rowcount == 0:
            return None
        if arrival.job is None:
            return 0
        return self._insert_job(db, arrival.app, arrival.job, now)

    def enqueue(self, app: str, job: NewJob) -> int:
        self.space.check()
        with self._tx() as db:
            return self._insert_job(db, app, job, self._clock())

    def enqueue_once(self, app: str, job: NewJob, key: str, fingerprint: str) -> tuple[int, bool]:
        """enqueue() unless `key` already queued a job: returns (job id, whether it was queued
        before). The key's first request must have had the same `fingerprint`, else
        IdempotencyConflictError. A repeat is answered even below the free-space floor: it
        writes nothing."""
        now = self._clock()
        with self._tx() as db:
            seen = db.execute(
                "SELECT job_id, fingerprint FROM send_keys WHERE key = ?", (key,)
            ).fetchone()
            if seen is not None:
                if seen["fingerprint"] != fingerprint:
                    raise IdempotencyConflictError(seen["job_id"])
                return int(seen["job_id"]), True
            self.space.check()
            job_id = self._insert_job(db, app, job, now)
            db.execute(
                "INSERT INTO send_keys (key, fingerprint, job_id, seen_at) VALUES (?, ?, ?, ?)",
                (key, fingerprint, job_id, now),
            )
            return job_id, False

    @staticmethod
    def _insert_job(db: sqlite3.Connection, app: str, job: NewJob, now: float) -> int:
        cur = db.execute(
            "INSERT INTO jobs (app, user, kind, payload, available_at, received_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (app, job.user, job.kind, json.dumps(job.payload, ensure_ascii=False), now, now, now),
        )
        return int(cur.lastrowid or 0)

    # --- workers --------------------------------------------------------------------------

    def claim(
        self, owner: str, lease_seconds: float, *, skip_apps: Collection[str] = ()
    ) -> Job | None:
        """Take the oldest runnable job whose user has nothing older queued or in flight,
        so each user's messages are answered in order while users run concurrently.
        `skip_apps`: apps that may not start another job now (at their concurrency limit)."""
        now = self._clock()
        skip = _not_in("j.app", skip_apps)
        with self._tx() as db:
            row = db.execute(
                f"""
                SELECT j.* FROM jobs j
                WHERE j.status = 'queued' AND j.available_at <= ?{skip}
                  AND NOT EXISTS (
                    SELECT 1 FROM jobs o WHERE o.app = j.app AND o.user = j.user
                      AND o.status IN ('queued', 'running') AND o.id < j.id)
                ORDER BY j.id LIMIT 1
                """,  # noqa: S608 - `skip` holds only placeholders
                (now, *skip_apps),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status='running', lease_owner=?, lease_until=?,"
                " attempts=attempts+1, updated_at=? WHERE id=?",
                (owner, now + lease_seconds, now, row["id"]),
            )
        job = _job(row)
        return Job(**{**job.__dict__, "status": "running", "attempts": job.attempts + 1})

    def renew_leases(
        self, owner: str, lease_seconds: float, job_ids: Sequence[int] | None = None
    ) -> None:
        """Extend `owner`'s leases; with `job_ids`, only those (the jobs a worker really has in
        hand: a job it dropped after an error must expire and be resumed)."""
        now = self._clock()
        with self._tx() as db:
            if job_ids is None:
                db.execute(
                    "UPDATE jobs SET lease_until=? WHERE status='running' AND lease_owner=?",
                    (now + lease_seconds, owner),
                )
                return
            db.executemany(
                "UPDATE jobs SET lease_until=? WHERE id=? AND status='running' AND lease_owner=?",
                [(now + lease_seconds, job_id, owner) for job_id in job_ids],
            )

    def heartbeat(self, owner: str) -> None:
        """A job process says it is alive (readiness of the web side reads this)."""
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO worker_heartbeats (owner, at) VALUES (?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET at=excluded.at",
                (owner, now),
            )
            db.execute("DELETE FROM worker_heartbeats WHERE at < ?", (now - 3600,))

    def live_workers(self, max_age: float) -> int:
        rows = self._read(
            "SELECT count(*) FROM worker_heartbeats WHERE at >= ?", (self._clock() - max_age,)
        )
        return int(rows[0][0])

    def requeue_expired(self) -> int:
        """Jobs whose worker died (lease ran out) go back to the queue."""
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status='queued', lease_owner=NULL, updated_at=?"
                " WHERE status='running' AND lease_until < ?",
                (now, now),
            )
            return cur.rowcount

    def release_owned(self, owner: str) -> None:
        """On a clean shutdown, hand unfinished jobs back at once."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status='queued', lease_owner=NULL WHERE status='running'"
                " AND lease_owner=?",
                (owner,),
            )

    def save_parts(
        self,
        job_id: int,
        parts: list[str],
        result: dict[str, object],
        *,
        conversation: Conversation | None = None,
    ) -> None:
        """Keep the answer's parts (and the conversation Dify answered in, for the member's
        next question) in one commit."""
        with self._tx() as db:
            db.execute(
                # merged: facts noted earlier (note_result) stay
                "UPDATE jobs SET parts=?, result=json_patch(coalesce(result, '{}'), ?),"
                " updated_at=? WHERE id=?",
                (
                    json.dumps(parts, ensure_ascii=False),
                    json.dumps(result, ensure_ascii=False),
                    self._clock(),
                    job_id,
                ),
            )
            if conversation is not None:
                self._set_conversation(db, conversation)

    def note_result(self, job_id: int, key: str, value: object) -> None:
        """Keep one more fact on the job's result (e.g. the ids of the message Dify accepted)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET result=json_set(coalesce(result, '{}'), ?, json(?)),"
                " updated_at=? WHERE id=?",
                (f"$.{key}", json.dumps(value, ensure_ascii=False), self._clock(), job_id),
            )

    def mark_part_sent(self, job_id: int, part: SentPart) -> None:
        """Record a part WeCom accepted: its msgid and, when WeCom reported some, the
        recipients it could not deliver to (invaliduser / invalidparty / invalidtag)."""
        with self._tx() as db:
            self._mark_sent(db, job_id, part)

    def _mark_sent(self, db: sqlite3.Connection, job_id: int, part: SentPart) -> None:
        """Once per part: a retry of a commit that did land finds the count there already."""
        db.execute(
            "UPDATE jobs SET parts_sent=?, updated_at=?, result=json_patch(json_set("
            "coalesce(result, '{}'), '$.msgids', json_insert("
            "coalesce(json_extract(result, '$.msgids'), json('[]')), '$[#]', ?)), ?)"
            " WHERE id=? AND parts_sent < ?",
            (
                part.parts_sent,
                self._clock(),
                part.msgid,
                json.dumps(part.facts(), ensure_ascii=False),
                job_id,
                part.parts_sent,
            ),
        )

    def finish(
        self, job_id: int, *, error: str | None = None, last_part: SentPart | None = None
    ) -> None:
        """Mark the job done; `last_part`: the part that completed it, recorded in the same
        commit (one write less per answer, and no moment where it is sent but not marked)."""
        with self._tx() as db:
            if last_part is not None:
                self._mark_sent(db, job_id, last_part)
            db.execute(
                "UPDATE jobs SET status='done', error=?, lease_owner=NULL, updated_at=? WHERE id=?",
                (error, self._clock(), job_id),
            )

    def fail(self, job_id: int, error: str, errcode: int | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status='failed', error=?, errcode=?, lease_owner=NULL,"
                " updated_at=? WHERE id=?",
                (error, errcode, self._clock(), job_id),
            )

    def retry_later(self, job_id: int, delay: float, error: str, errcode: int | None) -> None:
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status='queued', available_at=?, error=?, errcode=?,"
                " lease_owner=NULL, updated_at=? WHERE id=?",
                (now + delay, error, errcode, now, job_id),
            )

    def retry_after_error(self, job_id: int, delay: float, error: str) -> int:
        """Requeue a job that failed unexpectedly; returns how often that has happened to it."""
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status='queued', available_at=?, error=?, errcode=NULL,"
                " lease_owner=NULL, updated_at=?, result=json_set(coalesce(result, '{}'),"
                " '$.internal_errors', coalesce(json_extract(result, '$.internal_errors'), 0) + 1)"
                " WHERE id=?",
                (now + delay, error, now, job_id),
            )
            row = db.execute(
                "SELECT json_extract(result, '$.internal_errors') FROM jobs WHERE id=?", (job_id,)
            ).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def get_job(self, job_id: int) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _job(rows[0]) if rows else None

    def next_in_line(self, app: str, user: str, after_id: int) -> Job | None:
        """The user's queued job right after `after_id` (a media job's caption, perhaps)."""
        rows = self._read(
            "SELECT * FROM jobs WHERE app=? AND user=? AND id>? AND status='queued'"
            " ORDER BY id LIMIT 1",
            (app, user, after_id),
        )
        return _job(rows[0]) if rows else None

    def jobs(self, status: str | None = None) -> list[Job]:
        if status is None:
            return [_job(r) for r in self._read("SELECT * FROM jobs ORDER BY id")]
        return [
            _job(r) for r in self._read("SELECT * FROM jobs WHERE status=? ORDER BY id", (status,))
        ]

    def queue_depth(self) -> int:
        rows = self._read("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
        return int(rows[0][0])

    def next_available_in(self, *, skip_apps: Collection[str] = ()) -> float | None:
        """Seconds until the earliest job at the head of its user's line becomes runnable
        (None: nothing can become runnable without another job finishing first)."""
        skip = _not_in("j.app", skip_apps)
        rows = self._read(
            f"SELECT min(j.available_at) FROM jobs j WHERE j.status = 'queued'{skip}"  # noqa: S608 - placeholders only
            " AND NOT EXISTS ("
            " SELECT 1 FROM jobs o WHERE o.app = j.app AND o.user = j.user"
            " AND o.status IN ('queued', 'running') AND o.id < j.id)",
            tuple(skip_apps),
        )
        earliest = rows[0][0]
        return None if earliest is None else max(0.0, earliest - self._clock())

    # --- long connections (the AI bot) ------------------------------------------------------

    def set_link_state(self, name: str, owner: str, state: str, detail: str) -> None:
        """The report of connection `name`'s holder (the caller holds `exclusive(name)`)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO links (name, owner, state, detail, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner=excluded.owner, state=excluded.state,"
                " detail=excluded.detail, updated_at=excluded.updated_at",
                (name, owner, state, detail, self._clock()),
            )

    def link_states(self) -> list[LinkStatus]:
        return [
            LinkStatus(r["name"], r["owner"], r["state"], r["detail"], r["updated_at"])
            for r in self._read("SELECT * FROM links ORDER BY name")
        ]

    # --- webhook streams (the AI bot) ------------------------------------------------------

    def save_stream(
        self,
        app: str,
        stream_id: str,
        content: str,
        *,
        finished: bool,
        images: Sequence[StreamImage] = (),
    ) -> None:
        """The stream's text so far, and with the finish its images (a finished stream is
        not changed again)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO streams (app, stream_id, content, finished, updated_at, images)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (app, stream_id) DO UPDATE SET"
                " content=excluded.content, finished=excluded.finished,"
                " updated_at=excluded.updated_at, images=excluded.images"
                " WHERE streams.finished = 0",
                (app, stream_id, content, int(finished), self._clock(), images_json(images)),
            )

    def get_stream(self, app: str, stream_id: str) -> StreamProgress | None:
        rows = self._read(
            "SELECT content, finished, response_url_used, images FROM streams"
            " WHERE app=? AND stream_id=?",
            (app, stream_id),
        )
        if not rows:
            return None
        row = rows[0]
        return StreamProgress(row[0], bool(row[1]), bool(row[2]), images_of(row[3]))

    def use_response_url(self, app: str, stream_id: str) -> bool:
        """Claim the message's one response_url call; False when it was used before."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO streams (app, stream_id, content, updated_at) VALUES (?, ?, '', ?)"
                " ON CONFLICT (app, stream_id) DO NOTHING",
                (app, stream_id, self._clock()),
            )
            cur = db.execute(
                "UPDATE streams SET response_url_used=1 WHERE app=? AND stream_id=?"
                " AND response_url_used=0",
                (app, stream_id),
            )
            return cur.rowcount == 1

    # --- 微信客服 pulls ----------------------------------------------------------------------

    def kf_cursor(self, app: str, open_kfid: str) -> str | None:
        """The stored sync_msg cursor of a kf account; None: it was never pulled."""
        rows = self._read(
            "SELECT cursor FROM kf_cursors WHERE app=? AND open_kfid=?", (app, open_kfid)
        )
        return str(rows[0][0]) if rows else None

    def accept_pulled(
        self, app: str, open_kfid: str, cursor: str, arrivals: Sequence[Arrival]
    ) -> list[int | None]:
        """Store one pulled page's messages (accept_many's dedupe and jobs) and advance the
        account's cursor in the same transaction: a crash before it neither loses the page
        (the cursor still points before it) nor, after it, pulls the page again."""
        self.space.check()
        now = self._clock()
        with self._tx() as db:
            results = [self._accept_one(db, arrival, now) for arrival in arrivals]
            db.execute(
                "INSERT INTO kf_cursors (app, open_kfid, cursor, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (app, open_kfid) DO UPDATE SET cursor=excluded.cursor,"
                " updated_at=excluded.updated_at",
                (app, open_kfid, cursor, now),
            )
        return results

    # --- conversations and tokens ---------------------------------------------------------

    def get_conversation(self, corp: str, agent: str, user: str) -> str:
        rows = self._read(
            "SELECT conversation_id FROM conversations WHERE corp=? AND agent=? AND user=?",
            (corp, agent, user),
        )
        return rows[0][0] if rows else ""

    def set_conversation(self, corp: str, agent: str, user: str, conversation_id: str) -> None:
        with self._tx() as db:
            self._set_conversation(db, Conversation(corp, agent, user, conversation_id))

    def _set_conversation(self, db: sqlite3.Connection, conversation: Conversation) -> None:
        c = conversation
        db.execute(
            "INSERT INTO conversations (corp, agent, user, conversation_id, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (corp, agent, user) DO UPDATE SET"
            " conversation_id=excluded.conversation_id, updated_at=excluded.updated_at",
            (c.corp, c.agent, c.user, c.conversation_id, self._clock()),
        )

    def forget_conversation(self, corp: str, agent: str, user: str) -> None:
        with self._tx() as db:
            db.execute(
                "DELETE FROM conversations WHERE corp=? AND agent=? AND user=?", (corp, agent, user)
            )

    # TokenCache protocol of wecom.WeComClient
    def get_token(self, key: str) -> tuple[str, float] | None:
        rows = self._read("SELECT token, expires_at FROM tokens WHERE key=?", (key,))
        return (rows[0][0], rows[0][1]) if rows else None

    def put_token(self, key: str, token: str, expires_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (key, token, expires_at) VALUES (?, ?, ?) ON CONFLICT (key)"
                " DO UPDATE SET token=excluded.token, expires_at=excluded.expires_at",
                (key, token, expires_at),
            )

    def drop_token(self, key: str, token: str) -> None:
        """Forget `token`, unless another process already replaced it."""
        with self._tx() as db:
            db.execute("DELETE FROM tokens WHERE key=? AND token=?", (key, token))

    def refresh_lock(self, key: str) -> AbstractContextManager[None]:
        """One host: the client's own thread lock already makes one refresh at a time."""
        return nullcontext()

    def exclusive(self, name: str) -> Exclusive:
        """An flock on a file in the data dir: one holder among this host's processes; the
        kernel releases it when the holder dies."""
        return FileExclusive(self.path.parent / f"exclusive-{name}.lock")

    # --- maintenance ----------------------------------------------------------------------

    def sweep(self, dedupe_ttl: float, job_retention: float) -> tuple[int, int]:
        """Expire old dedupe and idempotency keys and finished jobs; returns (keys, jobs)
        removed."""
        now = self._clock()
        with self._tx() as db:
            keys = db.execute("DELETE FROM dedupe WHERE seen_at < ?", (now - dedupe_ttl,)).rowcount
            keys += db.execute(
                "DELETE FROM send_keys WHERE seen_at < ?", (now - dedupe_ttl,)
            ).rowcount
            jobs = db.execute(
                "DELETE FROM jobs WHERE status IN ('done', 'failed') AND updated_at < ?",
                (now - job_retention,),
            ).rowcount
            db.execute("DELETE FROM streams WHERE updated_at < ?", (now - dedupe_ttl,))
        return keys, jobs

    def export_snapshot(self) -> StoreSnapshot:
        """All of it as of one moment (a read transaction: safe while the bridge runs)."""
        try:
            db = self._conn()
            db.execute("BEGIN")
            try:
                jobs = [
                    JobRecord(_job(r), r["available_at"], r["updated_at"])
                    for r in db.execute("SELECT * FROM jobs ORDER BY id")
                ]
                tables = [
                    [tuple(r) for r in db.execute(f"SELECT {columns} FROM {table}")]  # noqa: S608
                    for table, columns in (
                        ("dedupe", "app, key, seen_at"),
                        ("send_keys", "key, fingerprint, job_id, seen_at"),
                        ("conversations", "corp, agent, user, conversation_id, updated_at"),
                        ("tokens", "key, token, expires_at"),
                    )
                ]
            finally:
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._drop_conn()
            raise StoreUnavailableError(f"read failed: {exc}") from exc
        dedupe, send_keys, conversations, tokens = tables
        return StoreSnapshot(jobs, dedupe, send_keys, conversations, tokens)

    def close(self) -> None:
        """Closes this thread's connection (others close with their threads)."""
        self._drop_conn()

    def check_open(self) -> None:
        """Raises StoreUnavailableError now if the store cannot be used (for CLIs, which should
        fail fast with a hint rather than later)."""
        self._read("SELECT 1")

    def probe_write(self) -> None:
        """A real write, for readiness: proves the disk, the lock and the free-space floor."""
        self.space.check()
        with self._tx() as db:
            db.execute(
                "INSERT INTO probe (id, at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET at=excluded.at",
                (self._clock(),),
            )
