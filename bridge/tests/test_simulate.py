"""`wecom-bridge simulate` end to end: signed callbacks into the in-process bridge, the answer read
back from the WeCom API double (a running one, or one the simulator serves itself)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AppSecrets, dify_state, free_port, wecom_state

from wecom_bridge.cli import main
from wecom_bridge.config import load_config
from wecom_bridge.jobs.splitter import split_message
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.server import ServerThread

APP_ENV = (
    "WECOM_CORP_ID",
    "WECOM_AGENT_ID",
    "WECOM_SECRET",
    "WECOM_TOKEN",
    "WECOM_ENCODING_AES_KEY",
)


@pytest.fixture
def sim_env(monkeypatch: pytest.MonkeyPatch, bridge_env: dict[str, str]) -> dict[str, str]:
    for name in APP_ENV:
        monkeypatch.setenv(name, bridge_env[name])
    return bridge_env


def simulate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["simulate", "--timeout", "15", "--quiet", "1", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_answer_is_printed(
    capsys: pytest.CaptureFixture[str],
    sim_env: dict[str, str],
    bridge: ServerThread,
    wecom_double: ServerThread,
) -> None:
    code, out, _ = simulate(
        capsys, "--url", f"{bridge.url}/wxcomapp", "--api-url", wecom_double.url, "--user",
        "wangwu", "年假怎么请？",
    )  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"→ wangwu sends '年假怎么请？' to {bridge.url}/wxcomapp"
    assert lines[1].startswith("  text MsgId ") and ": HTTP 200 in " in lines[1]
    assert lines[2] == "← wangwu receives 1 message(s):"
    assert lines[3] == "Dify double answer: 年假怎么请？"


def test_long_answer_in_parts(
    capsys: pytest.CaptureFixture[str],
    sim_env: dict[str, str],
    bridge: ServerThread,
    wecom_double: ServerThread,
    dify_double: ServerThread,
) -> None:
    answer = "".join(f"第{i}条：年假按工龄计算，请在系统中提交申请。\n" for i in range(120))
    dify_state(dify_double).set_answer(answer)
    expected = split_message(answer)
    assert len(expected) >= 3
    code, out, _ = simulate(
        capsys, "--url", f"{bridge.url}/wxcomapp", "--api-url", wecom_double.url, "长问题"
    )
    assert code == 0
    assert f"← zhangsan receives {len(expected)} message(s):" in out
    for number in range(1, len(expected) + 1):
        assert f"--- part {number}/{len(expected)} ---" in out
    printed = out.split(f"--- part 1/{len(expected)} ---\n", 1)[1]
    for number, part in enumerate(expected, 1):
        marker = f"--- part {number + 1}/{len(expected)} ---\n"
        chunk, _, printed = printed.partition(marker)
        assert chunk.rstrip("\n") == part.rstrip("\n")


def test_redeliveries_produce_one_answer(
    capsys: pytest.CaptureFixture[str],
    sim_env: dict[str, str],
    bridge: ServerThread,
    wecom_double: ServerThread,
) -> None:
    code, out, _ = simulate(
        capsys, "--url", f"{bridge.url}/wxcomapp", "--api-url", wecom_double.url, "--user",
        "lisi", "--redeliver", "3", "你好",
    )  # fmt: skip
    assert code == 0
    assert out.count(": HTTP 200 in ") == 4
    assert "redelivery 3/3 (same request)" in out
    assert "← lisi receives 1 message(s):" in out
    assert len([m for m in wecom_state(wecom_double).snapshot() if m["touser"] == "lisi"]) == 1


def test_event_gets_the_welcome(
    capsys: pytest.CaptureFixture[str],
    sim_env: dict[str, str],
    bridge: ServerThread,
    wecom_double: ServerThread,
) -> None:
    code, out, _ = simulate(
        capsys, "--url", f"{bridge.url}/wxcomapp", "--api-url", wecom_double.url, "--event",
        "enter_agent",
    )  # fmt: skip
    assert code == 0
    assert "→ zhangsan sends event enter_agent" in out
    assert out.rstrip().endswith("欢迎使用知识库助手")


def test_refused_callback_exits_1(
    capsys: pytest.CaptureFixture[str],
    sim_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    bridge: ServerThread,
    wecom_double: ServerThread,
) -> None:
    monkeypatch.setenv("WECOM_TOKEN", "WrongToken1")
    code, out, err = simulate(
        capsys, "--url", f"{bridge.url}/wxcomapp", "--api-url", wecom_double.url, "hi"
    )
    assert code == 1
    assert ": HTTP 403 in " in out
    assert "refused the callback (HTTP 403); run `wecom-bridge doctor`" in err


def test_missing_configuration_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in APP_ENV:
        monkeypatch.delenv(name, raising=False)
    code, _, err = simulate(capsys, "--url", "http://127.0.0.1:1/x", "--api-url", "http://x", "hi")
    assert code == 2
    assert "WECOM_CORP_ID: is required" in err


@pytest.fixture
def bridge_for_served_api(
    secrets: AppSecrets, dify_double: ServerThread
) -> Iterator[tuple[ServerThread, int, dict[str, str]]]:
    """A bridge whose WECOM_API_BASE points at a port where nothing runs yet."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {
            "WECOM_CORP_ID": secrets.corp_id,
            "WECOM_AGENT_ID": secrets.agent_id,
            "WECOM_SECRET": secrets.secret,
            "WECOM_TOKEN": secrets.token,
            "WECOM_ENCODING_AES_KEY": secrets.aes_key,
            "WECOM_API_BASE": f"http://127.0.0.1:{port}",
            "DIFY_API_BASE": f"{dify_double.url}/v1",
            "DIFY_API_KEY": secrets.dify_key,
            "BRIDGE_DATA_DIR": str(Path(data) / "data"),
        }
        app = create_app(load_config(env))
        with ServerThread(app) as server:
            yield server, port, env
        app.extensions["wecom_bridge"].pool.stop()


def test_cli_serves_the_api_itself(
    bridge_for_served_api: tuple[ServerThread, int, dict[str, str]],
) -> None:
    """The installed command as a separate process, with its own WeCom API double."""
    bridge, port, env = bridge_for_served_api
    result = subprocess.run(
        [sys.executable, "-m", "wecom_bridge", "simulate", "--url", f"{bridge.url}/wxcomapp",
         "--serve-api", f"127.0.0.1:{port}", "--timeout", "20", "你好"],
        env={**os.environ, **{k: env[k] for k in APP_ENV}},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("Dify double answer: 你好")


def test_the_simulator_sends_an_image_with_its_caption(
    capsys: pytest.CaptureFixture[str],
    sim_env: dict[str, str],
    bridge: ServerThread,
    wecom_double: ServerThread,
    dify_double: ServerThread,
    tmp_path: Path,
) -> None:
    from test_media_in import png

    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    image = tmp_path / "截图.png"
    image.write_bytes(png())
    code, out, _ = simulate(
        capsys, "--url", f"{bridge.url}/wxcomapp", "--api-url", wecom_double.url, "--user",
        "sun", "--image", str(image), "这是什么？",
    )  # fmt: skip
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"→ sun sends image {image} + '这是什么？' to {bridge.url}/wxcomapp"
    assert lines[-1] == "Dify double answer: 这是什么？ [files: image:截图.png]"
