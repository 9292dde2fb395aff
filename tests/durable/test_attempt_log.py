"""The attempt log on a real Postgres: attempts are copied in batches, to the table of their form (full, compact or
counted, by endpoints.attempt_log, failures always in full), kept while Postgres is away, let go when Postgres
refuses them for good (the writer going on), and dropped a day at a time after the retention, young ones left alone
and no row deleted one by one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.support import fetch, new_workspace
from webhookd.durable import attempts
from webhookd.durable.attempt_partitions import form_stats, partition_day
from webhookd.durable.attempts import AttemptLog
from webhookd.durable.transient import TRANSIENT
from webhookd.model import AttemptResult, Delivery, Event, Webhook

WEBHOOK = Webhook(
    id="00000000-0000-4000-8000-000000000001",
    workspace_id=new_workspace(),
    target_url="https://example.com/hook",
    operations=("*.*",),
    secret=b"s",
)


def _delivery(event_id: str) -> Delivery:
    return Delivery(event_id, "person.created", WEBHOOK.workspace_id, WEBHOOK, b"{}", None, "t:0:1")


async def test_attempts_are_copied_in_one_batch_with_their_number_result_and_excerpt(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        log = AttemptLog(pool, retention_seconds=3600, mode="full")
        log.add(_delivery("a"), 1, AttemptResult("5xx", status=503, error="down\x00for maintenance", duration=0.25))
        log.add(_delivery("a"), 2, AttemptResult("2xx", status=200, duration=0.01))
        log.add(_delivery("b"), 1, AttemptResult("timeout", error="x" * 5000, duration=10))
        assert await log.flush() == 3
        assert await log.flush() == 0
    finally:
        await pool.close()
    rows = await fetch(dsn, "SELECT * FROM webhookd.attempt_log ORDER BY event_id, attempt")
    assert [(r["event_id"], r["attempt"], r["result"], r["status"]) for r in rows] == [
        ("a", 1, "5xx", 503),
        ("a", 2, "2xx", 200),
        ("b", 1, "timeout", None),
    ]
    assert rows[0]["error"] == "HTTP 503: down\ufffdfor maintenance"
    assert rows[0]["duration_ms"] == 250
    assert rows[1]["error"] is None
    assert len(rows[2]["error"]) == 300
    assert str(rows[0]["webhook_id"]) == WEBHOOK.id
    assert rows[0]["event_name"] == "person.created"


async def test_attempts_wait_in_memory_while_their_connection_is_lost_and_are_written_later(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    locker = await asyncpg.connect(dsn)
    try:
        log = AttemptLog(pool, retention_seconds=3600)
        log.add(_delivery("kept"), 1, AttemptResult("2xx", status=200))
        # The copy waits behind a lock, and its connection is cut there: what a Postgres restart does mid-write.
        async with locker.transaction():
            await locker.execute("LOCK TABLE webhookd.first_tries IN ACCESS EXCLUSIVE MODE")
            copying = asyncio.create_task(log.flush())

            async def waiting() -> bool:
                pids = await locker.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                return bool(pids)

            await _until(waiting, "the copy to wait for the lock")
            with pytest.raises(TRANSIENT):
                await copying
        assert await log.flush() == 1
    finally:
        await locker.close()
        await pool.close()


class _Recorded:
    """Stands in for the module's logger: keeps each event with its keys."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _keep(self, event: str, **keys: Any) -> None:
        self.events.append((event, keys))

    info = warning = error = _keep


async def _until(condition: Any, what: str) -> None:
    for _ in range(100):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_batch_postgres_refuses_for_good_is_let_go_and_the_writer_goes_on(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = _Recorded()
    monkeypatch.setattr(attempts, "log", recorded)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    log = AttemptLog(pool, retention_seconds=3600, flush_interval=0.05)
    writer = asyncio.create_task(log.run())
    try:
        await pool.execute("ALTER TABLE webhookd.attempt_log DROP COLUMN source")  # a column the COPY names
        log.add(_delivery("refused"), 1, AttemptResult("5xx", status=500))
        log.add(_delivery("refused"), 2, AttemptResult("2xx", status=200))

        async def failed() -> bool:
            assert not writer.done(), f"the writer stopped: {writer.exception()!r}"
            return any(event == "attempt_log_write_failed" for event, _ in recorded.events)

        await _until(failed, "the refused batch to be let go")
        await pool.execute("ALTER TABLE webhookd.attempt_log ADD COLUMN source text")
        log.add(_delivery("later"), 1, AttemptResult("5xx", status=500))

        async def written() -> bool:
            return bool(await pool.fetch("SELECT 1 FROM webhookd.attempt_log"))

        await _until(written, "the later attempt to be written")
        assert not writer.done()
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await pool.close()
    rows = await fetch(dsn, "SELECT event_id FROM webhookd.attempt_log")
    assert [r["event_id"] for r in rows] == ["later"]  # the refused batch is not written twice, nor later
    failure = next(keys for event, keys in recorded.events if event == "attempt_log_write_failed")
    assert failure["dropped"] == 2
    assert "source" in failure["error"]


async def test_a_value_asyncpg_cannot_encode_is_let_go_not_retried_forever(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        log = AttemptLog(pool, retention_seconds=3600)
        log.add(_delivery("huge"), 2**40, AttemptResult("5xx", status=500))  # beyond the integer column

        assert await log.flush() == 0
        log.add(_delivery("fine"), 1, AttemptResult("2xx", status=200))
        assert await log.flush() == 1
    finally:
        await pool.close()


async def test_first_tries_take_the_form_of_the_mode_and_failures_stay_in_full(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        for mode in ("compact", "aggregate"):
            log = AttemptLog(pool, retention_seconds=3600, mode=mode)
            log.add(_delivery(f"{mode}-first"), 1, AttemptResult("2xx", status=204, duration=0.02))
            log.add(_delivery(f"{mode}-first-2"), 1, AttemptResult("2xx", status=200, duration=0.04))
            log.add(_delivery(f"{mode}-failed"), 1, AttemptResult("timeout", error="no answer", duration=10))
            retried = replace(_delivery(f"{mode}-retried"), row_id=7)
            log.add(retried, 1, AttemptResult("2xx", status=200))  # a deferred delivery's first try has a row
            kept = Event(
                f"{mode}-kept", "person.updated", WEBHOOK.workspace_id, "2026-12-01T00:00:00.000Z", b"{}", None
            )
            log.add_filtered(kept, WEBHOOK.id, "t:0:2", "why")
            await log.close(timeout=5)
    finally:
        await pool.close()
    full = await fetch(dsn, "SELECT event_id, result, row_id FROM webhookd.attempt_log ORDER BY event_id")
    assert [(r["event_id"], r["result"], r["row_id"]) for r in full] == [
        ("aggregate-failed", "timeout", None),
        ("aggregate-retried", "2xx", 7),
        ("compact-failed", "timeout", None),
        ("compact-kept", "filtered", None),
        ("compact-retried", "2xx", 7),
    ]
    compact = await fetch(dsn, "SELECT * FROM webhookd.first_tries ORDER BY event_id")
    assert [(r["event_id"], str(r["webhook_id"]), r["source"], r["status"]) for r in compact] == [
        ("compact-first", WEBHOOK.id, "t:0:1", 204),
        ("compact-first-2", WEBHOOK.id, "t:0:1", 200),
    ]
    assert compact[0]["duration_ms"] == pytest.approx(20)
    counts = await fetch(dsn, "SELECT * FROM webhookd.attempt_counts ORDER BY result")
    assert [(r["result"], r["attempts"]) for r in counts] == [("2xx", 2), ("filtered", 1)]
    assert counts[0]["duration_ms"] == pytest.approx(60)
    assert counts[0]["max_duration_ms"] == pytest.approx(40)
    assert counts[0]["minute"].second == 0


async def _partition_of_day(conn: asyncpg.Connection, table: str, day: datetime) -> None:
    start = day.replace(hour=0, minute=0, second=0, microsecond=0)
    await conn.execute(
        f"CREATE TABLE webhookd.{table}_{start:%Y%m%d} PARTITION OF webhookd.{table} "
        f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')"
    )


async def test_retention_drops_whole_days_past_it_and_deletes_no_row(dsn: str) -> None:
    now = datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        for table in ("attempt_log", "first_tries"):
            for age in (20, 16, 13):
                await _partition_of_day(conn, table, now - timedelta(days=age))
        await conn.execute(
            "INSERT INTO webhookd.attempt_log (event_id, webhook_id, workspace_id, event_name, attempt, at, "
            "duration_ms, result) SELECT 'old' || i, $1::uuid, $2::uuid, 'x.y', 1, "
            "now() - make_interval(days => 16 + i % 5 / 4 * 4), 1, '2xx' FROM generate_series(1, 25000) AS i",
            WEBHOOK.id,
            WEBHOOK.workspace_id,
        )
        await conn.execute(
            "INSERT INTO webhookd.attempt_log (event_id, webhook_id, workspace_id, event_name, attempt, at, "
            "duration_ms, result) VALUES ('young', $1::uuid, $2::uuid, 'x.y', 1, now() - interval '13 days', 1, "
            "'2xx')",
            WEBHOOK.id,
            WEBHOOK.workspace_id,
        )
        await conn.execute(
            "INSERT INTO webhookd.first_tries (event_id, webhook_id, source, at, duration_ms, status) "
            "SELECT 'old' || i, $1::uuid, 't:0:1', now() - interval '16 days', 1, 200 FROM generate_series(1, 1000) i",
            WEBHOOK.id,
        )
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        log = AttemptLog(pool, retention_seconds=14 * 86400)
        await log.keeper.maintain()
        stats = await form_stats(pool)
    finally:
        await pool.close()
    rows = await fetch(dsn, "SELECT event_id FROM webhookd.attempt_log")
    assert [r["event_id"] for r in rows] == ["young"]
    assert not await fetch(dsn, "SELECT 1 FROM webhookd.first_tries")
    # Gone with their partitions: no row was deleted, so none is left for the vacuum.
    deleted = await fetch(
        dsn,
        "SELECT coalesce(sum(n_tup_del), 0) AS n FROM pg_stat_user_tables "
        "WHERE schemaname = 'webhookd' AND (relname LIKE 'attempt_log%' OR relname LIKE 'first_tries%')",
    )
    assert deleted[0]["n"] == 0
    days = await fetch(
        dsn,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'webhookd.attempt_log'::regclass ORDER BY 1",
    )
    kept = [r["relname"] for r in days]
    assert kept[0] == f"attempt_log_{now - timedelta(days=13):%Y%m%d}"
    # And the coming days are there before their first attempt.
    assert f"attempt_log_{now + timedelta(days=2):%Y%m%d}" in kept
    assert stats["full"].oldest_day == partition_day(kept[0])
    assert stats["full"].partitions == len(kept)


async def test_a_day_without_its_partition_gets_one_at_its_first_write(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        today = datetime.now(UTC)
        await conn.execute(f"DROP TABLE webhookd.attempt_log_{today:%Y%m%d}")
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        log = AttemptLog(pool, retention_seconds=3600)
        log.add(_delivery("today"), 1, AttemptResult("5xx", status=500))
        assert await log.flush() == 1
    finally:
        await pool.close()
    assert [r["event_id"] for r in await fetch(dsn, "SELECT event_id FROM webhookd.attempt_log")] == ["today"]


async def test_a_minutes_counts_are_written_once_the_minute_is_over_and_the_rest_at_close(dsn: str) -> None:
    now = [time.time() // 60 * 60]
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        log = AttemptLog(pool, retention_seconds=3600, mode="aggregate", clock=lambda: now[0])
        log.add(_delivery("a"), 1, AttemptResult("2xx", status=200, duration=0.01))
        log.add(_delivery("b"), 1, AttemptResult("2xx", status=200, duration=0.03))
        assert await log.flush() == 0, "the minute is not over"
        now[0] += 60
        log.add(_delivery("c"), 1, AttemptResult("2xx", status=200, duration=0.02))
        assert await log.flush() == 1
        assert await log.flush() == 0
        await log.close(timeout=5)
    finally:
        await pool.close()
    rows = await fetch(dsn, "SELECT minute, attempts, max_duration_ms FROM webhookd.attempt_counts ORDER BY minute")
    assert [r["attempts"] for r in rows] == [2, 1]
    assert (rows[1]["minute"] - rows[0]["minute"]).total_seconds() == 60
    assert rows[0]["max_duration_ms"] == pytest.approx(30)
