"""Twenty's layouts read from its database: loaded for a workspace the first time one of its changes arrives, then
kept current.

Twenty's own tables say what a workspace schema holds: `core.workspace."databaseSchema"` which workspace it belongs
to, the object and field metadata (`objectMetadata`, `fieldMetadata`, in schema `core`, or `metadata` before Twenty
moved them) what each table and column means, and Postgres' catalog each column's type. A layout is read again when
a change names a table or column it does not know (a custom object or field added since), and a periodic check
compares a digest of the metadata and columns of every workspace seen with the one loaded, so a renamed field or
a changed type is picked up without a restart. Nothing here writes to Twenty's tables.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

import asyncpg
import structlog

from webhookd.durable.transient import TRANSIENT
from webhookd.intake.debezium import Change
from webhookd.intake.twenty_layout import (
    ColumnRow,
    FieldRow,
    ObjectRow,
    WorkspaceLayout,
    build_layout,
    workspace_id_from_schema,
)

log = structlog.get_logger("webhookd.intake.twenty_catalog")

# A stale layout is read again on a miss at most this often, so a table Twenty does not describe costs one query a
# second, not one per change.
_MISS_RELOAD_SECONDS: Final = 1.0
_RETRY_SECONDS: Final = 1.0
# A connection or a catalog query that takes longer is given up and tried again, never waited on for ever.
_QUERY_SECONDS: Final = 10.0
_LOAD_SECONDS: Final = 30.0

# From pg_catalog, which every role may read: a table of Twenty's that this role may not read must be named in the
# startup check's message, not be mistaken for a missing one.
_FIND_METADATA = """
WITH twenty AS (
  SELECT n.nspname AS schema, c.relname AS table FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname IN ('core', 'metadata') AND c.relname IN ('objectMetadata', 'fieldMetadata', 'dataSource')
)
SELECT (SELECT o.schema FROM twenty o JOIN twenty f ON f.schema = o.schema AND f.table = 'fieldMetadata'
        WHERE o.table = 'objectMetadata' ORDER BY o.schema = 'core' DESC LIMIT 1) AS metadata_schema,
       EXISTS (SELECT FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'core' AND c.relname = 'workspace' AND a.attname = 'databaseSchema'
                 AND NOT a.attisdropped) AS has_workspaces,
       (SELECT schema FROM twenty WHERE "table" = 'dataSource' ORDER BY schema = 'core' DESC LIMIT 1)
         AS data_source_schema
"""
# Twenty's record of which workspace a schema holds: `core.workspace."databaseSchema"` since Twenty 1.22, the
# `dataSource` table (in `core`, or `metadata` before May 2025) before; a workspace row whose `databaseSchema` is
# still empty vouches for the name's own id.
_NOW_MS = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_WORKSPACE_BY_SCHEMA = 'SELECT id::text FROM core.workspace WHERE "databaseSchema" = $1 LIMIT 1'
_WORKSPACE_BY_DATA_SOURCE = 'SELECT "workspaceId"::text FROM {d}."dataSource" WHERE schema = $1 LIMIT 1'
_WORKSPACE_NOT_MIGRATED = "SELECT id::text FROM core.workspace WHERE id = $1::uuid AND \"databaseSchema\" = ''"
_OBJECTS = 'SELECT id::text, "nameSingular", "isCustom" FROM {m}."objectMetadata" WHERE "workspaceId" = $1'
# Through to_jsonb, so that a Twenty old enough to have no `settings` column still answers.
_FIELDS = """
SELECT f."objectMetadataId"::text, f.name, f.type::text, to_jsonb(f) -> 'settings' ->> 'joinColumnName'
FROM {m}."fieldMetadata" f WHERE f."workspaceId" = $1
"""
_COLUMNS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS pg_type,
       CASE WHEN t.typcategory = 'A' THEN format_type(t.typelem, a.atttypmod) END AS element_type
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY c.relname, a.attnum
"""
# One digest per workspace schema of what its layout is built from; a layout whose digest moved is read again.
_COLUMN_DIGESTS = """
SELECT n.nspname AS schema,
       sum(hashtextextended(c.relname || '.' || a.attname || ':' || a.atttypid || ':' || a.atttypmod, 0))::text
         AS digest
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
GROUP BY n.nspname
"""
_METADATA_DIGESTS = """
SELECT w AS workspace,
       (SELECT coalesce(sum(hashtextextended(o.id::text || o."nameSingular" || o."isCustom"::text, 0)), 0)
        FROM {m}."objectMetadata" o WHERE o."workspaceId" = w)::text || ':' ||
       (SELECT coalesce(sum(hashtextextended(f."objectMetadataId"::text || f.name || f.type::text, 0)), 0)
        FROM {m}."fieldMetadata" f WHERE f."workspaceId" = w)::text AS digest
FROM unnest($1::uuid[]) AS w
"""


@dataclass(frozen=True, slots=True)
class NotTwenty:
    """A schema that is no Twenty workspace; remembered for a while so its changes cost no query each."""

    since: float


class TwentyCatalog:
    """Layouts by workspace schema, loaded on demand from Postgres."""

    def __init__(self, pool: asyncpg.Pool, refresh_seconds: float) -> None:
        self._pool = pool
        self._refresh_seconds = refresh_seconds
        self._layouts: dict[str, WorkspaceLayout | NotTwenty] = {}
        self._digests: dict[str, str] = {}  # by schema: columns digest and metadata digest
        self._metadata_schema: str | None = None
        self._has_workspaces = False
        self._data_source_schema: str | None = None
        self._inspected = False
        self._lock = asyncio.Lock()

    def cached(self, schema: str) -> WorkspaceLayout | NotTwenty | None:
        """What is known of a schema without asking Postgres; None: it must be loaded first."""
        known = self._layouts.get(schema)
        if isinstance(known, NotTwenty) and time.monotonic() - known.since > self._refresh_seconds:
            return None  # a workspace created since would otherwise wait forever
        return known

    def outdated(self, layout: WorkspaceLayout, change: Change) -> bool:
        """Whether the change names a table or column that a layout read now would know.

        A table is read for again once; a column whenever the change committed after the layout was read (a field
        added since), which the commit time tells exactly. A change without one (a flattened record without
        `__source_ts_ms`) may ask again once a second.
        """
        obj = layout.objects.get(change.table)
        if obj is None:
            return change.table not in layout.unknown_tables
        row = change.after if change.after is not None else change.before
        if row is None or row.keys() <= obj.columns.keys() or row.keys() <= obj.columns.keys() | obj.unknown_columns:
            return False
        if change.ts_ms is not None and layout.read_at_ms is not None:
            return change.ts_ms >= layout.read_at_ms
        return time.monotonic() - layout.loaded_at >= _MISS_RELOAD_SECONDS

    async def load(
        self,
        schema: str,
        stopping: asyncio.Event | None = None,
        *,
        for_table: str | None = None,
        for_columns: Collection[str] = (),
    ) -> WorkspaceLayout | NotTwenty:
        """Read one schema's layout, waiting out Postgres' outages and errors (until `stopping`).

        `for_table` and `for_columns` are what a change named: those the layout read does not know either are
        remembered as not Twenty's, so their further changes cost no query each (the periodic check still sees an
        object or field added later).

        Every error is waited out, not only an outage: a revoked grant or a statement timeout would otherwise cost
        the record (or, raised, the partition), while the log says what to mend and nothing is lost meanwhile.
        """
        while True:
            try:
                async with self._lock:
                    layout = await asyncio.wait_for(self._load(schema), _LOAD_SECONDS)
            except (*TRANSIENT, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("twenty_metadata_unavailable", schema=schema, error=str(exc), kind=type(exc).__name__)
                if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError):
                    self._inspected = False  # Twenty moved its tables (an upgrade): look for them again
                if stopping is not None and stopping.is_set():
                    raise
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            if isinstance(layout, WorkspaceLayout) and for_table is not None:
                obj = layout.objects.get(for_table)
                if obj is None:
                    layout.unknown_tables.add(for_table)
                else:
                    obj.unknown_columns.update(c for c in for_columns if c not in obj.columns)
            return layout

    async def check(self) -> list[str]:
        """What this role lacks to read Twenty's tables that are here: GRANT statements, none when it lacks nothing.

        Run at startup, so that a missing grant stops the daemon at once with the statement that mends it, not at
        the first change of some workspace.
        """
        async with self._pool.acquire() as conn:
            await self._inspect(conn)
            tables = []
            if self._has_workspaces:
                tables.append("core.workspace")
            if self._metadata_schema is not None:
                tables += [f'{self._metadata_schema}."objectMetadata"', f'{self._metadata_schema}."fieldMetadata"']
            if self._data_source_schema is not None:
                tables.append(f'{self._data_source_schema}."dataSource"')
            role = await conn.fetchval("SELECT quote_ident(current_user)")
            missing = []
            for table in tables:
                try:
                    await conn.execute(f"SELECT FROM {table} LIMIT 0")
                except asyncpg.InsufficientPrivilegeError:
                    schema = table.partition(".")[0]
                    missing.append(f"GRANT USAGE ON SCHEMA {schema} TO {role}; GRANT SELECT ON {table} TO {role};")
            return missing

    async def _inspect(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        if self._inspected:
            return
        found = await conn.fetchrow(_FIND_METADATA)
        assert found is not None
        self._metadata_schema, self._has_workspaces = found["metadata_schema"], found["has_workspaces"]
        self._data_source_schema = found["data_source_schema"]
        self._inspected = True
        log.info("twenty_metadata_found", metadata_schema=self._metadata_schema, workspaces_table=self._has_workspaces)

    async def _load(self, schema: str) -> WorkspaceLayout | NotTwenty:
        # One snapshot: a field added between two of these reads would leave a layout that no digest ever flags.
        async with (
            self._pool.acquire(timeout=_QUERY_SECONDS) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            await self._inspect(conn)
            read_at_ms = await conn.fetchval(_NOW_MS)
            workspace_id = await self._workspace_of(conn, schema)
            if workspace_id is None:
                self._layouts[schema] = NotTwenty(time.monotonic())
                return self._layouts[schema]
            m = self._metadata_schema
            objects: list[ObjectRow] = []
            fields: list[FieldRow] = []
            if m is not None:
                objects = [ObjectRow(*r) for r in await conn.fetch(_OBJECTS.format(m=m), workspace_id)]
                fields = [FieldRow(*r) for r in await conn.fetch(_FIELDS.format(m=m), workspace_id)]
            columns = [ColumnRow(*r) for r in await conn.fetch(_COLUMNS, schema)]
            digests = await _digests(conn, {schema: workspace_id}, m)
        self._digests[schema] = digests.get(schema, "")
        layout = build_layout(workspace_id, schema, objects, fields, columns, has_metadata=m is not None)
        layout.read_at_ms = read_at_ms
        self._layouts[schema] = layout
        log.info("twenty_layout_loaded", schema=schema, objects=len(layout.objects))
        return layout

    async def _workspace_of(self, conn: asyncpg.pool.PoolConnectionProxy, schema: str) -> str | None:
        """The workspace a schema holds, or None when it is no workspace's.

        Twenty's own record of the schema is the authority where it has one: `core.workspace."databaseSchema"`
        since Twenty 1.22, the `dataSource` table before. Only without either is the name's id taken on trust.
        """
        named = workspace_id_from_schema(schema)
        if not self._has_workspaces and self._data_source_schema is None:
            return named
        found: str | None = None
        if self._has_workspaces:
            found = await conn.fetchval(_WORKSPACE_BY_SCHEMA, schema)
        if found is None and self._data_source_schema is not None:
            found = await conn.fetchval(_WORKSPACE_BY_DATA_SOURCE.format(d=self._data_source_schema), schema)
        if found is None and named is not None and self._has_workspaces:
            found = await conn.fetchval(_WORKSPACE_NOT_MIGRATED, named)  # `databaseSchema` not filled in yet
        return found

    async def run(self) -> None:
        """Read again, every `refresh_seconds`, the layouts whose metadata or columns changed."""
        while True:
            await asyncio.sleep(self._refresh_seconds)
            loaded = {s: w.workspace_id for s, w in self._layouts.items() if isinstance(w, WorkspaceLayout)}
            if not loaded:
                continue
            try:
                async with self._pool.acquire(timeout=_QUERY_SECONDS) as conn:
                    digests = await _digests(conn, loaded, self._metadata_schema)
            except (*TRANSIENT, asyncpg.PostgresError, TimeoutError) as exc:
                # The layouts in hand keep serving; the next check tries again.
                log.warning("twenty_metadata_check_failed", error=str(exc), kind=type(exc).__name__)
                continue
            for schema in [s for s, d in digests.items() if self._digests.get(s) != d]:
                # The old layout serves until the new one is read: a change is never held up by the check.
                await self.load(schema)


async def _digests(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, workspaces: dict[str, str], metadata_schema: str | None
) -> dict[str, str]:
    """A digest per workspace schema of its columns and (where Twenty's metadata is here) its metadata."""
    columns = {r["schema"]: r["digest"] for r in await conn.fetch(_COLUMN_DIGESTS, list(workspaces))}
    metadata: dict[str, str] = {}
    if metadata_schema is not None:
        rows = await conn.fetch(_METADATA_DIGESTS.format(m=metadata_schema), list(workspaces.values()))
        metadata = {str(r["workspace"]): r["digest"] for r in rows}
    return {schema: f"{columns.get(schema)}/{metadata.get(ws)}" for schema, ws in workspaces.items()}
