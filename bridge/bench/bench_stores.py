"""Benchmark the two stores (issue 14): callbacks on PostgreSQL next to SQLite, and the drain rate
with two bridges against one on PostgreSQL. Prints numbers; asserts nothing.

1. Acknowledgements: `wecom-bridge serve` on SQLite, then on PostgreSQL (a fresh throwaway server
   from Debian's package, fsync on), the same saturation run of bench_bridge against each:
   throughput, ack p50 / p99.
2. Drain: one or two job sides (`wecom-bridge work`, BRIDGE_JOB_WORKERS each, as two bridge
   hosts would run) on one PostgreSQL, then N chat jobs (one member each) stored at once; jobs/s
   from the first commit until the queue is empty, the Dify double answering in --dify-delay-ms.

    cd bridge && python bench/bench_stores.py --concurrency 50 --requests 3000 --drain-jobs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid

from bench_bridge import (
    AES_KEY,
    AGENT,
    CORP,
    DIFY_KEY,
    SECRET,
    TOKEN,
    Stack,
    _drive,
    free_port,
    pct,
    prepare_requests,
    wait_http,
)

from wecom_bridge.jobs.kinds import ChatJob, new_job
from wecom_bridge.jobs.postgres_store import PostgresStore
from wecom_bridge.jobs.store import Arrival
from wecom_bridge.testing.postgres import ThrowawayPostgres


def ack_bench(
    label: str, args: argparse.Namespace, extra_env: dict[str, str]
) -> tuple[float, float, float]:
    stack = Stack(args.dify_delay_ms, args.threads, args.workers, extra_env=extra_env)
    try:
        reqs = prepare_requests(args.requests, f"{label}-{uuid.uuid4().hex[:6]}")
        latencies, errors, elapsed = asyncio.run(
            _drive(stack.bridge_port, reqs, args.concurrency, 0.0)
        )
        result = (args.requests / elapsed, pct(latencies, 0.50), pct(latencies, 0.99))
        print(
            f"ack  {label:<10} c={args.concurrency} n={args.requests}: "
            f"{result[0]:6.0f} req/s  p50={result[1]:6.1f} ms  p99={result[2]:6.1f} ms  "
            f"non-200={len(errors)}"
        )
        return result
    finally:
        stack.close()


def fill_queue(url: str, jobs: int) -> None:
    store = PostgresStore(url)
    arrivals = [
        Arrival("default", f"drain:{n}", new_job(f"drain-u{n}", ChatJob(f"q{n}", str(n))))
        for n in range(jobs)
    ]
    for start in range(0, jobs, 500):
        store.accept_many(arrivals[start : start + 500])
    store.close()


def drain_bench(server: ThrowawayPostgres, args: argparse.Namespace, bridges: int) -> float:
    url = server.create_database(f"drain_{bridges}_{uuid.uuid4().hex[:6]}")
    wecom_port, dify_port = free_port(), free_port()
    base = {
        **os.environ,
        "WECOM_CORP_ID": CORP,
        "WECOM_SECRET": SECRET,
        "WECOM_AGENT_ID": AGENT,
        "WECOM_TOKEN": TOKEN,
        "WECOM_ENCODING_AES_KEY": AES_KEY,
        "DIFY_API_KEY": DIFY_KEY,
        "WECOM_API_BASE": f"http://127.0.0.1:{wecom_port}",
        "DIFY_API_BASE": f"http://127.0.0.1:{dify_port}/v1",
        "BRIDGE_DATABASE_URL": url,
        "BRIDGE_JOB_WORKERS": str(args.workers),
        "BRIDGE_LOG_LEVEL": "WARNING",
    }
    procs = [
        Stack._spawn(["wecom-double", "--listen", f"127.0.0.1:{wecom_port}"], base),
        Stack._spawn(
            ["dify-double", "--listen", f"127.0.0.1:{dify_port}"],
            {**base, "DIFY_DOUBLE_DELAY_MS": str(args.dify_delay_ms)},
        ),
    ]
    store = PostgresStore(url)
    try:
        wait_http(f"http://127.0.0.1:{wecom_port}/_double/stats")
        wait_http(f"http://127.0.0.1:{dify_port}/health")
        for n in range(bridges):
            data = tempfile.mkdtemp(prefix=f"drain-bridge-{n}-")
            procs.append(Stack._spawn(["work"], {**base, "BRIDGE_DATA_DIR": data}))
        deadline = time.monotonic() + 60
        while store.live_workers(15) < bridges and time.monotonic() < deadline:
            time.sleep(0.2)  # every job side up (its heartbeat stored) before the jobs arrive
        time.sleep(1)  # and LISTENing
        started = time.monotonic()
        fill_queue(url, args.drain_jobs)  # the commits' NOTIFY wakes them
        while store.queue_depth() and time.monotonic() - started < args.drain_timeout:
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        left = store.queue_depth()
        rate = (args.drain_jobs - left) / elapsed
        print(
            f"drain {bridges} bridge(s) x {args.workers} workers, {args.drain_jobs} jobs, Dify "
            f"{args.dify_delay_ms} ms: {rate:6.0f} jobs/s ({elapsed:.1f} s, {left} left)"
        )
        return rate
    finally:
        store.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--drain-jobs", type=int, default=2000)
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--dify-delay-ms", type=int, default=50)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    server = ThrowawayPostgres(durable=True).init()
    server.start()
    try:
        print(f"cpus={os.cpu_count()}; PostgreSQL from {server.bindir} (fsync on), loopback")
        ack_bench("sqlite", args, {})
        url = server.create_database(f"ack_{uuid.uuid4().hex[:6]}")
        ack_bench("postgresql", args, {"BRIDGE_DATABASE_URL": url})
        for bridges in (1, 2):
            drain_bench(server, args, bridges)
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
