"""`wecom-bridge simulate`: play WeCom against a bridge and print what the member would see.

The callback goes out signed and encrypted like WeCom's (testing/callbacks.py); the answer is read
from the WeCom API double the bridge sends to (testing/wecom_double.py) — one the simulator starts
itself (`--serve-api`) or one already running (`--api-url`). One implementation of the doubles.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import requests

from wecom_bridge.config import kf_from_env, load_apps, pick_app
from wecom_bridge.errors import BridgeError, ConfigError
from wecom_bridge.testing.callbacks import (
    CallbackClient,
    build_callback,
    build_event_callback,
    build_media_callback,
    build_text_callback,
    new_msg_id,
)
from wecom_bridge.testing.kf_double import KfDoubleState
from wecom_bridge.testing.server import ServerThread, parse_listen
from wecom_bridge.testing.wecom_double import create_wecom_double
from wecom_bridge.wecom.crypto import WeComCrypto

QUIET_SECONDS = 2.0  # after the last part, this long without another means the answer is complete


class SimulationError(BridgeError):
    """The simulated exchange failed (callback refused, no answer); exit code 1."""


@dataclass(frozen=True)
class SimulatorApp:
    """The WeCom app the simulator plays: what WeCom's console holds for it."""

    corp_id: str
    agent_id: str
    token: str = field(repr=False)
    encoding_aes_key: str = field(repr=False)
    secret: str = field(default="", repr=False)  # only to serve the API double (--serve-api)

    @classmethod
    def from_env(cls, env: Mapping[str, str], name: str | None = None) -> SimulatorApp:
        """The app as the bridge's own loader reads it (environment or BRIDGE_APPS_FILE)."""
        app = pick_app(load_apps(env, require_dify=False), name)
        return cls(app.corp_id, app.agent_id, app.token, app.encoding_aes_key, app.secret)

    def crypto(self) -> WeComCrypto:
        return WeComCrypto(self.token, self.encoding_aes_key, self.corp_id)


@dataclass(frozen=True)
class Attempt:
    """One POST of the callback to the bridge, and what it answered."""

    label: str
    status: int
    body: bytes
    elapsed: float


@dataclass
class RecordedReplies:
    """What a WeCom API double received for one member (GET /_double/messages, long polling)."""

    api_url: str
    user: str
    session: requests.Session = field(default_factory=requests.Session)
    after: float = 0.0
    # 微信客服: what the double's kf/send_msg received, by external userid.
    path: str = "/_double/messages"
    user_param: str = "user"

    def fetch(self, wait: float) -> list[dict[str, Any]]:
        response = self.session.get(
            f"{self.api_url.rstrip('/')}{self.path}",
            params={self.user_param: self.user, "after": str(self.after), "wait": str(wait)},
            timeout=wait + 10,
        )
        response.raise_for_status()
        messages: list[dict[str, Any]] = response.json()["messages"]
        for message in messages:
            self.after = max(self.after, float(message["received_at"]))
        return messages

    def mark(self) -> None:
        """Only messages recorded from now on count (earlier conversations are ignored)."""
        self.fetch(0)

    def collect(self, timeout: float, quiet: float = QUIET_SECONDS) -> list[dict[str, Any]]:
        """Wait up to `timeout` for the first part, then until `quiet` passes without another."""
        deadline = time.monotonic() + timeout
        parts = self.fetch(max(0.0, deadline - time.monotonic()))
        while parts:
            more = self.fetch(quiet)
            if not more:
                break
            parts += more
        return parts


def text_of(message: Mapping[str, Any]) -> str:
    body = message.get(str(message.get("msgtype")), {}) or {}
    return str(body.get("content", f"({message.get('msgtype')})"))


# --image/--file/--voice: the MsgType each sends.
MEDIA_OPTIONS = {"image": "image", "file": "file", "voice": "voice"}


def media_option(args: argparse.Namespace) -> tuple[str, str] | None:
    """(MsgType, path) of the media the member sends, if any."""
    for option, msg_type in MEDIA_OPTIONS.items():
        path = getattr(args, option, None)
        if path:
            return msg_type, str(path)
    return None


def hand_media(api_url: str, msg_type: str, path: str) -> str:
    """Give the WeCom API double the member's media (as if they sent it): its MediaId."""
    with open(path, "rb") as fh:
        content = fh.read()
    response = requests.post(
        f"{api_url.rstrip('/')}/_double/media",
        json={
            "kind": msg_type,
            "filename": os.path.basename(path),
            "content_base64": base64.b64encode(content).decode("ascii"),
        },
        timeout=30,
    )
    if response.status_code != 200:
        raise SimulationError(f"the WeCom double refused the media: {response.text.strip()}")
    return str(response.json()["media_id"])


def post_callback(
    client: CallbackClient, app: SimulatorApp, args: argparse.Namespace, media_id: str = ""
) -> list[Attempt]:
    """The callback and its redeliveries: the very same request, as WeCom repeats it."""
    crypto, user = client.crypto, args.user
    media = media_option(args)
    if media is not None:
        msg_id = new_msg_id()
        params, body = build_media_callback(
            crypto,
            from_user=user,
            msg_type=media[0],
            media_id=media_id,
            msg_id=msg_id,
            agent_id=app.agent_id,
        )
        label = f"{media[0]} MsgId {msg_id}"
    elif args.event:
        params, body = build_event_callback(
            crypto, from_user=user, event=args.event, agent_id=app.agent_id
        )
        label = f"event {args.event}"
    else:
        msg_id = new_msg_id()
        params, body = build_text_callback(
            crypto, from_user=user, content=args.text, msg_id=msg_id, agent_id=app.agent_id
        )
        label = f"text MsgId {msg_id}"
    attempts = []
    for attempt in range(1 + args.redeliver):
        started = time.monotonic()
        try:
            response = client.post(params, body)
        except requests.RequestException as exc:
            raise SimulationError(f"POST {client.url} failed: {type(exc).__name__}") from None
        name = label if attempt == 0 else f"redelivery {attempt}/{args.redeliver} (same request)"
        attempts.append(
            Attempt(name, response.status_code, response.content, time.monotonic() - started)
        )
    if media is not None and args.text:  # the caption, right after (BRIDGE_MEDIA_CAPTION_SECONDS)
        started = time.monotonic()
        response = client.send_text(user, args.text)
        attempts.append(
            Attempt(
                "caption text", response.status_code, response.content, time.monotonic() - started
            )
        )
    return attempts


def _api_double(
    args: argparse.Namespace, app: SimulatorApp
) -> AbstractContextManager[ServerThread | None]:
    if not args.serve_api:
        return nullcontext(None)
    host, port = parse_listen(args.serve_api)
    double = create_wecom_double(corp_id=app.corp_id, secret=app.secret, agent_id=app.agent_id)
    return ServerThread(double, host, port)


def _kf_app(env: Mapping[str, str]) -> SimulatorApp:
    kf = kf_from_env(env, (), require_dify=False)
    if kf is None:
        raise ConfigError("WECOM_KF_SECRET", "must be set to play a 微信客服 customer (--kf)")
    return SimulatorApp(kf.corp_id, "", kf.token, kf.encoding_aes_key, kf.secret)


def _kf_api_double(
    args: argparse.Namespace, app: SimulatorApp
) -> AbstractContextManager[ServerThread | None]:
    if not args.serve_api:
        return nullcontext(None)
    host, port = parse_listen(args.serve_api)
    kf = KfDoubleState(corp_id=app.corp_id, secret=app.secret)  # the simulator signals itself
    return ServerThread(create_wecom_double(corp_id=app.corp_id, secret="", kf=kf), host, port)


def post_kf_signal(
    client: CallbackClient, app: SimulatorApp, token: str, redeliver: int
) -> list[Attempt]:
    """The kf callback WeCom sends after a customer's message, and its redeliveries."""
    fields: dict[str, str | int] = {
        "ToUserName": app.corp_id,
        "CreateTime": int(time.time()),
        "MsgType": "event",
        "Event": "kf_msg_or_event",
        "Token": token,
    }
    params, body = build_callback(client.crypto, fields)
    attempts = []
    for attempt in range(1 + redeliver):
        started = time.monotonic()
        try:
            response = client.post(params, body)
        except requests.RequestException as exc:
            raise SimulationError(f"POST {client.url} failed: {type(exc).__name__}") from None
        name = "kf_msg_or_event" if attempt == 0 else f"redelivery {attempt}/{redeliver}"
        attempts.append(
            Attempt(name, response.status_code, response.content, time.monotonic() - started)
        )
    return attempts


def simulate_kf(
    args: argparse.Namespace, env: Mapping[str, str], out: Callable[[str], None] = print
) -> int:
    """As a 微信客服 customer: the double records the message, the bridge is signalled and
    pulls it; the answer is what the double's kf/send_msg received."""
    app = _kf_app(env)
    verify: bool | str = args.ca_file or not args.insecure
    client = CallbackClient(args.url, app.crypto(), "", verify=verify, timeout=10.0)
    with _kf_api_double(args, app) as served:
        api_url = (served.url if served else args.api_url).rstrip("/")
        replies = RecordedReplies(
            api_url, args.user, path="/_double/kf/sent", user_param="external_userid"
        )
        replies.mark()
        what = "enters the chat" if args.event else f"sends {args.text!r}"
        out(f"→ customer {args.user} {what} (微信客服)")
        spec = {"external_userid": args.user, "send_callback": False}
        spec |= {"event": "enter"} if args.event else {"text": args.text}
        said = requests.post(f"{api_url}/_double/kf/customer", json=spec, timeout=10)
        said.raise_for_status()
        for attempt in post_kf_signal(client, app, said.json()["token"], args.redeliver):
            out(f"  {attempt.label}: HTTP {attempt.status} in {attempt.elapsed * 1000:.0f} ms")
            if attempt.status != 200:
                raise SimulationError(
                    f"the bridge refused the kf callback (HTTP {attempt.status}); run "
                    "`wecom-bridge doctor` to see why"
                )
        parts = replies.collect(args.timeout, args.quiet)
    if not parts:
        if args.event:
            out("← no reply (a welcome is sent only when WECOM_KF_WELCOME_TEXT is set)")
            return 0
        raise SimulationError(f"no answer within {args.timeout:g} s")
    out(f"← customer {args.user} receives {len(parts)} message(s):")
    for number, message in enumerate(parts, 1):
        if len(parts) > 1:
            out(f"--- part {number}/{len(parts)} ---")
        out(text_of(message))
    return 0


def simulate(
    args: argparse.Namespace, env: Mapping[str, str], out: Callable[[str], None] = print
) -> int:
    if getattr(args, "kf", False):
        return simulate_kf(args, env, out)
    app = SimulatorApp.from_env(env, args.app)
    verify: bool | str = args.ca_file or not args.insecure
    client = CallbackClient(args.url, app.crypto(), app.agent_id, verify=verify, timeout=10.0)
    with _api_double(args, app) as served:
        api_url = served.url if served else args.api_url
        replies = RecordedReplies(api_url, args.user)
        replies.mark()
        media = media_option(args)
        media_id = hand_media(api_url, *media) if media is not None else ""
        what = f"event {args.event}" if args.event else repr(args.text)
        if media is not None:
            what = f"{media[0]} {media[1]}" + (f" + {args.text!r}" if args.text else "")
        out(f"→ {args.user} sends {what} to {args.url}")
        for attempt in post_callback(client, app, args, media_id):
            text = attempt.body.decode("utf-8", "replace").strip()
            out(
                f"  {attempt.label}: HTTP {attempt.status} in {attempt.elapsed * 1000:.0f} ms"
                + (f" {text!r}" if text else "")
            )
            if attempt.status != 200:
                raise SimulationError(
                    f"the bridge refused the callback (HTTP {attempt.status}); run "
                    "`wecom-bridge doctor` to see why"
                )
        parts = replies.collect(args.timeout, args.quiet)
    if not parts:
        if args.event:
            out("← no reply (a welcome is sent only when BRIDGE_WELCOME_TEXT is set)")
            return 0
        raise SimulationError(
            f"no answer within {args.timeout:g} s (is the bridge's WECOM_API_BASE {api_url}?)"
        )
    out(f"← {args.user} receives {len(parts)} message(s):")
    for number, message in enumerate(parts, 1):
        if len(parts) > 1:
            out(f"--- part {number}/{len(parts)} ---")
        out(text_of(message))
    return 0


def add_simulate_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "simulate",
        help="play WeCom: send a signed callback to a bridge and print the answer",
        description="Sends a message (or event) as a WeCom member to the bridge's callback URL, "
        "signed and encrypted with WECOM_TOKEN / WECOM_ENCODING_AES_KEY / WECOM_CORP_ID, and "
        "prints the answer the bridge sent through message/send to a WeCom API double.",
    )
    parser.add_argument("text", nargs="?", default="", help="the message text")
    parser.add_argument("--url", required=True, help="the bridge's callback URL")
    parser.add_argument(
        "--user", help="the member's userid (zhangsan); with --kf the customer's external userid"
    )
    parser.add_argument(
        "--kf",
        action="store_true",
        help="play a 微信客服 customer (WECOM_KF_*; --url is the kf callback URL, /wxcomkf)",
    )
    parser.add_argument("--app", metavar="NAME", help="which app of BRIDGE_APPS_FILE to play")
    parser.add_argument("--redeliver", type=int, default=0, metavar="N", help="N redeliveries")
    parser.add_argument("--event", help="send this event (e.g. enter_agent) instead of text")
    for option, msg_type in MEDIA_OPTIONS.items():
        parser.add_argument(
            f"--{option}",
            metavar="PATH",
            help=f"send this {msg_type} (the API double serves its MediaId; a text: the caption)",
        )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    parser.add_argument(
        "--quiet",
        type=float,
        default=QUIET_SECONDS,
        metavar="S",
        help="the answer is complete when S seconds pass without another part",
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="accept any TLS certificate")
    tls.add_argument("--ca-file", help="trust this CA bundle for the callback URL")
    api = parser.add_mutually_exclusive_group(required=True)
    api.add_argument(
        "--serve-api",
        metavar="HOST:PORT",
        help="run the WeCom API double here (the bridge's WECOM_API_BASE must point to it)",
    )
    api.add_argument("--api-url", help="read the answer from this running WeCom API double")
    parser.set_defaults(func=run_simulate, parser=parser)


def run_simulate(args: argparse.Namespace) -> int:
    if not args.event and not args.text and media_option(args) is None:
        args.parser.error("give the message text (or --event, --image, --file, --voice)")
    if args.redeliver < 0:
        args.parser.error("--redeliver must be >= 0")
    if args.user is None:
        args.user = "wmSIMULATEDcustomer" if args.kf else "zhangsan"
    try:
        return simulate(args, os.environ)
    except ConfigError as exc:
        print(f"wecom-bridge simulate: configuration error: {exc}", file=sys.stderr)
        return 2
    except (SimulationError, requests.RequestException) as exc:
        print(f"wecom-bridge simulate: {exc}", file=sys.stderr)
        return 1
