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
from webhookd.operate.attempt_history import FIRST_TRY, AttemptHistory
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
# First-try successes of the window in the attempt log's own tables (it may be another database: the delivery rows
# that hide some of them are looked up apart). Compact rows carry no name: --event-name is applied once their
# records are read again.
_FIRST_TRIES = f"""
SELECT event_id, event_name, workspace_id::text AS workspace_id, source, at FROM webhookd.attempt_log
WHERE webhook_id = $1::uuid AND {FIRST_TRY} AND at BETWEEN $2 AND $3
  AND ($4::text IS NULL OR event_name = $4)
UNION ALL
SELECT event_id, NULL, NULL, source, at FROM webhookd.first_tries
WHERE webhook_id = $1::uuid AND at BETWEEN $2 AND $3
"""
# First-try successes of the window in the attempt log of earlier releases, one row per pair. A pair is an event id and
# a source: a recreated topic reuses default event ids (topic:partition:offset) for other events, so two sources under
# one id are two pairs, and a delivery row hides only the first try of its own source. A record consumed twice (after a
# crash) logs its pair twice; DISTINCT ON keeps one. A row without a source (logged before webhookd recorded sources)
# cannot say which pair it was: any delivery row of its event id hides it, and so does a row of the same event id that
# has a source (most likely the same record, consumed again by a newer webhookd after a restart), which unlike it can be
# replayed. bool_or looks only at the rows WHERE kept, so a source logged outside the window hides nothing in it.
_OLD_FIRST_TRIES = """
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
    event_name: str | None  # None: a compact first try, whose name is known once its record is read again
    at: datetime
    row_id: int | None = None
    source: str | None = None  # of a first-try success: where its record is
    workspace_id: str | None = None  # None for a compact first try

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


def window_warnings(start: datetime, retention: float, mode: str = "compact") -> list[str]:
    """What the window cannot reach: first-try successes are known only from the attempt log, which is pruned, and
    only counted with endpoints.attempt_log 'aggregate'."""
    counted = [
        "endpoints.attempt_log is 'aggregate': first-try successes are only counted, so this replay finds retried "
        "and dead-lettered deliveries only; to send a window's events again, read them again from Kafka (reset the "
        "consumer group's offsets to the window's start)"
    ]
    warnings = counted if mode == "aggregate" else []
    try:
        kept_from = datetime.now(UTC) - timedelta(seconds=retention)
    except OverflowError:  # a retention reaching back before year 1 has pruned nothing
        return warnings
    if start >= kept_from or mode == "aggregate":
        return warnings
    kept = f"{retention / 86400:g} days" if retention >= 86400 else f"{retention:g} seconds"
    return [
        f"first-try successes before {iso(kept_from)} may be gone from the attempt log and then cannot be found "
        f"(it keeps whole days, {kept} at least: endpoints.attempt_log_retention_seconds), nor can deliveries "
        "delivered after a retry, whose rows go after the same retention; dead letters keep their rows and are "
        "still found"
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


async def window_pairs(
    history: AttemptHistory, webhook: str, start: datetime, end: datetime, name: str | None
) -> list[Pair]:
    conn = history.main
    pairs = [
        Pair(r["event_id"], r["event_name"], r["at"], row_id=r["id"])
        for r in await conn.fetch(_ROWS, webhook, start, end, name)
    ]
    found = list(await history.log.fetch(_FIRST_TRIES, webhook, start, end, name))
    hidden = await history.delivery_rows(webhook, list({r["event_id"] for r in found}))
    # A record consumed twice (after a crash) logs its pair twice: the newest speaks for it.
    firsts: dict[tuple[str, str | None], Any] = {}
    for r in sorted(found, key=lambda r: r["at"]):
        if (r["event_id"], r["source"]) not in hidden:
            firsts[r["event_id"], r["source"]] = r
    if await history.old_table():
        logged = {event_id for event_id, _ in firsts}
        for r in await conn.fetch(_OLD_FIRST_TRIES, webhook, start, end, name):
            # A row without a source cannot say which pair it was: one logged since under its event id, with a
            # source, is most likely the same record consumed again, and unlike it can be replayed.
            if r["source"] is not None or r["event_id"] not in logged:
                firsts.setdefault((r["event_id"], r["source"]), r)
    pairs += [
        Pair(r["event_id"], r["event_name"], r["at"], source=r["source"], workspace_id=r["workspace_id"])
        for r in firsts.values()
    ]
    return sorted(pairs, key=lambda p: (p.at, p.event_id))
