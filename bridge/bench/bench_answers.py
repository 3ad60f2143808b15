"""Benchmark the answer side for LLM latency: how fast many members get their answers.

Two measurements against the Dify double (a fixed answer delay) and the WeCom double, with the
bridge started as in production (`wecom-bridge serve`, default settings unless told):
  * burst: N members each ask once at the same moment, Dify takes D seconds per answer;
    prints the time from the first callback until the last answer reached message/send.
  * drain: M members ask at once with Dify at a short delay; prints answers/s next to the
    number of job workers, for each worker count given.
Prints numbers; asserts nothing.

    python bench/bench_answers.py --members 200 --dify-delay 10 --drain-workers 4 16 64
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from bench_bridge import AES_KEY, AGENT, CORP, TOKEN, Stack

from wecom_bridge.testing.callbacks import build_text_callback
from wecom_bridge.wecom.crypto import WeComCrypto


def ask_all(stack: Stack, members: int, tag: str) -> float:
    """Every member asks once, 50 senders at a time; returns when the first callback was sent."""
    crypto = WeComCrypto(TOKEN, AES_KEY, CORP)
    url = f"http://127.0.0.1:{stack.bridge_port}/wxcomapp"

    def ask(n: int) -> int:
        params, body = build_text_callback(
            crypto,
            from_user=f"{tag}-u{n}",
            content=f"问题 {n}",
            msg_id=f"{tag}{n:08d}",
            agent_id=AGENT,
        )
        return requests.post(url, params=params, data=body, timeout=30).status_code

    started = time.time()
    with ThreadPoolExecutor(50) as senders:
        statuses = list(senders.map(ask, range(members)))
    refused = sum(status != 200 for status in statuses)
    if refused:
        print(f"     warning: {refused} callbacks not acknowledged")
    return started


def wait_answers(stack: Stack, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = stack.sent()
        if len(sent) >= count:
            return sent
        time.sleep(0.25)
    return stack.sent()


def burst(members: int, dify_delay: float, workers: int | None) -> None:
    stack = Stack(int(dify_delay * 1000), 16, workers)
    try:
        started = ask_all(stack, members, "burst")
        sent = wait_answers(stack, members, timeout=members * dify_delay + 60)
        last = max(m["received_at"] for m in sent) - started if sent else float("nan")
        rss, pss = stack.rss_mib(), stack.pss_mib()
    finally:
        stack.close()
    label = "default" if workers is None else str(workers)
    print(
        f"burst  members={members} dify={dify_delay:g}s workers={label:<8} "
        f"answered={len(sent)}  last answer after {last:6.1f} s  "
        f"rss={rss:.0f} MiB pss={pss:.0f} MiB"
    )


def drain(members: int, dify_delay: float, workers: int) -> None:
    stack = Stack(int(dify_delay * 1000), 16, workers)
    try:
        started = ask_all(stack, members, f"drain{workers}")
        sent = wait_answers(stack, members, timeout=members * dify_delay + 60)
        elapsed = max(m["received_at"] for m in sent) - started if sent else float("nan")
    finally:
        stack.close()
    print(
        f"drain  members={members} dify={dify_delay:g}s workers={workers:<4} "
        f"answered={len(sent)}  {len(sent) / elapsed:6.1f} answers/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--dify-delay", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=None, help="default: the bridge's")
    parser.add_argument("--drain-members", type=int, default=400)
    parser.add_argument("--drain-delay", type=float, default=0.5)
    parser.add_argument("--drain-workers", type=int, nargs="*", default=[4, 16, 64])
    args = parser.parse_args()
    burst(args.members, args.dify_delay, args.workers)
    for workers in args.drain_workers:
        drain(args.drain_members, args.drain_delay, workers)


if __name__ == "__main__":
    main()
