"""`webhookd deliveries replay`: send one webhook's deliveries of a time window again, first-try successes included.

The pairs of the window are the webhook's deliveries that were delivered or dead-lettered in it, each once:

- those with a row in `webhookd.deliveries` (they needed more than one attempt, or were dead-lettered) are reset to
  pending with a fresh retry schedule, as `deliveries retry` resets them;
- first-try successes have no row and no stored body: only their attempt-log row, which names the Kafka record the
  event came from (`source`, topic:partition:offset). That record is read again, decoded by the daemon's own reader
  and turned into the same body, and a pending row is written for it.

The running daemons' retry pollers then send them, under the same event id, so receivers that deduplicate by
`X-Twenty-Webhook-Event-Id` see each event once.

What it costs: a first-try success stores no body, only the ~30 bytes of `source` in its attempt-log row, instead
of the body's kilobytes; the price is that its body exists only as long as Kafka keeps the record. The attempt log
itself is kept for `endpoints.attempt_log_retention_seconds`, and a window that starts earlier is answered with a
warning: its older deliveries, first-try and retried alike (delivered rows are deleted after the same retention),
may be gone; dead letters are still found. The topic's own retention (or compaction) decides whether
the record is still there. When Kafka no longer has it (the offset is before the partition's first one,
past its end after a topic was recreated, compacted away, or the topic or partition is gone), that pair is reported
as "gone from Kafka" and not replayed, and the rest of the window still is; the command then exits 1. A record that
is there but now reads as another event (a recreated topic) is reported as "changed in Kafka", never sent. Attempts
logged before webhookd recorded `source` are reported as "no source recorded".

The window's pairs are chosen in `replay_window`, first-try successes are read again and queued in `requeue`, and
what was done is told by `replay_report`.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from webhookd.endpoints.sync import Connection
from webhookd.model import Event
from webhookd.operate.attempt_history import AttemptHistory
from webhookd.operate.delivery_commands import reset_rows
from webhookd.operate.output import UsageError, emit_json, emit_table, since, webhook_id
from webhookd.operate.replay_report import SHOWN, Report, finish, print_missed, print_warnings
from webhookd.operate.replay_window import Pair, iso, live_webhook, window_pairs, window_warnings
from webhookd.operate.requeue import insert_pending, read_again
from webhookd.operate.reread import Where, fetch_records, parse_source
from webhookd.runtime.config import Settings

_DISABLED = "SELECT disabled_at IS NOT NULL FROM webhookd.endpoints WHERE webhook_id = $1::uuid"


def command(settings: Settings) -> Callable[[Connection, argparse.Namespace, AttemptHistory], Awaitable[int]]:
    """`replay_deliveries` with the settings bound, shaped as the other `deliveries` actions."""

    async def replay(conn: Connection, args: argparse.Namespace, history: AttemptHistory) -> int:
        return await replay_deliveries(history, args, settings)

    return replay


async def replay_deliveries(history: AttemptHistory, args: argparse.Namespace, settings: Settings) -> int:
    conn = history.main
    webhook = webhook_id(args.webhook, "--webhook")
    start = since(args.since)
    end = datetime.now(UTC) if args.until is None else since(args.until, "--until")
    if end < start:
        raise UsageError(f"--until ({iso(end)}) is before --since ({iso(start)}): nothing can be in that window")
    subscriber = await live_webhook(conn, settings.postgres.subscriptions_table_sql, webhook)
    pairs = await window_pairs(history, webhook, start, end, args.event_name)
    # The window, and what the operator must know about it: printed with every answer, a list in JSON.
    window = {
        "webhook_id": webhook,
        "since": start,
        "until": end,
        "event_name": args.event_name,
        "warnings": window_warnings(
            start, settings.endpoints.attempt_log_retention_seconds, settings.endpoints.attempt_log
        ),
    }
    if not pairs:
        return _nothing(args, window)
    report = Report()
    from_kafka: dict[Pair, Where] = {}
    for pair in pairs:
        if pair.row_id is not None:
            continue
        where = parse_source(pair.source)
        if where is None:
            report.no_source.append(pair.missed("logged by a webhookd that did not yet record where events come from"))
        else:
            from_kafka[pair] = where
    disabled = bool(await conn.fetchval(_DISABLED, webhook))
    if args.dry_run:
        return await _dry_run(settings, args, window, pairs, from_kafka, report, disabled)
    if disabled:
        # The daemons would dead-letter every one of them again at once: the operator must enable it first.
        report.skipped_disabled = [
            {"id": p.row_id, "event_id": p.event_id, "webhook_id": webhook}
            for p in pairs
            if p.row_id is not None or p in from_kafka
        ]
        return finish(args, window, pairs, report)
    rows: dict[Pair, tuple[Event, bytes]] = {}
    if from_kafka:
        rows = await read_again(settings, subscriber, from_kafka, args.kafka_timeout, report)
        if args.event_name is not None:
            # Compact first tries carry no name; now that their records were read, those named otherwise go.
            other = {p for p, (event, _) in rows.items() if event.name != args.event_name}
            rows = {p: r for p, r in rows.items() if p not in other}
            pairs = [p for p in pairs if p not in other]
            if not pairs:
                return _nothing(args, window)
    async with conn.transaction():
        outcome = await reset_rows(conn, [p.row_id for p in pairs if p.row_id is not None])
        report.reset, report.skipped_disabled, report.in_flight = (
            outcome.reset,
            outcome.skipped_disabled,
            outcome.in_flight,
        )
        if rows:
            await insert_pending(conn, subscriber, rows, report)
    return finish(args, window, pairs, report)


def _nothing(args: argparse.Namespace, window: dict[str, Any]) -> int:
    if args.json:
        emit_json({**window, "dry_run": args.dry_run, "count": 0, **Report().as_json()})
    else:
        named = f" named {args.event_name}" if args.event_name else ""
        print(
            f"nothing to replay: webhook {window['webhook_id']} has no deliveries{named} delivered or dead-lettered "
            f"between {iso(window['since'])} and {iso(window['until'])}"
        )
        print_warnings(window)
    return 0


async def _dry_run(
    settings: Settings,
    args: argparse.Namespace,
    window: dict[str, Any],
    pairs: list[Pair],
    from_kafka: dict[Pair, Where],
    report: Report,
    disabled: bool,
) -> int:
    """Count and show; changes nothing. Whether Kafka still holds each record is asked (the partitions' first and
    end offsets, and one fetch per partition for its high watermark), which is cheap; whether each record still
    reads as the same event is not, since that means reading every one of them."""
    how = {p: p.how if p.row_id is not None else "no source recorded" for p in pairs}
    if from_kafka:
        fetched = await fetch_records(settings, from_kafka.values(), args.kafka_timeout, records=False)
        for pair, where in from_kafka.items():
            if where in fetched.gone:
                report.gone_from_kafka.append(pair.missed(fetched.gone[where]))
                how[pair] = "gone from Kafka"
            elif where in fetched.unread:
                report.not_read.append(pair.missed(fetched.unread[where]))
                how[pair] = "not checked: Kafka did not answer"
            else:
                how[pair] = pair.how
    shown = [{"event_id": p.event_id, "event_name": p.event_name, "at": p.at, "how": how[p]} for p in pairs]
    resets = sum(1 for p in pairs if p.row_id is not None)
    readable = sum(1 for p in from_kafka if how[p] == p.how)
    if args.json:
        emit_json({**window, "dry_run": True, "count": len(pairs), "pairs": shown, **report.as_json()})
        return 0
    print(
        f"dry run, nothing changed: {len(pairs)} deliveries of webhook {window['webhook_id']} between "
        f"{iso(window['since'])} and {iso(window['until'])}; {resets + readable} would be replayed "
        f"({resets} reset, {readable} read again from Kafka)"
    )
    print_warnings(window)
    emit_table(shown[:SHOWN], (("event_id", "EVENT"), ("event_name", "NAME"), ("at", "WHEN"), ("how", "HOW")))
    if len(pairs) > SHOWN:
        print(f"(the first {SHOWN} of {len(pairs)}; --json lists all)")
    if disabled:
        webhook = window["webhook_id"]
        print(
            f"its endpoint is disabled: a replay would skip them all; run `webhookd endpoints enable {webhook}` first"
        )
    print_missed(report, dry_run=True)
    return 0
