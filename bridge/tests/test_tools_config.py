"""`doctor` and `simulate` read the configuration through the service's own loader, so an apps
file works for them as it does for the bridge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import AppSecrets
from test_doctor import WECOM_ENV

from wecom_bridge.cli import main
from wecom_bridge.testing.server import ServerThread

# Every variable the service reads that could leak in from the developer's shell.
SERVICE_ENV = (*WECOM_ENV, "BRIDGE_APPS_FILE")


@pytest.fixture
def apps_file_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets: AppSecrets,
    bridge_env: dict[str, str],
) -> Path:
    """Two apps in a file: `hr` is the one the running bridge serves at /wxcomapp."""
    apps = tmp_path / "apps.toml"
    apps.write_text(
        f"""
[[app]]
name = "hr"
agent_id = "{secrets.agent_id}"
secret = "{secrets.secret}"
token = "{secrets.token}"
encoding_aes_key = "{secrets.aes_key}"
callback_path = "/wxcomapp"

[[app]]
name = "it"
agent_id = "1000099"
secret = "another-secret"
token = "OtherToken1"
encoding_aes_key = "{"B" * 43}"
callback_path = "/wxcomapp/it"
""",
        encoding="utf-8",
    )
    apps.chmod(0o600)
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in ("WECOM_CORP_ID", "WECOM_API_BASE", "DIFY_API_BASE", "DIFY_API_KEY"):
        monkeypatch.setenv(name, bridge_env[name])
    monkeypatch.setenv("BRIDGE_APPS_FILE", str(apps))
    return apps


def _doctor(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, dict[str, str]]:
    main(["doctor", "--json", "--timeout", "3", *args])
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_doctor_checks_the_named_app_of_an_apps_file(
    capsys: pytest.CaptureFixture[str], apps_file_env: Path, bridge: ServerThread
) -> None:
    results = _doctor(capsys, "--callback-url", f"{bridge.url}/wxcomapp", "--app", "hr")
    assert results["callback"]["status"] == "PASS", results["callback"]
    assert results["wecom-gettoken"]["status"] == "PASS"
    assert results["dify"]["status"] == "PASS"
    # The other app's values are not the bridge's: the handshake says so.
    results = _doctor(capsys, "--callback-url", f"{bridge.url}/wxcomapp", "--app", "it")
    assert results["callback"]["status"] == "FAIL"
    assert "WECOM_TOKEN differs" in results["callback"]["hint"]


def test_doctor_asks_which_app_when_there_are_several(
    capsys: pytest.CaptureFixture[str], apps_file_env: Path, bridge: ServerThread
) -> None:
    results = _doctor(capsys, "--callback-url", f"{bridge.url}/wxcomapp")
    assert results["callback"]["status"] == "FAIL"
    assert "several apps are configured, name one: hr, it" in results["callback"]["detail"]


def test_doctor_fails_an_invalid_value_and_skips_a_missing_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, apps_file_env: Path
) -> None:
    monkeypatch.setenv("DIFY_API_BASE", "not-a-url")
    results = _doctor(capsys, "--app", "hr")
    assert results["dify"]["status"] == "FAIL"
    assert "DIFY_API_BASE: must be an http(s) URL" in results["dify"]["detail"]
    monkeypatch.delenv("DIFY_API_BASE")
    assert _doctor(capsys, "--app", "hr")["dify"]["status"] == "SKIP"


def test_simulate_plays_the_named_app(
    capsys: pytest.CaptureFixture[str],
    apps_file_env: Path,
    bridge: ServerThread,
    wecom_double: ServerThread,
) -> None:
    args = ["simulate", "--url", f"{bridge.url}/wxcomapp", "--api-url", wecom_double.url]
    assert main([*args, "--app", "hr", "--timeout", "15", "--quiet", "1", "你好"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Dify double answer: 你好")
    assert main([*args, "--app", "nosuch", "你好"]) == 2
    assert "no app named 'nosuch'; configured: hr, it" in capsys.readouterr().err
