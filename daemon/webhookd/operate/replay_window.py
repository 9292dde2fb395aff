"""The pairs a `webhookd deliveries replay` covers: a live webhook's deliveries delivered or dead-lettered in a time
window, each (event, webhook) pair once, either as its delivery row or, for a first-try success, as its attempt-log
row naming the Kafka record it came from; and what such a window cannot reach, since the attempt log is pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from webhookd.endpoints.sync import Connection
from webhookd.model import Webhook
from webhookd.operate.output import NotFound
from webhookd.routing.subscription_rows import webhook_from_row

# Rows of the window: delivered in it, or dead-lettered in it (a dead letter's last change is its dead-lettering).
_ROWS = """
SELECT id, event_id, event_name, CASE WHEN status = 'delivered' THEN delivered_at ELSE updated_at END AS at
FROM webhookd.deliveries
WHERE webhook_id = $1::uuid
  AND ((status = 'delivered' AND delivered_at BETWEEN $2 AND $3) OR (status = 'dead' AND updated_at BETWEEN $2 AND $3))
  AND ($4::text IS NULL OR event_name = $4)
"""
# First-try successes of the window, one row per pair. A pair is an event id and a source: a recreated topic
# reuses default event ids (topic:partition:offset) for other events, so two sources under one id are two pairs,
# and a delivery row hides only the first try of its own source. A record consumed twice (after a crash) logs its
# pair twice; DISTINCT ON keeps one. A row without a source (logged before webhookd recorded sources) cannot say
# which pair it was: any delivery row of its event id hides it, and so does a row of the same event id that has a
# source (most likely the same record, consumed again by a newer webhookd after a restart), which unlike it can be
# replayed. bool_or looks only at the rows WHERE kept, so a source logged outside the window hides nothing in it.
_FIRST_TRIES = """
SELECT DISTINCT ON (event_id, source) event_id, event_name, workspace_id, source, at
FROM (
    SELECT a.event_id, a.event_name, a.workspace_id::text AS workspace_id, a.source, a.at,
           bool_or(a.source IS NOT NULL) OVER (PARTITION BY a.event_id) AS sourced
    FROM webhookd.attempts a
    WHERE a.webhook_id = $1::uuid AND a.attempt = 1 AND a.result = '2xx' AND a.at BETWEEN $2 AND $3
      AND ($4::text IS NULL OR a.event_name = $4)
      AND NOT EXISTS (
        SELECT 1 FROM webhookd.deliveries d
        WHERE d.event_id = a.event_id AND d.webhook_id = a.webhook_id AND (a.source IS NULL OR d.source = a.source)
      )
) first_tries
WHERE source IS NOT NULL OR NOT sourced
ORDER BY event_id, source, at DESC
"""


@dataclass(frozen=True, slots=True)
class Pair:
    """One (event, webhook) pair of the window, and how it is replayed: its row reset, or its record read again."""

    event_id: str
    event_name: str
    at: datetime
    row_id: int | None = None
    source: str | None = None  # of a first-try success: where its record is
    workspace_id: str | None = None

    @property
    def how(self) -> str:
        return f"reset row {self.row_id}" if self.row_id is not None else f"from Kafka {self.source}"

    def missed(self, why: str) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "event_name": self.event_name,
            "at": self.at,
            "source": self.source,
            "why": why,
        }


def window_warnings(start: datetime, retention: float) -> list[str]:
    """What the window cannot reach: first-try successes are known only from the attempt log, which is pruned."""
    try:
        kept_from = datetime.now(UTC) - timedelta(seconds=retention)
    except OverflowError:  # a retention reaching back before year 1 has pruned nothing
        return []
    if start >= kept_from:
        return []
    kept = f"{retention / 86400:g} days" if retention >= 86400 else f"{retention:g} seconds"
    return [
        f"first-try successes before {iso(kept_from)} are no longer in the attempt log and cannot be found "
        f"(it keeps {kept}: endpoints.attempt_log_retention_seconds); retried and dead-lettered deliveries have "
        "rows of their own and are still found"
    ]


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def live_webhook(conn: Connection, table: str, webhook: str) -> Webhook:
    row = await conn.fetchrow(
        'SELECT w.id::text AS id, w."workspaceId"::text AS "workspaceId", w."targetUrl", w.operations, w.secret, '
        f"o.options::text AS options FROM {table} w "
        "LEFT JOIN webhookd.webhook_options o ON o.webhook_id = w.id "
        'WHERE w.id = $1::uuid AND w."deletedAt" IS NULL',
        webhook,
    )
    if row is None:
        raise NotFound(f"--webhook: no live webhook with id {webhook} in {table} (never created, or deleted)")
    found = webhook_from_row(row)
    if found is None:
        raise NotFound(f"--webhook: webhook {webhook} can never be delivered to (its targetUrl or secret is unusable)")
    return found


async def window_pairs(conn: Connection, webhook: str, start: datetime, end: datetime, name: str | None) -> list[Pair]:
    pairs = [
        Pair(r["event_id"], r["event_name"], r["at"], row_id=r["id"])
        for r in await conn.fetch(_ROWS, webhook, start, end, name)
    ]
    pairs += [
        Pair(r["event_id"], r["event_name"], r["at"], source=r["source"], workspace_id=r["workspace_id"])
        for r in await conn.fetch(_FIRST_TRIES, webhook, start, end, name)
    ]
    return sorted(pairs, key=lambda p: (p.at, p.event_id))
