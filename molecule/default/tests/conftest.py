"""Helpers for the verify step: every request goes through the real stack on the server.

Requests run with curl on the server (testinfra, docker backend), so they take the same path a
client on the host would: /etc/hosts -> nginx -> bridge container -> doubles.
"""

import base64
import json
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from wecom_bridge.wecom.crypto import WeComCrypto

SCENARIO_DIR = Path(__file__).resolve().parents[1]
TEST_VARS = yaml.safe_load((SCENARIO_DIR / "group_vars" / "all.yml").read_text())
DOMAIN = TEST_VARS["wecom_test_domain"]
CALLBACK_PATH = "/wxcomapp"
# Pebble makes new roots at every start; the tests fetch the current one here.
PEBBLE_ROOT = "/tmp/pebble-root.pem"
PEBBLE_LISTENER_CERT = f"{TEST_VARS['wecom_test_pebble_dir']}/cert.pem"
WECOM_DOUBLE = "http://127.0.0.1:9001"


def text_of(message):
    """A recorded message's text ("" for an image or a file message)."""
    return message.get("text", {}).get("content", "")


@dataclass
class Response:
    status: int
    content_type: str
    location: str
    body: str


class Edge:
    """curl on the server against the edge (and the doubles' control APIs)."""

    def __init__(self, host):
        self.host = host

    def request(self, url, *, method="GET", query=None, body=None, extra=()):
        if query:
            url = f"{url}?{urlencode(query)}"
        args = [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-X",
            method,
            "--cacert",
            PEBBLE_ROOT,
        ]
        args += [*extra, "-w", r"\n%{http_code}\n%{content_type}\n%{redirect_url}", url]
        cmd = shlex.join(args)
        if body is not None:
            # testinfra has no stdin: the body travels base64-encoded in the command.
            b64 = base64.b64encode(body).decode()
            cmd = f"printf %s {b64} | base64 -d | {cmd} --data-binary @-"
        res = self.host.run(cmd)
        assert res.rc == 0, res.stderr
        text, status, content_type, location = res.stdout.rsplit("\n", 3)
        return Response(int(status), content_type, location, text)

    def https(self, path, **kwargs):
        return self.request(f"https://{DOMAIN}{path}", **kwargs)

    def http(self, path, **kwargs):
        return self.request(f"http://{DOMAIN}{path}", **kwargs)

    def sent_messages(self):
        """Every message/send body the WeCom double received, in order."""
        res = self.request(f"{WECOM_DOUBLE}/_double/messages")
        assert res.status == 200, res
        return json.loads(res.body)["messages"]

    def wait_for_send(self, text, timeout=20):
        """The message/send bodies whose text contains `text`, once there is one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.sent_messages() if text in text_of(m)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


@pytest.fixture(scope="module")
def edge(host):
    host.check_output(
        "curl -sS --fail --cacert %s -o %s https://127.0.0.1:15000/roots/0",
        PEBBLE_LISTENER_CERT,
        PEBBLE_ROOT,
    )
    return Edge(host)


@pytest.fixture(scope="session")
def server_address():
    """The server container's address on the host's Docker network: the controller's way in."""
    return subprocess.run(
        [
            "docker",
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            "server",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def pebble_root_file(host, edge, tmp_path_factory):
    """The current pebble root on the controller, for clients that run here."""
    ca_file = tmp_path_factory.mktemp("pebble") / "root.pem"
    ca_file.write_text(host.file(PEBBLE_ROOT).content_string)
    return ca_file


@pytest.fixture(scope="session")
def crypto():
    return WeComCrypto(
        TEST_VARS["wecom_test_token"],
        TEST_VARS["wecom_test_encoding_aes_key"],
        TEST_VARS["wecom_test_corp_id"],
    )


# --- ordering and reporting for the reliability tests -------------------------------------------

# name -> counts line, printed at the end of the run (CI logs keep them).
TALLIES: dict[str, str] = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "disruptive: kills or restarts parts of the stack; runs after the other tests",
    )


def pytest_collection_modifyitems(items):
    """Disruptive tests last, in their file order, so they cannot disturb the others."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def pytest_terminal_summary(terminalreporter):
    if TALLIES:
        terminalreporter.section("reliability counts (per test)")
        for name, line in TALLIES.items():
            terminalreporter.write_line(f"{name}: {line}")
