"""`webhookd endpoints list | enable | disable | limit`: each webhook's receiver, its health, and the operator's say.

The state shown is what the daemons last published (they sync every `endpoints.sync_interval_seconds`): disabled,
circuit open, rate-limited (over its limit, or asked to wait by the receiver), failing (no success since its last
failure) or healthy.
"""

from __future__ import annotations

import argparse
from typing import Any

from webhookd.endpoints.sync import Connection, disable, display_url, enable, set_rate_limit
from webhookd.operate.output import NotFound, UsageError, emit_json, emit_table, plain, webhook_id

STATES = ("healthy", "failing", "rate_limited", "circuit_open", "disabled")

_COLUMNS = (
    ("webhook_id", "WEBHOOK"),
    ("url", "URL"),
    ("state", "STATE"),
    ("consecutive_failures", "FAILS"),
    ("failures_total", "FAILED/TOTAL"),
    ("last_success_at", "LAST SUCCESS"),
    ("last_error", "LAST ERROR"),
    ("pending", "PENDING"),
    ("dead", "DEAD"),
    ("rate_limit_per_second", "LIMIT/S"),
)


def _list_sql(table: str) -> str:
    return f"""
    SELECT w.id::text AS webhook_id, w."workspaceId"::text AS workspace_id, w."targetUrl" AS target_url,
           e.last_success_at, e.last_failure_at, e.failing_since, coalesce(e.consecutive_failures, 0)
           AS consecutive_failures, coalesce(e.attempts_total, 0) AS attempts_total,
           coalesce(e.failures_total, 0) AS failures_total, e.last_status, e.last_error, e.disabled_at,
           e.disabled_reason, e.rate_limit_per_second,
           CASE WHEN e.circuit_open_until > now() THEN e.circuit_open_until END AS circuit_open_until,
           CASE WHEN e.rate_limited_until > now() THEN e.rate_limited_until END AS rate_limited_until,
           coalesce(c.pending, 0) AS pending, coalesce(c.dead, 0) AS dead
    FROM {table} w
    LEFT JOIN webhookd.endpoints e ON e.webhook_id = w.id
    LEFT JOIN (
        SELECT webhook_id, count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'dead') AS dead
        FROM webhookd.deliveries WHERE status <> 'delivered' GROUP BY webhook_id
    ) c ON c.webhook_id = w.id
    WHERE w."deletedAt" IS NULL
    ORDER BY w.id
    """


def _state(row: dict[str, Any]) -> str:
    if row["disabled_at"] is not None:
        return "disabled"
    if row["circuit_open_until"] is not None:
        return "circuit_open"
    if row["rate_limited_until"] is not None:
        return "rate_limited"
    if row["consecutive_failures"] > 0:
        return "failing"
    return "healthy"


async def list_endpoints(conn: Connection, args: argparse.Namespace, table: str) -> int:
    rows = []
    for record in await conn.fetch(_list_sql(table)):
        row = plain(record)
        row["url"] = display_url(row.pop("target_url"))
        row["state"] = _state(row)
        if args.state and row["state"] != args.state:
            continue
        if args.webhook and row["webhook_id"] != webhook_id(args.webhook, "--webhook"):
            continue
        rows.append(row)
    if args.json:
        emit_json(rows)
        return 0
    for row in rows:
        row["failures_total"] = f"{row['failures_total']}/{row['attempts_total']}"
        if row["state"] == "disabled":
            row["last_error"] = f"disabled: {row['disabled_reason']}"
    emit_table(rows, _COLUMNS)
    return 0


async def _known(conn: Connection, ids: list[str], table: str) -> None:
    rows = await conn.fetch(f"SELECT id::text AS id FROM {table} WHERE id = ANY($1::uuid[])", ids)
    missing = sorted(set(ids) - {r["id"] for r in rows})
    if missing:
        raise NotFound(f"no webhook with id {', '.join(missing)} in the subscriptions table")


async def enable_endpoints(conn: Connection, args: argparse.Namespace, table: str) -> int:
    ids = [webhook_id(i) for i in args.ids]
    await _known(conn, ids, table)
    await enable(conn, ids)
    print(
        f"enabled {len(ids)} endpoint(s); running daemons resume delivering within a few seconds. "
        "Dead letters stay dead: replay them with `webhookd deliveries retry --dead --webhook ID`."
    )
    return 0


async def disable_endpoints(conn: Connection, args: argparse.Namespace, table: str) -> int:
    ids = [webhook_id(i) for i in args.ids]
    await _known(conn, ids, table)
    await disable(conn, ids, args.reason)
    print(f"disabled {len(ids)} endpoint(s); their pending deliveries are dead letters now, new ones will be too.")
    return 0


async def limit_endpoint(conn: Connection, args: argparse.Namespace, table: str) -> int:
    wid = webhook_id(args.id)
    rate: float | None = None
    if args.rate != "default":
        try:
            rate = float(args.rate)
        except ValueError:
            rate = -1.0
        if not rate > 0 or rate == float("inf"):
            raise UsageError(f"RATE: {args.rate!r} is not a number of deliveries per second > 0, nor 'default'")
    await _known(conn, [wid], table)
    await set_rate_limit(conn, wid, rate)
    print(f"webhook {wid}: " + (f"at most {rate:g} deliveries a second" if rate else "the configured default rate"))
    return 0
