"""The retry table under churn: claims, the depth gauge, the sweep for lost wake-ups, pruning and the table's growth,
with a million pending rows in each shape an outage leaves.

Each shape is loaded anew (`INSERT ... SELECT generate_series`, bodies of about 1 kB, then VACUUM ANALYZE as
autovacuum would have run on a table that grew this much) and churned as the retry path churns it: the poller claims
a batch of `max_in_flight` rows through `RetryPoller.claim` (the statement, its round trip and the hand-over to the
dispatcher), the outcome writer settles the batch, and again; a few batches warm up first. The shapes:

- `a`: one endpoint's rows, all due, its circuit open (left out of claims); another endpoint has a few due rows,
  which fail again and are due again as they settle;
- `b`: the same endpoint back: its rows claimed and delivered batch after batch;
- `c`: the rows not due yet (backoff); the other endpoint's few rows as in `a`;
- `d`: an ordered webhook, queues of 100 deliveries per record, the head of each due and the rest waiting
  ('infinity'); each delivered head wakes the next;
- `e`: as `b`, with 5,000 rows at the head of the table claimed by other replicas (their leases running).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncpg

from webhookd.delivery.dispatch import Dispatcher
from webhookd.durable.outcomes import OutcomeWriter
from webhookd.durable.retries import RetryPoller, RetrySettings
from webhookd.durable.retry_upkeep import _NO_RECORD, _SWEEP_SLICE, _UNBLOCK_SLICE
from webhookd.endpoints.state import EndpointHealth
from webhookd.model import Delivery, Webhook
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.runtime.config import Settings
from webhookd.runtime.metrics import Metrics
from webhookd.runtime.policy import lease_seconds, retries_in_flight

ROWS = 1_000_000
SWEEP_SLICE = _SWEEP_SLICE  # records a slice of the sweep visits
BATCHES = 100
WARM_UP = 5
TARGET_MS = 10.0
SHAPES = ("a", "b", "c", "d", "e")
FILLFACTORS = (100, 70, 50)
RECORD_QUEUE = 100  # deliveries per record in shape d
LOCKED_ELSEWHERE = 5_000  # rows claimed by other replicas in shape e
_WORKSPACE = str(uuid.UUID(int=1))
_DOWN, _OTHER = str(uuid.UUID(int=0xA)), str(uuid.UUID(int=0xB))
_COUNT = "SELECT count(*) FROM webhookd.deliveries WHERE status = 'pending'"
_SIZE = "SELECT pg_total_relation_size('webhookd.deliveries')"
_UPDATES = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'webhookd.deliveries'::regclass"
_TRIGGERS = "ALTER TABLE webhookd.deliveries {} TRIGGER USER"
# $1 webhook, $2 rows, $3 when the first falls due (the others a millisecond apart), $4 records to order by (0: not
# ordered; else each record's first row is due and the others wait), $5 rows claimed elsewhere (the first ones).
_LOAD = """
INSERT INTO webhookd.deliveries (event_id, webhook_id, workspace_id, event_name, body, event_time, source, attempts,
    next_attempt_at, last_status, last_error, order_key, order_pos, locked_until)
SELECT $1 || ':' || i, $1::uuid, $6::uuid, 'person.updated',
       convert_to(json_build_object('event', 'person.updated', 'timestamp', '2026-01-01T00:00:00.000Z', 'data',
           json_build_object('id', md5(i::text), 'name', 'Ada Lovelace', 'emails', json_build_object('primaryEmail',
           'ada' || i || '@example.com'), 'jobTitle', 'Analyst', 'city', 'London', 'notes', repeat(md5((i * 7)::text),
           24), 'createdAt', '2025-12-31T23:59:59.000Z', 'updatedAt', '2026-01-01T00:00:00.000Z'))::text, 'UTF8'),
       now(), 'crm:' || (i % 4) || ':' || i, 1,
       CASE WHEN $4 > 0 AND i > $4 THEN 'infinity' ELSE $3::timestamptz + i * interval '1 millisecond' END,
       503, 'HTTP 503: Service Unavailable',
       CASE WHEN $4 > 0 THEN 'person:' || (i % $4) END, CASE WHEN $4 > 0 THEN i END,
       CASE WHEN i <= $5 THEN now() + interval '1 hour' END
FROM generate_series(1, $2) AS i
"""


@dataclass(frozen=True)
class ShapeCost:
    """One shape: claim time per batch and the rows a batch took; the gauge's sample against the count(*) it
    replaced; a slice of the sweep; a round of pruning what the churn delivered, and the rows it deleted; the churn's
    updates that were HOT, and the table's size (with TOAST and indexes) before and after it."""

    shape: str
    batch: int
    claim_median_ms: float
    claim_p99_ms: float
    rows_per_claim: float
    sample_ms: float
    count_ms: float
    sweep_ms: float
    prune_ms: float
    pruned: int
    hot_ratio: float
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class TriggerCost:
    """A statement's median milliseconds with the pending-count triggers and without them."""

    statement: str
    with_ms: float
    without_ms: float


class _Dispatcher:
    """What the poller asks of the dispatcher: the rows it has under way, and where claimed deliveries go."""

    def __init__(self) -> None:
        self.claimed: list[Delivery] = []

    def retry_rows(self) -> list[int]:
        return []

    def busy_webhooks(self) -> list[str]:
        return []

    def submit_retry(self, delivery: Delivery) -> None:
        self.claimed.append(delivery)


class _Health:
    """Endpoint health as claims see it: the endpoints whose circuit is open."""

    def __init__(self, held: list[str]) -> None:
        self.held = held

    def retry_holds(self) -> tuple[list[str], list[str]]:
        return self.held, []


@dataclass
class _Churn:
    """A poller with a pool and an outcome writer of its own, over the two webhooks of the shapes."""

    poller: RetryPoller
    dispatcher: _Dispatcher
    outcomes: OutcomeWriter
    pool: asyncpg.Pool
    batch: int
    down: Webhook

    @classmethod
    async def start(cls, dsn: str, held: list[str]) -> _Churn:
        settings = Settings.model_validate({"postgres": {"dsn": dsn}})
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        index = SubscriptionIndex()
        down, other = (Webhook(w, _WORKSPACE, "https://receiver.example/hook", ("*.*",), b"s") for w in (_DOWN, _OTHER))
        index.put(down)
        index.put(other)
        dispatcher, outcomes = _Dispatcher(), OutcomeWriter(pool)
        outcomes.start()
        batch = retries_in_flight(settings)
        # Delivered rows are kept for no time at all, so that a round of pruning has the churn's to delete.
        retry = RetrySettings(1.0, batch, lease_seconds(settings), delivered_retention_seconds=0.0)
        poller = RetryPoller(
            pool, cast(Dispatcher, dispatcher), index, cast(EndpointHealth, _Health(held)), outcomes, Metrics(), retry
        )
        return cls(poller, dispatcher, outcomes, pool, batch, down)

    async def cycle(self) -> tuple[float, int]:
        """Claim a batch and settle it; returns the claim's milliseconds and the rows it took."""
        started = time.perf_counter()
        taken = await self.poller.claim(self.batch)
        took = (time.perf_counter() - started) * 1000
        claimed, self.dispatcher.claimed = self.dispatcher.claimed, []
        await asyncio.gather(*(self._settle(d) for d in claimed))
        return took, taken

    async def _settle(self, d: Delivery) -> None:
        assert d.row_id is not None
        # The other endpoint's rows fail again, due at once; the endpoint that came back takes its deliveries.
        status = "pending" if d.webhook.id == _OTHER else "delivered"
        await self.outcomes.update(d.row_id, status=status, attempts=d.attempts + 1, retry_in=0.0, last_status=200,
                                   error=None)  # fmt: skip

    async def close(self) -> None:
        await self.outcomes.close(10)
        # The poller keeps a connection between its queries until its run ends, and this one never ran.
        self.pool.terminate()


async def _timed(times: int, work: Callable[[], Awaitable[Any]]) -> float:
    """The median milliseconds of `times` runs of `work`."""
    took = []
    for _ in range(times):
        started = time.perf_counter()
        await work()
        took.append((time.perf_counter() - started) * 1000)
    return statistics.median(took)


async def load(conn: asyncpg.Connection, shape: str, rows: int) -> None:
    """Empty the table and write `shape`'s rows; the other endpoint's few due rows go with every shape."""
    await conn.execute("TRUNCATE webhookd.deliveries")
    # Due from an hour ago (the last about 43 minutes ago), or, in backoff, from an hour from now.
    due = await conn.fetchval(f"SELECT now() {'+' if shape == 'c' else '-'} interval '1 hour'")
    records = rows // RECORD_QUEUE if shape == "d" else 0
    locked = LOCKED_ELSEWHERE if shape == "e" else 0
    await conn.execute(_LOAD, _DOWN, rows, due, records, locked, _WORKSPACE)
    await conn.execute(_LOAD, _OTHER, 10, await conn.fetchval("SELECT now() - interval '1 minute'"), 0, 0, _WORKSPACE)
    await conn.execute("VACUUM ANALYZE webhookd.deliveries")


async def _updates(conn: asyncpg.Connection) -> tuple[int, int]:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(_UPDATES)
    assert row is not None
    return row[0], row[1]


async def shape_cost(dsn: str, shape: str, rows: int = ROWS, batches: int = BATCHES) -> ShapeCost:
    conn = await asyncpg.connect(dsn)
    try:
        await load(conn, shape, rows)
        before, updates = await conn.fetchval(_SIZE), await _updates(conn)
        churn = await _Churn.start(dsn, [_DOWN] if shape == "a" else [])
        try:
            for _ in range(WARM_UP):
                await churn.cycle()
            cycles = [await churn.cycle() for _ in range(batches)]
            await churn.outcomes.close(10)  # every outcome written
            sample = await _timed(20, churn.poller.upkeep.sample)
            sweep = await _timed(5, lambda: conn.fetchrow(_UNBLOCK_SLICE, *_NO_RECORD, _SWEEP_SLICE))
            # Read before pruning: the churn's growth, not what pruning gives back.
            after = await conn.fetchval(_SIZE)
            delivered = "SELECT count(*) FROM webhookd.deliveries WHERE status = 'delivered'"
            pruned = await conn.fetchval(delivered)
            prune = await _timed(1, churn.poller.upkeep.prune)
            pruned -= await conn.fetchval(delivered)
        finally:
            await churn.close()
        count = await _timed(3, lambda: conn.fetchval(_COUNT))
        await asyncio.sleep(1.0)  # the pool's backends report their statistics as they exit
        upd, hot = (now - then for now, then in zip(await _updates(conn), updates, strict=True))
    finally:
        await conn.close()
    claims = sorted(ms for ms, _ in cycles)
    return ShapeCost(
        shape,
        churn.batch,
        statistics.median(claims),
        claims[min(len(claims) - 1, round(0.99 * len(claims)))],
        statistics.mean(n for _, n in cycles),
        sample,
        count,
        sweep,
        prune,
        pruned,
        hot / upd if upd else 0.0,
        before,
        after,
    )


async def fillfactor_cost(dsn: str, fillfactor: int, rows: int = ROWS, batches: int = BATCHES) -> ShapeCost:
    """Shape b's churn on a table filled to `fillfactor`; the migration's own setting is put back after."""
    conn = await asyncpg.connect(dsn)
    try:
        options = await conn.fetchval("SELECT reloptions FROM pg_class WHERE oid = 'webhookd.deliveries'::regclass")
        kept = next((o for o in options or [] if o.startswith("fillfactor=")), None)
        await conn.execute(f"ALTER TABLE webhookd.deliveries SET (fillfactor = {fillfactor})")
        try:
            return await shape_cost(dsn, "b", rows, batches)
        finally:
            back = f"SET ({kept})" if kept else "RESET (fillfactor)"
            await conn.execute(f"ALTER TABLE webhookd.deliveries {back}")
    finally:
        await conn.close()


async def trigger_costs(dsn: str, rows: int = 100_000, repeats: int = 7) -> list[TriggerCost]:
    """What the pending-count triggers add to the statements that fire them most, on shape b's table of `rows`:
    the outcome writer's inserts (one statement per row), a claim, its settle, a batch of pruning."""
    conn = await asyncpg.connect(dsn)
    timings: dict[str, dict[bool, list[float]]] = {}
    try:
        await load(conn, "b", rows)
        churn = await _Churn.start(dsn, [])
        try:
            for turn in range(2 * repeats):
                on = turn % 2 == 0
                await conn.execute(_TRIGGERS.format("ENABLE" if on else "DISABLE"))
                for name, ms in (await _statements(churn, turn)).items():
                    timings.setdefault(name, {True: [], False: []})[on].append(ms)
        finally:
            await conn.execute(_TRIGGERS.format("ENABLE"))
            await churn.close()
        # The counter missed what ran without its triggers: a fresh start counts from nothing.
        await conn.execute("TRUNCATE webhookd.deliveries")
    finally:
        await conn.close()
    return [TriggerCost(n, statistics.median(t[True]), statistics.median(t[False])) for n, t in timings.items()]


async def _statements(churn: _Churn, turn: int) -> dict[str, float]:
    body = b'{"event":"person.updated","data":{}}'
    fresh = [
        Delivery(f"t{turn}-{i}", "person.updated", _WORKSPACE, churn.down, body, None, f"crm:9:{turn * 1000 + i}")
        for i in range(1000)
    ]
    took = {"1,000 single-row inserts (OutcomeWriter.hold_back)": await _timed(
        1, lambda: churn.outcomes.hold_back(fresh, retry_in=3600.0, error="HTTP 503")
    )}  # fmt: skip
    started = time.perf_counter()
    await churn.poller.claim(churn.batch)
    took[f"claim of {churn.batch} (RetryPoller.claim)"] = (time.perf_counter() - started) * 1000
    claimed, churn.dispatcher.claimed = churn.dispatcher.claimed, []
    took[f"settle of {churn.batch} as delivered (OutcomeWriter.update)"] = await _timed(
        1, lambda: asyncio.gather(*(churn._settle(d) for d in claimed))
    )
    took[f"prune of {churn.batch} delivered rows"] = await _timed(1, churn.poller.upkeep.prune)
    return took
