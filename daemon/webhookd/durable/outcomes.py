"""Durable outcomes, written to Postgres in batches: retries scheduled, dead letters, bad events, late successes.

A record's Kafka offset may be committed only once every failed delivery of it is safely on disk, so callers wait
for their write. Writes from many deliveries are gathered into one transaction, which keeps the cost per failure
small; while Postgres is down, writes wait and retry, never drop (and the consumer, waiting on them, stops
committing, which is exactly what must happen).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from webhookd.durable.held_connection import HeldConnection
from webhookd.durable.transient import TRANSIENT
from webhookd.model import Delivery

log = structlog.get_logger("webhookd.durable.outcomes")

_BATCH_LIMIT = 1000
_RAW_LIMIT = 64 * 1024  # bytes of a bad record kept for inspection; the real size is stored beside it

_INSERT_DELIVERY = """
INSERT INTO webhookd.deliveries
    (event_id, webhook_id, workspace_id, event_name, body, event_time, source,
     status, attempts, next_attempt_at, last_status, last_error, order_key, order_pos)
VALUES ($1, $2::uuid, $3::uuid, $4, $5, $6, $7, $8, $9, now() + make_interval(secs => $10), $11, $12, $13, $14)
ON CONFLICT (event_id, webhook_id, source) DO NOTHING
"""
# A delivery of an ordered webhook whose record has a delivery pending: written to wait ('infinity') if one of them
# comes before it in Kafka, to be woken when that one settles (`_PROMOTE`); due now if it comes first (a record read
# again after a crash, whose later deliveries were already written). Either way the retry path sends it only once no
# earlier one of its record is pending (see `retries`).
_INSERT_BEHIND = """
INSERT INTO webhookd.deliveries
    (event_id, webhook_id, workspace_id, event_name, body, event_time, source,
     status, attempts, next_attempt_at, last_status, last_error, order_key, order_pos)
SELECT $1, $2::uuid, $3::uuid, $4, $5, $6, $7, $8, $9,
    CASE WHEN EXISTS (
        SELECT 1 FROM webhookd.deliveries e
        WHERE e.webhook_id = $2::uuid AND e.order_key = $13 AND e.status = 'pending' AND e.order_pos <= $14
    ) THEN 'infinity' ELSE now() + make_interval(secs => $10) END,
    $11, $12, $13, $14
ON CONFLICT (event_id, webhook_id, source) DO NOTHING
"""
# Column-wise, one array per parameter: the outcomes of a whole batch in one statement, which Postgres plans and runs
# once rather than once per row (a backlog of retries settles thousands of rows a second).
_UPDATE_DELIVERIES = """
UPDATE webhookd.deliveries d
SET status = v.status, attempts = v.attempts, next_attempt_at = now() + make_interval(secs => v.retry_in),
    last_status = v.last_status, last_error = v.last_error, locked_until = NULL, updated_at = now(),
    delivered_at = CASE WHEN v.status = 'delivered' THEN now() ELSE d.delivered_at END
FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::float8[], $5::integer[], $6::text[])
    AS v (id, status, attempts, retry_in, last_status, last_error)
-- A claim whose lease ran out may have been taken and settled by another replica; never undo its result.
WHERE d.id = v.id AND d.status = 'pending'
RETURNING d.webhook_id, d.order_key, d.status
"""
# The records whose pending delivery just settled: the earliest of each one's other pending deliveries, waiting
# behind it, is due now. (A wake-up lost to a race with a delivery written behind at that moment by another process
# is made good by the retry poller's periodic `UNBLOCK`.)
_PROMOTE = """
UPDATE webhookd.deliveries d SET next_attempt_at = now(), updated_at = now()
FROM (
    SELECT (
        SELECT n.id FROM webhookd.deliveries n
        WHERE n.webhook_id = k.webhook_id AND n.order_key = k.order_key AND n.status = 'pending'
        ORDER BY n.order_pos, n.id LIMIT 1
    ) AS id
    FROM unnest($1::uuid[], $2::text[]) AS k (webhook_id, order_key)
) first
WHERE d.id = first.id AND d.next_attempt_at = 'infinity'
"""
_COLUMNWISE = frozenset({_UPDATE_DELIVERIES})
_DEFER_DELIVERY = """
UPDATE webhookd.deliveries
SET next_attempt_at = now() + make_interval(secs => $2), locked_until = NULL, updated_at = now()
WHERE id = $1 AND status = 'pending'
"""
_INSERT_BAD_EVENT = """
INSERT INTO webhookd.bad_events (topic, "partition", "offset", reason, raw, raw_size)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (topic, "partition", "offset") DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record kept for an operator: where it was, why it was refused, and its bytes (capped)."""

    topic: str
    partition: int
    offset: int
    reason: str
    raw: bytes


@dataclass(slots=True)
class _Write:
    sql: str
    args: tuple[Any, ...]
    done: asyncio.Future[None]


class OutcomeWriter:
    """Gathers writes from every delivery and commits them together; `close` flushes what is queued."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._conn = HeldConnection(pool)
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name="outcomes")
        return self._task

    async def schedule(
        self, delivery: Delivery, *, status: str, retry_in: float, last_status: int | None, error: str | None
    ) -> None:
        """Write a delivery that failed its first attempt (pending retry or dead) as its durable row."""
        await self._write(_INSERT_DELIVERY, *_row(delivery, status, retry_in, last_status, clean_text(error)))

    async def hold_back(self, deliveries: Sequence[Delivery], *, retry_in: float, error: str) -> None:
        """Write deliveries that were never attempted as pending rows, due in `retry_in` seconds; returns once all are
        on disk. One wait for all of them: an endpoint that stopped answering sends every one of its deliveries here."""
        loop = asyncio.get_running_loop()
        text = clean_text(error)
        written: list[asyncio.Future[None]] = []
        for delivery in deliveries:
            done: asyncio.Future[None] = loop.create_future()
            self._queue.put_nowait(_Write(_INSERT_DELIVERY, _row(delivery, "pending", retry_in, None, text), done))
            written.append(done)
        for done in written:
            await done

    async def behind(self, delivery: Delivery, *, error: str) -> None:
        """Write a delivery of an ordered webhook, never attempted, behind the pending ones of its record."""
        await self._write(_INSERT_BEHIND, *_row(delivery, "pending", 0.0, None, clean_text(error)))

    async def update(
        self, row_id: int, *, status: str, attempts: int, retry_in: float, last_status: int | None, error: str | None
    ) -> None:
        """Record the outcome of an attempt on a delivery that already has its durable row."""
        await self._write(_UPDATE_DELIVERIES, row_id, status, attempts, retry_in, last_status, clean_text(error))

    async def dead_letters(self, rows: Sequence[tuple[int, int]], *, error: str) -> None:
        """Dead-letter claimed deliveries that will not be attempted, given as (row id, attempts so far), together."""
        text = clean_text(error)
        await asyncio.gather(
            *(self._write(_UPDATE_DELIVERIES, row_id, "dead", attempts, 0.0, None, text) for row_id, attempts in rows)
        )

    async def defer(self, row_id: int, *, retry_in: float) -> None:
        """Put a claimed delivery back for later without an attempt, keeping its last status and error."""
        await self._write(_DEFER_DELIVERY, row_id, retry_in)

    async def bad_event(self, bad: BadRecord) -> None:
        await self._write(
            _INSERT_BAD_EVENT,
            bad.topic,
            bad.partition,
            bad.offset,
            clean_text(bad.reason),
            bad.raw[:_RAW_LIMIT],
            len(bad.raw),
        )

    async def _write(self, sql: str, *args: Any) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Write(sql, args, done))
        # The write belongs to the batch now: cancelling the caller cancels only its wait (`done`), which the commit
        # then leaves alone. (A shield would cost a second future and callbacks on every write.)
        await done

    async def _run(self) -> None:
        batch: list[_Write] = []
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < _BATCH_LIMIT and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._commit(batch)
                for _ in batch:
                    self._queue.task_done()
                batch = []
        except BaseException as exc:
            # Whoever waits on a write must learn that it will never happen, rather than wait forever.
            failure = exc if isinstance(exc, Exception) else RuntimeError("the outcome writer stopped")
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for write in batch:
                if not write.done.done():
                    write.done.set_exception(failure)
                    write.done.exception()  # marks it retrieved: the caller may be gone (cancelled) by now
            raise
        finally:
            await self._conn.drop()

    async def _commit(self, batch: list[_Write]) -> None:
        by_sql: dict[str, list[tuple[Any, ...]]] = {}
        for write in batch:
            by_sql.setdefault(write.sql, []).append(write.args)
        backoff = 0.2
        while True:
            try:
                async with self._conn.use() as conn:
                    if len(by_sql) == 1:
                        # One statement is a transaction of its own: BEGIN and COMMIT would be two more round trips.
                        await _apply(conn, *next(iter(by_sql.items())))
                    else:
                        async with conn.transaction():
                            for sql, rows in by_sql.items():
                                await _apply(conn, sql, rows)
                break
            except TRANSIENT as exc:
                log.warning("record_write_retrying", error=str(exc), writes=len(batch), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        for write in batch:
            if not write.done.done():
                write.done.set_result(None)

    async def close(self, timeout: float) -> None:
        """Let queued writes reach Postgres (within `timeout`), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _apply(conn: asyncpg.pool.PoolConnectionProxy, sql: str, rows: list[tuple[Any, ...]]) -> None:
    if sql in _COLUMNWISE:
        settled = await conn.fetch(sql, *(list(column) for column in zip(*rows, strict=True)))
        ordered = {(r["webhook_id"], r["order_key"]) for r in settled if r["order_key"] and r["status"] != "pending"}
        if ordered:
            await conn.execute(_PROMOTE, [w for w, _ in ordered], [k for _, k in ordered])
    else:
        await conn.executemany(sql, rows)


def _row(
    delivery: Delivery, status: str, retry_in: float, last_status: int | None, error: str | None
) -> tuple[Any, ...]:
    """The parameters of `_INSERT_DELIVERY` for one delivery."""
    event_time = (
        datetime.fromtimestamp(delivery.kafka_timestamp_ms / 1000, UTC)
        if delivery.kafka_timestamp_ms is not None
        else None
    )
    return (
        delivery.event_id,
        delivery.webhook.id,
        delivery.workspace_id,
        delivery.event_name,
        delivery.body,
        event_time,
        delivery.source,
        status,
        delivery.attempts,
        retry_in,
        last_status,
        error,
        delivery.order_key,
        delivery.order_pos,
    )


def clean_text(text: str | None) -> str | None:
    # Postgres text cannot hold NUL, and receivers' error bodies are arbitrary bytes.
    # Nor lone surrogates, which aiohttp leaves in headers it decodes with surrogateescape.
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
