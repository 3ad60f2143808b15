"""Exactly once under load: a sustained burst of unique callbacks while the job side answers,
then drain, then count the answers each message got at the WeCom double.

The way issue 18 found duplicates: while callbacks pour in, the web side's group commit holds
SQLite's write lock almost all the time; a job's "part sent" write that gave up after its busy
timeout made the job retry and send a part WeCom had already accepted. Every message here has
its own member, so each should get exactly one answer. Prints numbers; asserts nothing (the exit
status is 1 when a message was answered twice or not at all, for CI).

    cd bridge && python bench/bench_exactly_once.py --requests 20000 --concurrency 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

from bench_bridge import Stack, _drive, pct, prepare_requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--dify-delay-ms", type=int, default=20)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--drain-timeout", type=float, default=900.0)
    args = parser.parse_args()

    log = Path(tempfile.mkdtemp(prefix="bridge-once-")) / "bridge.log"
    started = time.monotonic()
    stack = Stack(args.dify_delay_ms, args.threads, args.workers, bridge_log=log)
    try:
        reqs = prepare_requests(args.requests, "once")
        burst_started = time.monotonic()
        latencies, errors, elapsed = asyncio.run(
            _drive(stack.bridge_port, reqs, args.concurrency, 0.0)
        )
        answered_during_burst = len(stack.sent())
        print(
            f"burst: n={args.requests} senders={args.concurrency} in {elapsed:.1f} s "
            f"({args.requests / elapsed:.0f} req/s), ack p50={pct(latencies, 0.5):.0f} ms "
            f"p99={pct(latencies, 0.99):.0f} ms, non-200={len(errors)}, "
            f"answered during the burst={answered_during_burst}"
        )
        deadline = time.monotonic() + args.drain_timeout
        while stack.queue_depth() and time.monotonic() < deadline:
            time.sleep(1.0)
        time.sleep(2.0)  # a job retried late would show up now
        drained = time.monotonic() - burst_started
        sent = stack.sent()
    finally:
        stack.close()
    # A refused (non-200) callback is redelivered by WeCom; this client does not redeliver, so
    # a message whose callback was refused is expected to have no answer.
    per_user = collections.Counter(m["touser"] for m in sent)
    expected = {f"once-u{n}" for n in range(args.requests)}
    duplicates = sum(1 for user, n in per_user.items() if n > 1)
    extra = sum(n - 1 for n in per_user.values() if n > 1)
    lost = len(expected - set(per_user)) - len(errors)
    text = log.read_text(errors="replace") if log.exists() else ""
    locked = text.count("database is locked")
    print(
        f"drained after {drained:.1f} s: answers={len(sent)} messages answered={len(per_user)} "
        f"duplicates={duplicates} (extra sends {extra}) lost={lost} "
        f"refused={len(errors)} 'database is locked' in the log={locked}"
    )
    print(f"total wall time {time.monotonic() - started:.1f} s; bridge log {log}")
    return 1 if duplicates or lost else 0


if __name__ == "__main__":
    sys.exit(main())
