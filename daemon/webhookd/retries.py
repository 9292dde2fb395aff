"""The durable retry path: claims due deliveries from Postgres and feeds them back to the dispatcher.

Several replicas may share one database. A claim is a lease (`locked_until`) taken with FOR UPDATE SKIP LOCKED, so
two replicas never take the same row at once, and a replica killed mid-attempt loses its claims when they expire.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
import structlog

from webhookd.deliver import Delivery
from webhookd.dispatch import Dispatcher
from webhookd.health import EndpointHealth
from webhookd.metrics import Metrics
from webhookd.pgerrors import TRANSIENT
from webhookd.record import Recorder
from webhookd.subscriptions import SubscriptionIndex, Webhook

log = structlog.get_logger("webhookd.retries")

# $1 the most rows to claim, $2 the lease in seconds, $3 our own claims still under way (whose lease may have run
# out), $4 webhook ids; `rows` selects the ids of the due rows to claim.
_CLAIM = """
UPDATE webhookd.deliveries d
SET locked_until = now() + make_interval(secs => $2), updated_at = now()
WHERE d.id IN ({rows})
RETURNING d.id, d.event_id, d.webhook_id::text AS webhook_id, d.workspace_id::text AS workspace_id,
          d.event_name, d.body, (extract(epoch FROM d.event_time) * 1000)::bigint AS event_ms, d.source, d.attempts
"""
_DUE = """status = 'pending' AND next_attempt_at <= now() AND (locked_until IS NULL OR locked_until < now())
    AND NOT (id = ANY($3::bigint[]))"""
# The earliest due rows of every endpoint but those that take nothing now (circuit open, paused, host busy) or one
# delivery (a probe).
_CLAIM_MANY = _CLAIM.format(
    rows=f"""SELECT id FROM webhookd.deliveries WHERE {_DUE} AND NOT (webhook_id = ANY($4::uuid[]))
    ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED"""
)
# The earliest due row of each endpoint whose half-open circuit takes one delivery, its probe: one query for all.
_CLAIM_PROBES = _CLAIM.format(
    rows=f"""SELECT probe.id FROM unnest($4::uuid[]) AS w (webhook_id) CROSS JOIN LATERAL (
        SELECT id FROM webhookd.deliveries WHERE webhook_id = w.webhook_id AND {_DUE}
        ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED
    ) probe LIMIT $1"""
)
# Probes claimed in one poll at most; more wait for the next.
_PROBES_PER_POLL = 20
_RELEASE = "UPDATE webhookd.deliveries SET locked_until = NULL WHERE id = ANY($1::bigint[]) AND status = 'pending'"
_DEPTH = "SELECT count(*) FROM webhookd.deliveries WHERE status = 'pending'"


@dataclass(frozen=True)
class RetrySettings:
    """How often to look for due retries, how many may run at once, and how long a claim lasts."""

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
        recorder: Recorder,
        metrics: Metrics,
        settings: RetrySettings,
    ) -> None:
        self._pool = pool
        self._health = health
        self._dispatcher = dispatcher
        self._index = index
        self._recorder = recorder
        self._metrics = metrics
        self._settings = settings

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_depth = 0.0
        while True:
            room = self._settings.max_in_flight - self._dispatcher.retries_in_flight
            claimed = 0
            try:
                if room > 0:
                    claimed = await self.claim(room)
                if loop.time() >= next_depth:
                    self._metrics.retry_queue_depth.set(await self._pool.fetchval(_DEPTH))
                    next_depth = loop.time() + 5.0
            except (*TRANSIENT, asyncpg.PostgresError) as exc:
                log.warning("retry_poll_failed", error=str(exc))
            # A full claim suggests more are due: look again at once rather than after the interval.
            if claimed < room or room <= 0:
                await asyncio.sleep(self._settings.poll_interval)

    async def claim(self, limit: int) -> int:
        own = self._dispatcher.retry_rows()
        held, probing = self._health.retry_holds()
        skipped = held + self._dispatcher.busy_webhooks() + probing
        rows = list(await self._pool.fetch(_CLAIM_MANY, limit, self._settings.lease_seconds, own, skipped))
        probes = min(_PROBES_PER_POLL, limit - len(rows))
        if probing and probes > 0:
            rows += await self._pool.fetch(_CLAIM_PROBES, probes, self._settings.lease_seconds, own, probing)
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
                await self._recorder.update(
                    row["id"],
                    status="dead",
                    attempts=row["attempts"],
                    retry_in=0.0,
                    last_status=None,
                    error="the webhook no longer exists or no longer subscribes to this event",
                )
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
                )
            )
        return len(rows)

    def _still_subscribed(self, webhook: Webhook, workspace_id: str, event_name: str) -> bool:
        obj, _, action = event_name.partition(".")
        return webhook.workspace_id == workspace_id and any(
            w.id == webhook.id for w in self._index.match(workspace_id, obj, action)
        )

    async def release(self, row_ids: list[int]) -> None:
        """Give claims back at shutdown so another replica need not wait for the lease to expire."""
        if row_ids:
            await self._pool.execute(_RELEASE, row_ids)
