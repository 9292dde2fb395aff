"""The periodic safety net behind LISTEN/NOTIFY: a change that no notification announced (triggers off, as logical
replication applies rows) still reaches the index within one `subscriptions_refresh_seconds`, and a quiet table is
only checked, not loaded again in full."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from tests.support import add_webhook, new_workspace
from webhookd.subscriptions import SubscriptionStore
from webhookd.tls import PostgresConnect

REFRESH_SECONDS = 0.3


class CountingStore(SubscriptionStore):
    """The daemon's store, counting its full reloads."""

    reloads = 0

    async def reload(self) -> None:
        self.reloads += 1
        await super().reload()


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[CountingStore]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    store = CountingStore(PostgresConnect(dsn), pool, "core.webhook", refresh_seconds=REFRESH_SECONDS)
    following = asyncio.create_task(store.run())
    try:
        await asyncio.wait_for(store.loaded.wait(), 10)
        yield store
    finally:
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await pool.close()


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check` holds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what} did not happen within {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_quiet_table_is_checked_without_being_loaded_again(dsn: str, store: CountingStore) -> None:
    webhook_id = await add_webhook(dsn, new_workspace(), "https://example.com/hook", ["*.*"])
    await eventually(lambda: store.index.get(webhook_id) is not None, 5, "the notified insert")
    # The insert left the index ahead of its fingerprint: the first check after it reloads once, then all is quiet.
    await asyncio.sleep(2 * REFRESH_SECONDS)
    settled = store.reloads
    await asyncio.sleep(5 * REFRESH_SECONDS)
    assert store.reloads == settled, "an unchanged table was loaded again"


async def test_a_change_made_without_notification_takes_effect_at_the_next_check(
    dsn: str, store: CountingStore
) -> None:
    ws = new_workspace()
    moved = await add_webhook(dsn, ws, "https://example.com/old", ["*.*"])
    deleted = await add_webhook(dsn, ws, "https://example.com/gone", ["*.*"])
    await eventually(lambda: len(store.index.match(ws, "person", "created")) == 2, 5, "the notified inserts")
    conn = await asyncpg.connect(dsn)
    try:
        # Replica mode skips ordinary triggers, the notifying one included, as logical replication does.
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                'UPDATE core.webhook SET "targetUrl" = $1 WHERE id = $2::uuid', "https://example.com/new", moved
            )
            await conn.execute('UPDATE core.webhook SET "deletedAt" = now() WHERE id = $1::uuid', deleted)
    finally:
        await conn.close()

    def applied() -> bool:
        return [w.target_url for w in store.index.match(ws, "person", "created")] == ["https://example.com/new"]

    took = await eventually(applied, 3 * REFRESH_SECONDS + 2, "the unannounced change")
    print(f"\nan unannounced change reached the index after {took:.2f}s (checked every {REFRESH_SECONDS}s)")
