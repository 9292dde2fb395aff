"""The attempt log on a real Postgres: attempts are copied in batches, kept while Postgres is away, let go when
Postgres refuses them for good (the writer going on), and pruned after the retention period, the young ones left
alone."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import pytest

from tests.support import fetch, new_workspace
from webhookd.durable import attempts
from webhookd.durable.attempts import AttemptLog
from webhookd.durable.transient import TRANSIENT
from webhookd.model import AttemptResult, Delivery, Webhook

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


async def test_attempts_wait_in_memory_while_their_connection_is_lost_and_are_written_later(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    locker = await asyncpg.connect(dsn)
    try:
        log = AttemptLog(pool, retention_seconds=3600)
        log.add(_delivery("kept"), 1, AttemptResult("2xx", status=200))
        # The copy waits behind a lock, and its connection is cut there: what a Postgres restart does mid-write.
        async with locker.transaction():
            await locker.execute("LOCK TABLE webhookd.attempts IN ACCESS EXCLUSIVE MODE")
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
        await pool.execute("ALTER TABLE webhookd.attempts DROP COLUMN source")  # a column the COPY names
        log.add(_delivery("refused"), 1, AttemptResult("2xx", status=200))
        log.add(_delivery("refused"), 2, AttemptResult("2xx", status=200))

        async def failed() -> bool:
            assert not writer.done(), f"the writer stopped: {writer.exception()!r}"
            return any(event == "attempt_log_write_failed" for event, _ in recorded.events)

        await _until(failed, "the refused batch to be let go")
        await pool.execute("ALTER TABLE webhookd.attempts ADD COLUMN source text")
        log.add(_delivery("later"), 1, AttemptResult("2xx", status=200))

        async def written() -> bool:
            return bool(await pool.fetch("SELECT 1 FROM webhookd.attempts"))

        await _until(written, "the later attempt to be written")
        assert not writer.done()
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await pool.close()
    rows = await fetch(dsn, "SELECT event_id FROM webhookd.attempts")
    assert [r["event_id"] for r in rows] == ["later"]  # the refused batch is not written twice, nor later
    failure = next(keys for event, keys in recorded.events if event == "attempt_log_write_failed")
    assert failure["dropped"] == 2
    assert "source" in failure["error"]


async def test_a_value_asyncpg_cannot_encode_is_let_go_not_retried_forever(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        log = AttemptLog(pool, retention_seconds=3600)
        log.add(_delivery("huge"), 2**40, AttemptResult("2xx", status=200))  # beyond the integer column

        assert await log.flush() == 0
        log.add(_delivery("fine"), 1, AttemptResult("2xx", status=200))
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
