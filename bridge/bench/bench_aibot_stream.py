"""AI bot streaming latency: how soon a member sees the answer start, and how soon it is done.

The bridge (in process, with its job side) is connected to the AI-bot double over a real
WebSocket; the Dify double streams a fixed answer at a model-like pace. For each question it
prints the time from WeCom pushing the message to the first stream update (the placeholder),
to the first update with answer text, and to the finished stream, next to the time Dify itself
took to stream the answer (so the bridge's own overhead shows). Prints numbers, asserts nothing.

    cd bridge && python bench/bench_aibot_stream.py --chars 2000 --questions 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from wecom_bridge.config import load_config
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.aibot_double import AibotDouble
from wecom_bridge.testing.dify_double import create_dify_double
from wecom_bridge.testing.server import ServerThread

BOT_ID, BOT_SECRET, DIFY_KEY = "bench-bot", "bench-secret", "app-bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=2000, help="answer length (characters)")
    parser.add_argument("--chunk-chars", type=int, default=5, help="characters per SSE delta")
    parser.add_argument("--chunk-ms", type=float, default=25.0, help="ms between SSE deltas")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.5, help="WECOM_AIBOT_STREAM_INTERVAL")
    args = parser.parse_args()

    answer = ("知识库回答" * (args.chars // 5 + 1))[: args.chars]
    dify_app = create_dify_double(api_key=DIFY_KEY)
    dify = dify_app.extensions["dify_double"]
    dify.set_answer(answer)
    dify.set_pace(args.chunk_chars, args.chunk_ms / 1000)
    with AibotDouble(BOT_ID, BOT_SECRET) as aibot, ServerThread(dify_app) as dify_server:
        env = {
            "WECOM_AIBOT_MODE": "ws",
            "WECOM_AIBOT_BOT_ID": BOT_ID,
            "WECOM_AIBOT_SECRET": BOT_SECRET,
            "WECOM_AIBOT_WS_URL": aibot.url,
            "WECOM_AIBOT_STREAM_INTERVAL": str(args.interval),
            "DIFY_API_BASE": f"{dify_server.url}/v1",
            "DIFY_API_KEY": DIFY_KEY,
            "BRIDGE_DATA_DIR": str(Path(tempfile.mkdtemp(prefix="bench-aibot-")) / "data"),
            "BRIDGE_LOG_LEVEL": "WARNING",
        }
        app = create_app(load_config(env))
        runtime = app.extensions["wecom_bridge"]
        try:
            aibot.wait_connected()
            rows = [ask(aibot, answer, n) for n in range(args.questions)]
        finally:
            for link in runtime.links:
                link.stop()
            runtime.pool.stop()
    dify_seconds = -(-args.chars // args.chunk_chars) * args.chunk_ms / 1000
    print(
        f"answer {args.chars} chars ({len(answer.encode())} bytes); Dify double streams it in "
        f"{args.chunk_chars}-char deltas every {args.chunk_ms:g} ms (~{dify_seconds:.2f} s); "
        f"stream interval {args.interval:g} s"
    )
    print("question  first-update  first-text  finished  updates")
    for n, row in enumerate(rows, 1):
        print(f"{n:8d}  {row[0]:11.3f}s  {row[1]:9.3f}s  {row[2]:7.3f}s  {row[3]:7d}")
    for name, index in (("first-update", 0), ("first-text", 1), ("finished", 2)):
        print(f"median {name}: {statistics.median(r[index] for r in rows):.3f}s")
    return 0


def ask(aibot: AibotDouble, answer: str, n: int) -> tuple[float, float, float, int]:
    """(first update, first update with text, finished) seconds after the push; updates."""
    msgid = aibot.deliver_text(f"member{n}", f"问题 {n}")
    pushed = aibot.transcript(msgid).pushed_at
    aibot.wait(lambda: aibot.transcript(msgid).finished, timeout=120)
    updates = aibot.transcript(msgid).updates
    if updates[-1].content != answer:
        raise SystemExit("the finished stream is not the answer: the numbers would be moot")
    first_text = next(u.at for u in updates if u.content != "…")
    return updates[0].at - pushed, first_text - pushed, updates[-1].at - pushed, len(updates)


if __name__ == "__main__":
    raise SystemExit(main())
