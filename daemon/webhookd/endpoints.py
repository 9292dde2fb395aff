"""The endpoint book: endpoint health shared through `webhookd.endpoints`, between replicas and with operators.

Every sync (a few seconds apart) writes what this process learned (attempt counts, last success and failure, the
start of a failing streak, new disables, circuit and pause state) in one transaction, disables the endpoints that
have failed without a success for too long, and reads back the rows that changed: an operator's enable, disable or
rate limit, and other replicas' disables. Disabling an endpoint dead-letters its pending deliveries, which stay
listable and can be replayed once it is enabled again.
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

from webhookd.health import Changes, EndpointHealth
from webhookd.pgerrors import TRANSIENT
from webhookd.record import clean_text

log = structlog.get_logger("webhookd.endpoints")

# The operator commands hold a plain connection, the daemon one from its pool.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

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
_WRITE_STATE = """
INSERT INTO webhookd.endpoints AS e (webhook_id, circuit_open_until, rate_limited_until)
VALUES ($1::uuid, to_timestamp($2), to_timestamp($3))
ON CONFLICT (webhook_id) DO UPDATE SET
    circuit_open_until = EXCLUDED.circuit_open_until, rate_limited_until = EXCLUDED.rate_limited_until,
    updated_at = now()
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
# What an open circuit or a pause deferred, and the retries waiting out their backoff, go at the next poll.
_RESUME_PENDING = """
UPDATE webhookd.deliveries SET next_attempt_at = now(), updated_at = now()
WHERE webhook_id = ANY($1::uuid[]) AND status = 'pending' AND next_attempt_at > now()
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
_ALL = """
SELECT webhook_id::text AS webhook_id, disabled_reason, disabled_at IS NOT NULL AS disabled, rate_limit_per_second,
       extract(epoch FROM enabled_at)::float8 AS enabled_at, updated_at
FROM webhookd.endpoints
"""
# A transaction that began before the last read commits rows with an older updated_at: read a margin back. Reading
# a row again is harmless; its values are the current ones.
_CHANGED_SINCE = _ALL + "WHERE updated_at >= $1::timestamptz - interval '30 seconds'"


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
    """Syncs `EndpointHealth` with Postgres every `interval` seconds."""

    def __init__(self, pool: asyncpg.Pool, health: EndpointHealth, interval: float, disable_after: float) -> None:
        self._pool = pool
        self._health = health
        self._interval = interval
        self._disable_after = disable_after
        self._read_from: datetime | None = None

    async def load(self) -> None:
        """Read every endpoint row once, so disables and limits hold from the first delivery."""
        await self._refresh()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sync()
            except TRANSIENT as exc:
                log.warning("endpoint_sync_retrying", error=str(exc) or type(exc).__name__)

    async def sync(self) -> None:
        changes = self._health.take_changes()
        try:
            await self._write(changes)
        except BaseException:
            self._health.restore(changes)
            raise
        if self._disable_after > 0:
            await self._disable_failing()
        await self._refresh()

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
                await conn.executemany(
                    _WRITE_STATE, [(webhook_id, *state) for webhook_id, state in sorted(changes.states.items())]
                )
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
            if self._read_from is None or row["updated_at"] > self._read_from:
                self._read_from = row["updated_at"]


def display_url(url: str) -> str:
    """The URL as operators may see it: scheme, host and port; credentials, path and query can hold tokens."""
    with contextlib.suppress(ValueError):
        parsed = URL(url)
        if parsed.host:
            return str(parsed.with_user(None).with_path("").with_query(None).with_fragment(None)).rstrip("/") + "/…"
    return "(unreadable URL)"
