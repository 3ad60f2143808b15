"""A throwaway PostgreSQL server for the tests and benchmarks: Debian's `postgresql` package, a
fresh cluster (initdb) in a temporary directory, listening on loopback only, password
authentication.

PostgreSQL refuses to run as root, so as root (CI) the cluster belongs to the `postgres` user
the package creates and its commands run through `runuser`. The server is a real one: tests
stop and start it to play a database restart. `durable=False` (the unit tests) turns fsync off;
benchmarks keep it on, as a production server has it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or the server would not start."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major, reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable(
        "no initdb: install Debian's `postgresql` package (scripts/host-prerequisites does)"
    )


def _major(path: str) -> int:
    version = Path(path).parent.parent.name
    return int(version) if version.isdigit() else 0


class ThrowawayPostgres:
    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        self.bindir = _bindir()
        self.port = _free_port()
        self.password = secrets.token_hex(16)
        self.root = Path(tempfile.mkdtemp(prefix="wecom-bridge-pg-"))
        self.datadir = self.root / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)

    def _run(self, *args: str) -> None:
        done = subprocess.run(  # noqa: S603 - fixed binaries, arguments of our own
            [*self._as_user, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.root,  # the caller's directory may be closed to the postgres user (/root)
        )
        if done.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> ThrowawayPostgres:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        )
        pwfile.unlink()
        return self

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root} -c max_connections=200"
        )
        if not self.durable:
            options += " -c fsync=off"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{quote(self.password)}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(PostgresUnavailable):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
