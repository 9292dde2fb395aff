"""What the attempt log knows, for `deliveries list`, `show` and `replay`, wherever it is kept.

The attempt log lives in day-partitioned tables (durable.attempts says which row goes where), in the database of
`postgres.attempts_dsn` when it is set; the deliveries, and the attempt log of earlier releases (webhookd.attempts,
read for as long as it exists), live in `postgres.dsn`'s. No query joins the two databases: what needs both (a
first-try success hidden by a delivery row of its own) is settled here.

A first-try success with endpoints.attempt_log 'compact' carries no event name and no workspace: the workspace is
its webhook's, looked up in the subscriptions table; the name is known once its record is read again. With
'aggregate' first-try successes are only counted, and none of these reads can find them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from webhookd.endpoints.sync import Connection
from webhookd.operate.output import plain

# A first-try success as `deliveries list` shows a delivery row; {name} and {workspace} are the columns or NULLs.
_AS_DELIVERY = """
SELECT NULL::bigint AS id, 'delivered' AS status, 1 AS attempts, event_id, {name} AS event_name,
       webhook_id::text AS webhook_id, {workspace} AS workspace_id, source, status::integer AS last_status,
       NULL AS last_error, at AS created_at, at AS updated_at, at AS delivered_at, NULL::timestamptz AS next_attempt_at
"""
# A first-try success among the full rows: the live path's first attempt, answered 2xx (a delivery with a row of its
# own is listed from that row).
FIRST_TRY = "attempt = 1 AND result = '2xx' AND row_id IS NULL"
_FULL_FIRST_TRIES = (
    _AS_DELIVERY.format(name="event_name", workspace="workspace_id::text")
    + f"FROM webhookd.attempt_log WHERE {FIRST_TRY}"
)
_COMPACT_FIRST_TRIES = (
    _AS_DELIVERY.format(name="NULL::text", workspace="NULL::text") + "FROM webhookd.first_tries WHERE true"
)
# The attempt log of earlier releases, where a delivery row of the same pair hides a first try.
_OLD_FIRST_TRIES = (
    _AS_DELIVERY.format(name="event_name", workspace="workspace_id::text")
    + """FROM webhookd.attempts a WHERE attempt = 1 AND result = '2xx' AND NOT EXISTS (
    SELECT 1 FROM webhookd.deliveries d WHERE d.event_id = a.event_id AND d.webhook_id = a.webhook_id
)"""
)
# Pairs a webhook's filter kept from being sent: a record read twice (after a crash) logs its pair twice; the
# newest one speaks.
_FILTERED = """
SELECT DISTINCT ON (webhook_id) NULL::bigint AS id, 'filtered' AS status, 0 AS attempts, event_id, event_name,
       webhook_id::text AS webhook_id, workspace_id::text AS workspace_id, source, NULL::integer AS last_status,
       NULL AS last_error, error AS reason, at AS created_at, at AS updated_at, NULL::timestamptz AS delivered_at,
       NULL::timestamptz AS next_attempt_at
FROM {table}
WHERE event_id = $1 AND result = 'filtered'
ORDER BY webhook_id, at DESC
"""
_ATTEMPTS = """
SELECT attempt, at, round(duration_ms::numeric, 1)::float8 AS duration_ms, result, status, error
FROM {table} WHERE event_id = $1 AND webhook_id = $2::uuid
"""
_COMPACT_ATTEMPTS = """
SELECT 1 AS attempt, at, round(duration_ms::numeric, 1)::float8 AS duration_ms, '2xx' AS result,
       status::integer AS status, NULL AS error
FROM webhookd.first_tries WHERE event_id = $1 AND webhook_id = $2::uuid
"""
_OLD_TABLE = "SELECT to_regclass('webhookd.attempts') IS NOT NULL"
_ROWS_OF = """
SELECT event_id, source FROM webhookd.deliveries WHERE webhook_id = $1::uuid AND event_id = ANY($2::text[])
"""
# `deliveries list` without --since looks this far back first, then further, so that the newest first tries are
# found through the time index of the newest partitions instead of a sort of all of them.
_LOOK_BACK = (timedelta(minutes=1), timedelta(hours=1), timedelta(days=1), None)


@dataclass(frozen=True, slots=True)
class Filters:
    """What `deliveries list` was asked for."""

    webhook: str | None = None
    workspace: str | None = None
    event: str | None = None
    since: datetime | None = None


@dataclass(slots=True)
class AttemptHistory:
    """Reads of the attempt log, for one command. `main` is postgres.dsn's database, `log` the attempt log's (the
    same connection when postgres.attempts_dsn is unset); `table` the subscriptions table, quoted for SQL."""

    main: Connection
    log: Connection
    table: str
    _old: bool | None = field(default=None, init=False)

    async def old_table(self) -> bool:
        """Whether the attempt log of earlier releases is there to be read; looked up once a command."""
        if self._old is None:
            self._old = bool(await self.main.fetchval(_OLD_TABLE))
        return self._old

    async def first_tries(self, filters: Filters, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` first-try successes that match, newest first."""
        webhooks: list[str] | None = None
        if filters.workspace is not None:
            webhooks = [
                r["id"]
                for r in await self.main.fetch(
                    f'SELECT id::text AS id FROM {self.table} WHERE "workspaceId" = $1::uuid', filters.workspace
                )
            ]
        found: list[dict[str, Any]] = []
        for back in _LOOK_BACK:
            since = filters.since
            if back is not None:
                since = max(since, datetime.now().astimezone() - back) if since else datetime.now().astimezone() - back
            found = await self._first_tries_since(filters, since, webhooks, limit)
            if len(found) >= limit or since == filters.since:
                break
        found = await self._without_rows(found)
        found.sort(key=lambda r: r["updated_at"], reverse=True)
        return await self._with_workspaces(found[:limit])

    async def _first_tries_since(
        self, filters: Filters, since: datetime | None, webhooks: list[str] | None, limit: int
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        queries = [(self.log, _FULL_FIRST_TRIES, True), (self.log, _COMPACT_FIRST_TRIES, False)]
        if await self.old_table():
            queries.append((self.main, _OLD_FIRST_TRIES, True))
        for conn, sql, has_workspace in queries:
            where, values = conditions(filters, since, webhooks if not has_workspace else None)
            values.append(limit)
            query = sql + "".join(f" AND {w}" for w in where) + f" ORDER BY at DESC LIMIT ${len(values)}"
            found += [plain(r) for r in await conn.fetch(query, *values)]
        return found

    async def first_tries_of_event(self, event_id: str) -> list[dict[str, Any]]:
        """Every first-try success of this event, but those a delivery row of the same pair stands for."""
        found = await self._first_tries_since(Filters(event=event_id), None, None, 10_000)
        return await self._with_workspaces(await self._without_rows(found))

    async def _without_rows(self, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Leave out the first tries of pairs that have a delivery row (a record read again after a crash, whose
        second pass failed): the row stands for the pair."""
        if not found:
            return found
        rows = await self.main.fetch(
            "SELECT event_id, webhook_id::text AS webhook_id FROM webhookd.deliveries WHERE event_id = ANY($1::text[])",
            list({f["event_id"] for f in found}),
        )
        pairs = {(r["event_id"], r["webhook_id"]) for r in rows}
        return [f for f in found if (f["event_id"], f["webhook_id"]) not in pairs]

    async def filtered(self, event_id: str) -> list[dict[str, Any]]:
        found = [plain(r) for r in await self.log.fetch(_FILTERED.format(table="webhookd.attempt_log"), event_id)]
        if await self.old_table():
            seen = {f["webhook_id"] for f in found}
            old = await self.main.fetch(_FILTERED.format(table="webhookd.attempts"), event_id)
            found += [plain(r) for r in old if r["webhook_id"] not in seen]
        return found

    async def attempts_of(self, event_id: str, webhook_id: str) -> list[dict[str, Any]]:
        """Every attempt of one pair, oldest first."""
        found = [
            plain(r) for r in await self.log.fetch(_ATTEMPTS.format(table="webhookd.attempt_log"), event_id, webhook_id)
        ]
        found += [plain(r) for r in await self.log.fetch(_COMPACT_ATTEMPTS, event_id, webhook_id)]
        if await self.old_table():
            old = await self.main.fetch(_ATTEMPTS.format(table="webhookd.attempts"), event_id, webhook_id)
            found += [plain(r) for r in old]
        return sorted(found, key=lambda a: a["at"])

    async def delivery_rows(self, webhook_id: str, event_ids: list[str]) -> set[tuple[str, str]]:
        """The (event id, source) of the delivery rows of these events to this webhook."""
        rows = await self.main.fetch(_ROWS_OF, webhook_id, event_ids)
        return {(r["event_id"], r["source"]) for r in rows}

    async def _with_workspaces(self, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Compact rows carry no workspace: it is their webhook's."""
        missing = list({f["webhook_id"] for f in found if f["workspace_id"] is None})
        if missing:
            rows = await self.main.fetch(
                f'SELECT id::text AS id, "workspaceId"::text AS ws FROM {self.table} WHERE id = ANY($1::uuid[])',
                missing,
            )
            workspaces = {r["id"]: r["ws"] for r in rows}
            for f in found:
                if f["workspace_id"] is None:
                    f["workspace_id"] = workspaces.get(f["webhook_id"])
        return found


def conditions(
    filters: Filters, since: datetime | None, webhooks: list[str] | None = None, time_column: str = "at"
) -> tuple[list[str], list[Any]]:
    """The WHERE conditions and their values, `since` on `time_column`; `webhooks` stands for the workspace in a
    table without one."""
    where: list[str] = []
    values: list[Any] = []

    def add(condition: str, value: Any) -> None:
        values.append(value)
        where.append(condition.format(n=len(values)))

    if filters.webhook is not None:
        add("webhook_id = ${n}::uuid", filters.webhook)
    if filters.workspace is not None:
        if webhooks is None:
            add("workspace_id = ${n}::uuid", filters.workspace)
        else:
            add("webhook_id = ANY(${n}::uuid[])", webhooks)
    if filters.event is not None:
        add("event_id = ${n}", filters.event)
    if since is not None:
        add(f"{time_column} >= ${{n}}", since)
    return where, values
