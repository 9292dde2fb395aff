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
warning: its older first-try successes cannot be found. The topic's own retention (or compaction) decides whether
the record is still there. When Kafka no longer has it (the offset is before the partition's first one,
past its end after a topic was recreated, compacted away, or the topic or partition is gone), that pair is reported
as "gone from Kafka" and not replayed, and the rest of the window still is; the command then exits 1. A record that
is there but now reads as another event (a recreated topic) is reported as "changed in Kafka", never sent. Attempts
logged before webhookd recorded `source` are reported as "no source recorded".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import ConsumerRecord

from webhookd.delivery.body_formats import body_format
from webhookd.delivery.ordering import order_key
from webhookd.durable.transient import TRANSIENT
from webhookd.endpoints.sync import Connection
from webhookd.intake.readers import NeedsLayout, RecordReader, reader_for
from webhookd.intake.twenty_catalog import TwentyCatalog
from webhookd.model import BadEvent, Event, Skip, Webhook
from webhookd.operate.delivery_commands import print_skipped_disabled, reset_rows
from webhookd.operate.output import NotFound, UsageError, emit_json, emit_table, since, webhook_id
from webhookd.operate.reread import Where, fetch_records, parse_source
from webhookd.routing.filters import LazyRecord
from webhookd.routing.subscriptions import webhook_from_row
from webhookd.runtime.config import Settings
from webhookd.runtime.tls import transport

_SHOWN = 20  # pairs a dry run lists, and entries each "not replayed" line names
_REPLAYED_BY = "replayed by an operator"

# Rows of the window: delivered in it, or dead-lettered in it (a dead letter's last change is its dead-lettering).
_ROWS = """
SELECT id, event_id, event_name, CASE WHEN status = 'delivered' THEN delivered_at ELSE updated_at END AS at
FROM webhookd.deliveries
WHERE webhook_id = $1::uuid
  AND ((status = 'delivered' AND delivered_at BETWEEN $2 AND $3) OR (status = 'dead' AND updated_at BETWEEN $2 AND $3))
  AND ($4::text IS NULL OR event_name = $4)
"""
# First-try successes of the window, one row per pair. A pair is an event id and a source: a recreated topic
# reuses default event ids (topic:partition:offset) for other events, so two sources under one id are two pairs,
# and a delivery row hides only the first try of its own source. A record consumed twice (after a crash) logs its
# pair twice; DISTINCT ON keeps one. A row without a source (logged before webhookd recorded sources) cannot say
# which pair it was: any delivery row of its event id hides it, and so does a row of the same event id that has a
# source (most likely the same record, consumed again by a newer webhookd after a restart), which unlike it can be
# replayed. bool_or looks only at the rows WHERE kept, so a source logged outside the window hides nothing in it.
_FIRST_TRIES = """
SELECT DISTINCT ON (event_id, source) event_id, event_name, workspace_id, source, at
FROM (
    SELECT a.event_id, a.event_name, a.workspace_id::text AS workspace_id, a.source, a.at,
           bool_or(a.source IS NOT NULL) OVER (PARTITION BY a.event_id) AS sourced
    FROM webhookd.attempts a
    WHERE a.webhook_id = $1::uuid AND a.attempt = 1 AND a.result = '2xx' AND a.at BETWEEN $2 AND $3
      AND ($4::text IS NULL OR a.event_name = $4)
      AND NOT EXISTS (
        SELECT 1 FROM webhookd.deliveries d
        WHERE d.event_id = a.event_id AND d.webhook_id = a.webhook_id AND (a.source IS NULL OR d.source = a.source)
      )
) first_tries
WHERE source IS NOT NULL OR NOT sourced
ORDER BY event_id, source, at DESC
"""
_DISABLED = "SELECT disabled_at IS NOT NULL FROM webhookd.endpoints WHERE webhook_id = $1::uuid"
# attempts 0 and due now, as a reset row: the first attempt of a fresh retry schedule. A row that appeared since
# the window was read (another replay) is left as it is.
_INSERT = """
INSERT INTO webhookd.deliveries
    (event_id, webhook_id, workspace_id, event_name, body, event_time, source,
     status, attempts, next_attempt_at, last_error, order_key, order_pos)
SELECT v.event_id, $1::uuid, v.workspace_id::uuid, v.event_name, v.body, v.event_time, v.source,
       'pending', 0, now(), $8, v.order_key, v.order_pos
FROM unnest($2::text[], $3::text[], $4::text[], $5::bytea[], $6::timestamptz[], $7::text[], $9::text[], $10::bigint[])
    WITH ORDINALITY AS v (event_id, workspace_id, event_name, body, event_time, source, order_key, order_pos, n)
-- In the order given (Kafka's): for an ordered webhook, the row ids are the order its records' deliveries leave in.
ORDER BY v.n
ON CONFLICT (event_id, webhook_id, source) DO NOTHING
RETURNING id, event_id, source
"""


@dataclass(frozen=True, slots=True)
class Pair:
    """One (event, webhook) pair of the window, and how it is replayed: its row reset, or its record read again."""

    event_id: str
    event_name: str
    at: datetime
    row_id: int | None = None
    source: str | None = None  # of a first-try success: where its record is
    workspace_id: str | None = None

    @property
    def how(self) -> str:
        return f"reset row {self.row_id}" if self.row_id is not None else f"from Kafka {self.source}"

    def missed(self, why: str) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "event_name": self.event_name,
            "at": self.at,
            "source": self.source,
            "why": why,
        }


@dataclass(slots=True)
class Report:
    """What a replay did, or (dry run) would do; each list is one reason a pair was not replayed."""

    reset: list[int] = field(default_factory=list)
    from_kafka: list[dict[str, Any]] = field(default_factory=list)
    skipped_disabled: list[dict[str, Any]] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    gone_from_kafka: list[dict[str, Any]] = field(default_factory=list)
    no_source: list[dict[str, Any]] = field(default_factory=list)
    changed_in_kafka: list[dict[str, Any]] = field(default_factory=list)
    not_read: list[dict[str, Any]] = field(default_factory=list)
    already_queued: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(
            self.skipped_disabled
            or self.in_flight
            or self.gone_from_kafka
            or self.no_source
            or self.changed_in_kafka
            or self.not_read
        )

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def command(settings: Settings) -> Callable[[Connection, argparse.Namespace], Awaitable[int]]:
    """`replay_deliveries` with the settings bound, shaped as the other `deliveries` actions."""

    async def replay(conn: Connection, args: argparse.Namespace) -> int:
        return await replay_deliveries(conn, args, settings)

    return replay


async def replay_deliveries(conn: Connection, args: argparse.Namespace, settings: Settings) -> int:
    webhook = webhook_id(args.webhook, "--webhook")
    start = since(args.since)
    end = datetime.now(UTC) if args.until is None else since(args.until, "--until")
    if end < start:
        raise UsageError(f"--until ({_iso(end)}) is before --since ({_iso(start)}): nothing can be in that window")
    subscriber = await _live_webhook(conn, settings.postgres.subscriptions_table_sql, webhook)
    pairs = await _window(conn, webhook, start, end, args.event_name)
    # The window, and what the operator must know about it: printed with every answer, a list in JSON.
    window = {
        "webhook_id": webhook,
        "since": start,
        "until": end,
        "event_name": args.event_name,
        "warnings": _warnings(start, settings.endpoints.attempt_log_retention_seconds),
    }
    if not pairs:
        if args.json:
            emit_json({**window, "dry_run": args.dry_run, "count": 0, **Report().as_json()})
        else:
            named = f" named {args.event_name}" if args.event_name else ""
            print(
                f"nothing to replay: webhook {webhook} has no deliveries{named} delivered or dead-lettered between "
                f"{_iso(start)} and {_iso(end)}"
            )
            _print_warnings(window)
        return 0
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
        return _finish(args, window, pairs, report)
    rows: dict[Pair, tuple[Event, bytes]] = {}
    if from_kafka:
        rows = await _read_again(settings, subscriber, from_kafka, args.kafka_timeout, report)
    async with conn.transaction():
        outcome = await reset_rows(conn, [p.row_id for p in pairs if p.row_id is not None])
        report.reset, report.skipped_disabled, report.in_flight = (
            outcome.reset,
            outcome.skipped_disabled,
            outcome.in_flight,
        )
        if rows:
            await _insert(conn, subscriber, rows, report)
    return _finish(args, window, pairs, report)


def _warnings(start: datetime, retention: float) -> list[str]:
    """What the window cannot reach: first-try successes are known only from the attempt log, which is pruned."""
    try:
        kept_from = datetime.now(UTC) - timedelta(seconds=retention)
    except OverflowError:  # a retention reaching back before year 1 has pruned nothing
        return []
    if start >= kept_from:
        return []
    kept = f"{retention / 86400:g} days" if retention >= 86400 else f"{retention:g} seconds"
    return [
        f"first-try successes before {_iso(kept_from)} are no longer in the attempt log and cannot be found "
        f"(it keeps {kept}: endpoints.attempt_log_retention_seconds); retried and dead-lettered deliveries have "
        "rows of their own and are still found"
    ]


def _print_warnings(window: dict[str, Any]) -> None:
    for warning in window["warnings"]:
        print(f"warning: {warning}")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _live_webhook(conn: Connection, table: str, webhook: str) -> Webhook:
    row = await conn.fetchrow(
        'SELECT w.id::text AS id, w."workspaceId"::text AS "workspaceId", w."targetUrl", w.operations, w.secret, '
        f"o.options::text AS options FROM {table} w "
        "LEFT JOIN webhookd.webhook_options o ON o.webhook_id = w.id "
        'WHERE w.id = $1::uuid AND w."deletedAt" IS NULL',
        webhook,
    )
    if row is None:
        raise NotFound(f"--webhook: no live webhook with id {webhook} in {table} (never created, or deleted)")
    found = webhook_from_row(row)
    if found is None:
        raise NotFound(f"--webhook: webhook {webhook} can never be delivered to (its targetUrl or secret is unusable)")
    return found


async def _window(conn: Connection, webhook: str, start: datetime, end: datetime, name: str | None) -> list[Pair]:
    pairs = [
        Pair(r["event_id"], r["event_name"], r["at"], row_id=r["id"])
        for r in await conn.fetch(_ROWS, webhook, start, end, name)
    ]
    pairs += [
        Pair(r["event_id"], r["event_name"], r["at"], source=r["source"], workspace_id=r["workspace_id"])
        for r in await conn.fetch(_FIRST_TRIES, webhook, start, end, name)
    ]
    return sorted(pairs, key=lambda p: (p.at, p.event_id))


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
        f"{_iso(window['since'])} and {_iso(window['until'])}; {resets + readable} would be replayed "
        f"({resets} reset, {readable} read again from Kafka)"
    )
    _print_warnings(window)
    emit_table(shown[:_SHOWN], (("event_id", "EVENT"), ("event_name", "NAME"), ("at", "WHEN"), ("how", "HOW")))
    if len(pairs) > _SHOWN:
        print(f"(the first {_SHOWN} of {len(pairs)}; --json lists all)")
    if disabled:
        webhook = window["webhook_id"]
        print(
            f"its endpoint is disabled: a replay would skip them all; run `webhookd endpoints enable {webhook}` first"
        )
    _print_missed(report, dry_run=True)
    return 0


def _finish(args: argparse.Namespace, window: dict[str, Any], pairs: list[Pair], report: Report) -> int:
    if args.json:
        emit_json({**window, "dry_run": False, "count": len(pairs), **report.as_json()})
        return 1 if report.failed else 0
    done = len(report.reset) + len(report.from_kafka)
    print(
        f"replayed {done} deliveries of webhook {window['webhook_id']} "
        f"({len(report.reset)} reset, {len(report.from_kafka)} read again from Kafka)"
    )
    _print_warnings(window)
    print_skipped_disabled(report.skipped_disabled)
    if report.in_flight:
        print(f"being attempted right now, left alone: {', '.join(map(str, report.in_flight))}")
    _print_missed(report)
    return 1 if report.failed else 0


def _print_missed(report: Report, *, dry_run: bool = False) -> None:
    verb = "would not be replayed" if dry_run else "not replayed"
    for title, missed in (
        ("gone from Kafka", report.gone_from_kafka),
        ("no source recorded", report.no_source),
        ("changed in Kafka", report.changed_in_kafka),
        ("not read from Kafka", report.not_read),
        ("queued meanwhile by someone else", report.already_queued),
    ):
        if not missed:
            continue
        print(f"{title}, {verb}: {len(missed)}")
        for m in missed[:_SHOWN]:
            at = f" at {m['source']}" if m.get("source") else ""
            print(f"  {m['event_id']} ({m['event_name']}){at}: {m['why']}")
        if len(missed) > _SHOWN:
            print(f"  ... and {len(missed) - _SHOWN} more (--json lists all)")


async def _read_again(
    settings: Settings, subscriber: Webhook, from_kafka: dict[Pair, Where], timeout: float, report: Report
) -> dict[Pair, tuple[Event, bytes]]:
    """Each first-try success's event and body, from its record read again; what cannot be had goes to `report`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    fetched = await fetch_records(settings, from_kafka.values(), timeout, records=True)
    readable: dict[Pair, tuple[Where, ConsumerRecord]] = {}
    for pair, where in from_kafka.items():
        record = fetched.records.get(where)
        if record is not None:
            readable[pair] = (where, record)
        elif where in fetched.gone:
            report.gone_from_kafka.append(pair.missed(fetched.gone[where]))
        else:
            report.not_read.append(pair.missed(fetched.unread.get(where, "not read from Kafka")))
    if not readable:
        return {}
    bodies = body_format(settings.delivery.body_format)
    found: dict[Pair, tuple[Event, bytes]] = {}
    links = transport(settings).postgres
    # The catalog (Twenty's metadata, for Debezium records and the twenty body) reads through a pool of its own.
    pool = await asyncpg.create_pool(links.dsn, ssl=links.ssl, min_size=1, max_size=2, timeout=10)
    assert pool is not None
    try:
        reader = reader_for(settings, TwentyCatalog(pool, settings.twenty.metadata_refresh_seconds))
        for pair, (where, record) in readable.items():
            event = await _decode(reader, record, where, max(deadline - loop.time(), 1.0))
            if isinstance(event, str):
                report.not_read.append(pair.missed(event))
            elif (why := _changed(pair, where, event)) is not None:
                report.changed_in_kafka.append(pair.missed(why))
            elif isinstance(event, Event) and event.workspace_id != subscriber.workspace_id:
                # Only the event's own workspace may receive it, whatever became of the webhook since.
                why = (
                    f"the webhook now belongs to workspace {subscriber.workspace_id}, the event to {event.workspace_id}"
                )
                report.changed_in_kafka.append(pair.missed(why))
            elif isinstance(event, Event):
                found[pair] = (event, bodies.bodies(event, [subscriber])[0])
    finally:
        await pool.close()
    return found


async def _decode(
    reader: RecordReader, record: ConsumerRecord, where: Where, budget: float
) -> Event | Skip | BadEvent | NeedsLayout | str:
    """The record as the daemon reads it; a string says why it could not be read now."""

    def read() -> Event | Skip | BadEvent | NeedsLayout:
        try:
            return reader.read(record.value, where.topic, where.partition, where.offset, record.timestamp)
        except Exception as exc:  # a reader's defect costs this pair, as it costs the daemon one record
            return BadEvent("unreadable", f"reading the record failed: {type(exc).__name__}: {exc}"[:500])

    event = read()
    if isinstance(event, NeedsLayout):
        # Already set: where the daemon waits out a Postgres error while reading Twenty's metadata, a command fails
        # at once and says why.
        give_up = asyncio.Event()
        give_up.set()
        try:
            await asyncio.wait_for(reader.load(event, give_up), budget)
        except (*TRANSIENT, asyncpg.PostgresError) as exc:
            return f"cannot read Twenty's metadata of schema {event.schema} now: {exc or type(exc).__name__}"
        event = read()
    return event


def _changed(pair: Pair, where: Where, event: Event | Skip | BadEvent | NeedsLayout) -> str | None:
    """Why the record at `where` is no longer the event that was delivered, or None when it is."""
    if isinstance(event, NeedsLayout):
        return f"the layout of schema {event.schema} changed while it was read"
    if isinstance(event, Skip):
        return f"the record at {where} is now passed over ({event.reason})"
    if isinstance(event, BadEvent):
        return f"the record at {where} no longer reads as an event: {event.reason}: {event.detail}"
    assert isinstance(event, Event)
    if event.id != pair.event_id:
        return f"the record at {where} is now event {event.id!r}, not {pair.event_id!r}"
    if event.workspace_id != pair.workspace_id or event.name != pair.event_name:
        # Default ids are topic:partition:offset, which a recreated topic reuses for other events.
        return f"the record at {where} is now a {event.name} of workspace {event.workspace_id}"
    return None


async def _insert(conn: Connection, webhook: Webhook, rows: dict[Pair, tuple[Event, bytes]], report: Report) -> None:
    # Kafka order, so that an ordered webhook's replayed deliveries of one record leave as their events came.
    pairs = sorted(rows, key=lambda p: _position(p.source))
    events = [rows[p][0] for p in pairs]
    keys = [order_key(e.object_and_action[0], LazyRecord(e.data)) if webhook.options.ordered else None for e in events]
    written = await conn.fetch(
        _INSERT,
        webhook.id,
        [e.id for e in events],
        [e.workspace_id for e in events],
        [e.name for e in events],
        [rows[p][1] for p in pairs],
        [_event_time(e) for e in events],
        [p.source for p in pairs],
        _REPLAYED_BY,
        keys,
        [_position(p.source)[2] if key is not None else None for p, key in zip(pairs, keys, strict=True)],
    )
    done = {(r["event_id"], r["source"]): r["id"] for r in written}
    for pair in pairs:
        row_id = done.get((pair.event_id, pair.source))
        if row_id is None:
            report.already_queued.append(pair.missed("a delivery row for it was written meanwhile (another replay?)"))
        else:
            report.from_kafka.append({"id": row_id, "event_id": pair.event_id, "source": pair.source})


def _position(source: str | None) -> tuple[str, int, int]:
    where = parse_source(source)
    return (where.topic, where.partition, where.offset) if where is not None else (source or "", 0, 0)


def _event_time(event: Event) -> datetime | None:
    # As the daemon's own rows have it: the Kafka timestamp, for the end-to-end latency of a late success.
    if event.kafka_timestamp_ms is None:
        return None
    return datetime.fromtimestamp(event.kafka_timestamp_ms / 1000, UTC)
