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
from webhookd.routing.subscriptions import SubscriptionStore
from webhookd.runtime.tls import PostgresConnect

REFRESH_SECONDS = 0.3


class CountingStore(SubscriptionStore):
    """The daemon's store, counting its full reloads."""

    reloads = 0

    async def reload(self) -> None:
        self.reloads += 1
        await super().reload()


@contextlib.asynccontextmanager
async def following(dsn: str, refresh_seconds: float) -> AsyncIterator[CountingStore]:
    """The store, loaded and following the table as the daemon's does."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    store = CountingStore(PostgresConnect(dsn), pool, "core.webhook", refresh_seconds=refresh_seconds)
    task = asyncio.create_task(store.run())
    try:
        await asyncio.wait_for(store.loaded.wait(), 10)
        yield store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[CountingStore]:
    async with following(dsn, REFRESH_SECONDS) as store:
        yield store


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check` holds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what} did not happen within {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def unannounced(dsn: str, *statements: tuple[str, str, str]) -> None:
    """Run `(sql, value, id)` updates on the subscriptions table with its triggers off, as logical replication applies
    rows (it fires no ordinary trigger), so that no notification announces them."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():  # the table's owner may do this; other sessions see only the result
            await conn.execute("ALTER TABLE core.webhook DISABLE TRIGGER USER")
            for sql, value, webhook_id in statements:
                await conn.execute(sql, value, webhook_id)
            await conn.execute("ALTER TABLE core.webhook ENABLE TRIGGER USER")
    finally:
        await conn.close()


SET_URL = 'UPDATE core.webhook SET "targetUrl" = $1 WHERE id = $2::uuid'
SOFT_DELETE = 'UPDATE core.webhook SET "deletedAt" = $1::text::timestamptz WHERE id = $2::uuid'


def urls(store: CountingStore, ws: str) -> list[str]:
    return sorted(w.target_url for w in store.index.match(ws, "person", "created"))


async def test_a_quiet_table_is_checked_without_being_loaded_again(dsn: str, store: CountingStore) -> None:
    before = store.reloads
    webhook_id = await add_webhook(dsn, new_workspace(), "https://example.com/hook", ["*.*"])
    await eventually(lambda: store.index.get(webhook_id) is not None, 5, "the notified insert")
    # A notified change leaves the index ahead of its last reload's fingerprint: the next check reloads, once.
    await eventually(lambda: store.reloads == before + 1, 5, "the reload after a notified change")
    await asyncio.sleep(5 * REFRESH_SECONDS)
    assert store.reloads == before + 1, "an unchanged table was loaded again"


async def test_a_change_made_without_notification_takes_effect_at_the_next_check(
    dsn: str, store: CountingStore
) -> None:
    ws = new_workspace()
    moved = await add_webhook(dsn, ws, "https://example.com/old", ["*.*"])
    deleted = await add_webhook(dsn, ws, "https://example.com/gone", ["*.*"])
    await eventually(lambda: len(urls(store, ws)) == 2, 5, "the notified inserts")

    await unannounced(dsn, (SET_URL, "https://example.com/new", moved), (SOFT_DELETE, "2026-01-01", deleted))

    took = await eventually(lambda: urls(store, ws) == ["https://example.com/new"], 3 * REFRESH_SECONDS + 2,
                            "the unannounced change")  # fmt: skip
    print(f"\nan unannounced change reached the index after {took:.2f}s (checked every {REFRESH_SECONDS}s)")


async def test_a_table_returned_unannounced_to_its_last_loaded_state_is_loaded_again(dsn: str) -> None:
    ws = new_workspace()
    # Checked only when the test says, so that the revert lands between two checks.
    async with following(dsn, refresh_seconds=3600) as store:
        webhook_id = await add_webhook(dsn, ws, "https://example.com/a", ["*.*"])
        await eventually(lambda: urls(store, ws) == ["https://example.com/a"], 5, "the notified insert")
        await store.refresh()  # a full reload: its fingerprint is the table's with "a"
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SET_URL, "https://example.com/b", webhook_id)  # announced
        finally:
            await conn.close()
        await eventually(lambda: urls(store, ws) == ["https://example.com/b"], 5, "the notified change")

        await unannounced(dsn, (SET_URL, "https://example.com/a", webhook_id))  # back, as the last reload saw it
        await store.refresh()

        assert urls(store, ws) == ["https://example.com/a"], "the check took the index for the table it last loaded"
