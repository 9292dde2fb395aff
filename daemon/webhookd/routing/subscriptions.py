"""The subscriptions table followed into a `SubscriptionIndex`: loaded whole, then kept current until closed.

Changes arrive through LISTEN/NOTIFY (a trigger that `migrate` installs) and are read back by id, or in one full
reload when a burst names too many rows. A full reload follows every reconnect, for what a lost connection missed,
and a periodic check of the table's hash catches what no trigger announced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from webhookd.durable.listening import Listening
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.routing.subscription_rows import webhook_from_row
from webhookd.runtime.tls import PostgresConnect

NOTIFY_CHANNEL = "webhookd_subscriptions"
# Past this many changed rows at once, one full reload is cheaper than reading them one by one.
_BULK_CHANGE_THRESHOLD = 500
# Notifications are gathered for this long so that a burst of row changes is read in one query.
_DEBOUNCE_SECONDS = 0.05

log = structlog.get_logger("webhookd.routing.subscriptions")

# Rows indexed between two yields to the event loop during a full reload: about a few milliseconds of work.
_ROWS_PER_SLICE = 500
_PRUNE_PREVIOUS_SECRETS = "DELETE FROM webhookd.previous_secrets WHERE replaced_at < now() - make_interval(secs => $1)"


class SubscriptionStore:
    """Loads the table into a SubscriptionIndex and follows its changes until closed."""

    def __init__(
        self,
        postgres: PostgresConnect,
        pool: asyncpg.Pool,
        table: str,
        refresh_seconds: float,
        rotation_overlap: float = 0.0,
        on_count: Callable[[int], object] = lambda _: None,
    ) -> None:
        self.index = SubscriptionIndex()
        self._pool = pool
        self._select = (
            'SELECT w.id::text AS id, w."workspaceId"::text AS "workspaceId", w."targetUrl", w.operations, '
            "w.secret, p.secret AS previous_secret, "
            "extract(epoch FROM p.replaced_at)::float8 + $1 AS previous_until, o.options::text AS options "
            f"FROM {table} w LEFT JOIN webhookd.previous_secrets p "
            "ON p.webhook_id = w.id AND p.replaced_at > now() - make_interval(secs => $1) "
            "LEFT JOIN webhookd.webhook_options o ON o.webhook_id = w.id "
            'WHERE w."deletedAt" IS NULL'
        )
        # One number per table state, so that the periodic safety net costs Postgres one scan instead of costing this
        # process a rebuild of every webhook: the rows' text hashed and summed, with their count.
        self._fingerprint_sql = (
            "SELECT count(*) AS n, coalesce(sum(hashtextextended(s::text, 0)), 0)::text AS digest "
            f"FROM ({self._select}) s"
        )
        self._loaded_fingerprint: tuple[int, str] | None = None
        self._overlap = rotation_overlap
        self._refresh_seconds = refresh_seconds
        self._on_count = on_count
        self._changed: set[str] = set()
        self._wake = asyncio.Event()
        self.loaded = asyncio.Event()
        # The daemon waits for the first load before it consumes: a table that is missing or not Twenty's shape must
        # end that wait with the cause, not leave it to time out.
        self._listening = Listening(
            postgres,
            NOTIFY_CHANNEL,
            self._on_notify,
            self._reload_on,
            self._follow,
            "subscriptions_listener_lost",
            strict_first_catch_up=True,
        )

    @property
    def listening(self) -> bool:
        return self._listening.listening

    async def _prune(self) -> None:
        # Old secrets are kept only as long as they may still sign; past that they are just a liability. Once per
        # period is enough: the rows read never include an expired one.
        await self._pool.execute(_PRUNE_PREVIOUS_SECRETS, self._overlap)

    async def _fingerprint(self, conn: PoolConnectionProxy[asyncpg.Record]) -> tuple[int, str]:
        row = await conn.fetchrow(self._fingerprint_sql, self._overlap)
        assert row is not None  # an aggregate without GROUP BY always returns one row
        return int(row["n"]), str(row["digest"])

    async def reload(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            # One snapshot for both, so that the fingerprint describes exactly the rows indexed.
            fingerprint = await self._fingerprint(conn)
            rows = await conn.fetch(self._select, self._overlap)
        fresh = SubscriptionIndex()
        for n, row in enumerate(rows, 1):
            webhook = webhook_from_row(row)
            if webhook is not None:
                fresh.put(webhook)
            if n % _ROWS_PER_SLICE == 0:
                # A large table takes a second or more to index; deliveries go on meanwhile, in between slices.
                await asyncio.sleep(0)
        self.index.adopt(fresh)
        self._loaded_fingerprint = fingerprint
        self.loaded.set()
        self._on_count(len(self.index))
        log.debug("subscriptions_reloaded", count=len(self.index))

    async def refresh(self) -> None:
        """The safety net for changes no notification announced: a full reload if the table differs from the index.

        A period in which notifications changed the index ends in one reload; a quiet table costs only the check.
        """
        await self._prune()
        async with self._pool.acquire() as conn:
            fingerprint = await self._fingerprint(conn)
        if fingerprint != self._loaded_fingerprint:
            await self.reload()

    async def _apply_changes(self, ids: list[str]) -> None:
        rows = await self._pool.fetch(self._select + " AND w.id = ANY($2::uuid[])", self._overlap, ids)
        live = {row["id"]: row for row in rows}
        for webhook_id in ids:
            row = live.get(webhook_id)
            webhook = webhook_from_row(row) if row is not None else None
            if webhook is None:
                self.index.remove(webhook_id)
            else:
                self.index.put(webhook)
        # The index no longer matches the fingerprint of its last reload, and the table may yet return to that state
        # through a change no one announces (a row restored, say): only a reload may vouch for the index again.
        self._loaded_fingerprint = None
        self._on_count(len(self.index))

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._changed.add(str(payload))
        self._wake.set()

    async def run(self) -> None:
        """Follow changes forever: reconnects on its own, reloading in full after every reconnect.

        Raises what failed the first load unless it is transient (a missing table, a missing column): retrying it
        would only hide the cause.
        """
        await self._listening.run()

    async def _reload_on(self, _conn: asyncpg.Connection) -> None:
        await self.reload()

    async def _follow(self, conn: asyncpg.Connection) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self._refresh_seconds
        while not conn.is_closed():
            with contextlib.suppress(TimeoutError):
                # Wake at least every second to notice a dead connection, which asyncpg reports only when used.
                await asyncio.wait_for(self._wake.wait(), timeout=min(1.0, self._refresh_seconds))
            if self._wake.is_set():
                await asyncio.sleep(_DEBOUNCE_SECONDS)
                self._wake.clear()
                changed, self._changed = list(self._changed), set()
                if len(changed) > _BULK_CHANGE_THRESHOLD:
                    await self.reload()
                elif changed:
                    await self._apply_changes(changed)
            if loop.time() >= next_check:
                await self.refresh()
                next_check = loop.time() + self._refresh_seconds
            else:
                await conn.fetchval("SELECT 1", timeout=5)
