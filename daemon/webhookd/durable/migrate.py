"""Creates and upgrades the database objects webhookd needs; safe to run any number of times, from any replica.

Two kinds of objects are managed here. The `webhookd` schema is ours: its SQL files in `migrations/` run once each,
in order, recorded in `webhookd.schema_migrations`; those of `migrations/attempt_log/` run the same way in the
database of the attempt log (`postgres.attempts_dsn`, or the same one), which then gets its first partitions. The
subscriptions table has Twenty's layout and, in a Twenty
database, belongs to Twenty: it is created only where it is missing and never altered; we only attach a trigger that
tells running daemons when a row changes.
"""

from __future__ import annotations

from importlib import resources

import asyncpg

from webhookd.routing.subscriptions import NOTIFY_CHANNEL
from webhookd.runtime.config import EndpointSettings

# Any constant works; it only has to be the same for every replica so that two `migrate` runs never interleave.
_MIGRATE_LOCK_KEY = 0x7765_6268_6F6F_6B64  # "webhookd"


def _subscriptions_ddl(table: str) -> str:
    schema = table.rpartition(".")[0]
    # Looked up before it is created: Postgres checks CREATE on the schema (and on the database for a schema) even
    # for IF NOT EXISTS, and a Twenty database's own table needs no such grant to webhookd's role.
    create_schema = f"IF to_regnamespace('{schema}') IS NULL THEN CREATE SCHEMA {schema}; END IF;" if schema else ""
    return f"""
    DO $create_table$ BEGIN
        {create_schema}
        IF to_regclass('{table}') IS NULL THEN
            CREATE TABLE {table} (
                id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                "workspaceId" uuid NOT NULL,
                "targetUrl"   text NOT NULL,
                operations    text[] NOT NULL DEFAULT '{{*.*}}',
                description   text,
                secret        text NOT NULL,
                "createdAt"   timestamptz NOT NULL DEFAULT now(),
                "updatedAt"   timestamptz NOT NULL DEFAULT now(),
                "deletedAt"   timestamptz
            );
        END IF;
    END $create_table$;
    -- SECURITY DEFINER: in a Twenty database, Twenty's own role changes the rows and has no rights on our schema.
    CREATE OR REPLACE FUNCTION webhookd.notify_subscription_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            DELETE FROM webhookd.previous_secrets WHERE webhook_id = OLD.id;
        ELSIF TG_OP = 'UPDATE' AND NEW.secret IS DISTINCT FROM OLD.secret THEN
            -- A rotation: the old secret stays valid for the configured overlap.
            INSERT INTO webhookd.previous_secrets (webhook_id, secret, replaced_at)
            VALUES (OLD.id, OLD.secret, now())
            ON CONFLICT (webhook_id) DO UPDATE SET secret = EXCLUDED.secret, replaced_at = EXCLUDED.replaced_at;
        END IF;
        -- The payload is only the row id: the listener reads the row itself, so the secret never travels here.
        PERFORM pg_notify('{NOTIFY_CHANNEL}', COALESCE(NEW.id, OLD.id)::text);
        RETURN NULL;
    END $$;
    -- Created once, not replaced: replacing it would undo what the table's owner may have set on it since, such as
    -- ENABLE ALWAYS, which makes it fire for rows that logical replication applies.
    DO $create$ BEGIN
        IF NOT EXISTS (
            SELECT FROM pg_trigger
            WHERE tgrelid = '{table}'::regclass AND tgname = 'webhookd_subscription_change'
        ) THEN
            CREATE TRIGGER webhookd_subscription_change
                AFTER INSERT OR UPDATE OR DELETE ON {table}
                FOR EACH ROW EXECUTE FUNCTION webhookd.notify_subscription_change();
        END IF;
    END $create$;
    """


async def migrate(
    conn: asyncpg.Connection,
    table: str,
    attempts: asyncpg.Connection | None = None,
    *,
    retention: float = EndpointSettings().attempt_log_retention_seconds,
) -> list[str]:
    """Bring the database up to date and return the names of the migrations applied now.

    `table` is the subscriptions table already quoted for SQL, with its schema if it has one ('"core"."webhook"').
    `attempts` is a connection to the attempt log's own database, if it has one; `retention` is the attempt log's
    (`endpoints.attempt_log_retention_seconds`), which decides the partitions to drop.
    """
    async with conn.transaction():
        applied = await _apply(conn, _migration_files(""))
        await conn.execute(_subscriptions_ddl(table))
    log_conn = attempts if attempts is not None else conn
    async with log_conn.transaction():
        applied += await _apply(log_conn, _migration_files(ATTEMPT_LOG))
        await log_conn.execute("SELECT webhookd.keep_attempt_partitions($1, $2)", retention, DAYS_AHEAD)
    return applied


# The folder of the attempt log's migrations, and its prefix in the names recorded.
ATTEMPT_LOG = "attempt_log"
# Days of partitions made ahead of time: the daemons make more every few minutes, so two are enough for a database
# no daemon writes to for a day after `migrate`.
DAYS_AHEAD = 2


async def _apply(conn: asyncpg.Connection, files: list[tuple[str, str]]) -> list[str]:
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK_KEY)
    await conn.execute(
        """
        DO $create_schema$ BEGIN
            -- Only where missing, so that a migrated database asks no CREATE on the database of later runs.
            IF to_regnamespace('webhookd') IS NULL THEN CREATE SCHEMA webhookd; END IF;
        END $create_schema$;
        CREATE TABLE IF NOT EXISTS webhookd.schema_migrations (
            name       text PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        );
        """
    )
    done = {r["name"] for r in await conn.fetch("SELECT name FROM webhookd.schema_migrations")}
    for name, sql in files:
        if name in done:
            continue
        await conn.execute(sql)
        await conn.execute("INSERT INTO webhookd.schema_migrations (name) VALUES ($1)", name)
        applied.append(name)
    return applied


def _migration_files(folder_name: str) -> list[tuple[str, str]]:
    """The SQL files of `migrations/` or of one of its folders, in order, named as recorded ('attempt_log/0001_...')."""
    folder = resources.files("webhookd.durable") / "migrations"
    if folder_name:
        folder = folder / folder_name
    prefix = f"{folder_name}/" if folder_name else ""
    return sorted((prefix + f.name, f.read_text("utf-8")) for f in folder.iterdir() if f.name.endswith(".sql"))
