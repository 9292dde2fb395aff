"""Change records of a Twenty-shaped database through the daemon, on the real broker and Postgres: the layout read
from Twenty's metadata, a custom field added while running, records Twenty would never send skipped by reason, and
what the receiver gets in Twenty's body. (The suite under tests/kafka runs the same with Debezium itself.)"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from tests.support import Receiver, add_webhook, get_text, metric, produce, running, settings_for
from webhookd.durable.migrate import migrate
from webhookd.embedded import create_database, create_topic
from webhookd.embedded.twenty import TwentyWorkspace, create_twenty_core
from webhookd.intake.twenty_catalog import NotTwenty, TwentyCatalog
from webhookd.intake.twenty_layout import WorkspaceLayout

STAMP = "2025-02-10T15:30:50.123456Z"


async def twenty_workspace(dsn: str) -> TwentyWorkspace:
    conn = await asyncpg.connect(dsn)
    try:
        await create_twenty_core(conn)
        return await TwentyWorkspace.create(conn, "Acme")
    finally:
        await conn.close()


def person_row(record_id: str, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": record_id,
        "position": 1.0,
        "createdAt": STAMP,
        "updatedAt": STAMP,
        "deletedAt": None,
        "createdBySource": "API",
        "createdByWorkspaceMemberId": None,
        "createdByName": "Zapier",
        "createdByContext": "{}",
        "nameFirstName": "Ada",
        "nameLastName": "Lovelace",
        "emailsPrimaryEmail": "ada@example.com",
        "emailsAdditionalEmails": None,
        "jobTitle": "Analyst",
        "city": "London",
        "companyId": None,
    }
    row.update(changes)
    return row


def change(
    ws: TwentyWorkspace,
    op: str,
    before: Any,
    after: Any,
    lsn: int,
    table: str = "person",
    ts_ms: int = 1_739_201_450_123,
) -> dict[str, Any]:
    source = {"schema": ws.schema, "table": table, "ts_ms": ts_ms, "lsn": lsn, "db": "twenty"}
    return {"before": before, "after": after, "source": source, "op": op, "ts_ms": 1_739_201_450_200}


async def test_the_catalog_reads_a_workspace_layout_from_twentys_metadata(dsn: str) -> None:
    ws = await twenty_workspace(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        catalog = TwentyCatalog(pool, refresh_seconds=60)
        layout = await catalog.load(ws.schema)
        assert isinstance(layout, WorkspaceLayout)
        assert layout.workspace_id == ws.workspace_id
        person = layout.objects["person"]
        assert person.object_id == ws.object_ids["person"]
        assert (person.columns["nameFirstName"].field, person.columns["nameFirstName"].sub) == ("name", "firstName")
        assert person.columns["companyId"].relation == "company"
        pet = layout.objects["_pet"]
        assert (pet.name_singular, pet.object_id) == ("pet", ws.object_ids["pet"])
        assert isinstance(await catalog.load("public"), NotTwenty)
        # A schema named like a workspace that Twenty does not know is no workspace either.
        assert isinstance(await catalog.load("workspace_1a2b3c"), NotTwenty)
    finally:
        await pool.close()


async def test_twenty_bodies_from_change_records_with_a_custom_field_added_while_running(
    kafka: str, dsn: str, receiver: Receiver
) -> None:
    ws = await twenty_workspace(dsn)
    prefix = f"twenty{uuid.uuid4().hex[:6]}"
    person_topic, pet_topic = f"{prefix}.{ws.schema}.person", f"{prefix}.{ws.schema}._pet"
    for name in (person_topic, pet_topic):
        await create_topic(kafka, name, 1)
    await add_webhook(dsn, ws.workspace_id, receiver.url("/hook"), ["*.*"])
    settings = settings_for(
        kafka,
        dsn,
        person_topic,
        kafka={"topics": [], "topic_pattern": f"{prefix}\\..*", "input_format": "debezium"},
        delivery={"body_format": "twenty"},
    )
    ada = str(uuid.uuid4())
    async with running(settings) as service:
        await produce(
            kafka,
            person_topic,
            [
                change(ws, "c", None, person_row(ada), 100),
                change(ws, "u", person_row(ada), person_row(ada, city="Paris", updatedAt="2025-02-11T00:00:00Z"), 101),
                change(ws, "u", person_row(ada), person_row(ada, updatedAt="2025-02-12T00:00:00Z"), 102),  # unchanged
                change(ws, "u", person_row(ada), person_row(ada, deletedAt=STAMP), 103),
                b"null",  # a deleted row's tombstone as JsonConverter writes it without schemas
                b"[1]",
                change(ws, "c", None, person_row(ada), 104, table="invoice"),
                {**change(ws, "c", None, person_row(ada), 105), "source": {"schema": "public", "table": "person"}},
            ],
        )
        await receiver.wait_for(lambda: len(receiver.requests) >= 3, 30, "created, updated and deleted")
        # A custom field added in Twenty's settings while the daemon runs: a composite of two new columns.
        conn = await asyncpg.connect(dsn)
        try:
            await ws.add_field(
                conn, "pet", "price", "CURRENCY", {"priceAmountMicros": "numeric", "priceCurrencyCode": "text"}
            )
        finally:
            await conn.close()
        rex = str(uuid.uuid4())
        micros = {"scale": 0, "value": base64.b64encode((2000).to_bytes(2, "big")).decode()}
        pet = {"id": rex, "name": "Rex", "priceAmountMicros": micros, "priceCurrencyCode": "EUR"}
        # Committed after the field was added, as Debezium's commit time says.
        committed = int(time.time() * 1000)
        await produce(kafka, pet_topic, [change(ws, "c", None, pet, 106, table="_pet", ts_ms=committed)])
        await receiver.wait_for(lambda: len(receiver.requests) >= 4, 30, "the pet with its new field")
        _, text = await get_text(f"http://{service.settings.http.listen}/metrics")

    bodies = [orjson.loads(r.body) for r in receiver.requests]
    assert [b["eventName"] for b in bodies] == ["person.created", "person.updated", "person.deleted", "pet.created"]
    created, updated, deleted, pet_created = bodies
    assert created["objectMetadata"] == {"id": ws.object_ids["person"], "nameSingular": "person"}
    assert created["record"]["name"] == {"firstName": "Ada", "lastName": "Lovelace"}
    assert created["record"]["emails"] == {"primaryEmail": "ada@example.com", "additionalEmails": []}
    assert created["record"]["createdBy"] == {
        "source": "API",
        "workspaceMemberId": None,
        "name": "Zapier",
        "context": {},
    }
    assert created["eventDate"] == "2025-02-10T15:30:50.123Z"
    assert "updatedFields" not in created
    assert updated["updatedFields"] == ["city"]
    assert deleted["updatedFields"] == ["deletedAt"]
    assert pet_created["record"]["price"] == {"amountMicros": 2000, "currencyCode": "EUR"}
    assert pet_created["objectMetadata"]["id"] == ws.object_ids["pet"]
    assert all(b["webhookId"] and b["targetUrl"] == receiver.url("/hook") for b in bodies)
    assert metric(text, "webhookd_events_skipped_total", reason="unchanged") == 1
    assert metric(text, "webhookd_events_skipped_total", reason="not_twenty") == 1
    assert metric(text, "webhookd_events_skipped_total", reason="tombstone") == 1
    # Topics named after workspaces are counted under the pattern that found them, never one series each.
    pattern = f"{prefix}\\..*"
    assert metric(text, "webhookd_events_consumed_total", topic=pattern) == 9
    assert ws.schema not in text
    assert metric(text, "webhookd_events_invalid_total", reason="unknown_table") == 1
    assert metric(text, "webhookd_events_invalid_total", reason="not_an_object") == 1


async def test_a_role_with_only_the_readmes_grants_migrates_again_and_reads_twentys_metadata(
    postgres_admin: str,
) -> None:
    dsn = await create_database(postgres_admin, f"t_{uuid.uuid4().hex[:12]}")
    role = f"webhookd_{uuid.uuid4().hex[:8]}"
    database = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(dsn)
    try:
        # Twenty's database, owned by Twenty's role (here the superuser), with its own webhook table.
        await create_twenty_core(conn)
        await migrate(conn, '"core"."webhook"')
        await conn.execute("DROP SCHEMA webhookd CASCADE")  # as if webhookd had never been migrated here
        ws = await TwentyWorkspace.create(conn, "Acme")
        await conn.execute(
            f"""
            CREATE ROLE {role} LOGIN;
            GRANT CONNECT, CREATE ON DATABASE "{database}" TO {role};
            GRANT USAGE ON SCHEMA core TO {role};
            GRANT SELECT, TRIGGER ON core.webhook TO {role};
            GRANT SELECT ON core.workspace, core."objectMetadata", core."fieldMetadata" TO {role};
            """
        )
    finally:
        await conn.close()
    as_role = dsn.replace("postgres@", f"{role}@", 1)
    conn = await asyncpg.connect(as_role)
    try:
        await migrate(conn, '"core"."webhook"')  # the first run creates the schema webhookd, owned by the role
    finally:
        await conn.close()
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM {role}')
    finally:
        await admin.close()
    conn = await asyncpg.connect(as_role)
    try:
        assert await migrate(conn, '"core"."webhook"') == []  # later runs need no CREATE anywhere
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(as_role, min_size=1, max_size=2)
    assert pool is not None
    try:
        catalog = TwentyCatalog(pool, refresh_seconds=60)
        assert await catalog.check() == []
        layout = await catalog.load(ws.schema)
        assert isinstance(layout, WorkspaceLayout)
        assert layout.objects["person"].columns["nameLastName"].field == "name"
    finally:
        await pool.close()
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'REVOKE SELECT ON core."fieldMetadata" FROM {role}')
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(as_role, min_size=1, max_size=2)
    assert pool is not None
    try:
        assert await TwentyCatalog(pool, refresh_seconds=60).check() == [
            f'GRANT USAGE ON SCHEMA core TO {role}; GRANT SELECT ON core."fieldMetadata" TO {role};'
        ]
    finally:
        await pool.close()


async def test_a_layout_that_cannot_be_read_is_waited_for_and_read_once_it_can(postgres_admin: str) -> None:
    dsn = await create_database(postgres_admin, f"t_{uuid.uuid4().hex[:12]}")
    role = f"webhookd_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    try:
        await create_twenty_core(admin)
        ws = await TwentyWorkspace.create(admin, "Acme")
        await admin.execute(
            f"""
            CREATE ROLE {role} LOGIN;
            GRANT USAGE ON SCHEMA core TO {role};
            GRANT SELECT ON core.workspace, core."objectMetadata" TO {role};
            """
        )
        pool = await asyncpg.create_pool(dsn.replace("postgres@", f"{role}@", 1), min_size=1, max_size=2)
        assert pool is not None
        try:
            # A revoked grant, say: neither a crash of the consume loop nor a record given up, but a wait.
            loading = asyncio.create_task(TwentyCatalog(pool, refresh_seconds=60).load(ws.schema))
            await asyncio.sleep(2.5)
            assert not loading.done()
            await admin.execute(f'GRANT SELECT ON core."fieldMetadata" TO {role}')
            layout = await asyncio.wait_for(loading, 10)
        finally:
            await pool.close()
    finally:
        await admin.close()
    assert isinstance(layout, WorkspaceLayout)
    assert layout.objects["person"].columns["nameFirstName"].sub == "firstName"
