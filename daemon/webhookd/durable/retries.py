"""The durable retry path: claims due deliveries from Postgres and feeds them back to the dispatcher.

Several replicas may share one database. A claim is a lease (`locked_until`) taken with FOR UPDATE SKIP LOCKED, so
two replicas never take the same row at once, and a replica killed mid-attempt loses its claims when they expire.

A backlog drains as fast as the receivers take it: while rows are due, the poller claims again as soon as retries
under way settle and free room, not after the poll interval. Between claims it has the table looked after
(`retry_upkeep`).
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
from webhookd.durable.retry_upkeep import PRUNE_SECONDS, UNBLOCK_SECONDS, RetryTableUpkeep
from webhookd.durable.transient import TRANSIENT
from webhookd.endpoints.state import EndpointHealth
from webhookd.model import Delivery, Webhook
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.durable.retries")

# $1 the most rows to claim, $2 the lease in seconds, $3 our own claims still under way (whose lease may have run
# out), $4 webhook ids; `rows` selects the ids of the due rows to claim, an array so that the rows are then found by
# the primary key whatever the planner thinks of the batch's size. Only locked_until changes, which no index holds: a
# claim is a HOT update, and updated_at stays the time of the row's last change an operator would see.
_CLAIM = """
UPDATE webhookd.deliveries d
SET locked_until = now() + make_interval(secs => $2)
WHERE d.id = ANY(ARRAY({rows}))
RETURNING d.id, d.event_id, d.webhook_id::text AS webhook_id, d.workspace_id::text AS workspace_id,
          d.event_name, d.body, (extract(epoch FROM d.event_time) * 1000)::bigint AS event_ms, d.source, d.attempts,
          d.order_key, d.order_pos
"""


# A row of an ordered webhook is due only once no earlier row of its record (by its event's place in Kafka) is
# pending and none of its record's rows is claimed: a record's deliveries leave one at a time, in Kafka order, even
# when a record read again after a crash writes an earlier one behind later ones. A claimed row was due when claimed
# and waits for nothing ('infinity'), so the claimed rows are looked for among the record's rows that are not waiting
# (deliveries_in_order_active), never in the queue behind them.
def _due(q: str) -> str:
    return f"""{q}.status = 'pending' AND {q}.next_attempt_at <= now()
    AND ({q}.locked_until IS NULL OR {q}.locked_until < now()) AND NOT ({q}.id = ANY($3::bigint[]))
    AND ({q}.order_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM webhookd.deliveries e
        WHERE e.webhook_id = {q}.webhook_id AND e.order_key = {q}.order_key AND e.status = 'pending'
          AND (e.order_pos, e.id) < ({q}.order_pos, {q}.id)
    ) AND NOT EXISTS (
        SELECT 1 FROM webhookd.deliveries e
        WHERE e.webhook_id = {q}.webhook_id AND e.order_key = {q}.order_key AND e.status = 'pending'
          AND e.next_attempt_at < 'infinity' AND e.id <> {q}.id
          AND (e.locked_until >= now() OR e.id = ANY($3::bigint[]))
    ))"""


def _one_webhook(q: str, of: str) -> str:
    """`q.webhook_id = of.webhook_id` as a range, which only deliveries_due_by_webhook serves in webhook order: the
    statistics of a table where one endpoint has a million rows see no other, and with an equality the planner would
    as soon walk deliveries_due for an endpoint's few rows as jump to them."""
    return f"{q}.webhook_id >= {of}.webhook_id AND {q}.webhook_id <= {of}.webhook_id"


# The earliest due rows of every endpoint, in one walk of deliveries_due: what claims use while no endpoint is left
# out, the walk passing only rows claimed elsewhere.
_CLAIM_MANY = _CLAIM.format(
    rows=f"""SELECT q.id FROM webhookd.deliveries q WHERE {_due("q")} AND NOT (q.webhook_id = ANY($4::uuid[]))
    ORDER BY q.next_attempt_at LIMIT $1 FOR UPDATE OF q SKIP LOCKED"""
)
# The same rows with endpoints left out ($4: circuit open, paused, host busy, probing): a walk in due order would pass
# every row of theirs, a million for an endpoint down an hour. Instead each other endpoint with pending rows, found by
# jumping from one to the next in deliveries_due_by_webhook, offers its earliest due rows, and the earliest of those
# are claimed; the row locked is checked again as claims check it, since it may have changed since it was read.
_CLAIM_AROUND = _CLAIM.format(
    rows=f"""WITH RECURSIVE hooks (webhook_id) AS (
        (SELECT h.webhook_id FROM webhookd.deliveries h WHERE h.status = 'pending'
         ORDER BY h.webhook_id, h.next_attempt_at LIMIT 1)
        UNION ALL
        SELECT (SELECT h.webhook_id FROM webhookd.deliveries h WHERE h.status = 'pending'
                AND h.webhook_id > hooks.webhook_id ORDER BY h.webhook_id, h.next_attempt_at LIMIT 1)
        FROM hooks WHERE hooks.webhook_id IS NOT NULL
    )
    SELECT q.id FROM hooks CROSS JOIN LATERAL (
        SELECT c.id, c.next_attempt_at FROM webhookd.deliveries c WHERE {_one_webhook("c", "hooks")} AND {_due("c")}
        ORDER BY c.webhook_id, c.next_attempt_at LIMIT $1
    ) offered
    JOIN webhookd.deliveries q ON q.id = offered.id
    WHERE hooks.webhook_id IS NOT NULL AND NOT (hooks.webhook_id = ANY($4::uuid[])) AND {_due("q")}
    ORDER BY offered.next_attempt_at LIMIT $1 FOR UPDATE OF q SKIP LOCKED"""
)
# The earliest due row of each endpoint whose half-open circuit takes one delivery, its probe: one query for all.
_CLAIM_PROBES = _CLAIM.format(
    rows=f"""SELECT probe.id FROM unnest($4::uuid[]) AS w (webhook_id) CROSS JOIN LATERAL (
        SELECT q.id FROM webhookd.deliveries q WHERE {_one_webhook("q", "w")} AND {_due("q")}
        ORDER BY q.webhook_id, q.next_attempt_at LIMIT 1 FOR UPDATE OF q SKIP LOCKED
    ) probe LIMIT $1"""
)
# Probes claimed in one poll at most; more wait for the next.
_PROBES_PER_POLL = 20
_RELEASE = "UPDATE webhookd.deliveries SET locked_until = NULL WHERE id = ANY($1::bigint[]) AND status = 'pending'"
_UNSUBSCRIBED = "the webhook no longer exists or no longer subscribes to this event"


@dataclass(frozen=True)
class RetrySettings:
    """How often to look for due retries, how many may be under way at once (claimed, being sent or having their
    outcome written), how long a claim lasts, and how long delivered rows are kept (None: for ever)."""

    poll_interval: float
    max_in_flight: int
    lease_seconds: float
    delivered_retention_seconds: float | None = None


class RetryPoller:
    """Claims due deliveries while the dispatcher has room for them, and looks after the table meanwhile."""

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
        self.upkeep = RetryTableUpkeep(self._conn, metrics, settings.delivered_retention_seconds)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # When each chore is next due, on the loop's clock; one that failed is tried again at the next poll.
        upkeep = self.upkeep
        due = {"sample": 0.0, "sweep": loop.time() + UNBLOCK_SECONDS, "prune": loop.time() + PRUNE_SECONDS}
        chores = {"sample": upkeep.sample, "sweep": upkeep.sweep, "prune": upkeep.prune}
        try:
            while True:
                room = self._room()
                more_due = False
                try:
                    if room > 0:
                        # A claim that took all it asked for suggests more rows are due than there was room for.
                        more_due = await self.claim(room) >= room
                except (*TRANSIENT, asyncpg.PostgresError) as exc:
                    log.warning("retry_poll_failed", error=str(exc))
                for name, chore in chores.items():
                    try:
                        if loop.time() >= due[name]:
                            due[name] = loop.time() + await chore()
                    except (*TRANSIENT, asyncpg.PostgresError) as exc:
                        # Each on its own: one that keeps failing must not keep the others from their turn.
                        log.warning("retry_table_chore_failed", chore=name, error=str(exc))
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
            many = _CLAIM_AROUND if skipped else _CLAIM_MANY
            rows = list(await conn.fetch(many, limit, self._settings.lease_seconds, own, skipped))
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
