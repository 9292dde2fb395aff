"""What the attempt log and the retry table cost Postgres per delivery, measured on a real migrated database.

A million attempts each way, through the daemon's code: first-try successes in each `endpoints.attempt_log` mode
through `AttemptLog.add` and `flush`, 5,000 a flush, a second apart on the log's clock (5,000/s); 500,000 retried
deliveries (a 5xx, then a 2xx) and 125,000 dead letters (the default schedule's 8 attempts) through the retry
table's own statements as the outcome writer and the poller apply them, the attempt log beside them. The values are
`capacity_model.Traffic`'s, as the daemon makes them.

Each way starts from empty tables and a CHECKPOINT; the server checkpoints only when asked (and before each round of
dead letters that comes 5 minutes or more after the last, as checkpoint_timeout's default would) and autovacuum is
off, standing in for it a VACUUM ANALYZE of the retry table every 10,000 rows settled. Measured: WAL from the insert
position around each write and each VACUUM, the writes' wall time from this one writer, bytes (indexes and TOAST
included) after the writes and, for the retry table, after VACUUM FULL, row writes, and the writers' full-page
images. Retention: a day's partition of a million rows dropped by `webhookd.keep_attempt_partitions`, against as
many rows of the previous release's table deleted as it pruned them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from bench.capacity_model import Capacity, Cost, Retention, Traffic
from bench.stack import TABLE
from webhookd.durable.attempt_partitions import TABLES, keep
from webhookd.durable.attempts import AttemptLog
from webhookd.durable.migrate import migrate
from webhookd.durable.outcomes import _INSERT_DELIVERY, _UPDATE_DELIVERIES, _apply, _row, clean_text
from webhookd.durable.retries import _CLAIM_MANY
from webhookd.embedded import EmbeddedPostgres, create_database
from webhookd.model import AttemptLogForm, AttemptResult, Delivery
from webhookd.runtime.config.delivery_settings import DeliverySettings

T = TypeVar("T")

ATTEMPTS = 1_000_000
FIRST_TRY_BATCH = 5_000
STATEMENT_BATCH = 250  # rows a statement of the retry table in the bulk runs: a busy daemon's batch
ONE_BY_ONE = 1_000  # deliveries of the runs with a statement per row, as a quiet daemon writes them
RETENTION = 14 * 86_400.0
SCHEDULE = DeliverySettings.model_fields["retry_schedule"].default
CHECKPOINT_EVERY = 300.0  # checkpoint_timeout's default: retries further apart each find a checkpoint between
# Checkpoints only when asked and no autovacuum: nothing but the writes measured may move the WAL or the sizes.
SERVER = {"autovacuum": "off", "checkpoint_timeout": "1d", "max_wal_size": "64GB", "shared_buffers": "1GB"}
_LEASE = 60.0
_LOG_FLUSH = 150
_VACUUM_EVERY = 10_000
_LSN = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
_SNAPSHOT = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE p.relname = ANY($1::text[])), 0)::bigint AS log,
       coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE p.relname IS NULL OR NOT p.relname = ANY($1)),
                0)::bigint AS tables,
       (SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_user_tables WHERE schemaname = 'webhookd')::bigint
           AS rows,
       (SELECT sum(w.wal_fpi) FROM unnest($2::int[]) AS b (pid), pg_stat_get_backend_wal(b.pid) AS w)::bigint AS fpi
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid LEFT JOIN pg_class p ON p.oid = i.inhparent
WHERE n.nspname = 'webhookd' AND c.relkind = 'r'
"""
_LOG_TABLES = [f"webhookd.{t}" for t in TABLES.values()]
# The previous release's pruning, as it ran until the attempt log was partitioned.
_OLD_PRUNE = """
DELETE FROM webhookd.attempts WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM webhookd.attempts WHERE at < now() - make_interval(secs => $1) LIMIT 10000))
"""
# A million rows of the full form, spread over one day from $1, as the daemon writes them.
_OLD_ROWS = """
INSERT INTO webhookd.{table} ({columns})
SELECT gen_random_uuid()::text, ('00000000-0000-4000-8000-' || lpad((i % 1000)::text, 12, '0'))::uuid,
       ('00000000-0000-4000-9000-' || lpad((i % 1000 / 2)::text, 12, '0'))::uuid, 'person.updated', 1,
       $1::timestamptz + make_interval(secs => i * 86000.0 / $2), 50 + random() * 300, '2xx', 200, NULL,
       'crm.events:' || i % 12 || ':' || 48000000 + i / 12
FROM generate_series(1, $2) AS i
"""
_OLD_COLUMNS = "event_id, webhook_id, workspace_id, event_name, attempt, at, duration_ms, result, status, error, source"


class _Clock:
    """The attempt log's clock: its minutes are the bench's."""

    def __init__(self) -> None:
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        self.start = self.now = midnight.timestamp()

    def __call__(self) -> float:
        return self.now


@dataclass
class _Db:
    """The admin connection (snapshots, VACUUM, CHECKPOINT), the writers' pools of one connection each, and what the
    writes of the way under way cost so far."""

    admin: asyncpg.Connection
    log_pool: asyncpg.Pool
    table_pool: asyncpg.Pool
    seconds: dict[bool, float] = field(default_factory=dict)  # by whether the retry table or the attempt log wrote
    wal: dict[bool, int] = field(default_factory=dict)
    retry_tables: list[str] = field(default_factory=list)  # the retry table and what its triggers write
    log: AttemptLog | None = None  # the retry path's attempt log, and how many attempts it holds
    buffered: int = 0
    vacuum_wal: int = 0
    settled: int = 0  # rows settled since the retry table's last VACUUM

    async def vacuum(self, tables: list[str]) -> None:
        wal = await self.admin.fetchval(_LSN)
        await self.admin.execute(f"VACUUM (ANALYZE) {', '.join(tables)}")
        self.vacuum_wal += await self.admin.fetchval(_LSN) - wal

    async def autovacuum(self, settled: int) -> None:
        """What autovacuum does to the churning retry table (off here, to keep its WAL apart): a VACUUM ANALYZE every
        `_VACUUM_EVERY` rows settled. Without it claims are planned without statistics and read every dead version."""
        self.settled += settled
        if self.settled >= _VACUUM_EVERY:
            self.settled = 0
            await self.vacuum(self.retry_tables)

    async def add(self, delivery: Delivery, attempt: int, result: AttemptResult) -> None:
        """An attempt of the retry path; its log is flushed every `_LOG_FLUSH` (a second's worth at 5,000/s)."""
        if self.log is None:
            self.log = AttemptLog(self.log_pool, RETENTION, "compact")  # the mode is moot: these are all full
        self.log.add(delivery, attempt, result)
        self.buffered += 1
        if self.buffered >= _LOG_FLUSH:
            await self.flush()

    async def flush(self) -> None:
        if self.log is not None:
            await self.timed(False, self.log.flush())
        self.buffered = 0

    async def timed(self, table: bool, write: Awaitable[T]) -> T:
        """Await one write; charge its time and WAL to the retry table or the attempt log."""
        before = await self.admin.fetchval(_LSN)
        started = time.perf_counter()
        result = await write
        self.seconds[table] += time.perf_counter() - started
        self.wal[table] += await self.admin.fetchval(_LSN) - before
        return result

    async def reset(self) -> dict[str, int]:
        """Empty the tables, start the WAL from a checkpoint; returns the snapshot to measure from."""
        await self.admin.execute(f"TRUNCATE {', '.join(_LOG_TABLES)}, webhookd.deliveries")
        await self.admin.execute("CHECKPOINT")
        self.seconds, self.wal, self.log, self.buffered = {False: 0.0, True: 0.0}, {False: 0, True: 0}, None, 0
        self.vacuum_wal = self.settled = 0
        return await self.snapshot()

    async def snapshot(self) -> dict[str, int]:
        # A backend reports its statistics before it says it is ready again, and pg_stat_force_next_flush() skips the
        # second it may otherwise wait: once these return, every write so far is counted.
        for pool in (self.log_pool, self.table_pool):
            await pool.execute("SELECT pg_stat_force_next_flush()")
        await self.admin.execute("SELECT pg_stat_force_next_flush()")
        # The writers' own full-page images: not the VACUUMs' (PostgreSQL 18 keeps WAL statistics per backend).
        pids = [await pool.fetchval("SELECT pg_backend_pid()") for pool in (self.log_pool, self.table_pool)]
        row = await self.admin.fetchrow(_SNAPSHOT, list(TABLES.values()), pids)
        assert row is not None
        return dict(row)

    async def cost(
        self, kind: str, way: str, before: dict[str, int], deliveries: int, attempts: int, batch: int
    ) -> Cost:
        after = await self.snapshot()
        await self.vacuum(_LOG_TABLES + self.retry_tables)
        if after["tables"] != before["tables"]:
            # Rewritten with only their live versions: what the retry table keeps once vacuum has reused the rest.
            await self.admin.execute(f"VACUUM FULL {', '.join(self.retry_tables)}")
        kept = await self.snapshot()
        counts = await self.admin.fetchval("SELECT count(*) FROM webhookd.attempt_counts")
        return Cost(
            kind, way, deliveries, attempts, batch, after["rows"] - before["rows"], after["log"] - before["log"],
            after["tables"] - before["tables"], kept["tables"] - before["tables"], self.wal[False], self.wal[True],
            self.vacuum_wal, after["fpi"] - before["fpi"], self.seconds[False], self.seconds[True], counts,
        )  # fmt: skip


async def _first_tries(db: _Db, traffic: Traffic, mode: AttemptLogForm, total: int) -> Cost:
    """`total` first-try successes, `FIRST_TRY_BATCH` a flush, each flush a second later on the log's clock."""
    before = await db.reset()
    clock = _Clock()
    log = AttemptLog(db.log_pool, RETENTION, mode, clock=clock)
    for second in range(total // FIRST_TRY_BATCH):
        clock.now = clock.start + second
        for delivery in traffic.deliveries(FIRST_TRY_BATCH, body=False):
            log.add(delivery, 1, traffic.success())
        await db.timed(False, log.flush())
    clock.now += 60
    await db.timed(False, log.flush(final=True))
    return await db.cost(mode, f"first try, {mode}", before, total, total, FIRST_TRY_BATCH)


async def _retry_path(db: _Db, traffic: Traffic, deliveries: int, attempts: int, batch: int) -> Cost:
    """`deliveries` deliveries whose first attempt fails, written, claimed and settled `batch` rows a statement:
    with 2 `attempts` the second succeeds, with more the last dead-letters them."""
    before = await db.reset()
    async with db.table_pool.acquire() as conn:
        for start in range(0, deliveries, batch):
            chunk = traffic.deliveries(min(batch, deliveries - start), body=True)
            rows = []
            for delivery in chunk:
                delivery.attempts = 1
                failed = traffic.failure()
                await db.add(delivery, 1, failed)
                rows.append(_row(delivery, "pending", 0.0, failed.status, clean_text(failed.describe())))
            await db.timed(True, _apply(conn, _INSERT_DELIVERY, rows))
            if attempts == 2:
                # The retry comes 5 s later: written, claimed and settled between the same two checkpoints.
                await _attempt(db, conn, traffic, 2, len(chunk), attempts)
        for attempt in range(2, attempts + 1) if attempts > 2 else ():
            if SCHEDULE[attempt - 2] >= CHECKPOINT_EVERY:
                await db.admin.execute("CHECKPOINT")
            await _attempt(db, conn, traffic, attempt, deliveries, attempts, batch)
        await db.flush()
    kind, way = (
        ("retried", "retried: a 5xx, then a 2xx") if attempts == 2 else ("dead", f"dead letter: {attempts} failures")
    )
    way += f", {batch:,} a statement" if batch > 1 else ", a statement each"
    return await db.cost(kind, way, before, deliveries, deliveries * attempts, batch)


async def _attempt(db: _Db, conn: Any, traffic: Traffic, attempt: int, rows: int, last: int, batch: int = 0) -> None:
    """Claim `rows` due rows, `batch` a claim (all at once if 0), and settle each with its `attempt`-th attempt.
    The rows settled come last in due order, so a round claims each row once."""
    while rows > 0:
        claimed = await db.timed(True, conn.fetch(_CLAIM_MANY, min(batch or rows, rows), _LEASE, [], []))
        assert claimed, "every row written is due"
        rows -= len(claimed)
        settled = []
        for row in claimed:
            webhook = traffic.by_id[row["webhook_id"]]
            delivery = Delivery(row["event_id"], row["event_name"], row["workspace_id"], webhook, bytes(row["body"]),
                                row["event_ms"], row["source"], attempt, row["id"])  # fmt: skip
            result = traffic.success() if attempt == 2 == last else traffic.failure()
            await db.add(delivery, attempt, result)
            status = "delivered" if result.ok else "dead" if attempt == last else "pending"
            error = None if result.ok else clean_text(result.describe())
            settled.append((row["id"], status, attempt, 0.0, result.status, error))
        await db.timed(True, _apply(conn, _UPDATE_DELIVERIES, settled))
        await db.autovacuum(len(settled))


async def _retention(db: _Db, rows: int) -> Retention:
    """A day's partition of `rows` rows dropped by the keeper, against `rows` rows of webhookd.attempts deleted as
    the previous release pruned, both older than the retention."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=20)
    partition = f"attempt_log_{day:%Y%m%d}"
    await db.admin.execute(
        f"CREATE TABLE webhookd.{partition} PARTITION OF webhookd.attempt_log "
        f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"
    )
    await db.admin.execute(_OLD_ROWS.format(table="attempt_log", columns=_OLD_COLUMNS), day, rows)
    await db.admin.execute(_OLD_ROWS.format(table="attempts", columns=_OLD_COLUMNS), day, rows)
    await db.admin.execute("VACUUM ANALYZE webhookd.attempts, webhookd.attempt_log")
    await db.admin.execute("CHECKPOINT")
    wal, started = await db.admin.fetchval(_LSN), time.perf_counter()
    _, dropped = await keep(db.admin, RETENTION)
    drop_ms, drop_wal = (time.perf_counter() - started) * 1000, await db.admin.fetchval(_LSN) - wal
    wal, started, statements = await db.admin.fetchval(_LSN), time.perf_counter(), 1
    while await db.admin.execute(_OLD_PRUNE, RETENTION) != "DELETE 0":
        statements += 1
    delete_ms, delete_wal = (time.perf_counter() - started) * 1000, await db.admin.fetchval(_LSN) - wal
    await db.admin.execute("SELECT pg_stat_force_next_flush()")
    dead = await db.admin.fetchval(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'webhookd.attempts'::regclass"
    )
    wal, started = await db.admin.fetchval(_LSN), time.perf_counter()
    await db.admin.execute("VACUUM webhookd.attempts")
    vacuum_ms, vacuum_wal = (time.perf_counter() - started) * 1000, await db.admin.fetchval(_LSN) - wal
    return Retention(rows, drop_ms, drop_wal, dropped, delete_ms, delete_wal, statements, dead, vacuum_ms, vacuum_wal)


@contextlib.asynccontextmanager
async def _database(workdir: Path) -> AsyncIterator[_Db]:
    postgres = await asyncio.to_thread(EmbeddedPostgres.start, workdir / "attempt-capacity", settings=SERVER)
    try:
        dsn = await create_database(postgres.dsn, "capacity")
        admin = await asyncpg.connect(dsn)
        try:
            await migrate(admin, TABLE, retention=RETENTION)
            async with (
                # Never closed for idling: the full-page images are read from each writer's own statistics.
                asyncpg.create_pool(dsn, min_size=1, max_size=1, max_inactive_connection_lifetime=0) as log_pool,
                asyncpg.create_pool(dsn, min_size=1, max_size=1, max_inactive_connection_lifetime=0) as table_pool,
            ):
                db = _Db(admin, log_pool, table_pool, retry_tables=["webhookd.deliveries"])
                if await admin.fetchval("SELECT to_regclass('webhookd.pending_count') IS NOT NULL"):
                    db.retry_tables.append("webhookd.pending_count")  # migration 0008's counter, kept by triggers
                yield db
        finally:
            await admin.close()
    finally:
        await asyncio.to_thread(postgres.stop)


async def attempt_capacity(
    workdir: Path, attempts: int = ATTEMPTS, progress: Callable[[str], None] = print
) -> Capacity:
    """Every way of logging, `attempts` attempts each (the one-row-a-statement runs excepted), and the retention."""
    traffic, costs = Traffic(), []
    async with _database(workdir) as db:
        names = ("data_checksums", "wal_compression", "full_page_writes", "shared_buffers", "synchronous_commit")
        settings = [f"{n} {await db.admin.fetchval(f'SHOW {n}')}" for n in names]
        server = f"PostgreSQL {await db.admin.fetchval('SHOW server_version')}, {', '.join(settings)}"
        migrations = [r["name"] for r in await db.admin.fetch("SELECT name FROM webhookd.schema_migrations ORDER BY 1")]
        for mode in ("full", "compact", "aggregate"):
            costs.append(await _first_tries(db, traffic, mode, attempts))
            progress(f"  .. {costs[-1].way}")
        for n, tries, batch in ((attempts // 2, 2, STATEMENT_BATCH), (ONE_BY_ONE, 2, 1)):
            costs.append(await _retry_path(db, traffic, n, tries, batch))
            progress(f"  .. {costs[-1].way}")
        last = len(SCHEDULE) + 1
        for n, batch in ((attempts // last, STATEMENT_BATCH), (ONE_BY_ONE, 1)):
            costs.append(await _retry_path(db, traffic, n, last, batch))
            progress(f"  .. {costs[-1].way}")
        retention = await _retention(db, attempts)
    return Capacity(costs, retention, migrations, server)
