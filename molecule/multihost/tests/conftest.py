"""The multihost stack seen from this machine: HTTPS to the edge, the doubles on the outside
host, the bridges' own ports, and `docker` for the hosts themselves (this machine's containers)."""

import subprocess
from pathlib import Path

import pytest
import yaml
from wecom_bridge.wecom.crypto import WeComCrypto

SCENARIO_DIR = Path(__file__).resolve().parents[1]
TEST_VARS = yaml.safe_load((SCENARIO_DIR / "group_vars" / "all.yml").read_text())
ADDRESS = TEST_VARS["wecom_test_address"]
DOMAIN = TEST_VARS["wecom_test_domain"]
BRIDGE_HOSTS = ("bridge1", "bridge2")

# name -> counts line, printed at the end of the run (CI logs keep them).
TALLIES: dict[str, str] = {}


def on(host: str, command: str, check: bool = True) -> str:
    """A shell command on one of the scenario's hosts."""
    done = subprocess.run(
        ["docker", "exec", host, "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"{host}: {command}: {done.stderr}"
    return done.stdout.strip()


def docker(*args: str) -> None:
    """The host-level engine: stops and starts whole hosts."""
    subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="session")
def crypto():
    return WeComCrypto(
        TEST_VARS["wecom_test_token"],
        TEST_VARS["wecom_test_encoding_aes_key"],
        TEST_VARS["wecom_test_corp_id"],
    )


def pytest_terminal_summary(terminalreporter):
    if TALLIES:
        terminalreporter.section("multihost fault counts (per test)")
        for name, line in TALLIES.items():
            terminalreporter.write_line(f"{name}: {line}")
