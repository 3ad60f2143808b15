"""Benchmark the deployed stack: WeCom callbacks through the edge nginx into the bridge container.

Needs the stack of `make demo` (or `molecule converge -s default`) running in the `server`
container. Prints numbers; asserts nothing. Results and how to read them: docs/benchmarks.md.

1. Ack throughput and latency of valid, uniquely encrypted callbacks at each concurrency, next to
   the ceiling: the same nginx serving the static WW_verify file over the same TLS. Load comes from
   wrk (Debian's package, installed in the server if missing) inside the server, as WeCom would
   connect to the edge. Every acknowledged message is then checked for its one answer.
2. End-to-end added latency: callback sent → message/send received at the WeCom double, minus the
   Dify double's delay, one message at a time.
3. The bridge container's resident memory: idle, and the peak while under load.
4. With --provisioning: a fresh `site.yml` converge and an idempotent re-run (destroys the server).

    python bench/stack_bench.py --concurrency 50 200 500 --duration 15
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import yaml
from wecom_bridge.testing.redelivery import (
    Deliverer,
    answers_by_user,
    make_messages,
    recorded_messages,
)
from wecom_bridge.wecom.crypto import WeComCrypto

ROOT = Path(__file__).resolve().parents[1]
VARS = yaml.safe_load((ROOT / "molecule/default/group_vars/all.yml").read_text())
SERVER = "server"
DOMAIN = VARS["wecom_test_domain"]
REMOTE_DIR = "/root/bench"


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check).stdout.strip()


def in_server(command: str) -> str:
    return sh("docker", "exec", SERVER, "sh", "-c", command)


def server_address() -> str:
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    return sh("docker", "inspect", "-f", fmt, SERVER)


def crypto() -> WeComCrypto:
    return WeComCrypto(
        VARS["wecom_test_token"],
        VARS["wecom_test_encoding_aes_key"],
        VARS["wecom_test_corp_id"],
    )


def dify_control(path: str, payload: dict) -> None:
    in_server(
        f"docker exec dify-api-1 curl -sS --fail -X POST -H 'Content-Type: application/json'"
        f" -d {shlex.quote(json.dumps(payload))} http://127.0.0.1:5001{path}"
    )


def bridge_rss_mib() -> float:
    """Resident memory of every process in the bridge container (granian, its workers, jobs)."""
    out = in_server("docker top wecom-bridge -o pid,rss")  # docker top needs the pid column
    return sum(int(line.split()[1]) for line in out.splitlines()[1:]) / 1024


def bridge_container_mib() -> float:
    """The container's memory as its cgroup counts it (what `docker stats` shows and a memory
    limit applies to): each page once, however many processes share it."""
    out = in_server("docker stats --no-stream --format '{{.MemUsage}}' wecom-bridge")
    used = out.split("/", 1)[0].strip()  # e.g. "118.3MiB / 3.8GiB"
    units = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0, "kB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
    for unit, factor in units.items():
        if used.endswith(unit):
            return float(used[: -len(unit)]) * factor
    return float(used.rstrip("B")) / (1024 * 1024)


# The container's cgroup under cgroup v1 and v2 (inside the server, whose Docker runs the bridge).
CGROUP_DIRS = (
    "/sys/fs/cgroup/memory/docker/{id}",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope",
    "/sys/fs/cgroup/docker/{id}",
)


def bridge_container_anon_mib() -> float:
    """The container's anonymous memory (cgroup v1 `rss`, v2 `anon`): what its processes hold,
    each page once. `docker stats` adds the active page cache of the files the bridge wrote
    (the store), which the kernel takes back when it needs it."""
    dirs = " ".join(d.format(id="$id") for d in CGROUP_DIRS)
    out = in_server(
        "id=$(docker inspect -f '{{.Id}}' wecom-bridge); "
        f"for d in {dirs}; do [ -r $d/memory.stat ] && "
        'awk \'$1 == "rss" || $1 == "anon" {print $2; exit}\' $d/memory.stat && break; done'
    )
    return int(out.split()[0]) / (1024 * 1024) if out else float("nan")


def queue_depth() -> int:
    return int(json.loads(in_server("curl -s http://127.0.0.1:8400/readyz"))["queue_depth"])


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: int
    refused: int  # non-2xx answers (counted in `requests` by wrk)
    wrapped: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wrk(url: str, concurrency: int, duration: int, requests_file: str | None = None) -> WrkResult:
    threads = min(2, os.cpu_count() or 1)
    script_args = ["--", requests_file, str(threads)] if requests_file else []
    command = [
        "docker", "exec", SERVER, "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration}s",
        "--timeout", "10s", "-s", f"{REMOTE_DIR}/wrk-replay.lua", url, *script_args,
    ]  # fmt: skip
    out = sh(*command)
    data = json.loads(next(line for line in out.splitlines() if line.startswith("WRK_JSON"))[9:])
    errors = sum(data[k] for k in ("non_2xx", "connect_errors", "read_errors", "write_errors"))
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        p999_ms=data["p999_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors=errors + data["timeouts"],
        refused=data["non_2xx"],
        wrapped=data["wrapped"],
    )


def write_requests(tag: str, count: int) -> tuple[str, list[str]]:
    """`count` distinct callbacks as wrk-replay.lua lines, copied into the server."""
    messages = make_messages(crypto(), VARS["wecom_test_agent_id"], tag, count)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        for message in messages:
            path = f"/wxcomapp?{urllib.parse.urlencode(message.params)}"
            handle.write(f"{path}\t{message.body.decode()}\n")
    remote = f"{REMOTE_DIR}/{tag}.txt"
    sh("docker", "cp", handle.name, f"{SERVER}:{remote}")
    os.unlink(handle.name)
    return remote, [m.user for m in messages]


class CpuHogs:
    """`count` processes that only burn CPU, while the runs inside last (another job on the box)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        loop = [sys.executable, "-c", "while True: pass"]
        self.procs = [subprocess.Popen(loop) for _ in range(self.count)]
        if self.count:
            print(f"({self.count} busy-loop processes compete for the CPU)")
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


class RssSampler:
    """Peaks while a run goes: the RSS summed over the container's processes (shared pages
    counted in each), and the container's own memory (its cgroup)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.container_peak = 0.0
        self.anon_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, bridge_rss_mib())
            self.container_peak = max(self.container_peak, bridge_container_mib())
            self.anon_peak = max(self.anon_peak, bridge_container_anon_mib())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_drained(timeout: float = 600) -> float:
    start = time.monotonic()
    while queue_depth() and time.monotonic() - start < timeout:
        time.sleep(1)
    return time.monotonic() - start


def ack_benchmark(address: str, concurrency: int, duration: int, expected_rate: int) -> None:
    ceiling = wrk(
        f"https://{DOMAIN}/WW_verify_{VARS['wecom_test_verify_code']}.txt",
        concurrency,
        duration,
    )
    tag = f"c{concurrency}-{int(time.time())}"
    remote, users = write_requests(tag, expected_rate * duration)
    with RssSampler() as rss:
        bridge = wrk(f"https://{DOMAIN}/wxcomapp", concurrency, duration, remote)
    drain = wait_drained()
    # wrk counts the answers it read; requests still in flight when it stopped may be stored
    # (and answered) too, so answered >= acked is the no-loss check.
    acked = min(bridge.requests - bridge.refused, len(users))
    per_user = answers_by_user(recorded_messages(f"http://{address}:9001"))
    answered = sum(1 for u in users if per_user[u])
    duplicates = sum(max(0, per_user[u] - 1) for u in users)
    print(
        f"| {concurrency} | {ceiling.rate:,.0f} | {ceiling.p50_ms:.1f} / {ceiling.p99_ms:.1f} / "
        f"{ceiling.max_ms:.0f} | {bridge.rate:,.0f} | {bridge.p50_ms:.1f} / {bridge.p99_ms:.1f} / "
        f"{bridge.p999_ms:.0f} / {bridge.max_ms:.0f} | {bridge.rate / ceiling.rate:.1%} | "
        f"{bridge.errors} | "
        f"{acked} / {answered} / {duplicates} | {drain:.0f} s | {rss.peak:.0f} MiB | "
        f"{rss.container_peak:.0f} / {rss.anon_peak:.0f} MiB |",
        flush=True,
    )
    if bridge.wrapped:
        print(f"  (ran out of distinct messages: raise --expected-rate above {expected_rate})")


def added_latency(address: str, count: int, dify_delay: float, ca_file: str) -> None:
    dify_control("/_double/delay", {"seconds": dify_delay})
    deliverer = Deliverer(f"https://{address}/wxcomapp", verify=ca_file, hostname=DOMAIN)
    sent_at = {}
    for message in make_messages(
        crypto(), VARS["wecom_test_agent_id"], f"lat-{time.time():.0f}", count
    ):
        sent_at[message.user] = time.time()
        deliverer.post_once(message)
        time.sleep(dify_delay + 0.05)  # one at a time: the path, not the queue
    wait_drained()
    time.sleep(1)
    added = sorted(
        (m["received_at"] - sent_at[m["touser"]] - dify_delay) * 1000
        for m in recorded_messages(f"http://{address}:9001")
        if m.get("touser") in sent_at
    )
    dify_control("/_double/delay", {"seconds": 0})
    if not added:
        raise SystemExit("added latency: no answer arrived (is the stack up and ready?)")
    print(
        f"added latency, n={len(added)} (Dify double delay {dify_delay * 1000:.0f} ms subtracted): "
        f"p50 {statistics.median(added):.1f} ms, p99 {added[int(0.99 * (len(added) - 1))]:.1f} ms, "
        f"max {added[-1]:.1f} ms",
        flush=True,
    )


def provisioning() -> None:
    env = {**os.environ, "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"}

    def molecule(*args: str) -> float:
        start = time.monotonic()
        subprocess.run(["molecule", *args, "-s", "default"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        return time.monotonic() - start

    molecule("destroy")
    setup = molecule("create") + molecule("prepare")
    fresh = molecule("converge")
    again = molecule("converge")
    print(
        f"provisioning: server container + prepare {setup:.0f} s; fresh site.yml converge "
        f"{fresh:.0f} s; idempotent re-run {again:.0f} s",
        flush=True,
    )


def prepare_server() -> str:
    """wrk and the replay script in the server; pebble's root here, for the latency client."""
    running = sh("docker", "inspect", "-f", "{{.State.Running}}", SERVER, check=False)
    if running != "true":
        raise SystemExit(f"no running '{SERVER}' container: bring the stack up with `make demo`")
    in_server(
        "command -v wrk >/dev/null"
        " || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }"
    )
    in_server(f"mkdir -p {REMOTE_DIR}")
    sh(
        "docker",
        "cp",
        str(ROOT / "bench/wrk-replay.lua"),
        f"{SERVER}:{REMOTE_DIR}/wrk-replay.lua",
    )
    ca = Path(tempfile.mkdtemp()) / "root.pem"
    ca.write_text(
        in_server("curl -sS --cacert /etc/pebble/cert.pem https://127.0.0.1:15000/roots/0")
    )
    return str(ca)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    parser.add_argument(
        "--expected-rate", type=int, default=1500,
        help="callbacks/s to prepare distinct messages for (more than the bridge takes)",
    )  # fmt: skip
    parser.add_argument("--latency-samples", type=int, default=100)
    parser.add_argument("--dify-delay-ms", type=int, default=50)
    parser.add_argument(
        "--cpu-hogs", type=int, default=0,
        help="busy-loop processes on the box during the runs (a contended machine)",
    )  # fmt: skip
    parser.add_argument(
        "--provisioning",
        action="store_true",
        help="also time site.yml (destroys the server)",
    )
    args = parser.parse_args()

    if args.provisioning:
        provisioning()
    ca_file = prepare_server()
    address = server_address()
    print(
        f"cpus={os.cpu_count()} server={address}; bridge idle rss={bridge_rss_mib():.0f} MiB,"
        f" container memory {bridge_container_mib():.0f} MiB"
        f" (anonymous {bridge_container_anon_mib():.0f} MiB)"
    )
    print(
        "| senders | ceiling req/s | ceiling p50 / p99 / max ms | bridge req/s "
        "| bridge p50 / p99 / p99.9 / max ms | bridge/ceiling | errors "
        "| acked / answered / duplicates | drain | peak RSS sum "
        "| peak container memory / anonymous |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with CpuHogs(args.cpu_hogs):
        for concurrency in args.concurrency:
            ack_benchmark(address, concurrency, args.duration, args.expected_rate)
    added_latency(address, args.latency_samples, args.dify_delay_ms / 1000, ca_file)
    print(
        f"bridge rss after the runs={bridge_rss_mib():.0f} MiB,"
        f" container memory {bridge_container_mib():.0f} MiB"
        f" (anonymous {bridge_container_anon_mib():.0f} MiB)"
    )


if __name__ == "__main__":
    main()
