"""A Twenty-shaped database for `webhookd dev --cdc` and the tests: Twenty's own tables, as far as webhookd reads them,
and workspaces that change the way Twenty's API changes them.

`create_twenty_core` makes `core.workspace` and the object and field metadata tables; `TwentyWorkspace.create` makes
a `workspace_<base36>` schema with `person`, `company`, `opportunity` and the custom object `pet` (table `_pet`),
with composite, currency, jsonb, enum, array, date and relation columns, every table `REPLICA IDENTITY FULL` as
Debezium needs for the row before an update. The write methods do what Twenty's API does to a row: an update sets
`updatedAt`, a delete from the UI moves to the trash (`deletedAt`), a restore clears it, a destroy deletes the row.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from webhookd.intake.twenty_layout import schema_for_workspace

CORE_SQL = """
CREATE SCHEMA IF NOT EXISTS core;
CREATE TABLE IF NOT EXISTS core.workspace (
    id uuid PRIMARY KEY,
    "displayName" varchar,
    "databaseSchema" varchar NOT NULL DEFAULT '',
    "createdAt" timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS core."objectMetadata" (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    "nameSingular" varchar NOT NULL,
    "namePlural" varchar NOT NULL,
    "labelSingular" varchar NOT NULL,
    "isCustom" boolean NOT NULL DEFAULT false,
    "isActive" boolean NOT NULL DEFAULT true,
    "workspaceId" uuid NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    UNIQUE ("nameSingular", "workspaceId")
);
CREATE TABLE IF NOT EXISTS core."fieldMetadata" (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    "objectMetadataId" uuid NOT NULL REFERENCES core."objectMetadata" (id) ON DELETE CASCADE,
    type varchar NOT NULL,
    name varchar NOT NULL,
    label varchar NOT NULL,
    "isCustom" boolean NOT NULL DEFAULT false,
    "isActive" boolean NOT NULL DEFAULT true,
    "isNullable" boolean NOT NULL DEFAULT true,
    settings jsonb,
    "workspaceId" uuid NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, "objectMetadataId")
);
"""

# Columns every object's table has, as Twenty creates them.
_SYSTEM_COLUMNS = """
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    position double precision,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    "deletedAt" timestamptz,
    "createdBySource" {schema}."actor_source_enum" NOT NULL DEFAULT 'MANUAL',
    "createdByWorkspaceMemberId" uuid,
    "createdByName" text NOT NULL DEFAULT '',
    "createdByContext" jsonb"""

_WORKSPACE_SQL = """
CREATE SCHEMA {schema};
CREATE TYPE {schema}."actor_source_enum" AS ENUM ('EMAIL', 'CALENDAR', 'WORKFLOW', 'API', 'IMPORT', 'MANUAL', 'SYSTEM');
CREATE TYPE {schema}."opportunity_stage_enum" AS ENUM ('NEW', 'SCREENING', 'MEETING', 'PROPOSAL', 'CUSTOMER');
CREATE TYPE {schema}."_pet_species_enum" AS ENUM ('DOG', 'CAT', 'BIRD');
CREATE TABLE {schema}.company ({system},
    name text,
    "domainNamePrimaryLinkUrl" text,
    "domainNamePrimaryLinkLabel" text,
    "domainNameSecondaryLinks" jsonb,
    employees integer,
    "annualRecurringRevenueAmountMicros" numeric,
    "annualRecurringRevenueCurrencyCode" text
);
CREATE TABLE {schema}.person ({system},
    "nameFirstName" text,
    "nameLastName" text,
    "emailsPrimaryEmail" text,
    "emailsAdditionalEmails" jsonb,
    "jobTitle" text,
    city text,
    "companyId" uuid REFERENCES {schema}.company (id) ON DELETE SET NULL
);
CREATE TABLE {schema}.opportunity ({system},
    name text,
    "amountAmountMicros" numeric,
    "amountCurrencyCode" text,
    "closeDate" timestamptz,
    stage {schema}."opportunity_stage_enum" NOT NULL DEFAULT 'NEW',
    tags text[],
    "companyId" uuid REFERENCES {schema}.company (id) ON DELETE SET NULL,
    "pointOfContactId" uuid REFERENCES {schema}.person (id) ON DELETE SET NULL
);
CREATE TABLE {schema}._pet ({system},
    name text,
    species {schema}."_pet_species_enum",
    traits jsonb,
    "birthDate" date,
    "weightKg" numeric(6, 2)
);
ALTER TABLE {schema}.company REPLICA IDENTITY FULL;
ALTER TABLE {schema}.person REPLICA IDENTITY FULL;
ALTER TABLE {schema}.opportunity REPLICA IDENTITY FULL;
ALTER TABLE {schema}._pet REPLICA IDENTITY FULL;
"""

_SYSTEM_FIELDS = (
    ("id", "UUID"),
    ("position", "POSITION"),
    ("createdAt", "DATE_TIME"),
    ("updatedAt", "DATE_TIME"),
    ("deletedAt", "DATE_TIME"),
    ("createdBy", "ACTOR"),
)
# Each object's own fields: name -> Twenty's field type. Composite fields span the columns named after them.
OBJECTS: Mapping[str, tuple[bool, tuple[tuple[str, str], ...]]] = {
    "company": (
        False,
        (
            ("name", "TEXT"),
            ("domainName", "LINKS"),
            ("employees", "NUMBER"),
            ("annualRecurringRevenue", "CURRENCY"),
        ),
    ),
    "person": (
        False,
        (("name", "FULL_NAME"), ("emails", "EMAILS"), ("jobTitle", "TEXT"), ("city", "TEXT"), ("company", "RELATION")),
    ),
    "opportunity": (
        False,
        (
            ("name", "TEXT"),
            ("amount", "CURRENCY"),
            ("closeDate", "DATE_TIME"),
            ("stage", "SELECT"),
            ("tags", "ARRAY"),
            ("company", "RELATION"),
            ("pointOfContact", "RELATION"),
        ),
    ),
    "pet": (
        True,
        (
            ("name", "TEXT"),
            ("species", "SELECT"),
            ("traits", "RAW_JSON"),
            ("birthDate", "DATE"),
            ("weightKg", "NUMERIC"),
        ),
    ),
}


async def create_twenty_core(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    """Twenty's core tables that webhookd reads, where missing."""
    await conn.execute(CORE_SQL)


@dataclass
class TwentyWorkspace:
    """One workspace: its schema, its objects' metadata ids, and writes as Twenty's API makes them."""

    workspace_id: str
    schema: str
    object_ids: dict[str, str] = field(default_factory=dict)  # nameSingular -> objectMetadata.id

    @classmethod
    async def create(
        cls, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, name: str, workspace_id: str | None = None
    ) -> TwentyWorkspace:
        workspace_id = workspace_id or str(uuid.uuid4())
        schema = schema_for_workspace(workspace_id)
        async with conn.transaction():
            await conn.execute(_WORKSPACE_SQL.format(schema=schema, system=_SYSTEM_COLUMNS.format(schema=schema)))
            await conn.execute(
                'INSERT INTO core.workspace (id, "displayName", "databaseSchema") VALUES ($1, $2, $3)',
                workspace_id,
                name,
                schema,
            )
            workspace = cls(workspace_id, schema)
            for singular, (custom, fields) in OBJECTS.items():
                object_id = await conn.fetchval(
                    'INSERT INTO core."objectMetadata" ("nameSingular", "namePlural", "labelSingular", "isCustom", '
                    '"workspaceId") VALUES ($1, $2, $3, $4, $5) RETURNING id::text',
                    singular,
                    singular + "s",
                    singular.title(),
                    custom,
                    workspace_id,
                )
                workspace.object_ids[singular] = object_id
                for field_name, kind in _SYSTEM_FIELDS + fields:
                    await workspace._field_metadata(conn, singular, field_name, kind)
        return workspace

    async def _field_metadata(
        self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, obj: str, name: str, kind: str
    ) -> None:
        settings = '{"relationType": "MANY_TO_ONE"}' if kind == "RELATION" else None
        await conn.execute(
            'INSERT INTO core."fieldMetadata" ("objectMetadataId", type, name, label, "isCustom", settings, '
            '"workspaceId") VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)',
            self.object_ids[obj],
            kind,
            name,
            name,
            OBJECTS[obj][0],
            settings,
            self.workspace_id,
        )

    def table(self, obj: str) -> str:
        custom = OBJECTS[obj][0] if obj in OBJECTS else True
        return f'{self.schema}."{"_" if custom else ""}{obj}"'

    async def insert(
        self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, obj: str, values: Mapping[str, Any]
    ) -> str:
        """A record created through the API; returns its id."""
        columns = ", ".join(f'"{c}"' for c in values)
        params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        record_id: str = await conn.fetchval(
            f"INSERT INTO {self.table(obj)} ({columns}) VALUES ({params}) RETURNING id::text", *values.values()
        )
        return record_id

    async def update(
        self,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
        obj: str,
        record_id: str,
        values: Mapping[str, Any],
    ) -> None:
        """An update through the API: the given columns, and `updatedAt` as Twenty sets it on every write."""
        sets = ", ".join([*(f'"{c}" = ${i}' for i, c in enumerate(values, 2)), '"updatedAt" = clock_timestamp()'])
        await conn.execute(f"UPDATE {self.table(obj)} SET {sets} WHERE id = $1", record_id, *values.values())

    async def soft_delete(
        self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, obj: str, record_id: str
    ) -> None:
        """A delete from Twenty's UI: the record moves to the trash."""
        await conn.execute(
            f'UPDATE {self.table(obj)} SET "deletedAt" = clock_timestamp(), "updatedAt" = clock_timestamp() '
            "WHERE id = $1",
            record_id,
        )

    async def restore(
        self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, obj: str, record_id: str
    ) -> None:
        await self.update(conn, obj, record_id, {"deletedAt": None})

    async def destroy(
        self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, obj: str, record_id: str
    ) -> None:
        """A permanent delete: the row is gone."""
        await conn.execute(f"DELETE FROM {self.table(obj)} WHERE id = $1", record_id)

    async def add_field(
        self,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
        obj: str,
        name: str,
        kind: str,
        columns: Mapping[str, str],
    ) -> None:
        """A custom field added in Twenty's settings: its columns and its metadata row, in one transaction."""
        async with conn.transaction():
            for column, pg_type in columns.items():
                await conn.execute(f'ALTER TABLE {self.table(obj)} ADD COLUMN "{column}" {pg_type}')
            await self._field_metadata(conn, obj, name, kind)
