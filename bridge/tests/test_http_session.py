"""The upstream sessions read the proxy and CA settings of the environment once, by requests'
own rules, instead of on every call."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from conftest import AppSecrets

from wecom_bridge.http_session import session_for
from wecom_bridge.jobs.store import SqliteStore
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.wecom.api import WeComClient


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "dify.internal,10.0.0.0/8")


def test_a_proxy_is_used_unless_no_proxy_names_the_host(proxy_env: None) -> None:
    assert session_for("https://qyapi.weixin.qq.com").proxies["https"] == (
        "http://proxy.example:3128"
    )
    assert session_for("https://dify.internal/v1").proxies == {}
    assert session_for("http://10.1.2.3/v1").proxies == {}


def test_the_ca_bundle_variable_is_the_trust_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/private-ca.pem")
    assert session_for("https://dify.internal/v1").verify == "/etc/ssl/private-ca.pem"
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    assert session_for("https://dify.internal/v1").verify is True


def test_wecoms_api_is_reached_through_the_proxy(
    monkeypatch: pytest.MonkeyPatch, tmp_path, wecom_double: ServerThread, secrets: AppSecrets
) -> None:
    """HTTP_PROXY points at the WeCom double: a client for an unresolvable host gets its token
    only if the request really went through the proxy."""
    for name in ("http_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", wecom_double.url)
    client = WeComClient(
        api_base="http://qyapi.invalid",
        corp_id=secrets.corp_id,
        secret=secrets.secret,
        token_cache=SqliteStore(tmp_path / "store"),
    )
    assert client.access_token()


class _HeldUntilAllCame(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as Dify's nginx and WeCom's API answer (werkzeug, which the
    doubles run on, closes every connection): each request waits until every caller's has come."""

    protocol_version = "HTTP/1.1"
    server: _KeepAliveServer

    def do_GET(self) -> None:
        self.server.ports.add(self.client_address[1])
        self.server.arrived.wait()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _KeepAliveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, callers: int) -> None:
        super().__init__(("127.0.0.1", 0), _HeldUntilAllCame)
        self.arrived = threading.Barrier(callers, timeout=10)
        self.ports: set[int] = set()


def _ports_of_two_rounds(session: requests.Session, callers: int) -> set[int]:
    """`callers` threads call at once, twice: the client ports the server saw, one per
    connection."""
    server = _KeepAliveServer(callers)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        for _ in range(2):
            with ThreadPoolExecutor(callers) as pool:
                statuses = list(pool.map(lambda _: session.get(url).status_code, range(callers)))
            assert statuses == [200] * callers
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return server.ports


def test_as_many_callers_at_once_as_connections_reuse_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="urllib3"):
        ports = _ports_of_two_rounds(session_for("http://127.0.0.1", connections=24), 24)
    assert len(ports) == 24  # the second round found every connection of the first kept
    assert [r.getMessage() for r in caplog.records] == []  # no "Connection pool is full"
