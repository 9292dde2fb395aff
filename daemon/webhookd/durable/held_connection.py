"""One pool connection that a long-running task keeps between its queries (the retry poller, the outcome writer)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from webhookd.durable.transient import TRANSIENT


class HeldConnection:
    """A pool connection that one long-running task keeps between its queries, until a query fails or the task ends.

    Taken from the pool and given back around every query, a connection costs the pool's reset, a round trip, each
    time; on an event loop busy with deliveries a round trip is a turn of the loop, which the retry path would pay
    twice per claim and twice per batch of outcomes.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """The connection for a query or a transaction; given back if it fails, so the next use gets another."""
        if self._conn is None:
            self._conn = await self._pool.acquire()
        try:
            yield self._conn
        except BaseException:
            await self.drop()
            raise

    async def drop(self) -> None:
        """Give the connection back to the pool, which replaces it if it broke; at the latest when the task ends."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*TRANSIENT, asyncpg.PostgresError):
                await self._pool.release(conn)
