"""Command line: `wecom-bridge serve | work | check-config | send | doctor | simulate |
simulate-aibot | migrate-store | wecom-double | dify-double | aibot-double`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from wecom_bridge import __version__
from wecom_bridge.config import BridgeConfig, load_config
from wecom_bridge.errors import ConfigError
from wecom_bridge.logs import setup_logging


def _load_or_exit() -> BridgeConfig:
    try:
        return load_config()
    except ConfigError as exc:
        print(f"wecom-bridge: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_or_exit()
    setup_logging(config.log_format, config.log_level, background=True)
    from wecom_bridge.service.processes import run_server

    run_server(config)
    return 0


def cmd_work(args: argparse.Namespace) -> int:
    config = _load_or_exit()
    setup_logging(config.log_format, config.log_level, background=True)
    from wecom_bridge.service.app import build_job_process_side
    from wecom_bridge.service.job_process import run_job_process

    run_job_process(config, build_job_process_side)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_exit()
    for app in config.apps:
        dify = (
            f"Dify {app.dify.api_base} (mode {app.dify.app_mode or 'from /info'})"
            if app.dify
            else "no Dify"
        )
        if app.aibot is not None:
            where = (
                f"long connection to {app.aibot.ws_url}"
                if app.aibot.mode == "ws"
                else f"webhook at {app.callback_path}"
            )
            print(f"AI bot {app.name}: bot {app.aibot.bot_id or '-'}, {where}, {dify}")
            continue
        print(
            f"app {app.name}: corp {app.corp_id}, agent {app.agent_id}, callback path "
            f"{app.callback_path}, {dify}"
        )
    if config.kf is not None:
        kf = config.kf
        print(
            f"微信客服: callback path {kf.callback_path}, start {kf.start}, hand-over words "
            f"{'|'.join(kf.handover_words) or '(none)'}"
        )
    store = (
        "PostgreSQL (BRIDGE_DATABASE_URL)"
        if config.database_url
        else f"SQLite in {config.data_dir}"
    )
    print(f"WeCom API {config.wecom_api_base}; store {store}; listen {config.listen}")
    print(f"send API: {'on' if config.api_token else 'off (BRIDGE_API_TOKEN not set)'}")
    print("configuration OK")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from wecom_bridge.tools.doctor import (
        DoctorOptions,
        Status,
        render_json,
        render_table,
        run_doctor,
    )
    from wecom_bridge.tools.probe import Prober, parse_resolve

    try:
        resolve = dict(parse_resolve(spec) for spec in args.resolve)
    except ValueError as exc:
        args.parser.error(str(exc))
    # The clients log configuration errors for the service's operators; the table says it here.
    logging.getLogger("wecom_bridge").addHandler(logging.NullHandler())
    options = DoctorOptions(
        domain=args.domain,
        verify_codes=tuple(args.verify_code),
        callback_url=args.callback_url,
        kf_callback_url=args.kf_callback_url,
        bridge_url=args.bridge_url,
        cert_days=args.cert_days,
        app=args.app,
        env=os.environ,
    )
    prober = Prober(resolve=resolve, ca_file=args.ca_file, timeout=args.timeout)
    results = run_doctor(options, prober)
    print(render_json(results) if args.json else render_table(results))
    return 1 if any(r.status == Status.FAIL for r in results) else 0


def add_doctor_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="preflight checks: domain, WW_verify file, TLS, callback, WeCom API, Dify, bridge",
        description="Checks everything WeCom and Dify need and says how to fix what fails. "
        "Configuration from the environment (WECOM_*, DIFY_*); checks without inputs are skipped.",
    )
    doctor.add_argument("--domain", help="the ICP-filed domain WeCom calls (host or host:port)")
    doctor.add_argument(
        "--verify-code",
        action="append",
        default=[],
        metavar="CODE",
        help="code of a WW_verify_CODE.txt file (repeatable)",
    )
    doctor.add_argument(
        "--callback-url", help="default https://<domain><the app's callback path> (/wxcomapp)"
    )
    doctor.add_argument(
        "--kf-callback-url",
        help="微信客服 (when WECOM_KF_SECRET is set): default https://<domain>/wxcomkf",
    )
    doctor.add_argument("--bridge-url", help="the bridge's internal base URL, for /readyz")
    doctor.add_argument("--app", metavar="NAME", help="which app of BRIDGE_APPS_FILE to check")
    doctor.add_argument(
        "--cert-days", type=int, default=14, help="fail when the certificate expires sooner"
    )
    doctor.add_argument("--ca-file", help="also trust this CA bundle (a private or test CA)")
    doctor.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="HOST:PORT:ADDR",
        help="connect to ADDR for HOST:PORT, like curl --resolve (repeatable)",
    )
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds per network probe")
    doctor.add_argument("--json", action="store_true", help="JSON: [{name,status,detail,hint}]")
    doctor.set_defaults(func=cmd_doctor, parser=doctor)


def _run_double(factory_name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from wecom_bridge.testing import dify_double, wecom_double
        from wecom_bridge.testing.server import serve_forever

        setup_logging("text", "INFO")
        factories: dict[str, Callable[[], object]] = {
            "wecom": lambda: wecom_double.wecom_double_from_env(args.callback_url),
            "dify": dify_double.dify_double_from_env,
        }
        try:
            app = factories[factory_name]()
        except ConfigError as exc:
            print(f"wecom-bridge: configuration error: {exc}", file=sys.stderr)
            return 2
        serve_forever(app, args.listen)
        return 0

    return run


def cmd_aibot_double(args: argparse.Namespace) -> int:
    from wecom_bridge.testing.aibot_control import serve_aibot_double, serve_aibot_webhook_double
    from wecom_bridge.testing.server import required_env

    setup_logging("text", "INFO")
    try:
        if args.webhook:
            token = required_env("WECOM_AIBOT_TOKEN")
            aes_key = required_env("WECOM_AIBOT_ENCODING_AES_KEY")
        else:
            bot_id = required_env("WECOM_AIBOT_BOT_ID")
            secret = required_env("WECOM_AIBOT_SECRET")
    except ConfigError as exc:
        print(f"wecom-bridge: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.webhook:
        serve_aibot_webhook_double(args.webhook, token, aes_key, args.control)
    else:
        serve_aibot_double(bot_id, secret, args.listen, args.control)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # The tools' modules import their clients and the doubles: only a tool's command loads them.
    from wecom_bridge.tools.migrate_store import add_migrate_store_parser
    from wecom_bridge.tools.send import add_send_parser
    from wecom_bridge.tools.simulate import add_simulate_parser
    from wecom_bridge.tools.simulate_aibot import add_simulate_aibot_parser

    parser = argparse.ArgumentParser(prog="wecom-bridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"wecom-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the bridge (production WSGI server)").set_defaults(
        func=cmd_serve
    )
    sub.add_parser("work", help="run only the job workers (serve starts one)").set_defaults(
        func=cmd_work
    )
    sub.add_parser("check-config", help="validate the configuration and exit").set_defaults(
        func=cmd_check_config
    )
    add_send_parser(sub)
    add_doctor_parser(sub)
    add_simulate_parser(sub)
    add_simulate_aibot_parser(sub)
    aibot = sub.add_parser(
        "aibot-double",
        help="run the AI-bot double (WebSocket server + control API + chat page at /chat); "
        "WECOM_AIBOT_BOT_ID / WECOM_AIBOT_SECRET are the bot it accepts",
    )
    aibot.add_argument("--listen", default="127.0.0.1:9300", help="the WebSocket host:port")
    aibot.add_argument(
        "--webhook",
        metavar="CALLBACK_URL",
        help="webhook mode: play WeCom calling the bridge's AI-bot callback URL "
        "(signed with WECOM_AIBOT_TOKEN / WECOM_AIBOT_ENCODING_AES_KEY) instead of serving "
        "the long connection",
    )
    aibot.add_argument("--control", default="127.0.0.1:9301", help="the control API host:port")
    aibot.set_defaults(func=cmd_aibot_double)
    add_migrate_store_parser(sub)
    for name, port in (("wecom", 9001), ("dify", 9002)):
        double = sub.add_parser(f"{name}-double", help=f"run the {name} test double")
        double.add_argument("--listen", default=f"127.0.0.1:{port}", help="host:port")
        double.set_defaults(func=_run_double(name), callback_url=None)
        if name == "wecom":
            double.add_argument(
                "--callback-url",
                help="the bridge's callback URL for the chat page at /_double/chat "
                "(default $WECOM_DOUBLE_CALLBACK_URL)",
            )
    return parser


# The service's own commands, which take no arguments, start without the tools' parsers: what a
# process imports stays in its memory, and granian's main process forks the web workers.
SERVICE_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "work": cmd_work,
}


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if len(words) == 1 and words[0] in SERVICE_COMMANDS:
        return SERVICE_COMMANDS[words[0]](argparse.Namespace(command=words[0]))
    args = build_parser().parse_args(words)
    return int(args.func(args))
