"""Upgrading a database whose attempt log is the single table of earlier releases (webhookd.attempts), while a
daemon of such a release keeps writing to it: `migrate` keeps every row, the older daemon's writes never fail,
every row stays readable beside the new tables, and the old table is emptied at once only once no older daemon
runs and all its rows are past the retention (it stays, so that a rollback still starts).

The older daemon is played by the statements that release runs against Postgres (its heartbeat, and its COPY of
attempts into webhookd.attempts), on a database built by its own migrations, 0001 to 0006.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.support import fetch, new_workspace, until
from webhookd.durable.attempts import AttemptLog
from webhookd.durable.migrate import _apply, _migration_files, _subscriptions_ddl, migrate
from webhookd.embedded import create_database
from webhookd.model import AttemptResult, Delivery, Webhook
from webhookd.operate.attempt_history import AttemptHistory, Filters
from webhookd.operate.replay_window import window_pairs

TABLE = '"core"."webhook"'
WEBHOOK = Webhook(
    id=str(uuid.uuid4()),
    workspace_id=new_workspace(),
    target_url="https://example.com/hook",
    operations=("*.*",),
    secret=b"s",
)
# What that release copied, in its column order.
_OLD_COLUMNS = (
    "event_id",
    "webhook_id",
    "workspace_id",
    "event_name",
    "attempt",
    "at",
    "duration_ms",
    "result",
    "status",
    "error",
    "source",
)
_OLD_BEAT = """
INSERT INTO webhookd.members AS m (member_id, seen_at) VALUES ($1, clock_timestamp())
ON CONFLICT (member_id) DO UPDATE SET seen_at = EXCLUDED.seen_at
"""
HISTORY = 100_000


@pytest.fixture
async def old_database(postgres_admin: str) -> AsyncIterator[str]:
    """A database as the release before day partitions migrated it, with a history of attempts."""
    name = f"upgrade_{uuid.uuid4().hex[:12]}"
    dsn = await create_database(postgres_admin, name)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            # What `migrate` of that release did: its migrations, then the subscriptions table.
            await _apply(conn, [(file, sql) for file, sql in _migration_files("") if file < "0007"])
            await conn.execute(_subscriptions_ddl(TABLE))
        await conn.execute(
            "INSERT INTO webhookd.attempts (event_id, webhook_id, workspace_id, event_name, attempt, at, duration_ms, "
            "result, status, source) SELECT 'past' || i, $1::uuid, $2::uuid, 'person.created', 1, "
            "now() - make_interval(secs => i), 3, '2xx', 200, 'crm:0:' || i FROM generate_series(1, $3) AS i",
            WEBHOOK.id,
            WEBHOOK.workspace_id,
            HISTORY,
        )
    finally:
        await conn.close()
    yield dsn
    admin = await asyncpg.connect(postgres_admin)
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class OlderDaemon:
    """The writes of a daemon of the earlier release: a heartbeat, and a batch of attempts every 20 ms."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.written = 0
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OlderDaemon:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def wrote(self, n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return self.written >= n

        return check

    async def _run(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            batch = 0
            while not self._stop.is_set():
                ids = (uuid.UUID(WEBHOOK.id), uuid.UUID(WEBHOOK.workspace_id))
                at = datetime.now(UTC)
                rows = [
                    (f"live{batch}-{i}", *ids, "person.updated", 1, at, 2.0, "2xx", 200, None, f"crm:1:{batch}{i}")
                    for i in range(10)
                ]
                try:
                    await conn.execute(_OLD_BEAT, "older/1")
                    await conn.copy_records_to_table(
                        "attempts", schema_name="webhookd", columns=_OLD_COLUMNS, records=rows
                    )
                    self.written += len(rows)
                except (asyncpg.PostgresError, OSError) as exc:
                    self.errors.append(exc)
                batch += 1
                await asyncio.sleep(0.02)
        finally:
            await conn.close()


async def test_upgrading_keeps_every_row_while_an_older_daemon_writes_and_reads_both_logs(old_database: str) -> None:
    dsn = old_database
    async with OlderDaemon(dsn) as older:
        await until(older.wrote(200), 10, "the older daemon's first writes")
        conn = await asyncpg.connect(dsn)
        try:
            applied = await migrate(conn, TABLE)
        finally:
            await conn.close()
        assert applied[0] == "0007_attempts_by_day.sql"
        assert "attempt_log/0001_by_day.sql" in applied
        written_at_upgrade = older.written
        await until(older.wrote(written_at_upgrade + 200), 10, "the older daemon's writes after the upgrade")
        # A new daemon beside it: it writes the new tables, and leaves the old one, which the older daemon needs.
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            log = AttemptLog(pool, retention_seconds=14 * 86400, mode="compact")
            delivery = Delivery("new-first", "person.created", WEBHOOK.workspace_id, WEBHOOK, b"{}", None, "crm:2:7")
            log.add(delivery, 1, AttemptResult("2xx", status=200))
            log.add(
                Delivery("new-failed", "person.created", WEBHOOK.workspace_id, WEBHOOK, b"{}", None, "crm:2:8"),
                1,
                AttemptResult("5xx", status=503),
            )
            assert await log.flush() == 2
            await log.keeper.maintain()
            assert (await fetch(dsn, "SELECT to_regclass('webhookd.attempts') IS NOT NULL AS kept"))[0]["kept"]
        finally:
            await pool.close()
    assert older.errors == []
    total = (await fetch(dsn, "SELECT count(*) AS n FROM webhookd.attempts"))[0]["n"]
    assert total == HISTORY + older.written, "every row written before, during and after the upgrade is there"

    conn = await asyncpg.connect(dsn)
    try:
        history = AttemptHistory(conn, conn, TABLE)
        assert {f["event_id"] for f in await history.first_tries_of_event("past77")} == {"past77"}
        assert [a["result"] for a in await history.attempts_of("new-failed", WEBHOOK.id)] == ["5xx"]
        newest = await history.first_tries(Filters(webhook=WEBHOOK.id), 5000)
        assert "new-first" in {f["event_id"] for f in newest}
        assert any(f["event_id"].startswith("live") for f in newest), "the older daemon's rows are listed too"
        now = datetime.now(UTC)
        pairs = await window_pairs(history, WEBHOOK.id, now - timedelta(seconds=30), now, None)
        assert {"new-first", "past5"} <= {p.event_id for p in pairs}
    finally:
        await conn.close()


async def test_the_old_table_is_emptied_only_once_no_older_daemon_runs_and_its_rows_are_past_the_retention(
    old_database: str,
) -> None:
    dsn = old_database
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_OLD_BEAT, "older/1")
        await migrate(conn, TABLE)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)

    async def old_rows() -> int:
        return int((await fetch(dsn, "SELECT count(*) AS n FROM webhookd.attempts"))[0]["n"])

    try:
        log = AttemptLog(pool, retention_seconds=14 * 86400)
        await fetch(dsn, "UPDATE webhookd.attempts SET at = at - interval '15 days'")
        await log.keeper.maintain()
        assert await old_rows() == HISTORY, "an older daemon is still a member: it writes the old table"
        await fetch(dsn, "DELETE FROM webhookd.members")
        await fetch(dsn, "UPDATE webhookd.attempts SET at = now() WHERE event_id = 'past1'")
        await log.keeper.maintain()
        assert await old_rows() == HISTORY, "a row of it is still within the retention"
        await fetch(dsn, "UPDATE webhookd.attempts SET at = now() - interval '15 days' WHERE event_id = 'past1'")
        await log.keeper.maintain()
        # Emptied, not dropped: a daemon of the earlier release still finds its table, so a rollback still starts.
        assert await old_rows() == 0
    finally:
        await pool.close()
