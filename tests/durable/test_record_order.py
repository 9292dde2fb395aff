"""Per-record order in the retry table, on the real Postgres: the retry path claims a record's deliveries one at a
time, earliest Kafka offset first (also when a record read again after a crash writes an earlier one last); the ones
written behind wait without being scanned and are woken as the one before settles, and a lost wake-up is made good.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from webhookd.durable.outcomes import OutcomeWriter
from webhookd.durable.retries import _CLAIM_MANY
from webhookd.durable.retry_upkeep import _NO_RECORD, _SWEEP_SLICE, _UNBLOCK_SLICE
from webhookd.model import Delivery, Webhook

WORKSPACE = str(uuid.uuid4())
HOOK = Webhook(str(uuid.uuid4()), WORKSPACE, "https://receiver.example/hook", ("*.*",), b"secret")
KEY = "opportunity:deal-a"


@dataclass
class Table:
    pool: asyncpg.Pool
    outcomes: OutcomeWriter

    async def claim(self) -> list[str]:
        """The event ids the retry path would claim now (and claims them)."""
        rows = await self.pool.fetch(_CLAIM_MANY, 100, 30.0, [], [])
        return sorted(r["event_id"] for r in rows)

    async def settle(self, event_id: str, status: str = "delivered") -> None:
        row_id = await self.pool.fetchval("SELECT id FROM webhookd.deliveries WHERE event_id = $1", event_id)
        await self.outcomes.update(row_id, status=status, attempts=1, retry_in=0.0, last_status=200, error=None)

    async def due(self) -> dict[str, bool]:
        rows = await self.pool.fetch("SELECT event_id, isfinite(next_attempt_at) AS due FROM webhookd.deliveries")
        return {r["event_id"]: r["due"] for r in rows}


@pytest.fixture
async def table(dsn: str) -> AsyncIterator[Table]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    outcomes = OutcomeWriter(pool)
    task = outcomes.start()
    try:
        yield Table(pool, outcomes)
    finally:
        await outcomes.close(timeout=5)
        task.cancel()
        await pool.close()


def _delivery(event_id: str, offset: int, key: str = KEY) -> Delivery:
    return Delivery(
        event_id=event_id,
        event_name="opportunity.updated",
        workspace_id=WORKSPACE,
        webhook=HOOK,
        body=b"{}",
        kafka_timestamp_ms=None,
        source=f"crm:0:{offset}",
        order_key=key,
        order_pos=offset,
    )


async def test_deliveries_written_behind_wait_unscanned_and_go_one_by_one_as_each_settles(table: Table) -> None:
    # The first update failed (due in no time); the two after it were written behind it.
    await table.outcomes.schedule(_delivery("u1", 11), status="pending", retry_in=0.0, last_status=500, error="x")
    await table.outcomes.behind(_delivery("u2", 12), error="waiting")
    await table.outcomes.behind(_delivery("u3", 13), error="waiting")
    await table.outcomes.behind(_delivery("other", 14, key="opportunity:deal-b"), error="waiting")
    assert await table.due() == {"u1": True, "u2": False, "u3": False, "other": True}
    assert await table.claim() == ["other", "u1"]
    assert await table.claim() == []  # u1 is claimed: nothing else of its record may go
    await table.settle("u1")
    assert await table.claim() == ["u2"]
    await table.settle("u2", status="dead")  # given up: the next one goes on
    assert await table.claim() == ["u3"]


async def test_a_record_read_again_after_a_crash_goes_before_its_later_deliveries_already_waiting(table: Table) -> None:
    # Before the crash: u1 (offset 10) was delivered, u2 failed, u3 waits behind it; the offsets were not committed.
    await table.outcomes.schedule(_delivery("u2", 11), status="pending", retry_in=0.0, last_status=500, error="x")
    await table.outcomes.behind(_delivery("u3", 12), error="waiting")
    # After the restart u1 is read again: its record has pending deliveries, so it is written behind them, but it
    # comes first in Kafka, and goes first.
    await table.outcomes.behind(_delivery("u1", 10), error="waiting")
    assert await table.claim() == ["u1"]
    await table.settle("u1")
    assert await table.claim() == ["u2"]
    await table.settle("u2")
    assert await table.claim() == ["u3"]


async def test_no_delivery_of_a_record_is_claimed_while_an_earlier_written_one_is_being_attempted(table: Table) -> None:
    await table.outcomes.schedule(_delivery("u2", 11), status="pending", retry_in=0.0, last_status=500, error="x")
    assert await table.claim() == ["u2"]
    # Written while u2 is being attempted (a record read again after a rebalance): it waits for u2's outcome.
    await table.outcomes.behind(_delivery("u1", 10), error="waiting")
    assert await table.claim() == []
    await table.settle("u2")
    assert await table.claim() == ["u1"]


async def test_a_lost_wake_up_is_made_good_by_the_periodic_unblock(table: Table) -> None:
    await table.outcomes.schedule(_delivery("u1", 11), status="pending", retry_in=0.0, last_status=500, error="x")
    await table.outcomes.behind(_delivery("u2", 12), error="waiting")
    # u1 leaves by a path that wakes nobody (an operator's command, or a race with the write of u2).
    await table.pool.execute("UPDATE webhookd.deliveries SET status = 'delivered' WHERE event_id = 'u1'")
    assert await table.claim() == []
    await table.pool.execute(_UNBLOCK_SLICE, *_NO_RECORD, _SWEEP_SLICE)  # the poller's slice, from the start
    assert await table.claim() == ["u2"]
