"""The retry table with a backlog of 120,000 pending rows, on the real Postgres: EXPLAIN (ANALYZE, BUFFERS) of the
claim statements shows the index each shape is meant to use, no sequential scan, and rows and buffers read that do
not grow with the backlog, with custom and generic plans alike. Claims are HOT updates; the depth gauge sums a
counter that every writer keeps equal to count(*); delivered rows past the retention are pruned, dead letters kept;
the sweep for lost wake-ups visits a slice of the waiting records at a time."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any, cast

import asyncpg
import pytest

from webhookd.delivery.dispatch import Dispatcher
from webhookd.durable import retries, retry_upkeep
from webhookd.durable.outcomes import OutcomeWriter
from webhookd.durable.retries import (
    _CLAIM_AROUND,
    _CLAIM_MANY,
    _CLAIM_PROBES,
    RetryPoller,
    RetrySettings,
)
from webhookd.durable.retry_upkeep import _NO_RECORD, _PRUNE, _TABLE_STATS, _UNBLOCK_SLICE
from webhookd.endpoints import sync
from webhookd.endpoints.state import EndpointHealth
from webhookd.model import Delivery, Webhook
from webhookd.operate.delivery_commands import reset_rows
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.runtime.metrics import Metrics

BACKLOG = 120_000
WORKSPACE = str(uuid.uuid4())
DOWN, OTHER = str(uuid.uuid4()), str(uuid.uuid4())
MODES = ("auto", "force_generic_plan")
# $1 webhook, $2 rows, $3 due from (a millisecond apart), $4 records (0: unordered; else each record's first row is
# due and the rest wait), $5 rows claimed elsewhere, the first ones.
_FILL = """
INSERT INTO webhookd.deliveries (event_id, webhook_id, workspace_id, event_name, body, source, attempts,
    next_attempt_at, order_key, order_pos, locked_until)
SELECT $1 || ':' || i, $1::uuid, $6::uuid, 'person.updated', convert_to(repeat('x', 200), 'UTF8'), 'crm:0:' || i, 1,
       CASE WHEN $4 > 0 AND i > $4 THEN 'infinity' ELSE now() + $3::interval + i * interval '1 millisecond' END,
       CASE WHEN $4 > 0 THEN 'person:' || (i % $4) END, CASE WHEN $4 > 0 THEN i END,
       CASE WHEN i <= $5 THEN now() + interval '1 hour' END
FROM generate_series(1, $2) AS i
"""
_PENDING = """
SELECT (SELECT sum(pending) FROM webhookd.pending_count), count(*) FROM webhookd.deliveries WHERE status = 'pending'
"""
AGO, LATER = timedelta(hours=-1), timedelta(hours=1)


async def fill(
    conn: asyncpg.Connection, webhook: str, rows: int, due: timedelta, records: int = 0, locked: int = 0
) -> None:
    await conn.execute(_FILL, webhook, rows, due, records, locked, WORKSPACE)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    try:
        yield connection
    finally:
        await connection.close()


class Plan:
    """EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) of one run of a statement, rolled back."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    @classmethod
    async def of(cls, conn: asyncpg.Connection, mode: str, sql: str, *args: Any) -> Plan:
        await conn.execute(f"SET plan_cache_mode = {mode}")
        tr = conn.transaction()
        await tr.start()
        try:
            text = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
        finally:
            await tr.rollback()
        return cls(json.loads(text)[0]["Plan"])

    def nodes(self, node: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        node = self.root if node is None else node
        yield node
        for child in node.get("Plans", []):
            yield from self.nodes(child)

    @property
    def rows(self) -> int:
        return int(self.root["Actual Rows"])

    @property
    def buffers(self) -> int:
        return int(self.root["Shared Hit Blocks"]) + int(self.root["Shared Read Blocks"])

    def touched(self) -> int:
        """Rows (or index entries) that the scans of the table returned or filtered out, over all their loops."""
        return int(
            sum(
                (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
                for n in self.nodes()
                if n.get("Relation Name") == "deliveries" and "Scan" in n["Node Type"]
            )
        )

    def check(self, *indexes: str) -> None:
        """The table is read through indexes only, these among them."""
        scans = {n["Node Type"] for n in self.nodes() if n.get("Relation Name") == "deliveries"}
        assert not scans & {"Seq Scan", "Bitmap Heap Scan"}, scans
        used = {n["Index Name"] for n in self.nodes() if "Index Name" in n}
        assert set(indexes) <= used, used

    def expect(self, rows: int, touched: int, buffers: int) -> None:
        """It returned `rows`, and read at most `touched` rows and `buffers` buffers."""
        assert self.rows == rows
        assert self.touched() <= touched, self.touched()
        assert self.buffers <= buffers, self.buffers


class _Around:
    """What the poller asks of the dispatcher, endpoint health and the outcome writer: which endpoints take nothing
    now, where claimed deliveries go, and dead letters (none: every webhook here is live)."""

    def __init__(self, held: list[str]) -> None:
        self.held = held
        self.claimed: list[Delivery] = []

    def retry_rows(self) -> list[int]:
        return []

    def busy_webhooks(self) -> list[str]:
        return []

    def retry_holds(self) -> tuple[list[str], list[str]]:
        return self.held, []

    def submit_retry(self, delivery: Delivery) -> None:
        self.claimed.append(delivery)

    async def dead_letters(self, rows: list[tuple[int, int]], *, error: str) -> None:
        assert not rows


def poller(
    pool: asyncpg.Pool, held: list[str], retention: float | None = None, outcomes: OutcomeWriter | None = None
) -> tuple[RetryPoller, _Around, Metrics]:
    index = SubscriptionIndex()
    for webhook in (DOWN, OTHER):
        index.put(Webhook(webhook, WORKSPACE, "https://receiver.example/hook", ("*.*",), b"secret"))
    around, metrics = _Around(held), Metrics()
    writer = outcomes or cast(OutcomeWriter, around)
    settings = RetrySettings(1.0, 512, 60.0, retention)
    retry = RetryPoller(pool, cast(Dispatcher, around), index, cast(EndpointHealth, around), writer, metrics, settings)
    return retry, around, metrics


async def backlog(conn: asyncpg.Connection, due: timedelta = AGO, **shape: int) -> None:
    """The down endpoint's backlog in `due`'s shape, the other endpoint's 10 rows due a minute ago, and statistics."""
    await fill(conn, DOWN, BACKLOG, due, **shape)
    await fill(conn, OTHER, 10, timedelta(minutes=-1) if due == AGO else due)
    await conn.execute("ANALYZE webhookd.deliveries")


async def test_claims_around_an_open_circuit_jump_over_its_backlog(dsn: str, conn: asyncpg.Connection) -> None:
    await backlog(conn)
    for mode in MODES:
        plan = await Plan.of(conn, mode, _CLAIM_AROUND, 512, 60.0, [], [DOWN])
        plan.check("deliveries_due_by_webhook")
        plan.expect(rows=10, touched=40, buffers=200)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        claims, around, metrics = poller(pool, held=[DOWN])
        assert await claims.claim(512) == 10
        assert {d.webhook.id for d in around.claimed} == {OTHER}
        await claims.upkeep.sample()
    finally:
        pool.terminate()
    # The gauges read the counter and the files' sizes, not the rows.
    assert metrics.registry.get_sample_value("webhookd_retry_queue_depth") == BACKLOG + 10
    assert (metrics.registry.get_sample_value("webhookd_retry_table_bytes") or 0) > 0
    stats = await Plan.of(conn, "auto", _TABLE_STATS)
    assert "deliveries" not in {n.get("Relation Name") for n in stats.nodes()}


async def test_a_claim_from_a_due_backlog_reads_the_batch_and_nothing_behind_it(conn: asyncpg.Connection) -> None:
    await backlog(conn)
    for mode in MODES:
        plan = await Plan.of(conn, mode, _CLAIM_MANY, 512, 60.0, [], [])
        plan.check("deliveries_due")
        plan.expect(rows=512, touched=2 * 512 + 10, buffers=10 * 512)
        # The same batch with the other endpoint left out: each endpoint offers its earliest due rows.
        plan = await Plan.of(conn, mode, _CLAIM_AROUND, 512, 60.0, [], [OTHER])
        plan.check("deliveries_due_by_webhook")
        plan.expect(rows=512, touched=3 * 512 + 10, buffers=12 * 512)


async def test_claims_in_a_backlog_in_backoff_read_nothing(conn: asyncpg.Connection) -> None:
    await backlog(conn, LATER)
    for mode in MODES:
        for sql, skipped in ((_CLAIM_MANY, []), (_CLAIM_AROUND, [OTHER]), (_CLAIM_PROBES, [DOWN, OTHER])):
            plan = await Plan.of(conn, mode, sql, 512, 60.0, [], skipped)
            plan.check()
            plan.expect(rows=0, touched=5, buffers=40)


async def test_an_ordered_claim_checks_each_head_without_reading_the_queue_behind_it(conn: asyncpg.Connection) -> None:
    await backlog(conn, records=BACKLOG // 100)  # queues of 100 deliveries, the head of each due
    for mode in MODES:
        plan = await Plan.of(conn, mode, _CLAIM_MANY, 512, 60.0, [], [])
        plan.check("deliveries_due", "deliveries_in_order", "deliveries_in_order_active")
        # Reading each head's queue would be 100 rows a head.
        plan.expect(rows=512, touched=3 * 512 + 10, buffers=16 * 512)
        # A slice of the sweep visits its records' first waiting rows, whatever the queues behind them.
        plan = await Plan.of(conn, mode, _UNBLOCK_SLICE, *_NO_RECORD, 200)
        plan.check("deliveries_in_order_waiting")
        plan.expect(rows=1, touched=3 * 200, buffers=16 * 200)


async def test_claims_pass_the_rows_claimed_elsewhere_and_no_further(conn: asyncpg.Connection) -> None:
    await backlog(conn, locked=2000)
    for mode in MODES:
        plan = await Plan.of(conn, mode, _CLAIM_MANY, 512, 60.0, [], [])
        plan.check("deliveries_due")
        plan.expect(rows=512, touched=2000 + 2 * 512 + 10, buffers=2 * (2000 + 512))


async def test_probes_jump_to_each_half_open_endpoint_s_earliest_due_row(conn: asyncpg.Connection) -> None:
    await backlog(conn)
    for mode in MODES:
        plan = await Plan.of(conn, mode, _CLAIM_PROBES, 20, 60.0, [], [OTHER, DOWN])
        plan.check("deliveries_due_by_webhook")
        plan.expect(rows=2, touched=10, buffers=100)


async def test_a_claim_is_a_hot_update_that_leaves_updated_at_alone(conn: asyncpg.Connection) -> None:
    await fill(conn, DOWN, 100, AGO)
    before = await conn.fetchval("SELECT max(updated_at) FROM webhookd.deliveries")
    hot = "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'webhookd.deliveries'::regclass"
    hot_before = await conn.fetchval(hot)
    claimed = await conn.fetch(_CLAIM_MANY, 100, 60.0, [], [])
    await conn.execute(retries._RELEASE, [r["id"] for r in claimed[:50]])
    await conn.execute("SELECT pg_stat_force_next_flush()")
    for _ in range(50):
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        if await conn.fetchval(hot) - hot_before >= 150:
            break
        await asyncio.sleep(0.05)
    assert await conn.fetchval(hot) - hot_before == 150  # 100 claims and 50 releases, every one HOT
    assert await conn.fetchval("SELECT max(updated_at) FROM webhookd.deliveries") == before


async def pending(conn: asyncpg.Connection) -> tuple[int, int]:
    """The depth the gauge reads, and count(*)."""
    row = await conn.fetchrow(_PENDING)
    assert row is not None
    return row[0], row[1]


def delivery(event_id: str, webhook: str = DOWN, order: tuple[str, int] | None = None) -> Delivery:
    hook = Webhook(webhook, WORKSPACE, "https://receiver.example/hook", ("*.*",), b"secret")
    key, pos = order if order is not None else (None, None)
    return Delivery(event_id, "person.updated", WORKSPACE, hook, b"{}", None, f"crm:0:{event_id}", 1, None, key, pos)


async def test_the_pending_count_equals_count_star_after_every_writer(dsn: str, conn: asyncpg.Connection) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
    outcomes = OutcomeWriter(pool)
    outcomes.start()
    claims, around, _ = poller(pool, held=[], retention=0.0, outcomes=outcomes)
    try:

        async def agrees(step: str) -> None:
            counted, counted_star = await pending(conn)
            assert counted == counted_star, step

        await fill(conn, DOWN, 300, AGO)
        await outcomes.schedule(delivery("s1"), status="pending", retry_in=0.0, last_status=500, error="x")
        await outcomes.schedule(delivery("s2"), status="dead", retry_in=0.0, last_status=410, error="gone")
        await outcomes.hold_back([delivery(f"h{i}", OTHER) for i in range(20)], retry_in=0.0, error="busy")
        await outcomes.schedule(delivery("o1", order=("k", 1)), status="pending", retry_in=0.0, last_status=500,
                                error="x")  # fmt: skip
        await outcomes.behind(delivery("o2", order=("k", 2)), error="waiting")
        await conn.copy_records_to_table(
            "deliveries", schema_name="webhookd", columns=("event_id", "webhook_id", "workspace_id", "event_name",
            "body", "source"), records=[(f"c{i}", uuid.UUID(DOWN), uuid.UUID(WORKSPACE), "x", b"{}", f"c:{i}")
            for i in range(5)],
        )  # fmt: skip
        await agrees("inserts")
        assert await claims.claim(100) == 100
        await agrees("claims")
        settle = around.claimed
        for d, status in zip(settle, ("delivered", "dead", "pending") * 40, strict=False):
            assert d.row_id is not None
            await outcomes.update(d.row_id, status=status, attempts=2, retry_in=60.0, last_status=200, error=None)
        await agrees("settles")
        rows = [
            r["id"] for r in await conn.fetch("SELECT id FROM webhookd.deliveries WHERE status = 'pending' LIMIT 9")
        ]
        await outcomes.dead_letters([(row, 1) for row in rows[:3]], error="unsubscribed")
        await outcomes.defer(rows[3], retry_in=30.0)
        await agrees("dead letters and deferrals")
        old = [r["id"] for r in await conn.fetch("SELECT id FROM webhookd.deliveries WHERE status <> 'pending'")]
        await reset_rows(conn, old[:20])
        await agrees("operator resets")
        await sync.disable(conn, [OTHER], "test")
        await sync.enable(conn, [OTHER])
        await agrees("disable and enable")
        await conn.execute("UPDATE webhookd.deliveries SET status = 'delivered', delivered_at = now() WHERE id = $1",
                           rows[5])  # fmt: skip
        assert await claims.upkeep.prune() == retry_upkeep.PRUNE_SECONDS
        assert await conn.fetchval("SELECT count(*) FROM webhookd.deliveries WHERE status = 'delivered'") == 0
        await conn.execute("DELETE FROM webhookd.deliveries WHERE id = $1", rows[6])
        await agrees("deletes")
        # A writer holding its shard until it commits does not hold up another one.
        other = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await fill(conn, str(uuid.uuid4()), 3, AGO)
                async with other.transaction():
                    await asyncio.wait_for(fill(other, str(uuid.uuid4()), 4, AGO), 5)
        finally:
            await other.close()
        await agrees("concurrent writers")
        await conn.execute("TRUNCATE webhookd.deliveries")
        assert await pending(conn) == (0, 0)
    finally:
        await outcomes.close(5)
        pool.terminate()


async def test_delivered_rows_past_the_retention_go_in_batches_and_dead_letters_stay(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await fill(conn, DOWN, 12_100, AGO)  # 50 dead letters, 12,000 delivered two days ago, 50 a moment ago
    n = "split_part(event_id, ':', 2)::int"
    await conn.execute(f"""
        UPDATE webhookd.deliveries SET status = CASE WHEN {n} <= 50 THEN 'dead' ELSE 'delivered' END,
            delivered_at = CASE WHEN {n} > 12050 THEN now() WHEN {n} > 50 THEN now() - interval '2 days' END
    """)  # fmt: skip
    await fill(conn, OTHER, 10, AGO)
    await conn.execute("ANALYZE webhookd.deliveries")
    for mode in MODES:
        plan = await Plan.of(conn, mode, _PRUNE, 86400.0, retry_upkeep._NEVER)
        plan.check("deliveries_delivered")
        plan.expect(rows=1, touched=2 * retry_upkeep._PRUNE_BATCH, buffers=10 * retry_upkeep._PRUNE_BATCH)
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=1) for _ in range(2)]
    try:
        # Two replicas at once: each takes rows the other has not locked, neither waits.
        pruners = [poller(pool, held=[], retention=86400.0)[0] for pool in pools]
        await asyncio.wait_for(asyncio.gather(*(p.upkeep.prune() for p in pruners)), 10)
    finally:
        for pool in pools:
            pool.terminate()
    left = await conn.fetch("SELECT status, count(*) AS n FROM webhookd.deliveries GROUP BY status ORDER BY status")
    assert [(r["status"], r["n"]) for r in left] == [("dead", 50), ("delivered", 50), ("pending", 10)]


async def test_the_sweep_wakes_lost_records_a_slice_at_a_time(
    dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(conn, DOWN, 75, AGO, records=25)  # 25 records of 3: a head due, two waiting
    # Three records lose their head by a path that wakes nobody.
    await conn.execute("UPDATE webhookd.deliveries SET status = 'delivered' WHERE order_pos IN (3, 11, 24)")
    monkeypatch.setattr(retry_upkeep, "_SWEEP_SLICE", 10)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        sweeper = poller(pool, held=[])[0]
        waits = [await sweeper.upkeep.sweep() for _ in range(3)]
    finally:
        pool.terminate()
    assert waits == [retry_upkeep._SLICE_SECONDS, retry_upkeep._SLICE_SECONDS, retry_upkeep.UNBLOCK_SECONDS]
    woken = await conn.fetch(
        "SELECT order_pos FROM webhookd.deliveries WHERE order_pos > 25 AND isfinite(next_attempt_at) ORDER BY 1"
    )
    assert [r["order_pos"] for r in woken] == [28, 36, 49]
