"""The durable retry path: claims due deliveries from Postgres and feeds them back to the dispatcher.

Several replicas may share one database. A claim is a lease (`locked_until`) taken with FOR UPDATE SKIP LOCKED, so
two replicas never take the same row at once, and a replica killed mid-attempt loses its claims when they expire.

A backlog drains as fast as the receivers take it: while rows are due, the poller claims again as soon as retries
under way settle and free room, not after the poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import asyncpg
import structlog

from webhookd.delivery.dispatch import Dispatcher
from webhookd.durable.held_connection import HeldConnection
from webhookd.durable.outcomes import OutcomeWriter
from webhookd.durable.transient import TRANSIENT
from webhookd.endpoints.state import EndpointHealth
from webhookd.model import Delivery, Webhook
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.durable.retries")

# $1 the most rows to claim, $2 the lease in seconds, $3 our own claims still under way (whose lease may have run
# out), $4 webhook ids; `rows` selects the ids of the due rows to claim.
_CLAIM = """
UPDATE webhookd.deliveries d
SET locked_until = now() + make_interval(secs => $2), updated_at = now()
WHERE d.id IN ({rows})
RETURNING d.id, d.event_id, d.webhook_id::text AS webhook_id, d.workspace_id::text AS workspace_id,
          d.event_name, d.body, (extract(epoch FROM d.event_time) * 1000)::bigint AS event_ms, d.source, d.attempts,
          d.order_key, d.order_pos
"""
# A row of an ordered webhook is due only once no earlier row of its record (by its event's place in Kafka) is
# pending and none of its record's rows is claimed: a record's deliveries leave one at a time, in Kafka order, even
# when a record read again after a crash writes an earlier one behind later ones.
_DUE = """q.status = 'pending' AND q.next_attempt_at <= now() AND (q.locked_until IS NULL OR q.locked_until < now())
    AND NOT (q.id = ANY($3::bigint[]))
    AND (q.order_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM webhookd.deliveries e
        WHERE e.webhook_id = q.webhook_id AND e.order_key = q.order_key AND e.status = 'pending' AND e.id <> q.id
          AND ((e.order_pos, e.id) < (q.order_pos, q.id) OR e.locked_until >= now() OR e.id = ANY($3::bigint[]))
    ))"""
# The earliest due rows of every endpoint but those that take nothing now (circuit open, paused, host busy) or one
# delivery (a probe).
_CLAIM_MANY = _CLAIM.format(
    rows=f"""SELECT q.id FROM webhookd.deliveries q WHERE {_DUE} AND NOT (q.webhook_id = ANY($4::uuid[]))
    ORDER BY q.next_attempt_at LIMIT $1 FOR UPDATE OF q SKIP LOCKED"""
)
# The earliest due row of each endpoint whose half-open circuit takes one delivery, its probe: one query for all.
_CLAIM_PROBES = _CLAIM.format(
    rows=f"""SELECT probe.id FROM unnest($4::uuid[]) AS w (webhook_id) CROSS JOIN LATERAL (
        SELECT q.id FROM webhookd.deliveries q WHERE q.webhook_id = w.webhook_id AND {_DUE}
        ORDER BY q.next_attempt_at LIMIT 1 FOR UPDATE OF q SKIP LOCKED
    ) probe LIMIT $1"""
)
# Probes claimed in one poll at most; more wait for the next.
_PROBES_PER_POLL = 20
_RELEASE = "UPDATE webhookd.deliveries SET locked_until = NULL WHERE id = ANY($1::bigint[]) AND status = 'pending'"
_DEPTH = "SELECT count(*) FROM webhookd.deliveries WHERE status = 'pending'"
# The records whose earliest pending delivery still waits ('infinity') for one before it that is no longer pending:
# its wake-up (record._PROMOTE) was lost to a race with another process writing it, or the one before it left by a
# path that wakes nobody (an operator's command). Made due now.
_UNBLOCK = """
UPDATE webhookd.deliveries d SET next_attempt_at = now(), updated_at = now()
FROM (
    SELECT DISTINCT ON (webhook_id, order_key) id, next_attempt_at FROM webhookd.deliveries
    WHERE status = 'pending' AND order_key IS NOT NULL
    ORDER BY webhook_id, order_key, order_pos, id
) first
WHERE d.id = first.id AND first.next_attempt_at = 'infinity'
"""
# How often the poller looks for such records: a lost wake-up costs a record at most this long.
_UNBLOCK_SECONDS = 15.0
_UNSUBSCRIBED = "the webhook no longer exists or no longer subscribes to this event"


@dataclass(frozen=True)
class RetrySettings:
    """How often to look for due retries, how many may be under way at once (claimed, being sent or having their
    outcome written), and how long a claim lasts."""

    poll_interval: float
    max_in_flight: int
    lease_seconds: float


class RetryPoller:
    """Claims due deliveries while the dispatcher has room for them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        dispatcher: Dispatcher,
        index: SubscriptionIndex,
        health: EndpointHealth,
        outcomes: OutcomeWriter,
        metrics: Metrics,
        settings: RetrySettings,
    ) -> None:
        self._pool = pool
        self._conn = HeldConnection(pool)
        self._health = health
        self._dispatcher = dispatcher
        self._index = index
        self._outcomes = outcomes
        self._metrics = metrics
        self._settings = settings

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_depth = 0.0
        next_unblock = loop.time() + _UNBLOCK_SECONDS
        try:
            while True:
                room = self._room()
                more_due = False
                try:
                    if room > 0:
                        # A claim that took all it asked for suggests more rows are due than there was room for.
                        more_due = await self.claim(room) >= room
                    if loop.time() >= next_depth:
                        async with self._conn.use() as conn:
                            self._metrics.retry_queue_depth.set(await conn.fetchval(_DEPTH))
                        next_depth = loop.time() + 5.0
                    if loop.time() >= next_unblock:
                        async with self._conn.use() as conn:
                            await conn.execute(_UNBLOCK)
                        next_unblock = loop.time() + _UNBLOCK_SECONDS
                except (*TRANSIENT, asyncpg.PostgresError) as exc:
                    log.warning("retry_poll_failed", error=str(exc))
                if more_due or room <= 0:
                    await self._room_for_a_batch()
                elif self._dispatcher.ordered_retries_in_flight():
                    await self._successor_due()
                else:
                    # Nothing else is due now; rows fall due with time, not when a retry settles.
                    await asyncio.sleep(self._settings.poll_interval)
        finally:
            await self._conn.drop()

    def _room(self) -> int:
        return self._settings.max_in_flight - self._dispatcher.retries_in_flight

    async def _room_for_a_batch(self) -> None:
        """Wait until a batch's worth of retries has settled, or the poll interval has passed.

        Retries settle one by one, and a claim per settled retry would be a Postgres round trip, a scan past the rows
        under way and the hold lists built anew for every delivery. Waiting for a quarter of the room keeps claims
        to about four per `max_in_flight` deliveries, while three quarters of the room stay busy meanwhile: with
        `max_in_flight` above what may be sent at once, as the service sets it, still more than every slot takes.
        After the poll interval whatever room there is gets claimed, so slow retries never keep due rows waiting
        longer than they did before.
        """
        settled = self._dispatcher.retry_settled
        batch = max(1, self._settings.max_in_flight // 4)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.poll_interval):
                while True:
                    # Cleared before the room is read: a retry that settles after this sets it again.
                    settled.clear()
                    if self._room() >= batch:
                        return
                    await settled.wait()

    async def _successor_due(self) -> None:
        """Until a retry settles, or the poll interval has passed: the next delivery of a record kept in order falls
        due the moment the one before it settles, and waiting the poll interval for each would send such a record's
        backlog at one delivery a poll."""
        settled = self._dispatcher.retry_settled
        settled.clear()
        # Read after clearing: a retry that settles from now on sets it again.
        if self._dispatcher.ordered_retries_in_flight():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), self._settings.poll_interval)

    async def claim(self, limit: int) -> int:
        own = self._dispatcher.retry_rows()
        held, probing = self._health.retry_holds()
        skipped = held + self._dispatcher.busy_webhooks() + probing
        async with self._conn.use() as conn:
            rows = list(await conn.fetch(_CLAIM_MANY, limit, self._settings.lease_seconds, own, skipped))
            probes = min(_PROBES_PER_POLL, limit - len(rows))
            if probing and probes > 0:
                rows += await conn.fetch(_CLAIM_PROBES, probes, self._settings.lease_seconds, own, probing)
        unsubscribed = self._hand_over(rows)
        # One transaction for all of them: a deleted webhook can leave a whole backlog behind.
        await self._outcomes.dead_letters(unsubscribed, error=_UNSUBSCRIBED)
        return len(rows)

    def _hand_over(self, rows: list[asyncpg.Record]) -> list[tuple[int, int]]:
        """Submit each claimed row to the dispatcher; returns those to dead-letter, as (row id, attempts)."""
        unsubscribed: list[tuple[int, int]] = []
        for row in rows:
            webhook = self._index.get(row["webhook_id"])
            if webhook is None or not self._still_subscribed(webhook, row["workspace_id"], row["event_name"]):
                # The subscription was deleted, moved to another workspace (which must never see this event), or no
                # longer asks for this kind of event.
                self._metrics.deliveries_by_outcome["dead_lettered"].inc()
                log.info(
                    "delivery_dead_lettered",
                    event_id=row["event_id"],
                    webhook_id=row["webhook_id"],
                    workspace_id=row["workspace_id"],
                    reason="webhook deleted, moved or unsubscribed",
                )
                unsubscribed.append((row["id"], row["attempts"]))
                continue
            self._dispatcher.submit_retry(
                Delivery(
                    event_id=row["event_id"],
                    event_name=row["event_name"],
                    workspace_id=row["workspace_id"],
                    webhook=webhook,
                    body=bytes(row["body"]),
                    kafka_timestamp_ms=row["event_ms"],
                    source=row["source"],
                    attempts=row["attempts"],
                    row_id=row["id"],
                    order_key=row["order_key"],
                    order_pos=row["order_pos"],
                )
            )
        return unsubscribed

    def _still_subscribed(self, webhook: Webhook, workspace_id: str, event_name: str) -> bool:
        obj, _, action = event_name.partition(".")
        return webhook.workspace_id == workspace_id and any(
            w.id == webhook.id for w in self._index.match(workspace_id, obj, action)
        )

    async def release(self, row_ids: list[int]) -> None:
        """Give claims back at shutdown so another replica need not wait for the lease to expire."""
        if row_ids:
            await self._pool.execute(_RELEASE, row_ids)
