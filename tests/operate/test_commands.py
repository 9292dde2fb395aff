"""The commands that need services: `migrate` (idempotent, never touching Twenty's own table), `run` refusing an
unmigrated database with a clear message, and `webhookd dev` showing verified deliveries end to end."""

from __future__ import annotations

import asyncio
import re
import tempfile
import uuid
from pathlib import Path

import asyncpg
import psutil

from tests.support import config_for, fetch, webhookd_cli, write_config
from webhookd.embedded import create_database


async def test_migrate_is_idempotent_and_leaves_an_existing_twenty_table_alone(postgres_admin: str, kafka: str) -> None:
    dsn = await create_database(postgres_admin, f"m_{uuid.uuid4().hex[:10]}")
    conn = await asyncpg.connect(dsn)
    try:
        # Twenty's table as Twenty made it, with a column of its own that migrate must keep.
        await conn.execute(
            'CREATE SCHEMA core; CREATE TABLE core.webhook (id uuid PRIMARY KEY, "workspaceId" uuid NOT NULL, '
            "\"targetUrl\" text NOT NULL, operations text[] NOT NULL DEFAULT '{*.*}', description text, "
            'secret text NOT NULL, "createdAt" timestamptz, "updatedAt" timestamptz, "deletedAt" timestamptz, '
            "\"twentyOwn\" text DEFAULT 'kept')"
        )
    finally:
        await conn.close()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp) / "c.yaml", config_for(kafka, dsn, "t"))
        first = await webhookd_cli("migrate", "--config", str(config))
        second = await webhookd_cli("migrate", "--config", str(config))
    assert first[0] == 0, first[1]
    assert "0001_state.sql" in first[1]
    assert second == (0, second[1])
    assert "none needed" in second[1]
    columns = await fetch(
        dsn, "SELECT column_name FROM information_schema.columns WHERE table_schema='core' AND table_name='webhook'"
    )
    assert "twentyOwn" in {r["column_name"] for r in columns}
    triggers = await fetch(dsn, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'core.webhook'::regclass")
    assert [r["tgname"] for r in triggers] == ["webhookd_subscription_change"]


async def test_migrate_keeps_the_firing_mode_the_table_owner_gave_the_trigger(postgres_admin: str, kafka: str) -> None:
    dsn = await create_database(postgres_admin, f"m_{uuid.uuid4().hex[:10]}")
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp) / "c.yaml", config_for(kafka, dsn, "t"))
        assert (await webhookd_cli("migrate", "--config", str(config)))[0] == 0
        conn = await asyncpg.connect(dsn)
        try:
            # As README advises where the table arrives by logical replication.
            await conn.execute("ALTER TABLE core.webhook ENABLE ALWAYS TRIGGER webhookd_subscription_change")
        finally:
            await conn.close()
        again = await webhookd_cli("migrate", "--config", str(config))  # as every pod's init container does
    assert again[0] == 0, again[1]
    mode = await fetch(dsn, "SELECT tgenabled FROM pg_trigger WHERE tgname = 'webhookd_subscription_change'")
    assert [r["tgenabled"] for r in mode] == [b"A"], "migrate undid ENABLE ALWAYS"


async def test_run_on_an_unmigrated_database_says_to_migrate_and_exits_1(postgres_admin: str, kafka: str) -> None:
    dsn = await create_database(postgres_admin, f"u_{uuid.uuid4().hex[:10]}")
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp) / "c.yaml", config_for(kafka, dsn, "t"))
        status, out = await webhookd_cli("run", "--config", str(config), timeout=60)
    assert status == 1
    assert "webhookd migrate" in out


async def test_run_with_a_bad_config_exits_2_naming_the_key() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text("postgres:\n  dsn: postgresql://u:hunter2@db/x\ndelivery:\n  concurrency: lots\n")
        status, out = await webhookd_cli("run", "--config", str(path))
    assert status == 2
    assert "delivery.concurrency" in out
    assert "hunter2" not in out


REPO = Path(__file__).resolve().parents[2]


async def test_dev_shows_verified_deliveries_and_leaves_no_process_behind() -> None:
    status, out = await webhookd_cli("dev", "--config", str(REPO / "config" / "dev.yaml"), "--events", "8", timeout=120)
    assert status == 0, out[-3000:]
    assert "signature verified" in out
    assert "0 failed verification" in out
    started = re.search(r"broker pid (\d+) .* Postgres pid (\d+)", out)
    assert started is not None, out[:2000]
    await asyncio.sleep(0.5)
    for pid in map(int, started.groups()):
        assert not _running(pid), f"webhookd dev left process {pid} running"


async def test_dev_cdc_without_java_says_what_is_missing_and_exits_2(tmp_path: Path) -> None:
    # An empty JAVA_HOME stands for a machine without Java: what `make run-cdc` then tells a newcomer.
    status, out = await webhookd_cli("dev", "--cdc", "--events", "1", env={"JAVA_HOME": str(tmp_path)}, timeout=60)

    assert status == 2, out[-2000:]
    assert "Java 17+ and Maven" in out
    assert f"JAVA_HOME={tmp_path} has no bin/java" in out
    assert "apt-get install" in out


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
