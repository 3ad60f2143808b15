"""`wecom-bridge simulate-aibot`: play a member writing to the AI bot, and watch the answer
stream in as the member would.

The message goes through the AI-bot double (`wecom-bridge aibot-double`, testing/aibot_double.py)
that the bridge is connected to (its WECOM_AIBOT_WS_URL points at the double): the simulator
asks the double's control API to push the message, then prints each stream update as it arrives
and the finished answer (plus any further messages the bot sent to the chat).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import requests

POLL_SECONDS = 0.1


def add_simulate_aibot_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "simulate-aibot",
        help="play a member writing to the AI bot (through the AI-bot double) and watch it stream",
    )
    parser.add_argument("text", nargs="?", default="", help="the message text (or a caption)")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", metavar="PATH", help="send this image (with a text: mixed)")
    media.add_argument("--file", metavar="PATH", help="send this file")
    parser.add_argument(
        "--control", default="http://127.0.0.1:9301", help="the AI-bot double's control URL"
    )
    parser.add_argument("--user", default="zhangsan", help="the member's userid")
    parser.add_argument("--group", metavar="CHATID", help="write in this group chat (@ the bot)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the end")
    parser.set_defaults(func=run_simulate_aibot)


def run_simulate_aibot(args: argparse.Namespace) -> int:
    try:
        return simulate_aibot(args, print)
    except (requests.RequestException, TimeoutError, ValueError, OSError) as exc:
        print(f"wecom-bridge simulate-aibot: {exc}", file=sys.stderr)
        return 1


def _push_media(base: str, args: argparse.Namespace, path: str) -> str:
    """The double serves the file encrypted and pushes the image, file or mixed message."""
    with open(path, "rb") as fh:
        content = base64.b64encode(fh.read()).decode("ascii")
    pushed = requests.post(
        f"{base}/control/media",
        json={
            "userid": args.user,
            "kind": "image" if getattr(args, "image", None) else "file",
            "filename": os.path.basename(path),
            "content_base64": content,
            "text": args.text,
        },
        timeout=30,
    )
    pushed.raise_for_status()
    return str(pushed.json()["msgid"])


def simulate_aibot(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    base = args.control.rstrip("/")
    text = f"@bot {args.text}" if args.group else args.text
    sent = time.monotonic()
    path = getattr(args, "image", None) or getattr(args, "file", None)
    if path:
        msgid = _push_media(base, args, path)
        out(
            f"→ {args.user} sends {path}"
            + (f" with {text!r}" if text else "")
            + f" (msgid {msgid})"
        )
    else:
        if not text:
            raise ValueError("give the message text (or --image / --file)")
        pushed = requests.post(
            f"{base}/control/messages",
            json={"userid": args.user, "text": text, "chatid": args.group or ""},
            timeout=10,
        )
        pushed.raise_for_status()
        msgid = pushed.json()["msgid"]
        where = f"group {args.group}" if args.group else "a single chat"
        out(f"→ {args.user} writes {text!r} in {where} (msgid {msgid})")
    shown = 0
    deadline = sent + args.timeout
    while time.monotonic() < deadline:
        view = requests.get(f"{base}/control/messages/{msgid}", timeout=10).json()
        updates = view.get("updates") or []
        for update in updates[shown:]:
            mark = "finished" if update["finish"] else "update"
            out(f"  +{update['at'] - view['pushed_at']:6.2f}s {mark}: {update['content']}")
            for image in update.get("images") or []:  # the finish's msg_item
                out(f"  + an image with the finish: {image['bytes']} bytes, md5 {image['md5']}")
        shown = len(updates)
        if view.get("finished") is not None or len(view.get("answers") or []) > 0:
            time.sleep(1.0)  # further parts follow within moments
            answers = requests.get(f"{base}/control/messages/{msgid}", timeout=10).json()
            extra = (answers.get("answers") or [])[1 if view.get("finished") is not None else 0 :]
            for message in extra:
                out(f"← a further message: {message}")
            return 0
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"no finished answer within {args.timeout:g} s (is the bridge connected?)")
