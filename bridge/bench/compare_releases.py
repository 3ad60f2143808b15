"""Acknowledgement throughput of two releases back to back, under the same load, as ratios.

The machine is noisy (±25 % between runs), so only a comparison within one run means anything:
the previous release (a git worktree of OLD, run from its own source) and this tree, one after the
other and then again in the other order, each driven by the same closed-loop senders, plus the
framework floor (a plain Flask route on gunicorn gthread with the old release's thread count;
floor+ with this tree's). Each release runs with its own default web threads (`--threads`,
`--new-threads`). Prints numbers and ratios; asserts nothing.

    python bench/compare_releases.py --old 6903fcc --concurrency 200 --requests 4000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench_bridge import Stack, _drive, free_port, pct, prepare_requests, wait_http

BRIDGE = Path(__file__).resolve().parents[1]


@contextmanager
def old_release(rev: str) -> Iterator[Path]:
    """The bridge's source at `rev`, in a temporary git worktree."""
    where = Path(tempfile.mkdtemp(prefix="bridge-old-")) / "tree"
    subprocess.run(["git", "-C", str(BRIDGE), "worktree", "add", "--detach", str(where), rev],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield where / "bridge" / "src"
    finally:
        subprocess.run(["git", "-C", str(BRIDGE), "worktree", "remove", "--force", str(where)],
                       check=False, capture_output=True)  # fmt: skip


@contextmanager
def source(src: Path | None) -> Iterator[None]:
    """Child processes import the bridge from `src` (None: this tree, as installed)."""
    before = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


class Floor:
    """floor_app on gunicorn gthread, 1 worker, the bridge's thread count."""

    def __init__(self, threads: int) -> None:
        self.bridge_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads",
             str(threads), "--keep-alive", "5", "-b", f"127.0.0.1:{self.bridge_port}",
             "--chdir", str(Path(__file__).parent), "floor_app:app"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{self.bridge_port}/readyz")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def measure(target: Stack | Floor, concurrency: int, count: int, tag: str) -> dict[str, float]:
    reqs = prepare_requests(count, tag)
    latencies, errors, elapsed = asyncio.run(_drive(target.bridge_port, reqs, concurrency, 0.0))
    result = {
        "throughput": count / elapsed,
        "p50": pct(latencies, 0.50),
        "p99": pct(latencies, 0.99),
        "max": max(latencies) * 1000,
        "non200": float(len(errors)),
    }
    if isinstance(target, Stack):
        result["rss"] = target.rss_mib()
        result["pss"] = target.pss_mib()
        deadline = time.monotonic() + 120
        while target.queue_depth() and time.monotonic() < deadline:  # drain before the next run
            time.sleep(0.5)
        target.clear()
    return result


def run_stack(src: Path | None, args: argparse.Namespace, tag: str) -> dict[str, float]:
    threads = args.threads if src is not None else args.new_threads  # each with its default
    with source(src):
        stack = Stack(args.dify_delay_ms, threads, args.workers)
    try:
        measure(stack, args.concurrency, min(500, args.requests), f"{tag}w")  # warm-up
        return measure(stack, args.concurrency, args.requests, tag)
    finally:
        stack.close()


def line(name: str, r: dict[str, float]) -> str:
    rss = f"  rss={r['rss']:.0f} MiB pss={r['pss']:.0f} MiB" if "rss" in r else ""
    return (
        f"{name:<6} throughput={r['throughput']:6.0f} req/s  p50={r['p50']:6.1f} ms  "
        f"p99={r['p99']:6.1f} ms  max={r['max']:6.1f} ms  non-200={r['non200']:.0f}{rss}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the previous release: a commit or tag")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2, help="old/new pairs, order alternating")
    parser.add_argument("--dify-delay-ms", type=int, default=50)
    parser.add_argument(
        "--threads", type=int, default=16, help="web threads of the old release and the floor"
    )
    parser.add_argument(
        "--new-threads",
        type=int,
        default=64,
        help="web threads of this tree (default: its default)",
    )
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": [], "floor": [], "floor+": []}
    with old_release(args.old) as old_src:
        for n in range(args.rounds):
            order = [("old", old_src), ("new", None)]
            for name, src in order if n % 2 == 0 else reversed(order):
                results[name].append(run_stack(src, args, f"{name}{n}x"))
                print(line(name, results[name][-1]), flush=True)
            # The floor on the old setup, and (floor+) with this tree's thread count.
            floors = (("floor", args.threads, "f"), ("floor+", args.new_threads, "g"))
            for name, threads, tag in floors:
                floor = Floor(threads)
                try:
                    count = args.requests
                    results[name].append(measure(floor, args.concurrency, count, f"{tag}{n}x"))
                finally:
                    floor.close()
                print(line(name, results[name][-1]), flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"\nmedians of {args.rounds} round(s), c={args.concurrency}, n={args.requests}:")
    for key in ("throughput", "p50", "p99"):
        print(
            f"  {key:<10} old={med('old', key):7.1f}  new={med('new', key):7.1f}  "
            f"floor={med('floor', key):7.1f}  new/old={med('new', key) / med('old', key):5.2f}  "
            f"new/floor={med('new', key) / med('floor', key):5.2f}"
        )
    print(
        f"  floor+ ({args.new_threads} threads) throughput={med('floor+', 'throughput'):.1f}  "
        f"new/floor+={med('new', 'throughput') / med('floor+', 'throughput'):5.2f}"
    )
    print(
        f"  memory (new, under load) rss={med('new', 'rss'):.0f} MiB "
        f"pss={med('new', 'pss'):.0f} MiB"
    )


if __name__ == "__main__":
    main()
