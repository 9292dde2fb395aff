"""`webhookd deliveries list | show | retry`: what happened to deliveries, every attempt, and replaying dead letters.

A delivery that succeeded at its first attempt has no row of its own (the hot path never writes one); it is listed
from the attempt log, without an id, and `show --event` finds it, as it finds the pairs a webhook's filter kept back
(status `filtered`, with the filter's reason). `retry` resets a row to pending with its whole retry schedule: the same
event id and body go out again, so receivers that deduplicate by event id see one event. `deliveries replay`
(`operate.replay`) resets rows the same way, through `reset_rows`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from webhookd.endpoints.sync import Connection
from webhookd.operate.attempt_history import AttemptHistory, Filters, conditions
from webhookd.operate.output import NotFound, UsageError, emit_json, emit_table, plain, since, webhook_id, workspace_id

_LIST_COLUMNS = (
    ("id", "ID"),
    ("status", "STATUS"),
    ("attempts", "ATTEMPTS"),
    ("event_id", "EVENT"),
    ("event_name", "NAME"),
    ("webhook_id", "WEBHOOK"),
    ("last_status", "HTTP"),
    ("last_error", "LAST ERROR"),
    ("next_attempt_at", "NEXT ATTEMPT"),
    ("updated_at", "UPDATED"),
)
_ATTEMPT_COLUMNS = (
    ("attempt", "#"),
    ("at", "AT"),
    ("duration_ms", "MS"),
    ("result", "RESULT"),
    ("status", "HTTP"),
    ("error", "ERROR OR RESPONSE"),
)
_ROWS = """
SELECT id, status, attempts, event_id, event_name, webhook_id::text AS webhook_id, workspace_id::text AS workspace_id,
       source, last_status, last_error, created_at, updated_at, delivered_at,
       -- 'infinity': waiting for an earlier delivery of the same record (an ordered webhook), not for a time.
       CASE WHEN status = 'pending' AND isfinite(next_attempt_at) THEN next_attempt_at END AS next_attempt_at
FROM webhookd.deliveries
"""
# A pending row under a live claim is being attempted right now: its attempt settles it, and freeing its claim
# would let another replica send it at the same time; it is left alone and reported.
_RESET = """
UPDATE webhookd.deliveries d
SET status = 'pending', attempts = 0, next_attempt_at = now(), locked_until = NULL, updated_at = now()
WHERE d.id = ANY($1::bigint[])
  AND NOT (d.status = 'pending' AND d.locked_until > now())
  AND NOT EXISTS (
    SELECT 1 FROM webhookd.endpoints e WHERE e.webhook_id = d.webhook_id AND e.disabled_at IS NOT NULL
  )
RETURNING d.id
"""
_IN_FLIGHT = """
SELECT id FROM webhookd.deliveries WHERE id = ANY($1::bigint[]) AND status = 'pending' AND locked_until > now()
"""
_DISABLED_OF = """
SELECT d.id, d.webhook_id::text AS webhook_id FROM webhookd.deliveries d
JOIN webhookd.endpoints e ON e.webhook_id = d.webhook_id AND e.disabled_at IS NOT NULL
WHERE d.id = ANY($1::bigint[])
"""


async def list_deliveries(conn: Connection, args: argparse.Namespace, history: AttemptHistory) -> int:
    asked = Filters(
        webhook=webhook_id(args.webhook, "--webhook") if args.webhook else None,
        workspace=workspace_id(args.workspace) if args.workspace else None,
        event=args.event,
        since=since(args.since) if args.since else None,
    )
    where, values = conditions(asked, asked.since, time_column="updated_at")
    rows_where = [*where, f"status = '{args.status}'"] if args.status else where  # status is one of argparse's choices
    values.append(args.limit)
    sql = _ROWS + (" WHERE " + " AND ".join(rows_where) if rows_where else "")
    rows = [plain(r) for r in await conn.fetch(sql + f" ORDER BY updated_at DESC LIMIT ${len(values)}", *values)]
    if args.status in (None, "delivered"):
        # First-try successes, which only the attempt log knows.
        rows += await history.first_tries(asked, args.limit)
        rows = sorted(rows, key=lambda r: r["updated_at"], reverse=True)[: args.limit]
    if args.json:
        emit_json(rows)
    else:
        emit_table(rows, _LIST_COLUMNS)
        if len(rows) == args.limit:
            print(f"(the newest {args.limit}; --limit shows more)")
    return 0


async def show_delivery(conn: Connection, args: argparse.Namespace, history: AttemptHistory) -> int:
    if args.event is not None:
        rows = await conn.fetch(_ROWS + " WHERE event_id = $1 ORDER BY webhook_id", args.event)
        found = [plain(r) for r in rows]
        found += await history.first_tries_of_event(args.event)
        found += await history.filtered(args.event)
    else:
        found = [plain(r) for r in await conn.fetch(_ROWS + " WHERE id = $1", args.id)]
    if not found:
        what = f"event {args.event!r}" if args.event is not None else f"id {args.id}"
        raise NotFound(f"no delivery with {what}")
    for delivery in found:
        delivery["attempt_log"] = await history.attempts_of(delivery["event_id"], delivery["webhook_id"])
    if args.json:
        emit_json(found if args.event is not None else found[0])
        return 0
    for i, delivery in enumerate(found):
        if i:
            print()
        _print_delivery(delivery)
    return 0


def _print_delivery(d: dict[str, Any]) -> None:
    fields = (
        ("id", "id"),
        ("status", "status"),
        ("event", "event_id"),
        ("event name", "event_name"),
        ("webhook", "webhook_id"),
        ("workspace", "workspace_id"),
        ("from", "source"),
        ("attempts", "attempts"),
        ("last HTTP status", "last_status"),
        ("last error", "last_error"),
        ("filtered out by", "reason"),
        ("next attempt", "next_attempt_at"),
        ("created", "created_at"),
        ("delivered", "delivered_at"),
    )
    for label, key in fields:
        value = d.get(key)
        if value is None and key in ("next_attempt_at", "delivered_at", "last_error", "source", "reason"):
            continue
        if isinstance(value, datetime):
            value = value.isoformat(timespec="seconds")
        print(f"{label + ':':<18}{value if value is not None else '-'}")
    print("attempts:")
    if d["attempt_log"]:
        emit_table(d["attempt_log"], _ATTEMPT_COLUMNS)
    else:
        print("  (none in the attempt log: not attempted yet, past its retention, or counted only: 'aggregate')")


@dataclass(frozen=True, slots=True)
class Reset:
    """What resetting delivery rows to pending did: rows reset, rows left alone and why."""

    reset: list[int]
    skipped_disabled: list[dict[str, Any]]  # {"id", "webhook_id"}: rows of a disabled endpoint
    in_flight: list[int]  # rows being attempted right now


async def reset_rows(conn: Connection, ids: list[int]) -> Reset:
    """Reset these rows to pending with a fresh retry schedule, except those of a disabled endpoint and those being
    attempted right now; one transaction (a savepoint inside the caller's)."""
    async with conn.transaction():
        skipped = [plain(r) for r in await conn.fetch(_DISABLED_OF, ids)]
        in_flight = sorted(r["id"] for r in await conn.fetch(_IN_FLIGHT, ids))
        reset = sorted(r["id"] for r in await conn.fetch(_RESET, ids))
    return Reset(reset, skipped, in_flight)


def print_skipped_disabled(skipped: list[dict[str, Any]]) -> None:
    for webhook in sorted({s["webhook_id"] for s in skipped}):
        count = sum(1 for s in skipped if s["webhook_id"] == webhook)
        print(
            f"skipped {count} of webhook {webhook}: its endpoint is disabled; "
            f"run `webhookd endpoints enable {webhook}` first"
        )


async def retry_deliveries(conn: Connection, args: argparse.Namespace, history: AttemptHistory) -> int:
    del history  # the rows are all in the deliveries table
    if not args.ids and not args.dead:
        raise UsageError("name delivery ids, or choose dead letters with --dead (and --webhook, --since)")
    if args.ids and (args.dead or args.webhook or args.since or args.all):
        raise UsageError("give delivery ids or --dead with filters, not both")
    if args.all and not args.dead:
        raise UsageError("--all goes with --dead: `deliveries retry --dead --all` replays every dead letter")
    if args.dead and not (args.webhook or args.since or args.all):
        # One mistyped command must not send weeks of dead letters to every receiver at once.
        raise UsageError(
            "this would replay every dead letter; add --all if you mean it (or narrow it with --webhook, --since)"
        )
    if args.ids:
        ids = list(dict.fromkeys(args.ids))
        existing = {r["id"] for r in await conn.fetch("SELECT id FROM webhookd.deliveries WHERE id = ANY($1)", ids)}
        missing = [i for i in ids if i not in existing]
    else:
        where = ["status = 'dead'"]
        values: list[Any] = []
        if args.webhook:
            values.append(webhook_id(args.webhook, "--webhook"))
            where.append(f"webhook_id = ${len(values)}::uuid")
        if args.since:
            values.append(since(args.since))
            where.append(f"updated_at >= ${len(values)}")
        sql = "SELECT id FROM webhookd.deliveries WHERE " + " AND ".join(where)
        ids = [r["id"] for r in await conn.fetch(sql, *values)]
        missing = []
    outcome = await reset_rows(conn, ids)
    done, in_flight = outcome.reset, outcome.in_flight
    # `retry` says "replayed": to its user a row reset to pending is a delivery sent again, and scripts read the key.
    result = {
        "replayed": done,
        "skipped_disabled": outcome.skipped_disabled,
        "in_flight": in_flight,
        "not_found": missing,
    }
    if args.json:
        emit_json(result)
    else:
        print(f"replayed {len(done)} deliveries" + (f": {', '.join(map(str, done[:50]))}" if done else ""))
        print_skipped_disabled(outcome.skipped_disabled)
        if in_flight:
            print(f"being attempted right now, left alone: {', '.join(map(str, in_flight))}")
        if missing:
            print(f"no such delivery: {', '.join(map(str, missing))}")
    return 1 if missing else 0
