"""The deployed stack under faults: nothing WeCom delivered is lost or answered twice.

Each test sends distinct messages (one member each) the way WeCom delivers them — 5 s timeout,
up to three retries 5 s apart (wecom_bridge.testing.redelivery) — from this machine through
the server's edge nginx, strikes one fault on the server mid-burst, then counts what the members
received at the WeCom double: sent, acknowledged, answered, fallbacks, duplicates, lost. The counts
are printed at the end of the run. Marked disruptive: they run after the other verify tests.
"""

import json
import secrets
import shlex
import threading
import time
from dataclasses import dataclass

import pytest
import requests
from conftest import DOMAIN, TALLIES, TEST_VARS
from wecom_bridge.testing.redelivery import (
    Deliverer,
    Outcome,
    Tally,
    WeComRetry,
    make_messages,
    recorded_messages,
    tally,
    wait_for_answers,
)

pytestmark = pytest.mark.disruptive

BRIDGE = "wecom-bridge"
BRIDGE_DATA = "/var/lib/wecom-bridge"
DIFY_API = "dify-api-1"
READY_URL = "http://127.0.0.1:8400/readyz"
# A burst a fault is struck into arrives over this many seconds: all at once, the bridge takes
# 150 callbacks in well under a second, about the time `docker exec ... kill` needs to land, and
# the fault could miss the burst (seen as "the kill did not interrupt the burst").
BURST_SECONDS = 10.0


def wait_until(predicate, timeout, step=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@dataclass
class Stack:
    """The server seen from this machine (HTTPS to its edge) and from inside (commands)."""

    host: object
    crypto: object
    address: str
    ca_file: str

    @property
    def wecom_api(self):
        return f"http://{self.address}:9001"

    def sh(self, command):
        res = self.host.run(command)
        assert res.rc == 0, f"{command}: {res.stderr}"
        return res.stdout.strip()

    def deliverer(self, **kwargs):
        url = f"https://{self.address}/wxcomapp"
        return Deliverer(url, verify=self.ca_file, hostname=DOMAIN, **kwargs)

    def messages(self, tag, count):
        tag = f"{tag}-{secrets.token_hex(3)}"
        return make_messages(self.crypto, TEST_VARS["wecom_test_agent_id"], tag, count)

    def finish(self, name, outcomes, timeout=120):
        """Counts once every job is done: a job resumed after its lease (15 s) would only
        then send a duplicate answer."""
        wait_for_answers(self.wecom_api, outcomes, timeout)
        wait_until(lambda: self.queue_depth() == 0, timeout, 1.0, "the bridge's queue to empty")
        time.sleep(2)
        counts = tally(outcomes, recorded_messages(self.wecom_api))
        TALLIES[name] = counts.line()
        return counts

    def dify(self, path, payload):
        """The Dify double's control API, from inside its container (not published)."""
        body = shlex.quote(json.dumps(payload))
        self.sh(
            f"docker exec {DIFY_API} curl -sS --fail -X POST -H 'Content-Type: application/json'"
            f" -d {body} http://127.0.0.1:5001{path}"
        )

    def ready_status(self):
        return self.host.run(f"curl -s -o /dev/null -w '%{{http_code}}' {READY_URL}").stdout

    def wait_ready(self, timeout=120):
        wait_until(lambda: self.ready_status() == "200", timeout, 1.0, "the bridge's /readyz")

    def queue_depth(self):
        return json.loads(self.sh(f"curl -sS {READY_URL}")).get("queue_depth", -1)

    def bridge_state(self):
        """State and restart count only: the full inspect holds the bridge's secrets (Env)."""
        fields = '{"State": {{json .State}}, "RestartCount": {{.RestartCount}}}'
        return json.loads(self.sh(f"docker inspect -f '{fields}' {BRIDGE}"))

    def wait_wecom_double(self, timeout=120):
        def answers():
            try:
                return requests.get(f"{self.wecom_api}/_double/stats", timeout=5).ok
            except requests.RequestException:
                return False

        wait_until(answers, timeout, 1.0, "the WeCom double")

    def wecom_stats(self):
        return requests.get(f"{self.wecom_api}/_double/stats", timeout=10).json()


@pytest.fixture(scope="module")
def stack(host, crypto, server_address, pebble_root_file):
    stack = Stack(host, crypto, server_address, str(pebble_root_file))
    stack.wait_ready()
    return stack


@pytest.fixture(autouse=True)
def dify_restored(stack):
    yield
    stack.dify("/_double/reset", {})


def assert_exactly_once(counts: Tally):
    """Nothing acknowledged is lost or answered twice. A message can be stored yet miss its 200
    (then it is answered without being acknowledged): answered >= acknowledged."""
    assert counts.lost == 0, counts
    assert counts.duplicates == 0, counts
    assert counts.answered >= counts.acknowledged, counts


class Strike(threading.Thread):
    """Runs `action` once `deliverer` has had `acks` 200s; join() re-raises what it raised."""

    def __init__(self, deliverer, acks, action):
        super().__init__(daemon=True)
        self.deliverer, self.acks, self.action = deliverer, acks, action
        self.error = None
        self.start()

    def run(self):
        try:
            wait_until(lambda: self.deliverer.acknowledged >= self.acks, 60, 0.01, "acks")
            self.action()
        except Exception as exc:  # reported by join(), in the test's thread
            self.error = exc

    def join(self, timeout=None):
        super().join(timeout)
        if self.error is not None:
            raise AssertionError(f"the fault could not be struck: {self.error!r}")


def test_redelivery_storm(stack):
    """Every message delivered 3 times ~5 s apart, all concurrently; plus 3 at the same instant."""
    spaced, same_instant = (
        stack.messages("storm", 100),
        stack.messages("storm-same", 50),
    )
    deliverer = stack.deliverer(concurrency=64)
    threads = [
        threading.Thread(
            target=lambda: spaced_out.extend(deliverer.deliver_all(spaced, (0, 5, 10)))
        ),
        threading.Thread(
            target=lambda: same_out.extend(deliverer.deliver_all(same_instant, (0, 0, 0)))
        ),
    ]
    spaced_out: list[Outcome] = []
    same_out: list[Outcome] = []
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = stack.finish("redelivery storm", spaced_out + same_out)
    assert counts.sent == counts.acknowledged == 150, counts
    assert counts.deliveries == 450, counts
    assert counts.fallbacks == 0, counts
    assert_exactly_once(counts)


def test_kill9_of_the_bridge_container_mid_burst(stack):
    # Answers would take 30 s, so the kill lands while workers wait on Dify, never inside the
    # milliseconds between WeCom accepting an answer and the bridge recording it.
    stack.dify("/_double/delay", {"seconds": 30})
    restarts = stack.bridge_state()["RestartCount"]
    messages = stack.messages("kill9", 150)
    deliverer = stack.deliverer(concurrency=8)

    def kill():
        answered = tally(outcomes_so_far, recorded_messages(stack.wecom_api)).answered
        assert answered == 0, "an answer went out before the kill: the test lost its timing"
        stack.sh(f"kill -9 $(docker inspect -f '{{{{.State.Pid}}}}' {BRIDGE})")
        stack.dify("/_double/delay", {"seconds": 0})

    outcomes_so_far = [Outcome(m) for m in messages]

    striker = Strike(deliverer, 40, kill)
    outcomes = deliverer.deliver_all(messages, spread=BURST_SECONDS)
    striker.join()
    counts = stack.finish("kill -9 mid-burst", outcomes)
    logs = stack.sh(f"docker logs --tail 40 {BRIDGE} 2>&1")
    assert stack.bridge_state()["RestartCount"] == restarts + 1, logs
    assert counts.non_200 > 0, "the kill did not interrupt the burst"
    assert counts.acknowledged == counts.sent == 150, counts
    assert_exactly_once(counts)


def test_dify_failing_or_hanging(stack):
    """Each member gets the answer if Dify recovers within the retries, else the fallback."""
    deliverer = stack.deliverer()
    results = {}
    phases = {
        "down": {"status": 500, "times": 1000},  # every attempt fails: fallback
        "flaky": {"status": 502, "times": 2},  # fewer failures than one job's attempts
        "hanging": {"hang": 4, "times": 8},  # slow, then answers
    }
    for phase, fault in phases.items():
        stack.dify("/_double/faults", fault)
        outcomes = deliverer.deliver_all(stack.messages(f"dify-{phase}", 8))
        results[phase] = stack.finish(f"Dify {phase}", outcomes)
        stack.dify("/_double/reset", {})
    for counts in results.values():
        assert counts.sent == counts.acknowledged == counts.answered == 8, counts
        assert_exactly_once(counts)
    assert results["down"].fallbacks == 8, results["down"]
    assert results["flaky"].fallbacks == 0, results["flaky"]
    assert results["hanging"].fallbacks == 0, results["hanging"]


def test_token_invalidated_mid_burst(stack):
    stack.dify("/_double/delay", {"seconds": 0.1})  # spread the answers over the burst
    calls = stack.wecom_stats()["gettoken_calls"]
    deliverer = stack.deliverer(concurrency=16)

    def expire():
        requests.post(f"{stack.wecom_api}/_double/expire-tokens", timeout=10).raise_for_status()

    striker = Strike(deliverer, 60, expire)
    outcomes = deliverer.deliver_all(stack.messages("token", 120), spread=BURST_SECONDS)
    striker.join()
    counts = stack.finish("42001 mid-burst", outcomes)
    assert counts.sent == counts.acknowledged == counts.answered == 120, counts
    assert counts.fallbacks == 0, counts
    assert_exactly_once(counts)
    assert stack.wecom_stats()["gettoken_calls"] > calls, "the bridge never fetched a new token"


@pytest.fixture
def data_on_tmpfs(stack):
    """The bridge's data dir on a tmpfs (its data + 128 MiB) the test can fill; moved back after."""
    saved = "/root/bridge-data.saved"
    stack.sh(f"docker stop {BRIDGE} && rm -rf {saved} && cp -a {BRIDGE_DATA} {saved}")
    size_mib = int(stack.sh(f"du -sm {saved} | cut -f1")) + 128
    options = f"size={size_mib}m,mode=0750,uid=10001,gid=10001"
    stack.sh(f"mount -t tmpfs -o {options} bridge-data {BRIDGE_DATA}")
    try:
        stack.sh(f"cp -a {saved}/. {BRIDGE_DATA}/ && docker start {BRIDGE}")
        stack.wait_ready()
        yield
    finally:  # also when the setup failed: later tests need the data dir back on disk
        # Under the tmpfs lie the files from before the test (an old WAL among them): the
        # directory is emptied before the data comes back, and every step runs.
        stack.sh(
            f"rm -f {BRIDGE_DATA}/filler; chmod -R u+w {BRIDGE_DATA}; docker stop {BRIDGE};"
            f" rm -rf {saved} && cp -a {BRIDGE_DATA} {saved}; umount {BRIDGE_DATA};"
            f" find {BRIDGE_DATA} -mindepth 1 -delete && cp -a {saved}/. {BRIDGE_DATA}/"
            f" && rm -rf {saved}; docker start {BRIDGE}"
        )
        stack.wait_ready()


def refused_then_taken(stack, name, messages):
    """While the fault lasts: non-200s, not ready, no restart. Returns after one try each."""
    restarts = stack.bridge_state()["RestartCount"]
    once = stack.deliverer(retry=WeComRetry(attempts=1))
    refused = once.deliver_all(messages)
    assert all(o.statuses and o.statuses[0] >= 500 for o in refused), [o.statuses for o in refused]
    assert stack.ready_status() == "503"
    state = stack.bridge_state()
    assert state["State"]["Running"] and state["RestartCount"] == restarts, state["State"]
    TALLIES[f"{name} (while it lasts)"] = f"sent={len(messages)} non_200={len(refused)}"


def test_data_dir_full_or_unwritable(stack, data_on_tmpfs):
    # Full: free space under the bridge's floor (BRIDGE_MIN_FREE_MB, 64 MiB by default).
    free = int(stack.sh(f"df --output=avail -B1 {BRIDGE_DATA} | tail -n 1"))
    stack.sh(f"fallocate -l {free - 16 * 2**20} {BRIDGE_DATA}/filler")
    wait_until(
        lambda: stack.ready_status() == "503",
        10,
        0.5,
        "the bridge to see the full disk",
    )
    full = stack.messages("disk-full", 10)
    refused_then_taken(stack, "data dir full", full)
    stack.sh(f"rm {BRIDGE_DATA}/filler")
    stack.wait_ready(30)
    counts = stack.finish("data dir full, then space back", stack.deliverer().deliver_all(full))
    assert counts.sent == counts.acknowledged == counts.answered == 10, counts
    assert_exactly_once(counts)

    # Unwritable: the bridge restarted on a read-only data dir stays up, refusing.
    stack.sh(f"chmod -R a-w {BRIDGE_DATA} && docker restart {BRIDGE}")
    wait_until(lambda: stack.ready_status() == "503", 60, 1.0, "the restarted bridge to answer")
    unwritable = stack.messages("disk-ro", 10)
    refused_then_taken(stack, "data dir unwritable", unwritable)
    stack.sh(f"chmod -R u+w {BRIDGE_DATA}")
    stack.wait_ready(90)  # the job process comes back on its restart backoff
    counts = stack.finish(
        "data dir unwritable, then fixed", stack.deliverer().deliver_all(unwritable)
    )
    assert counts.sent == counts.acknowledged == counts.answered == 10, counts
    assert_exactly_once(counts)


@pytest.mark.parametrize("service", ["nginx", "docker"])
def test_service_restart_during_traffic(stack, service):
    stack.dify("/_double/delay", {"seconds": 0.2})
    deliverer = stack.deliverer(concurrency=8)

    def restart():
        stack.sh(f"systemctl restart {service}")

    striker = Strike(deliverer, 30, restart)
    messages = stack.messages(f"restart-{service}", 120)
    outcomes = deliverer.deliver_all(messages, spread=BURST_SECONDS)
    striker.join()
    stack.wait_ready()
    stack.wait_wecom_double()
    counts = stack.finish(f"{service} restart", outcomes, timeout=180)
    assert counts.non_200 > 0 or service == "nginx", "the restart did not interrupt the burst"
    assert_exactly_once(counts)
    # The stack came back by itself: containers up, a new message answered.
    assert stack.sh("systemctl is-active docker nginx").split() == ["active", "active"]
    after = stack.deliverer().deliver_all(stack.messages(f"after-{service}", 5))
    counts_after = stack.finish(f"after the {service} restart", after)
    assert counts_after.answered == counts_after.acknowledged == 5, counts_after


def test_stack_state_after_faults(stack):
    """The faults left nothing behind: no job stuck, the data dir back on disk."""
    assert stack.queue_depth() == 0
    assert "bridge-data" not in stack.sh("findmnt -n -o SOURCE --target " + BRIDGE_DATA)
