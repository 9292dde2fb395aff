"""The command-line arguments of the operator commands, `webhookd deliveries | endpoints | webhooks ACTION ...`: each
action's parser, added to the command line's by `webhookd.cli`, which also gives each of them `--config`. `positive`,
the type of a count of at least 1, is shared with `webhookd run --workers`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from webhookd.operate.endpoint_commands import STATES


def positive(value: str) -> int:
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


WithConfig = Callable[[str, str, "argparse._SubParsersAction[argparse.ArgumentParser]"], argparse.ArgumentParser]


def add_operator_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig
) -> None:
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
        "--kafka-timeout", type=positive, default=60, metavar="SECONDS", help="bound on reading Kafka (default 60)"
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


def add_webhook_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig
) -> None:
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
