"""`wecom-bridge send`: a proactive message sent now, synchronously (not through the queue).

Same configuration (environment or apps file; Dify settings are not needed), same cached access
token (the store in BRIDGE_DATA_DIR, so the CLI and the service do not fight over gettoken),
same splitting and per-member pacing as the service. Prints WeCom's answer per part; on failure
explains the errcode in plain words and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from wecom_bridge.channels.proactive import parse_send_request, resolve_app
from wecom_bridge.channels.wecom_app import WeComAppOutbound
from wecom_bridge.config import load_config
from wecom_bridge.errors import (
    ConfigError,
    SendRequestError,
    StoreUnavailableError,
    WeComApiError,
    WeComConfigError,
)
from wecom_bridge.jobs.backends import Role, open_pacer, open_store
from wecom_bridge.jobs.pacing import send_paced
from wecom_bridge.jobs.splitter import split_message
from wecom_bridge.logs import setup_logging
from wecom_bridge.wecom.api import WeComClient
from wecom_bridge.wecom.errcodes import hint_for, lookup
from wecom_bridge.wecom.messages import SendResult

EXIT_OK = 0
EXIT_SEND_FAILED = 1  # WeCom refused or could not be reached
EXIT_USAGE = 2  # bad arguments, configuration, unreadable file or data directory

# Request fields as the command line names them, for error messages.
_OPTION = {
    "touser": "--to",
    "toparty": "--party",
    "totag": "--tag",
    "content": "--text/--markdown/--file",
    "msgtype": "--msgtype",
    "app": "--app",
}


def add_send_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "send",
        help="send a message to members now (text or markdown)",
        description=(
            "Send a proactive message through WeCom's message/send, synchronously. "
            "Uses the bridge's configuration and cached access token; Dify settings are not "
            "needed. Exit 0 when every part was accepted, 1 when WeCom refused (errcode "
            "explained), 2 on bad arguments or configuration."
        ),
    )
    parser.add_argument("--to", default="", metavar="USERS", help="userids joined by '|'")
    parser.add_argument(
        "--party", action="append", default=[], metavar="ID", help="department id (repeatable)"
    )
    parser.add_argument("--tag", action="append", default=[], metavar="ID", help="tag id")
    body = parser.add_mutually_exclusive_group(required=True)
    body.add_argument("--text", metavar="TEXT", help="send TEXT as a text message")
    body.add_argument("--markdown", metavar="TEXT", help="send TEXT as a markdown message")
    body.add_argument("--file", metavar="PATH", help="send the file's content ('-' = stdin)")
    parser.add_argument(
        "--msgtype",
        choices=("text", "markdown"),
        default=None,
        help="message type of --file (default text)",
    )
    parser.add_argument("--safe", action="store_true", help="保密消息 (watermarked, no sharing)")
    parser.add_argument("--app", metavar="NAME", help="which configured app sends (apps file)")
    parser.add_argument(
        "--attempts",
        type=int,
        default=4,
        metavar="N",
        help="tries per part on transient errors (45009, 45033, -1, network); default 4",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log token fetches and retries to stderr (default: only the result)",
    )
    parser.set_defaults(func=cmd_send)


def _content(args: argparse.Namespace) -> tuple[str, str]:
    """(msgtype, content) from --text / --markdown / --file."""
    if args.text is not None:
        return "text", args.text
    if args.markdown is not None:
        return "markdown", args.markdown
    raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    return args.msgtype or "text", raw.decode("utf-8")


def explain(exc: WeComApiError) -> str:
    """The errcode in plain words, with what to do about it (from the one errcode table)."""
    code, said = exc.errcode, exc.errmsg
    if code is None:
        return f"could not reach WeCom ({said}); check WECOM_API_BASE and the network"
    entry = lookup(code)
    text = f"errcode {code}: {entry.meaning or said}; {hint_for(code, said)}"
    if code == 60020 and isinstance(exc, WeComConfigError) and exc.ip:
        text += f"\nIP to add: {exc.ip}"
    return text


def _show(value: str) -> str:
    return value or "-"


def cmd_send(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr

    def usage(message: str) -> int:
        print(f"wecom-bridge send: {message}", file=err)
        return EXIT_USAGE

    try:
        config = load_config(require_dify=False)
    except ConfigError as exc:
        return usage(f"configuration error: {exc}")
    # The result lines and the explanation say it all; the library's logs are for --verbose.
    setup_logging("text", "INFO" if args.verbose else "CRITICAL")
    if args.attempts < 1:
        return usage("--attempts must be at least 1")
    if args.msgtype and args.file is None:
        return usage("--msgtype goes with --file (use --text or --markdown otherwise)")
    try:
        msgtype, content = _content(args)
    except OSError as exc:
        return usage(f"cannot read {args.file}: {exc.strerror}")
    except UnicodeDecodeError:
        return usage(f"{args.file} is not UTF-8 text")
    doc: dict[str, object] = {
        "touser": args.to,
        "toparty": "|".join(args.party),
        "totag": "|".join(args.tag),
        "msgtype": msgtype,
        "content": content,
        "safe": int(args.safe),
    }
    if args.app is not None:
        doc["app"] = args.app
    try:
        request, app_name = parse_send_request(doc)
        app = resolve_app(config, app_name)
    except SendRequestError as exc:
        return usage(f"{_OPTION.get(exc.field or '', exc.field)}: {exc.problem}")
    try:
        store = open_store(config, Role.TOOL)
        store.check_open()
    except StoreUnavailableError as exc:
        where = "BRIDGE_DATABASE_URL" if config.database_url else "BRIDGE_DATA_DIR"
        return usage(f"cannot open the token cache in {where} ({exc}); run as the bridge's user")
    client = WeComClient(
        api_base=config.wecom_api_base,
        corp_id=app.corp_id,
        secret=app.secret,
        token_cache=store,
        max_attempts=args.attempts,
        config_error_cooldown=config.config_error_cooldown,
    )
    outbound = WeComAppOutbound(app, client)
    parts = split_message(request.content, outbound.part_limit_bytes)
    sent: list[SendResult] = []

    def report(index: int, result: SendResult) -> None:
        sent.append(result)
        print(
            f"part {index + 1}/{len(parts)}: sent (errcode 0) msgid={_show(result.msgid)}"
            f" invaliduser={_show(result.invaliduser)}"
            f" invalidparty={_show(result.invalidparty)}"
            f" invalidtag={_show(result.invalidtag)}"
            + (f" unlicenseduser={result.unlicenseduser}" if result.unlicenseduser else ""),
            file=out,
            flush=True,
        )

    try:
        send_paced(outbound, open_pacer(store), request, parts, on_sent=report)
    except WeComApiError as exc:
        failed = len(sent) + 1
        print(f"part {failed}/{len(parts)}: failed (errcode {exc.errcode})", file=out)
        print(f"wecom-bridge send: {explain(exc)}", file=err)
        if sent:
            print(f"(parts 1-{len(sent)} were sent before the failure)", file=err)
        return EXIT_SEND_FAILED
    except StoreUnavailableError as exc:
        print(f"wecom-bridge send: token cache unavailable: {exc}", file=err)
        return EXIT_SEND_FAILED
    invalid = {
        name: value
        for name in ("invaliduser", "invalidparty", "invalidtag", "unlicenseduser")
        if (value := "|".join(sorted({getattr(r, name) for r in sent} - {""})))
    }
    if invalid:
        listed = ", ".join(f"{name} {value}" for name, value in invalid.items())
        print(f"wecom-bridge send: WeCom could not deliver to: {listed}", file=err)
    return EXIT_OK
