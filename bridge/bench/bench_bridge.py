"""Benchmark the bridge on loopback: callback ack latency/throughput, added latency, RSS.

Starts the WeCom and Dify doubles and `wecom-bridge serve` (gunicorn) as separate processes,
then drives valid, uniquely encrypted callbacks at it from an asyncio client (HTTP/1.1
keep-alive, one connection per sender). Prints numbers; asserts nothing.

    python bench/bench_bridge.py --concurrency 50 200 --rates 0 100 200 --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import requests

from wecom_bridge.testing.callbacks import build_text_callback
from wecom_bridge.wecom.crypto import WeComCrypto

CORP, AGENT, SECRET = "wwbenchcorp", "1000002", "bench-secret"
TOKEN, AES_KEY, DIFY_KEY = "BenchToken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "app-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


class Stack:
    """Doubles + bridge as child processes; torn down on exit."""

    def __init__(
        self,
        dify_delay_ms: int,
        threads: int,
        workers: int | None,
        *,
        bridge_log: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.wecom_port, self.dify_port, self.bridge_port = free_port(), free_port(), free_port()
        self.data = tempfile.mkdtemp(prefix="bridge-bench-")
        base = {
            **os.environ,
            "WECOM_CORP_ID": CORP,
            "WECOM_SECRET": SECRET,
            "WECOM_AGENT_ID": AGENT,
            "DIFY_API_KEY": DIFY_KEY,
        }
        self.procs = [
            self._spawn(["wecom-double", "--listen", f"127.0.0.1:{self.wecom_port}"], base),
            self._spawn(
                ["dify-double", "--listen", f"127.0.0.1:{self.dify_port}"],
                {**base, "DIFY_DOUBLE_DELAY_MS": str(dify_delay_ms)},
            ),
        ]
        bridge_env = {
            **base,
            "WECOM_TOKEN": TOKEN,
            "WECOM_ENCODING_AES_KEY": AES_KEY,
            "WECOM_API_BASE": f"http://127.0.0.1:{self.wecom_port}",
            "DIFY_API_BASE": f"http://127.0.0.1:{self.dify_port}/v1",
            "BRIDGE_DATA_DIR": self.data,
            "BRIDGE_LISTEN": f"127.0.0.1:{self.bridge_port}",
            "BRIDGE_WEB_THREADS": str(threads),
            "BRIDGE_LOG_LEVEL": "WARNING",
            **({"BRIDGE_JOB_WORKERS": str(workers)} if workers is not None else {}),
            **(extra_env or {}),
        }
        wait_http(f"http://127.0.0.1:{self.wecom_port}/_double/stats")
        wait_http(f"http://127.0.0.1:{self.dify_port}/health")
        self.bridge = self._spawn(["serve"], bridge_env, log=bridge_log)
        self.procs.append(self.bridge)
        wait_http(f"http://127.0.0.1:{self.bridge_port}/readyz")

    @staticmethod
    def _spawn(
        args: list[str], env: dict[str, str], log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        stderr = log.open("ab") if log is not None else subprocess.DEVNULL
        return subprocess.Popen(
            [sys.executable, "-m", "wecom_bridge", *args],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

    def _pids(self) -> list[int]:
        """The bridge's processes: the server's main process and its children."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.bridge.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [self.bridge.pid, *(int(p) for p in out.split())]

    def pin(self) -> None:
        """The bridge and the doubles on the last CPU, this load generator on the others, so
        that neither's scheduling shows in the other's numbers (every thread, and the threads
        started later inherit it)."""
        last = (os.cpu_count() or 1) - 1
        if last < 1:
            raise SystemExit("--pin needs at least two CPUs")
        for pid in [*self._pids(), *(proc.pid for proc in self.procs)]:
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                    os.sched_setaffinity(int(task.name), {last})
        os.sched_setaffinity(0, set(range(last)))
        print(
            f"pinned: the bridge and the doubles on cpu {last}, the load generator on 0-{last - 1}"
        )

    def _memory_kib(self, field: str, source: str) -> float:
        total_kib = 0
        for pid in self._pids():
            for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
                if line.startswith(field):
                    total_kib += int(line.split()[1])
        return total_kib / 1024

    def rss_mib(self) -> float:
        """Resident memory summed over the bridge's processes (pages they share count twice)."""
        return self._memory_kib("VmRSS:", "status")

    def pss_mib(self) -> float:
        """Proportional set size summed: each shared page counted once, what the container's
        memory accounting sees."""
        return self._memory_kib("Pss:", "smaps_rollup")

    def sent(self) -> list[dict]:
        url = f"http://127.0.0.1:{self.wecom_port}/_double/messages"
        return requests.get(url, timeout=30).json()["messages"]

    def clear(self) -> None:
        requests.delete(f"http://127.0.0.1:{self.wecom_port}/_double/messages", timeout=10)

    def queue_depth(self) -> int:
        url = f"http://127.0.0.1:{self.bridge_port}/readyz"
        return int(requests.get(url, timeout=10).json()["queue_depth"])

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def prepare_requests(count: int, tag: str) -> list[bytes]:
    """Raw HTTP requests, each a distinct, correctly signed and encrypted message."""
    crypto = WeComCrypto(TOKEN, AES_KEY, CORP)
    raw = []
    for n in range(count):
        params, body = build_text_callback(
            crypto, from_user=f"{tag}-u{n}", content=f"q{n}", msg_id=f"{tag}{n:08d}", agent_id=AGENT
        )
        head = (
            f"POST /wxcomapp?{urllib.parse.urlencode(params)} HTTP/1.1\r\n"
            f"Host: bench\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        raw.append(head.encode() + body)
    return raw


async def _sender(
    port: int,
    queue: asyncio.Queue[bytes],
    latencies: list[float],
    errors: list[int],
    interval: float,
) -> None:
    """One WeCom connection. interval 0: back to back (saturation); else paced sends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # Paced senders start at random points of their interval, all connected first: a server
    # that ties a thread to a connection until its first request shows here (it did: ~1 s p99).
    await asyncio.sleep(interval * random.random())
    next_at = time.perf_counter()
    try:
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
            start = time.perf_counter()
            writer.write(req)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if b" 200 " not in status_line:
                errors.append(int(status_line.split()[1]) if status_line else 0)
    finally:
        writer.close()


async def _drive(
    port: int,
    reqs: list[bytes],
    concurrency: int,
    interval: float,
    lags: list[float] | None = None,
) -> tuple[list[float], list[int], float]:
    """`lags`: filled with how late this client's own event loop woke up (every 2 ms), so a
    tail the load generator caused itself can be told from the bridge's."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for req in reqs:
        queue.put_nowait(req)
    latencies: list[float] = []
    errors: list[int] = []
    done = asyncio.Event()
    watch = asyncio.ensure_future(_loop_lag(done, lags if lags is not None else []))
    start = time.perf_counter()
    await asyncio.gather(
        *(_sender(port, queue, latencies, errors, interval) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - start
    done.set()
    await watch
    return latencies, errors, elapsed


async def _loop_lag(done: asyncio.Event, lags: list[float], tick: float = 0.002) -> None:
    while not done.is_set():
        asked = time.perf_counter()
        await asyncio.sleep(tick)
        lags.append(time.perf_counter() - asked - tick)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


class Profiler:
    """py-spy sampling every bridge process while a run lasts (collapsed stacks per process)."""

    def __init__(self, stack: Stack, out_dir: Path | None, label: str) -> None:
        self.stack, self.out_dir, self.label = stack, out_dir, label
        self.procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> Profiler:
        if self.out_dir is None:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for pid in self.stack._pids():
            out = self.out_dir / f"{self.label}-{pid}.txt"
            # --gil: only the thread holding the GIL, i.e. where the CPU time of Python goes.
            cmd = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "250"]
            cmd += ["--gil", "--nonblocking", "--threads", "-o", str(out)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((str(pid), out, proc))
        time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc: object) -> None:
        for role, out, proc in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            proc.wait(30)
            print_profile(role, out)


def process_role(stacks: str) -> str:
    """Which bridge process sampled `stacks` (they share one command line and thread names)."""
    if "jobs/workers.py" in stacks:
        return "job process"
    return "web worker" if "granian/wsgi.py" in stacks else "server main process"


def print_profile(pid: str, path: Path, top: int = 12) -> None:
    """The functions holding most samples (self, and self + callees) in py-spy's raw output."""
    if not path.exists() or not path.read_text().strip():
        print(f"profile pid {pid}: no samples holding the GIL")
        return
    role = process_role(path.read_text())
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("thread")]
        samples += count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    print(f"profile {role} (pid {pid}): {samples} samples holding the GIL, at 250/s")
    for name, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        share, inclusive = 100 * count / samples, 100 * total[name] / samples
        print(f"  self {share:5.1f}%  total {inclusive:5.1f}%  {name}")


def ack_run(
    stack: Stack,
    concurrency: int,
    count: int,
    rate: float,
    profile: Path | None = None,
    *,
    run: int = 0,
    drain_seconds: float = 120.0,
) -> float:
    """rate 0: closed loop, every sender back to back; else the total offered req/s. `run`
    keeps the message ids of runs with the same settings apart (the bridge dedupes them).
    Returns the throughput reached."""
    reqs = prepare_requests(count, f"c{concurrency}r{rate:g}n{run}x")
    interval = concurrency / rate if rate else 0.0
    lags: list[float] = []
    with Profiler(stack, profile, f"c{concurrency}r{rate:g}"):
        latencies, errors, elapsed = asyncio.run(
            _drive(stack.bridge_port, reqs, concurrency, interval, lags)
        )
    mode = f"paced {rate:g}/s" if rate else "saturation"
    throughput = count / elapsed
    print(
        f"ack  c={concurrency:<4} {mode:<14} n={count:<6} "
        f"throughput={throughput:6.0f} req/s  "
        f"p50={pct(latencies, 0.50):6.1f} ms  p99={pct(latencies, 0.99):6.1f} ms  "
        f"max={max(latencies) * 1000:6.1f} ms  non-200={len(errors)}  "
        f"rss={stack.rss_mib():.0f} MiB pss={stack.pss_mib():.0f} MiB  "
        f"client loop lag max={max(lags, default=0) * 1000:.1f} ms"
    )
    deadline = time.monotonic() + drain_seconds
    while stack.queue_depth() and time.monotonic() < deadline:  # let the answers drain
        time.sleep(0.5)
    print(f"     answers sent so far={len(stack.sent())}, queue depth={stack.queue_depth()}")
    stack.clear()
    return throughput


def added_latency_run(stack: Stack, count: int, dify_delay: float) -> None:
    stack.clear()
    crypto = WeComCrypto(TOKEN, AES_KEY, CORP)
    session = requests.Session()
    sent_at: dict[str, float] = {}
    for n in range(count):
        user = f"lat-u{n}"
        params, body = build_text_callback(
            crypto, from_user=user, content=f"latency {n}", msg_id=f"lat{n:08d}", agent_id=AGENT
        )
        sent_at[user] = time.time()
        session.post(
            f"http://127.0.0.1:{stack.bridge_port}/wxcomapp", params=params, data=body, timeout=10
        )
        time.sleep(dify_delay + 0.05)  # one at a time: measure the path, not the queue

    def ours() -> list[dict]:
        # Answers to the saturation run's last jobs (running when it was cleared) land too.
        return [m for m in stack.sent() if m["touser"] in sent_at]

    deadline = time.monotonic() + 60
    while len(ours()) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    added = [(m["received_at"] - sent_at[m["touser"]] - dify_delay) for m in ours()]
    if not added:
        print(f"added latency: none of the {count} answers arrived within 60 s")
        return
    print(
        f"added latency (callback sent -> message/send received, minus Dify's "
        f"{dify_delay * 1000:.0f} ms) n={len(added)}: p50={pct(added, 0.5):.1f} ms  "
        f"p99={pct(added, 0.99):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[0, 100, 200],
        help="offered req/s per run; 0 = saturation (closed loop)",
    )
    parser.add_argument(
        "--paced-fraction",
        type=float,
        metavar="F",
        help="after each saturation run, a paced run at F times the throughput it measured"
        " (0.5: half the capacity, as measured in the same run)",
    )
    parser.add_argument(
        "--paced-runs",
        type=int,
        default=1,
        metavar="K",
        help="each paced rate (and --paced-fraction's) K times, new messages each time",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=120.0,
        help="after each run, wait at most this long for the answers (with Dify at 10 s a"
        " saturation run's 10,000 take 26 min: the next run then starts with a backlog)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the bridge and the doubles on the last CPU, the load generator on the others",
    )
    parser.add_argument("--latency-samples", type=int, default=100)
    parser.add_argument("--dify-delay-ms", type=int, default=50)
    parser.add_argument("--threads", type=int, default=64, help="BRIDGE_WEB_THREADS")
    parser.add_argument(
        "--workers",
        type=int,
        help="BRIDGE_JOB_WORKERS; unset: the service's own default, as a deployment gets it",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample every bridge process with py-spy during each run; raw stacks go to DIR",
    )
    args = parser.parse_args()
    stack = Stack(args.dify_delay_ms, args.threads, args.workers)
    try:
        print(f"bridge idle rss={stack.rss_mib():.0f} MiB; cpus={os.cpu_count()}")
        if args.pin:
            stack.pin()
        numbers = itertools.count()

        def repeated(concurrency: int, rate: float, times: int) -> float:
            """`times` runs at `rate`, each with new messages; the last one's throughput."""
            reached = 0.0
            for _ in range(times):
                reached = ack_run(
                    stack,
                    concurrency,
                    args.requests,
                    rate,
                    args.profile,
                    run=next(numbers),
                    drain_seconds=args.drain_seconds,
                )
            return reached

        for concurrency, rate in itertools.product(args.concurrency, args.rates):
            reached = repeated(concurrency, rate, args.paced_runs if rate else 1)
            if rate == 0 and args.paced_fraction:
                paced = round(args.paced_fraction * reached)
                repeated(concurrency, paced, args.paced_runs)
        if args.latency_samples:
            added_latency_run(stack, args.latency_samples, args.dify_delay_ms / 1000)
        print(f"bridge rss after load={stack.rss_mib():.0f} MiB")
    finally:
        stack.close()


if __name__ == "__main__":
    main()
