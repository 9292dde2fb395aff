"""deploy/postgres/roles.sql on the real Postgres: in a database whose subscriptions table belongs to Twenty's role,
the migrate role migrates (again and again), the runtime role runs the daemon end to end (deliveries, retries and dead
letters, subscription changes by Twenty's role), and the runtime role can change no structure. A database that one
role migrated before is taken over by the two roles; in one without Twenty's table, the migrate role creates it and
the runtime role only reads it."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web

from tests.daemon_tools import wait_ready
from tests.support import (
    DaemonProcess,
    Receiver,
    add_webhook,
    config_for,
    event,
    fetch,
    get_text,
    metric,
    new_workspace,
    produce,
    until,
    webhookd_cli,
    write_config,
)
from webhookd.durable.attempt_partitions import keep, retire_old_table
from webhookd.durable.migrate import migrate
from webhookd.embedded import _postgres_bin_dir, create_database
from webhookd.embedded.twenty import create_twenty_core
from webhookd.intake.twenty_catalog import TwentyCatalog

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"
SUBSCRIPTIONS = '"core"."webhook"'


def as_role(dsn: str, role: str, password: str) -> str:
    """The same server and database as `dsn`, logged in as `role`."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"))


@dataclass
class Database:
    """A database for webhookd's two roles: `admin` is the superuser's DSN, `twenty` that of the role that writes
    the webhooks (in a Twenty-like database, Twenty's role, which owns the database and its `core` tables)."""

    admin: str
    twenty: str
    migrate_role: str
    runtime_role: str
    suffix: str

    def migrate_dsn(self) -> str:
        return as_role(self.admin, self.migrate_role, f"m-{self.suffix}")

    def runtime_dsn(self) -> str:
        return as_role(self.admin, self.runtime_role, f"r-{self.suffix}")


async def twenty_database(postgres_admin: str) -> Database:
    suffix = uuid.uuid4().hex[:8]
    admin = await create_database(postgres_admin, f"roles_{suffix}")
    twenty = f"twenty_{suffix}"
    conn = await asyncpg.connect(admin)
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"CREATE ROLE {twenty} LOGIN PASSWORD 't-{suffix}'")
        await conn.execute(f'ALTER DATABASE "{database}" OWNER TO {twenty}')
        # As Twenty's role, so that it owns core.webhook as in a Twenty database. migrate creates the table where it
        # is missing, in Twenty's layout; its schema webhookd goes again, as if webhookd had never been here.
        await conn.execute(f"SET ROLE {twenty}")
        await create_twenty_core(conn)
        await migrate(conn, SUBSCRIPTIONS)
        await conn.execute("DROP SCHEMA webhookd CASCADE")
    finally:
        await conn.close()
    return Database(
        admin, as_role(admin, twenty, f"t-{suffix}"), f"webhookd_migrate_{suffix}", f"webhookd_{suffix}", suffix
    )


async def run_roles_sql(db: Database) -> None:
    """Run the file as an operator does, with psql as the superuser."""
    proc = await asyncio.create_subprocess_exec(
        str(_postgres_bin_dir() / "psql"),
        db.admin,
        "--no-psqlrc",
        "--file",
        str(ROLES_SQL),
        "--set",
        f"migrate_role={db.migrate_role}",
        "--set",
        f"runtime_role={db.runtime_role}",
        "--set",
        f"migrate_password=m-{db.suffix}",
        "--set",
        f"runtime_password=r-{db.suffix}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # timed out: psql must not outlive the test
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")


async def webhookd_migrate(dsn: str, kafka: str, tmp_path: Path) -> tuple[int, str]:
    config = write_config(tmp_path / f"migrate-{uuid.uuid4().hex[:6]}.yaml", config_for(kafka, dsn, "unused"))
    return await webhookd_cli("migrate", "--config", str(config))


@pytest.fixture
async def roles(postgres_admin: str) -> Database:
    """A Twenty-like database after roles.sql, as an operator leaves it before the first `webhookd migrate`."""
    db = await twenty_database(postgres_admin)
    await run_roles_sql(db)
    return db


async def fail(_request: web.Request, _body: bytes) -> web.StreamResponse:
    return web.Response(status=500, text="down")


async def test_migrate_role_migrates_and_runtime_role_delivers_retries_and_dead_letters_end_to_end(
    roles: Database, kafka: str, topic: str, receiver: Receiver, tmp_path: Path
) -> None:
    first = await webhookd_migrate(roles.migrate_dsn(), kafka, tmp_path)
    assert first[0] == 0, first[1]
    assert "0001_state.sql" in first[1]
    workspace = new_workspace()
    # Twenty's role writes the webhooks, and the trigger the migrate role attached fires for it.
    await add_webhook(roles.twenty, workspace, receiver.url("/ok"), ["person.created"])
    receiver.behaviours["/fail"] = fail
    config = config_for(kafka, roles.runtime_dsn(), topic)
    daemon = DaemonProcess(write_config(tmp_path / "run.yaml", config), {}, tmp_path / "daemon.log")
    daemon.start()
    try:
        await wait_ready(daemon, config["http"]["listen"])
        failing = await add_webhook(roles.twenty, workspace, receiver.url("/fail"), ["person.*"])

        async def both_loaded() -> bool:
            _, text = await get_text(f"http://{config['http']['listen']}/metrics")
            return metric(text, "webhookd_subscriptions") == 2

        await until(both_loaded, 10, "the webhook Twenty's role added, through LISTEN")
        await produce(kafka, topic, [event("person.created", workspace)])
        await receiver.wait_for(lambda: len(receiver.at("/ok")) == 1, 30, "the delivery")

        async def dead_lettered() -> bool:
            rows = await fetch(
                roles.admin, "SELECT status, attempts FROM webhookd.deliveries WHERE webhook_id = $1", failing
            )
            return [tuple(row) for row in rows] == [("dead", 3)]

        # The retry path: a pending row written, claimed, updated twice, then dead; every attempt logged by COPY.
        await until(dead_lettered, 30, "the failing delivery to be retried and dead-lettered")
        assert len(receiver.at("/fail")) == 3

        async def attempts_logged() -> bool:
            logged = "SELECT FROM webhookd.attempt_log UNION ALL SELECT FROM webhookd.first_tries"
            return len(await fetch(roles.admin, logged)) == 4

        await until(attempts_logged, 30, "the attempt log")
        assert daemon.terminate() == 0
    finally:
        daemon.kill()

    log = (tmp_path / "daemon.log").read_text(errors="replace")
    assert "permission denied" not in log, log
    again = await webhookd_migrate(roles.migrate_dsn(), kafka, tmp_path)
    assert again[0] == 0, again[1]
    assert "none needed" in again[1]


async def test_runtime_role_reads_twentys_metadata_and_can_change_no_structure(
    roles: Database, kafka: str, tmp_path: Path
) -> None:
    assert (await webhookd_migrate(roles.migrate_dsn(), kafka, tmp_path))[0] == 0
    ddl = [
        "CREATE TABLE webhookd.x (id int)",
        "ALTER TABLE webhookd.deliveries ADD COLUMN x int",
        "DROP TABLE webhookd.members",
        "CREATE OR REPLACE FUNCTION webhookd.pace_lease() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "TRUNCATE webhookd.deliveries",
        "DROP TRIGGER webhookd_subscription_change ON core.webhook",
        "CREATE TRIGGER x AFTER INSERT ON core.webhook FOR EACH ROW EXECUTE FUNCTION webhookd.notify_options_change()",
        "ALTER TABLE core.webhook ADD COLUMN x int",
        "CREATE SCHEMA x",
        "CREATE TABLE public.x (id int)",
        "CREATE TABLE webhookd.attempt_log_20991231 PARTITION OF webhookd.attempt_log "
        "FOR VALUES FROM ('2099-12-31') TO ('2100-01-01')",
        "DROP TABLE webhookd.attempts",
        "TRUNCATE webhookd.attempts",
    ]
    runtime = await asyncpg.connect(roles.runtime_dsn())
    try:
        for statement in ddl:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await runtime.execute(statement)
        # Nor may it change Twenty's rows.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute("DELETE FROM core.webhook")
    finally:
        await runtime.close()
    denied = await webhookd_migrate(roles.runtime_dsn(), kafka, tmp_path)
    assert denied[0] == 1, denied[1]
    assert "permission denied" in denied[1] or "must be owner" in denied[1], denied[1]

    # A table a later release's migration creates is the runtime role's to use at once: the default privileges.
    migrate_conn = await asyncpg.connect(roles.migrate_dsn())
    try:
        await migrate_conn.execute("CREATE TABLE webhookd.later (id bigserial PRIMARY KEY, note text)")
    finally:
        await migrate_conn.close()
    pool = await asyncpg.create_pool(roles.runtime_dsn(), min_size=1, max_size=2)
    assert pool is not None
    try:
        await pool.execute("INSERT INTO webhookd.later (note) VALUES ('x')")
        assert await pool.fetchval("DELETE FROM webhookd.later RETURNING id") == 1
        # The attempt log's partitions come and go through the functions that run as the migrate role, and are the
        # runtime role's to write at once.
        created, _ = await keep(pool, 86400 * 14)
        assert created == 0, "migrate made the coming days"
        await pool.execute("SELECT webhookd.keep_attempt_partitions(1, 5)")
        far = (datetime.now(UTC) + timedelta(days=5)).replace(hour=12)
        await pool.execute(
            "INSERT INTO webhookd.attempt_log (event_id, webhook_id, workspace_id, event_name, attempt, at, "
            "duration_ms, result) VALUES ('e', gen_random_uuid(), gen_random_uuid(), 'x.y', 1, $1, 1, '5xx')",
            far,
        )
    finally:
        await pool.close()
    # The attempt log of earlier releases is emptied through its function too, which this role may call.
    await fetch(
        roles.admin,
        "INSERT INTO webhookd.attempts (event_id, webhook_id, workspace_id, event_name, attempt, at, duration_ms, "
        "result) VALUES ('old', gen_random_uuid(), gen_random_uuid(), 'x.y', 1, now() - interval '30 days', 1, '2xx')",
    )
    pool = await asyncpg.create_pool(roles.runtime_dsn(), min_size=1, max_size=2)
    assert pool is not None
    try:
        assert await retire_old_table(pool, 86400.0)
        assert await pool.fetchval("SELECT count(*) FROM webhookd.attempts") == 0
        # What the Debezium input and the twenty body read from Twenty's metadata.
        assert await TwentyCatalog(pool, refresh_seconds=60).check() == []
    finally:
        await pool.close()


async def test_a_database_one_role_migrated_is_taken_over_by_the_two_roles(postgres_admin: str, kafka: str) -> None:
    db = await twenty_database(postgres_admin)
    database = urlsplit(db.admin).path.lstrip("/")
    # The single role of earlier releases, named as the runtime role is now, with the grants the README gave it.
    admin = await asyncpg.connect(db.admin)
    try:
        await admin.execute(
            f"""
            CREATE ROLE {db.runtime_role} LOGIN PASSWORD 'r-{db.suffix}';
            GRANT CONNECT, CREATE ON DATABASE "{database}" TO {db.runtime_role};
            GRANT USAGE ON SCHEMA core TO {db.runtime_role};
            GRANT SELECT, TRIGGER ON core.webhook TO {db.runtime_role};
            """
        )
    finally:
        await admin.close()
    with tempfile.TemporaryDirectory() as tmp:
        single = await webhookd_migrate(db.runtime_dsn(), kafka, Path(tmp))
        assert single[0] == 0, single[1]

        await run_roles_sql(db)
        await run_roles_sql(db)  # idempotent

        owners = await fetch(
            db.admin,
            "SELECT DISTINCT r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE c.relnamespace = 'webhookd'::regnamespace "
            "UNION SELECT r.rolname FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner "
            "WHERE p.pronamespace = 'webhookd'::regnamespace "
            "UNION SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'webhookd'",
        )
        assert [row[0] for row in owners] == [db.migrate_role]
        again = await webhookd_migrate(db.migrate_dsn(), kafka, Path(tmp))
        assert again[0] == 0, again[1]
    runtime = await asyncpg.connect(db.runtime_dsn())
    try:
        for statement in (
            "CREATE TABLE webhookd.x (id int)",
            "DROP TRIGGER webhookd_subscription_change ON core.webhook",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await runtime.execute(statement)
        assert await runtime.fetchval("SELECT count(*) FROM webhookd.deliveries") == 0
        assert await runtime.fetchval("SELECT count(*) FROM core.webhook") == 0
        assert not await runtime.fetchval(
            "SELECT has_database_privilege(current_user, current_database(), 'CREATE') "
            "OR has_table_privilege(current_user, 'core.webhook', 'TRIGGER')"
        )
    finally:
        await runtime.close()


async def test_without_twentys_table_the_migrate_role_creates_it_and_the_runtime_role_only_reads_it(
    postgres_admin: str, kafka: str, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    admin = await create_database(postgres_admin, f"roles_{suffix}")
    db = Database(admin, admin, f"webhookd_migrate_{suffix}", f"webhookd_{suffix}", suffix)
    await run_roles_sql(db)

    migrated = await webhookd_migrate(db.migrate_dsn(), kafka, tmp_path)
    assert migrated[0] == 0, migrated[1]
    webhook = await add_webhook(db.admin, new_workspace(), "https://example.com/hook", ["*.*"])
    runtime = await asyncpg.connect(db.runtime_dsn())
    try:
        assert await runtime.fetchval("SELECT id::text FROM core.webhook") == webhook
        for statement in ("DELETE FROM core.webhook", "ALTER TABLE core.webhook ADD COLUMN x int"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await runtime.execute(statement)
    finally:
        await runtime.close()
