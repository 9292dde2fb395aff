"""The attempt log on a real Postgres: attempts are copied in batches, kept while Postgres is away, and pruned
after the retention period, the young ones left alone."""

from __future__ import annotations

import asyncpg

from tests.support import fetch, new_workspace
from webhookd.attempts import AttemptLog
from webhookd.deliver import AttemptResult, Delivery
from webhookd.subscriptions import Webhook

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
        log = AttemptLog(pool, retention_seconds=3600)
        log.add(_delivery("a"), 1, AttemptResult("5xx", status=503, error="down\x00for maintenance", duration=0.25))
        log.add(_delivery("a"), 2, AttemptResult("2xx", status=200, duration=0.01))
        log.add(_delivery("b"), 1, AttemptResult("timeout", error="x" * 5000, duration=10))
        assert await log.flush() == 3
        assert await log.flush() == 0
    finally:
        await pool.close()
    rows = await fetch(dsn, "SELECT * FROM webhookd.attempts ORDER BY event_id, attempt")
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


async def test_attempts_wait_in_memory_while_postgres_refuses_and_are_written_later(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        log = AttemptLog(pool, retention_seconds=3600)
        log.add(_delivery("kept"), 1, AttemptResult("2xx", status=200))
        async with pool.acquire() as conn:
            await conn.execute("ALTER TABLE webhookd.attempts RENAME TO attempts_away")
        try:
            try:
                await log.flush()
            except asyncpg.UndefinedTableError:
                pass
            else:
                raise AssertionError("the copy should have failed")
        finally:
            async with pool.acquire() as conn:
                await conn.execute("ALTER TABLE webhookd.attempts_away RENAME TO attempts")
        assert await log.flush() == 1
    finally:
        await pool.close()


async def test_pruning_removes_attempts_older_than_the_retention_only(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO webhookd.attempts (event_id, webhook_id, workspace_id, event_name, attempt, at, "
            "duration_ms, result) SELECT 'old' || i, $1::uuid, $2::uuid, 'x.y', 1, now() - interval '15 days', 1, "
            "'2xx' FROM generate_series(1, 25000) AS i",
            WEBHOOK.id,
            WEBHOOK.workspace_id,
        )
        await conn.execute(
            "INSERT INTO webhookd.attempts (event_id, webhook_id, workspace_id, event_name, attempt, at, "
            "duration_ms, result) VALUES ('young', $1::uuid, $2::uuid, 'x.y', 1, now() - interval '13 days', 1, "
            "'2xx')",
            WEBHOOK.id,
            WEBHOOK.workspace_id,
        )
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        removed = await AttemptLog(pool, retention_seconds=14 * 86400).prune()
    finally:
        await pool.close()
    assert removed == 25000
    rows = await fetch(dsn, "SELECT event_id FROM webhookd.attempts")
    assert [r["event_id"] for r in rows] == ["young"]
