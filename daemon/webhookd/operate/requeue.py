"""First-try successes of a replay, queued again: their Kafka records read again by position, decoded by the daemon's
own reader into the same event and body, checked to be still the event that was delivered (a recreated topic reuses
positions for other events), and written as pending delivery rows for the running daemons' retry pollers to send.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
from aiokafka import ConsumerRecord

from webhookd.delivery.body_formats import body_format
from webhookd.delivery.ordering import order_key
from webhookd.durable.transient import TRANSIENT
from webhookd.endpoints.sync import Connection
from webhookd.intake.readers import NeedsLayout, RecordReader, reader_for
from webhookd.intake.twenty_catalog import TwentyCatalog
from webhookd.model import BadEvent, Event, Skip, Webhook
from webhookd.operate.replay_report import Report
from webhookd.operate.replay_window import Pair
from webhookd.operate.reread import Where, fetch_records, parse_source
from webhookd.routing.filters import LazyRecord
from webhookd.runtime.config import Settings
from webhookd.runtime.tls import transport

_REPLAYED_BY = "replayed by an operator"
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


async def read_again(
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
    # A compact first try carries neither (None): its event id and the webhook's workspace, checked after, suffice.
    if (pair.workspace_id is not None and event.workspace_id != pair.workspace_id) or (
        pair.event_name is not None and event.name != pair.event_name
    ):
        # Default ids are topic:partition:offset, which a recreated topic reuses for other events.
        return f"the record at {where} is now a {event.name} of workspace {event.workspace_id}"
    return None


async def insert_pending(
    conn: Connection, webhook: Webhook, rows: dict[Pair, tuple[Event, bytes]], report: Report
) -> None:
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
