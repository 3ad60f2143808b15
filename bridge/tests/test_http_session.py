"""The upstream sessions read the proxy and CA settings of the environment once, by requests'
own rules, instead of on every call."""

from __future__ import annotations

import pytest
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
