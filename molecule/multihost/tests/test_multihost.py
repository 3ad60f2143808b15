"""Several servers under faults (issue 14): two bridge hosts share one PostgreSQL behind one edge.

A burst of distinct callbacks (one member each) is delivered the way WeCom does - 5 s timeout, up
to three retries 5 s apart - from this machine through the edge, which balances them over both
bridges; a fault is struck mid-burst: kill -9 of one bridge container, docker stop of a whole
bridge host, a PostgreSQL restart. Each test counts sent / acknowledged / answered / duplicates /
lost at the WeCom double; nothing acknowledged may be lost or answered twice.
"""

import re
import threading
import time

import psycopg
import pytest
import requests
from conftest import ADDRESS, BRIDGE_HOSTS, DOMAIN, TALLIES, TEST_VARS, docker, on
from wecom_bridge.testing.redelivery import (
    Deliverer,
    Outcome,
    Tally,
    make_messages,
    recorded_messages,
    tally,
    wait_for_answers,
)

WECOM_API = f"http://{ADDRESS['outside']}:9001"
DIFY_CONTROL = f"http://{ADDRESS['outside']}:9002/_double"
BURST_SECONDS = 8.0
# A job a dead bridge held resumes once its lease (15 s) ran out and housekeeping (5 s) saw it.
RESUME_SECONDS = 60


def wait_until(predicate, timeout, step=0.5, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def bridge_url(name: str, path: str) -> str:
    return f"http://{ADDRESS[name]}:8400{path}"


def ready(name: str) -> bool:
    try:
        return requests.get(bridge_url(name, "/readyz"), timeout=3).status_code == 200
    except requests.RequestException:
        return False


def metric(name: str, line_start: str) -> float:
    text = requests.get(bridge_url(name, "/metrics"), timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    )


def queue_depth() -> int:
    """The shared queue, as any bridge that answers sees it."""
    for name in BRIDGE_HOSTS:
        try:
            return int(requests.get(bridge_url(name, "/readyz"), timeout=3).json()["queue_depth"])
        except (requests.RequestException, KeyError, ValueError):
            continue
    return -1


def messages(crypto, tag: str, count: int):
    return make_messages(
        crypto, TEST_VARS["wecom_test_agent_id"], f"{tag}-{time.time_ns() % 10**6}", count
    )


@pytest.fixture(scope="module")
def edge_certificate(tmp_path_factory) -> str:
    """The edge's self-signed certificate (selfsigned mode), trusted for these requests only."""
    path = tmp_path_factory.mktemp("edge") / "edge.crt"
    path.write_text(on("edge", f"cat /etc/nginx/tls/{DOMAIN}.crt") + "\n")
    return str(path)


def deliverer(ca_file: str, concurrency: int = 16) -> Deliverer:
    return Deliverer(
        f"https://{ADDRESS['edge']}/wxcomapp",
        verify=ca_file,
        hostname=DOMAIN,
        concurrency=concurrency,
    )


def finish(name: str, outcomes: list[Outcome]) -> Tally:
    wait_for_answers(WECOM_API, outcomes, RESUME_SECONDS)
    wait_until(lambda: queue_depth() == 0, RESUME_SECONDS, 1.0, "the shared queue to empty")
    time.sleep(2)
    counts = tally(outcomes, recorded_messages(WECOM_API))
    TALLIES[name] = counts.line()
    print(f"{name}: {counts.line()}")
    return counts


def assert_exactly_once(counts: Tally, sent: int) -> None:
    assert counts.sent == counts.acknowledged == sent, counts
    assert counts.lost == 0, counts
    assert counts.duplicates == 0, counts
    assert counts.answered == sent, counts


def strike_after(seconds: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


def dify_delay(seconds: float) -> None:
    requests.post(f"{DIFY_CONTROL}/delay", json={"seconds": seconds}, timeout=10).raise_for_status()


@pytest.fixture(autouse=True)
def both_bridges_ready():
    wait_until(lambda: all(ready(n) for n in BRIDGE_HOSTS), 180, 1.0, "both bridges' /readyz")
    yield
    dify_delay(0)


# --- what site.yml set up -----------------------------------------------------------------------


def test_the_edge_balances_over_both_bridges_and_retries_the_next(host):
    config = host.file("/etc/nginx/sites-available/wecom-edge-https.conf").content_string
    for name in BRIDGE_HOSTS:
        assert f"server {ADDRESS[name]}:8400 max_fails=1 fail_timeout=5s;" in config
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in config


def test_postgresql_takes_only_the_bridge_hosts_over_tls():
    hba = on("pg", "cat /etc/postgresql/*/main/pg_hba.conf")
    remote = [line.split() for line in hba.splitlines() if re.match(r"host(ssl)?\s", line)]
    networks = {line[3] for line in remote if not line[3].startswith(("127.", "::1"))}
    assert networks == {f"{ADDRESS[n]}/32" for n in BRIDGE_HOSTS}
    assert all(line[0] == "hostssl" for line in remote if line[3] in networks)
    ssl_sessions = on(
        "pg",
        'runuser -u postgres -- psql -tAc "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity'
        " USING (pid) WHERE usename = 'wecom_bridge' AND ssl\"",
    )
    assert int(ssl_sessions) > 0
    # This machine is not a bridge host: refused before any password is checked.
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
        psycopg.connect(
            host=ADDRESS["pg"],
            user="wecom_bridge",
            dbname="wecom_bridge",
            password="x",
            connect_timeout=5,
        )


def test_the_generated_password_is_root_only_and_never_in_a_command_line():
    assert on("pg", "stat -c '%a %U' /etc/wecom-postgresql/bridge-password") == "600 root"
    for name in BRIDGE_HOSTS:
        assert on(name, "stat -c '%a %U' /etc/wecom-bridge/bridge.env") == "600 root"
        assert (
            on(name, "grep -c '^BRIDGE_DATABASE_URL=postgresql://' /etc/wecom-bridge/bridge.env")
            == "1"
        )
        args = on(name, "docker inspect -f '{{.Path}} {{.Args}}' wecom-bridge")
        assert "postgresql://" not in args


# --- faults -------------------------------------------------------------------------------------


def test_a_burst_is_spread_over_both_bridges(crypto, edge_certificate):
    before = {n: metric(n, "wecom_bridge_callbacks_total") for n in BRIDGE_HOSTS}
    outcomes = deliverer(edge_certificate).deliver_all(messages(crypto, "spread", 80))
    counts = finish("burst over two bridges", outcomes)
    assert_exactly_once(counts, 80)
    for name in BRIDGE_HOSTS:
        assert metric(name, "wecom_bridge_callbacks_total") > before[name], (
            f"{name} took no callback"
        )


def test_kill9_of_one_bridge_container_mid_burst(crypto, edge_certificate):
    dify_delay(3)  # answers take a while: the kill finds jobs in the killed bridge's hands
    kill = strike_after(
        3, lambda: (on("bridge1", "docker kill --signal KILL wecom-bridge"), dify_delay(0))
    )
    outcomes = deliverer(edge_certificate).deliver_all(
        messages(crypto, "kill9", 100), spread=BURST_SECONDS
    )
    kill.join()
    counts = finish("kill -9 of one bridge container", outcomes)
    on("bridge1", "docker start wecom-bridge")
    assert_exactly_once(counts, 100)


def test_docker_stop_of_a_whole_bridge_host_mid_burst(crypto, edge_certificate):
    dify_delay(1)
    stop = strike_after(3, lambda: docker("stop", "bridge2"))
    try:
        outcomes = deliverer(edge_certificate).deliver_all(
            messages(crypto, "hoststop", 100), spread=BURST_SECONDS
        )
        stop.join()
        dify_delay(0)
        counts = finish("docker stop of a bridge host", outcomes)
    finally:
        docker("start", "bridge2")
    assert_exactly_once(counts, 100)
    wait_until(lambda: ready("bridge2"), 180, 1.0, "bridge2 back after its host restarted")


def test_postgresql_restart_mid_burst(crypto, edge_certificate):
    dify_delay(0.5)
    restart = strike_after(3, lambda: on("pg", "systemctl restart postgresql"))
    outcomes = deliverer(edge_certificate).deliver_all(
        messages(crypto, "pgrestart", 100), spread=BURST_SECONDS
    )
    restart.join()
    dify_delay(0)
    counts = finish("PostgreSQL restart mid-burst", outcomes)
    assert_exactly_once(counts, 100)
