"""`wecom-bridge migrate-store`: copy a bridge's SQLite store into PostgreSQL, for a team moving
from one server to several.

Copies what must move: the jobs (queued ones with their progress, and the finished ones the send
API may still be asked about), dedupe keys (so WeCom's redeliveries stay dropped), idempotency
keys, conversations and access tokens. It reads one consistent snapshot, so it can run beside a
live bridge, but the bridge's workers must be stopped first: they and the new bridges would
answer the same queued jobs. It refuses while they run (their heartbeat is recent) unless
--force. Repeating it copies nothing twice.

The target is BRIDGE_DATABASE_URL from the environment (never the command line: it may hold the
password); its schema is created or migrated first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from wecom_bridge.config import database_url
from wecom_bridge.errors import ConfigError, StoreUnavailableError
from wecom_bridge.jobs.postgres_store import PostgresStore
from wecom_bridge.jobs.store import SqliteStore
from wecom_bridge.service.processes import HEARTBEAT_SECONDS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_migrate_store_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "migrate-store",
        help="copy the SQLite store (BRIDGE_DATA_DIR) into PostgreSQL (BRIDGE_DATABASE_URL)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the SQLite store's data dir (default $BRIDGE_DATA_DIR or /var/lib/wecom-bridge)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what would be copied, write nothing"
    )
    parser.add_argument(
        "--force", action="store_true", help="copy even though the bridge's workers seem alive"
    )
    parser.set_defaults(func=cmd_migrate_store)


def cmd_migrate_store(args: argparse.Namespace) -> int:
    return migrate_store(args, os.environ, sys.stdout, sys.stderr)


def migrate_store(
    args: argparse.Namespace, env: dict[str, str] | os._Environ[str], out: TextIO, err: TextIO
) -> int:
    def fail(message: str, code: int = EXIT_FAILED) -> int:
        print(f"wecom-bridge migrate-store: {message}", file=err)
        return code

    data_dir = args.data_dir or Path(env.get("BRIDGE_DATA_DIR", "") or "/var/lib/wecom-bridge")
    try:
        url = database_url(env)
    except ConfigError as exc:
        return fail(str(exc), EXIT_USAGE)
    if url is None:
        return fail("BRIDGE_DATABASE_URL is not set: where should the store go?", EXIT_USAGE)
    if not (data_dir / "bridge.sqlite3").is_file():
        return fail(f"no SQLite store in {data_dir} (bridge.sqlite3): nothing to copy", EXIT_USAGE)
    source = SqliteStore(data_dir)
    try:
        if source.live_workers(3 * HEARTBEAT_SECONDS) and not args.force:
            return fail(
                f"the bridge on {data_dir} is running (its workers' heartbeat is recent): stop it "
                "first, or its workers and the new bridges would answer the same jobs (--force "
                "copies anyway)"
            )
        snapshot = source.export_snapshot()
    except StoreUnavailableError as exc:
        return fail(f"cannot read {data_dir}: {exc}")
    finally:
        source.close()
    found = {
        "jobs": len(snapshot.jobs),
        "dedupe": len(snapshot.dedupe),
        "send_keys": len(snapshot.send_keys),
        "conversations": len(snapshot.conversations),
        "tokens": len(snapshot.tokens),
    }
    print(f"found in {data_dir}: " + ", ".join(f"{k} {v}" for k, v in found.items()), file=out)
    if args.dry_run:
        return EXIT_OK
    target = PostgresStore(url, name="wecom-bridge-migrate-store")
    try:
        copied = target.import_snapshot(snapshot, source=str(data_dir.resolve()))
    except StoreUnavailableError as exc:
        return fail(f"cannot write to BRIDGE_DATABASE_URL: {exc}")
    finally:
        target.close()
    print("copied to PostgreSQL: " + ", ".join(f"{k} {v}" for k, v in copied.items()), file=out)
    return EXIT_OK
