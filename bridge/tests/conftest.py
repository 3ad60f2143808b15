"""Shared fixtures: the WeCom and Dify doubles on loopback, and the bridge in front of them."""

from __future__ import annotations

import ast
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from wecom_bridge.channels.base import Reply, Target
from wecom_bridge.config import AppConfig, Replies, load_config
from wecom_bridge.jobs.postgres_store import PostgresStore
from wecom_bridge.jobs.store import SqliteStore, Store
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.dify_double import create_dify_double
from wecom_bridge.testing.postgres import PostgresUnavailable, ThrowawayPostgres
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.testing.wecom_double import create_wecom_double
from wecom_bridge.wecom.crypto import WeComCrypto
from wecom_bridge.wecom.messages import SendResult

# CPython 3.11.0-3.11.7 and 3.12.0-3.12.1 keep ast.parse's recursion counter in one place for
# all threads (gh-106905, fixed by gh-113035): when a GC pass inside one thread's parse lets another
# thread parse, the first raises "SystemError: AST constructor recursion depth mismatch" (a CI run
# on 3.11.7 failed a fixture so: werkzeug parses while building a new app's URL rules, and pytest's
# log capture formats tracebacks, which 3.11 parses for the ^^^ markers, in whichever thread logs).
# The service formats its log lines in one writer thread, and its image runs 3.13.
AST_PARSE_SHARES_ITS_COUNTER = (3, 11) <= sys.version_info < (3, 11, 8) or (
    (3, 12) <= sys.version_info < (3, 12, 2)
)


def serialize_ast_parse() -> None:
    if getattr(ast.parse, "serialized", False):
        return
    parse, lock = ast.parse, threading.RLock()

    @functools.wraps(parse)
    def serialized(*args, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            return parse(*args, **kwargs)

    serialized.serialized = True  # type: ignore[attr-defined]
    ast.parse = serialized  # type: ignore[assignment]


if AST_PARSE_SHARES_ITS_COUNTER:
    serialize_ast_parse()


@dataclass(frozen=True)
class AppSecrets:
    corp_id: str = "wwtestcorp0001"
    agent_id: str = "1000002"
    secret: str = "test-corp-secret-not-real"
    token: str = "TestToken123"
    aes_key: str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
    dify_key: str = "app-test-dify-key"

    def crypto(self) -> WeComCrypto:
        return WeComCrypto(self.token, self.aes_key, self.corp_id)


class FakeClock:
    """A clock a test moves by hand (`clock.now += 60`)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, step: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


@contextmanager
def aibot_double_process(args: list[str], env: dict[str, str]) -> Iterator[str]:
    """`wecom-bridge aibot-double ARGS --control …` as its own process (as molecule and the
    demo run it); yields its control URL once it answers, stops it afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "wecom_bridge", "aibot-double", *args]
    double = subprocess.Popen(
        [*command, "--control", f"127.0.0.1:{port}"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    control = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{control}/control/status"))
        yield control
    finally:
        double.terminate()
        double.wait(10)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the two store backends -------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[ThrowawayPostgres]:
    """A real PostgreSQL server for the session (Debian's package; scripts/host-prerequisites
    installs it). It is part of the suite: when it cannot start, the tests that need it fail.
    BRIDGE_TEST_POSTGRES=off skips them on a developer machine without it, never under CI."""
    if os.environ.get("BRIDGE_TEST_POSTGRES") == "off" and os.environ.get("CI") != "true":
        pytest.skip("BRIDGE_TEST_POSTGRES=off: the PostgreSQL store is not tested")
    server = ThrowawayPostgres()
    try:
        server.init().start()
    except PostgresUnavailable as exc:
        server.destroy()
        pytest.fail(f"cannot start the test PostgreSQL server: {exc}", pytrace=False)
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres_server: ThrowawayPostgres) -> str:
    """A fresh, empty database of its own for each test."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@dataclass
class StoreBackend:
    """Opens stores of one backend on one database (several: like several processes)."""

    name: str
    open: Callable[..., Store]
    env: dict[str, str]  # what points the bridge's configuration at this database
    opened: list[Store] = field(default_factory=list)

    def __call__(self, **options: object) -> Store:
        store = self.open(**options)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    """The shared store suite runs once per backend."""
    if request.param == "sqlite":
        data = tmp_path / "store"
        backend = StoreBackend(
            "sqlite", lambda **o: SqliteStore(data, **o), {"BRIDGE_DATA_DIR": str(data)}
        )
    else:
        url = request.getfixturevalue("postgres_url")
        backend = StoreBackend(
            "postgresql", lambda **o: PostgresStore(url, **o), {"BRIDGE_DATABASE_URL": url}
        )
    yield backend
    for store in backend.opened:
        store.close()


@pytest.fixture
def secrets() -> AppSecrets:
    return AppSecrets()


@pytest.fixture
def wecom_double(secrets: AppSecrets) -> Iterator[ServerThread]:
    app = create_wecom_double(
        corp_id=secrets.corp_id, secret=secrets.secret, agent_id=secrets.agent_id
    )
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def dify_double(secrets: AppSecrets) -> Iterator[ServerThread]:
    with ServerThread(create_dify_double(api_key=secrets.dify_key)) as server:
        yield server


def wecom_state(server: ServerThread):
    return server.app.extensions["wecom_double"]


def dify_state(server: ServerThread):
    return server.app.extensions["dify_double"]


def wecom_env(secrets: AppSecrets, api_base: str) -> dict[str, str]:
    """The WeCom half of the bridge's configuration, pointed at a WeCom double."""
    return {
        "WECOM_CORP_ID": secrets.corp_id,
        "WECOM_AGENT_ID": secrets.agent_id,
        "WECOM_SECRET": secrets.secret,
        "WECOM_TOKEN": secrets.token,
        "WECOM_ENCODING_AES_KEY": secrets.aes_key,
        "WECOM_API_BASE": api_base,
    }


@pytest.fixture
def bridge_env(
    tmp_path: Path, secrets: AppSecrets, wecom_double: ServerThread, dify_double: ServerThread
) -> dict[str, str]:
    return {
        **wecom_env(secrets, wecom_double.url),
        "DIFY_API_BASE": f"{dify_double.url}/v1",
        "DIFY_API_KEY": secrets.dify_key,
        "DIFY_BACKOFF": "0.05",
        "DIFY_READ_TIMEOUT": "5",
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
        "BRIDGE_WELCOME_TEXT": "欢迎使用知识库助手",
        "WECOM_CONFIG_ERROR_COOLDOWN": "2",
    }


@pytest.fixture
def bridge(bridge_env: dict[str, str]) -> Iterator[ServerThread]:
    """The bridge app in-process on a real loopback HTTP server, with its worker pool."""
    app = create_app(load_config(bridge_env))
    with ServerThread(app) as server:
        yield server
    app.extensions["wecom_bridge"].pool.stop()


@pytest.fixture
def callbacks(bridge: ServerThread, secrets: AppSecrets) -> CallbackClient:
    return CallbackClient(f"{bridge.url}/wxcomapp", secrets.crypto(), secrets.agent_id)


class BridgeProcess:
    """`wecom-bridge serve` (granian) as a separate process group that can be killed -9."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "BRIDGE_LISTEN": f"127.0.0.1:{self.port}"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BridgeProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wecom_bridge", "serve"],
            env=self.env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(self._ready, timeout=20)
        return self

    def _ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.stderr.read().decode(errors="replace") if self.proc else ""


@dataclass
class RecordingChannel:
    """An outbound that records what it sends (the processor's tests need no HTTP for it)."""

    sent: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    part_limit_bytes: int = 2048
    max_parts: int | None = None

    def pacing_keys(self, target: Target) -> list[str]:
        return []

    def send_part(self, target: Target, text: str) -> SendResult:
        assert isinstance(target, Reply)
        with self.lock:
            self.sent.append((target.user, text))
            return SendResult(msgid=f"m{len(self.sent)}")


def plain_app(name: str = "default", **replies: str) -> AppConfig:
    """An app without Dify, for processor tests."""
    return AppConfig(
        name=name,
        corp_id="ww1",
        agent_id="1000002",
        secret="s",
        token="t",
        encoding_aes_key="k",
        callback_path="/wxcomapp",
        dify=None,
        replies=Replies(**replies),
    )
