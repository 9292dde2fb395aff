"""The command line: parses arguments and hands over to the room that does the work, nothing more.

Exit status: 0 success, 2 bad usage or configuration, 1 failure at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from webhookd import __version__
from webhookd.config import ConfigError, Settings, describe, load_settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webhookd",
        description="Delivers CRM change events from Kafka to HMAC-signed webhooks, at least once.",
    )
    parser.add_argument("--version", action="version", version=f"webhookd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            "-c",
            type=Path,
            required=True,
            metavar="FILE",
            help="YAML configuration; any key can be overridden by WEBHOOKD_<SECTION>__<KEY>",
        )
        return sub

    with_config("run", "Run the daemon in the foreground; SIGTERM or SIGINT drains, commits and exits 0.")
    with_config("migrate", "Create or upgrade the database schema; safe to run any number of times.")
    with_config("check-config", "Validate the configuration: exit 0 and print it (secrets hidden), or list problems.")
    dev = commands.add_parser(
        "dev",
        help="Run everything locally: broker, Postgres, a demo receiver, sample webhooks and events.",
        description="The embedded default: starts a local Kafka-compatible broker and Postgres, a receiver that "
        "verifies signatures, sample webhooks and a stream of events, and shows each delivery. Ctrl-C stops it all.",
    )
    dev.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        metavar="FILE",
        help="base configuration (default: the settings of config/dev.yaml, built in)",
    )
    dev.add_argument(
        "--events", type=int, default=0, metavar="N", help="stop after N events (default: run until Ctrl-C)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dev":
        from webhookd.dev import run_dev  # the embedded services are an optional install

        return run_dev(args.config, args.events)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(describe(settings))
        return EXIT_OK
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    return _run(settings)


def _run(settings: Settings) -> int:
    from webhookd.logs import setup_logging
    from webhookd.service import Service

    setup_logging(settings.logging.level, settings.logging.format)

    async def serve() -> int:
        return await Service(settings).serve()

    return asyncio.run(serve())


async def _migrate(settings: Settings) -> int:
    import asyncpg

    from webhookd.store.migrate import migrate
    from webhookd.tls import TLSError, postgres_connect

    try:
        postgres = postgres_connect(settings.postgres)  # the daemon's own connect arguments, TLS included
    except TLSError as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        conn = await asyncpg.connect(postgres.dsn, ssl=postgres.ssl, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"webhookd: cannot connect to Postgres (postgres.dsn): {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        applied = await migrate(conn, settings.postgres.subscriptions_table_sql)
    except asyncpg.PostgresError as exc:
        print(f"webhookd: migration failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await conn.close()
    print(f"schema up to date ({len(applied)} migration(s) applied: {', '.join(applied) or 'none needed'})")
    return EXIT_OK
