"""The endpoint book: endpoint health shared through `webhookd.endpoints`, between replicas and with operators.

Every sync (a few seconds apart) writes what this process learned (attempt counts, last success and failure, the
start of a failing streak, new disables, circuit and pause state) in one transaction, disables the endpoints that
have failed without a success for too long, and reads back the rows that changed: an operator's enable, disable or
rate limit, and other replicas' disables. Disabling an endpoint dead-letters its pending deliveries, which stay
listable and can be replayed once it is enabled again.

Pauses cannot wait for the next sync: when a receiver's `Retry-After` pauses an endpoint, the health wakes the book,
which writes the pause at once and, in the same transaction, NOTIFYs every process on `PAUSE_CHANNEL` with the
webhook id and the seconds left. Every process LISTENs on a connection of its own (`follow_pauses`) and applies the
pause to the webhook's endpoint as the notification arrives, a few milliseconds later; after each (re)connect it
reads the pauses in force, and every sync reads them too, so a notification missed meanwhile costs at most a sync
interval. Times cross processes only as time left, added to Postgres's own clock, so that no wall clock is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy
from yarl import URL

from webhookd.durable.listening import Listening
from webhookd.durable.outcomes import clean_text
from webhookd.durable.transient import TRANSIENT
from webhookd.endpoints.changes import Changes
from webhookd.endpoints.state import EndpointHealth
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.runtime.tls import PostgresConnect

log = structlog.get_logger("webhookd.endpoints.sync")

# The operator commands hold a plain connection, the daemon one from its pool.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

# Notifications of pauses: '<webhook id> <seconds left>'.
PAUSE_CHANNEL = "webhookd_endpoint_pauses"

# Failures merge across replicas: the streak starts at the earliest failure after the latest success (or enable).
_WRITE_DELTA = """
INSERT INTO webhookd.endpoints AS e
    (webhook_id, target_url, last_success_at, last_failure_at, failing_since, consecutive_failures,
     attempts_total, failures_total, last_status, last_error)
VALUES ($1::uuid, $2, to_timestamp($3), to_timestamp($4), to_timestamp($5), $6, $7, $8, $9, $10)
ON CONFLICT (webhook_id) DO UPDATE SET
    target_url = EXCLUDED.target_url,
    last_success_at = greatest(e.last_success_at, EXCLUDED.last_success_at),
    last_failure_at = greatest(e.last_failure_at, EXCLUDED.last_failure_at),
    failing_since = (
        SELECT min(t) FROM (VALUES (e.failing_since), (EXCLUDED.failing_since)) AS v (t)
        WHERE t > coalesce(greatest(e.last_success_at, EXCLUDED.last_success_at, e.enabled_at), '-infinity')
    ),
    consecutive_failures = CASE WHEN $11 THEN EXCLUDED.consecutive_failures
                                ELSE e.consecutive_failures + EXCLUDED.consecutive_failures END,
    attempts_total = e.attempts_total + EXCLUDED.attempts_total,
    failures_total = e.failures_total + EXCLUDED.failures_total,
    last_status = EXCLUDED.last_status,
    last_error = EXCLUDED.last_error,
    updated_at = now()
"""
# States are given as seconds left (NULL: none), measured from Postgres's clock.
_WRITE_STATE = """
INSERT INTO webhookd.endpoints AS e (webhook_id, circuit_open_until, rate_limited_until)
VALUES ($1::uuid, clock_timestamp() + make_interval(secs => $2), clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (webhook_id) DO UPDATE SET
    circuit_open_until = EXCLUDED.circuit_open_until, rate_limited_until = EXCLUDED.rate_limited_until,
    updated_at = now()
"""
# Delivered when the transaction commits, so a pause is announced only once it is written.
_ANNOUNCE = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS p (payload)"
_PAUSED_FOR = "extract(epoch FROM e.rate_limited_until - clock_timestamp())::float8 AS paused_for"
_PAUSES_IN_FORCE = f"""
SELECT e.webhook_id::text AS webhook_id, {_PAUSED_FOR} FROM webhookd.endpoints e
WHERE e.rate_limited_until > clock_timestamp()
"""
# An operator's enable after the moment the disable was decided wins: a 410 seen before it must not undo it.
_DISABLE = """
INSERT INTO webhookd.endpoints AS e (webhook_id, disabled_at, disabled_reason)
SELECT id, now(), $2 FROM unnest($1::uuid[]) AS ids (id)
ON CONFLICT (webhook_id) DO UPDATE SET
    disabled_at = coalesce(e.disabled_at, now()), disabled_reason = coalesce(e.disabled_reason, $2), updated_at = now()
WHERE e.enabled_at IS NULL OR e.enabled_at < to_timestamp($3)
RETURNING webhook_id
"""
# Claimed rows are left to their attempt, which finds the endpoint disabled and dead-letters them itself.
_DEAD_LETTER_PENDING = """
UPDATE webhookd.deliveries
SET status = 'dead', last_error = $2, updated_at = now()
WHERE webhook_id = ANY($1::uuid[]) AND status = 'pending' AND (locked_until IS NULL OR locked_until < now())
"""
_ENABLE = """
INSERT INTO webhookd.endpoints AS e (webhook_id, enabled_at)
SELECT id, now() FROM unnest($1::uuid[]) AS ids (id)
ON CONFLICT (webhook_id) DO UPDATE SET
    disabled_at = NULL, disabled_reason = NULL, enabled_at = now(), failing_since = NULL, consecutive_failures = 0,
    circuit_open_until = NULL, rate_limited_until = NULL, updated_at = now()
"""
# What an open circuit or a pause deferred, and the retries waiting out their backoff, go at the next poll; an
# ordered record's rows waiting ('infinity') for the one before them keep waiting for it.
_RESUME_PENDING = """
UPDATE webhookd.deliveries SET next_attempt_at = now(), updated_at = now()
WHERE webhook_id = ANY($1::uuid[]) AND status = 'pending' AND next_attempt_at > now() AND next_attempt_at < 'infinity'
"""
_SET_RATE = """
INSERT INTO webhookd.endpoints AS e (webhook_id, rate_limit_per_second) VALUES ($1::uuid, $2)
ON CONFLICT (webhook_id) DO UPDATE SET rate_limit_per_second = EXCLUDED.rate_limit_per_second, updated_at = now()
"""
# Failing for the whole period: a single failure followed by days without traffic is not enough.
_FAILING_TOO_LONG = """
SELECT webhook_id::text AS webhook_id, failing_since FROM webhookd.endpoints
WHERE disabled_at IS NULL AND last_failure_at - failing_since >= make_interval(secs => $1)
"""
_ALL = f"""
SELECT e.webhook_id::text AS webhook_id, e.disabled_reason, e.disabled_at IS NOT NULL AS disabled,
       e.rate_limit_per_second, extract(epoch FROM e.enabled_at)::float8 AS enabled_at, e.updated_at, {_PAUSED_FOR}
FROM webhookd.endpoints e
"""
# A transaction that began before the last read commits rows with an older updated_at: read a margin back. Reading
# a row again is harmless; its values are the current ones.
_CHANGED_SINCE = _ALL + "WHERE e.updated_at >= $1::timestamptz - interval '30 seconds'"


async def disable(conn: Connection, webhook_ids: Sequence[str], reason: str, decided_at: float | None = None) -> None:
    """Disable webhooks and dead-letter their pending deliveries (already disabled ones keep their first reason).

    `decided_at` (epoch seconds, default now) is when the disable was decided; a webhook enabled after it stays
    enabled.
    """
    when = time.time() if decided_at is None else decided_at
    async with conn.transaction():
        rows = await conn.fetch(_DISABLE, sorted(webhook_ids), clean_text(reason), when)
        disabled = sorted(str(r["webhook_id"]) for r in rows)
        if disabled:
            await conn.execute(_DEAD_LETTER_PENDING, disabled, clean_text(f"endpoint disabled: {reason}"))


async def enable(conn: Connection, webhook_ids: Sequence[str]) -> None:
    """Enable webhooks: their failing streak starts afresh and what waits for them is due now (the operator has
    looked at the receiver). Dead letters stay dead until replayed."""
    ids = sorted(webhook_ids)
    async with conn.transaction():
        await conn.execute(_ENABLE, ids)
        await conn.execute(_RESUME_PENDING, ids)


async def set_rate_limit(conn: Connection, webhook_id: str, rate: float | None) -> None:
    """Set a webhook's own deliveries-per-second limit; None returns it to the configured default."""
    await conn.execute(_SET_RATE, webhook_id, rate)


class EndpointBook:
    """Syncs `EndpointHealth` with Postgres every `interval` seconds, and at once when it has a pause to announce.

    `postgres` connects the pause listener; `index` gives the URL of a webhook this process has not sent to yet, so
    that an announced pause holds its endpoint from its first delivery here.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        health: EndpointHealth,
        interval: float,
        disable_after: float,
        postgres: PostgresConnect,
        index: SubscriptionIndex | None = None,
    ) -> None:
        self._pool = pool
        self._health = health
        self._interval = interval
        self._disable_after = disable_after
        self._index = index
        self._read_from: datetime | None = None
        self._listening = Listening(
            postgres, PAUSE_CHANNEL, self._on_pause, self._read_pauses, self._keep_alive, "pause_listener_lost"
        )

    @property
    def listening(self) -> bool:
        return self._listening.listening

    async def load(self) -> None:
        """Read every endpoint row once, so disables and limits hold from the first delivery."""
        await self._refresh()

    async def run(self) -> None:
        """Sync every interval; between syncs, publish at once whatever the health marks urgent."""
        loop = asyncio.get_running_loop()
        urgent = self._health.urgent
        due = loop.time() + self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(urgent.wait(), max(due - loop.time(), 0.0))
            urgent.clear()
            try:
                if loop.time() >= due:
                    due = loop.time() + self._interval
                    await self.sync()
                else:
                    await self.publish()
            except TRANSIENT as exc:
                log.warning("endpoint_sync_retrying", error=str(exc) or type(exc).__name__)

    async def sync(self) -> None:
        await self.publish()
        if self._disable_after > 0:
            await self._disable_failing()
        await self._refresh()

    async def publish(self) -> None:
        """Write what this process learned since the last write, announcing the pauses among it."""
        changes = self._health.take_changes()
        try:
            await self._write(changes)
        except BaseException:
            self._health.restore(changes)
            raise

    async def _write(self, changes: Changes) -> None:
        if not (changes.deltas or changes.disables or changes.states):
            return
        async with self._pool.acquire() as conn, conn.transaction():
            if changes.deltas:
                await conn.executemany(
                    _WRITE_DELTA,
                    [
                        (
                            webhook_id,
                            display_url(d.url),
                            d.last_success,
                            d.last_failure,
                            d.failing_since,
                            d.consecutive,
                            d.attempts,
                            d.failures,
                            d.last_status,
                            clean_text(d.last_error),
                            d.saw_success,
                        )
                        # In id order, as every replica does, so that two syncs never wait on each other's rows.
                        for webhook_id, d in sorted(changes.deltas.items())
                    ],
                )
            if changes.states:
                states = [
                    (webhook_id, changes.seconds_left(open_until), changes.seconds_left(paused_until))
                    for webhook_id, (open_until, paused_until) in sorted(changes.states.items())
                ]
                await conn.executemany(_WRITE_STATE, states)
                pauses = [f"{webhook_id} {left:.3f}" for webhook_id, _, left in states if left]
                if pauses:
                    await conn.execute(_ANNOUNCE, PAUSE_CHANNEL, pauses)
            for webhook_id, (reason, decided_at) in sorted(changes.disables.items()):
                await disable(conn, [webhook_id], reason, decided_at)

    async def _disable_failing(self) -> None:
        async with self._pool.acquire() as conn:
            for row in await conn.fetch(_FAILING_TOO_LONG, self._disable_after):
                reason = f"no successful delivery since {row['failing_since'].isoformat(timespec='seconds')}"
                await disable(conn, [row["webhook_id"]], reason)
                self._health.apply_disabled(row["webhook_id"], reason)

    async def _refresh(self) -> None:
        if self._read_from is None:
            rows = await self._pool.fetch(_ALL)
        else:
            rows = await self._pool.fetch(_CHANGED_SINCE, self._read_from)
        for row in rows:
            self._health.apply_disabled(
                row["webhook_id"],
                (row["disabled_reason"] or "disabled") if row["disabled"] else None,
                row["enabled_at"],
            )
            self._health.apply_rate(row["webhook_id"], row["rate_limit_per_second"])
            self._apply_pause(row["webhook_id"], row["paused_for"])
            if self._read_from is None or row["updated_at"] > self._read_from:
                self._read_from = row["updated_at"]

    def _apply_pause(self, webhook_id: str, paused_for: float | None) -> None:
        if paused_for is not None and paused_for > 0:
            webhook = self._index.get(webhook_id) if self._index is not None else None
            self._health.apply_pause(webhook_id, paused_for, webhook.target_url if webhook else None)

    async def follow_pauses(self) -> None:
        """Apply the pauses other processes announce, until cancelled; reconnects on its own, and reads the pauses in
        force after every (re)connect, for those announced while it was away."""
        await self._listening.run()

    async def _read_pauses(self, conn: asyncpg.Connection) -> None:
        for row in await conn.fetch(_PAUSES_IN_FORCE):
            self._apply_pause(row["webhook_id"], row["paused_for"])

    async def _keep_alive(self, conn: asyncpg.Connection) -> None:
        while True:
            # A connection lost without a word shows only when used; meanwhile the syncs read the pauses.
            await asyncio.sleep(self._interval)
            await conn.fetchval("SELECT 1", timeout=5)

    def _on_pause(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        webhook_id, _, seconds = str(payload).partition(" ")
        try:
            paused_for = float(seconds)
        except ValueError:
            log.warning("pause_notification_unreadable", payload=str(payload)[:100])
            return
        self._apply_pause(webhook_id, paused_for)


def display_url(url: str) -> str:
    """The URL as operators may see it: scheme, host and port; credentials, path and query can hold tokens."""
    with contextlib.suppress(ValueError):
        parsed = URL(url)
        if parsed.host:
            return str(parsed.with_user(None).with_path("").with_query(None).with_fragment(None)).rstrip("/") + "/…"
    return "(unreadable URL)"
