"""Command line: `wecom-bridge serve | work | check-config | send | wecom-double | dify-double`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from wecom_bridge import __version__
from wecom_bridge.config import BridgeConfig, load_config
from wecom_bridge.errors import ConfigError
from wecom_bridge.logs import setup_logging
from wecom_bridge.send_cli import add_send_parser


def _load_or_exit() -> BridgeConfig:
    try:
        return load_config()
    except ConfigError as exc:
        print(f"wecom-bridge: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_or_exit()
    setup_logging(config.log_format, config.log_level)
    from wecom_bridge.server import run_server

    run_server(config)
    return 0


def cmd_work(args: argparse.Namespace) -> int:
    config = _load_or_exit()
    setup_logging(config.log_format, config.log_level)
    from wecom_bridge.app import run_job_process

    run_job_process(config)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_exit()
    for app in config.apps:
        dify = (
            f"Dify {app.dify.api_base} (mode {app.dify.app_mode or 'from /info'})"
            if app.dify
            else "no Dify"
        )
        print(
            f"app {app.name}: corp {app.corp_id}, agent {app.agent_id}, callback path "
            f"{app.callback_path}, {dify}"
        )
    print(f"WeCom API {config.wecom_api_base}; data {config.data_dir}; listen {config.listen}")
    print(f"send API: {'on' if config.api_token else 'off (BRIDGE_API_TOKEN not set)'}")
    print("configuration OK")
    return 0


def _run_double(factory_name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from wecom_bridge.doubles import dify_api, wecom_api
        from wecom_bridge.doubles.server import serve_forever

        setup_logging("text", "INFO")
        factory = {"wecom": wecom_api.wecom_double_from_env, "dify": dify_api.dify_double_from_env}[
            factory_name
        ]
        try:
            app = factory()
        except ConfigError as exc:
            print(f"wecom-bridge: configuration error: {exc}", file=sys.stderr)
            return 2
        serve_forever(app, args.listen)
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
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
    for name, port in (("wecom", 9001), ("dify", 9002)):
        double = sub.add_parser(f"{name}-double", help=f"run the {name} test double")
        double.add_argument("--listen", default=f"127.0.0.1:{port}", help="host:port")
        double.set_defaults(func=_run_double(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
