"""Twenty's real change stream: writes to a Twenty-shaped database, made as Twenty's API makes them, read by Debezium
(configured by the shipped deploy/debezium/twenty-connector.json) into Apache Kafka, delivered by the daemon as
Twenty's events in both body formats, and each delivery accepted by the documented Node.js signature check."""

from __future__ import annotations

import asyncio
import collections
import datetime
import decimal
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from tests.delivery.test_node_verification import SECRETS, Verdict, node_receiver
from tests.kafka.debezium import Debezium
from tests.kafka.test_at_least_once import PATHS, _slow
from tests.support import (
    DaemonProcess,
    Receiver,
    add_webhook,
    config_for,
    get_text,
    metric,
    running,
    settings_for,
    write_config,
)
from webhookd.durable.migrate import migrate
from webhookd.embedded.twenty import TwentyWorkspace, create_twenty_core

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "debezium" / "twenty-connector.json"
# What a deployment sets for its own database; everything else of the shipped connector is used as it is.
_PER_DEPLOYMENT = (
    "database.hostname",
    "database.port",
    "database.user",
    "database.password",
    "database.dbname",
    "slot.name",
    "publication.name",
    "topic.prefix",
)
TWENTY_TABLE, DOCS_TABLE = '"core"."webhook"', '"core"."webhook_docs"'


def debezium_topics(prefix: str, **keys: Any) -> dict[str, Any]:
    """The `kafka` keys of a daemon reading the Debezium topics of `prefix`: every first write to a table makes a
    topic of its own, which the pattern finds within metadata_max_age_ms."""
    return {
        "topics": [],
        "topic_pattern": rf"{prefix}\.workspace_.*",
        "input_format": "debezium",
        "metadata_max_age_ms": 500,
        **keys,
    }


async def start_shipped_connector(debezium: Debezium, dsn: str, prefix: str) -> None:
    """Debezium on the database of `dsn`, configured as the shipped connector (plain envelopes), topics `prefix`.*"""
    await debezium.start(
        urlsplit(dsn).path.lstrip("/"),
        [],
        publication="webhookd_twenty",
        topic_prefix=prefix,
        schemas_enable=False,
        overrides=shipped_connector(),
    )


def shipped_connector() -> dict[str, Any]:
    config: dict[str, Any] = json.loads(SHIPPED.read_text())["config"]
    return {key: value for key, value in config.items() if key not in _PER_DEPLOYMENT}


@dataclass
class Step:
    """One write as Twenty's API makes it, and what the receiver must get for it (None: nothing)."""

    what: str
    write: Callable[[], Awaitable[Any]]
    event: str | None
    updated_fields: list[str] | None = None
    # Other rows the database changed on its own (a foreign key's ON DELETE SET NULL): events Twenty would not send.
    also: tuple[str, ...] = ()


async def wait_for(verdicts: list[Verdict], count: int, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(verdicts) < count:
        assert loop.time() < deadline, f"{len(verdicts)} of {count} deliveries within {timeout} s: {what}"
        await asyncio.sleep(0.1)


async def twenty_database(dsn: str) -> tuple[TwentyWorkspace, TwentyWorkspace]:
    conn = await asyncpg.connect(dsn)
    try:
        await create_twenty_core(conn)
        acme = await TwentyWorkspace.create(conn, "Acme")
        other = await TwentyWorkspace.create(conn, "Other")
        await migrate(conn, DOCS_TABLE)  # a second subscriptions table, for the daemon that sends the docs body
        # As the README asks of a superuser once: every table, so new workspaces and objects need no restart.
        await conn.execute("CREATE PUBLICATION webhookd_twenty FOR ALL TABLES")
        return acme, other
    finally:
        await conn.close()


async def add_docs_webhook(dsn: str, workspace: str, url: str, secret: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f'INSERT INTO {DOCS_TABLE} ("workspaceId", "targetUrl", operations, secret) VALUES ($1, $2, $3, $4)',
            uuid.UUID(workspace),
            url,
            ["*.*"],
            secret,
        )
    finally:
        await conn.close()


def person(company: str) -> dict[str, Any]:
    return {**person_row_values(), "companyId": company}


def deal(company: str, contact: str) -> dict[str, Any]:
    return {
        "name": "Big deal",
        "amountAmountMicros": decimal.Decimal("1500000000"),
        "amountCurrencyCode": "EUR",
        "stage": "MEETING",
        "tags": ["q4", "a,b"],
        "closeDate": datetime.datetime(2025, 3, 31, 17, 0, 0, 123456, tzinfo=datetime.UTC),
        "companyId": company,
        "pointOfContactId": contact,
    }


PET = {
    "name": "Rex",
    "species": "DOG",
    "traits": '{"good": true, "age": 4.5, "big": 12345678901234567890}',
    "birthDate": datetime.date(2020, 2, 29),
    "weightKg": decimal.Decimal("12.5"),
}


async def test_each_twenty_write_arrives_as_twentys_event_in_both_body_formats_and_verifies_in_node(
    kafka: str, dsn: str, debezium: Debezium, tmp_path: Path
) -> None:
    acme, other = await twenty_database(dsn)
    prefix = f"twenty{uuid.uuid4().hex[:6]}"
    twenty = settings_for(
        kafka, dsn, prefix, kafka=debezium_topics(prefix, group_id=f"{prefix}-t"), delivery={"body_format": "twenty"}
    )
    docs = settings_for(
        kafka,
        dsn,
        prefix,
        kafka=debezium_topics(prefix, group_id=f"{prefix}-d"),
        postgres={"subscriptions_table": "core.webhook_docs"},
    )
    conn = await asyncpg.connect(dsn)
    ids: dict[str, str] = {}

    async def insert(key: str, ws: TwentyWorkspace, obj: str, values: dict[str, Any]) -> None:
        ids[key] = await ws.insert(conn, obj, values)

    async def add_price_and_set_it() -> None:
        await acme.add_field(
            conn, "pet", "price", "CURRENCY", {"priceAmountMicros": "numeric", "priceCurrencyCode": "text"}
        )
        await acme.update(
            conn, "pet", ids["pet"], {"priceAmountMicros": decimal.Decimal(250_000_000), "priceCurrencyCode": "EUR"}
        )

    steps = [
        Step(
            "create a company",
            lambda: insert("company", acme, "company", {"name": "Acme", "employees": 12}),
            "company.created",
        ),
        Step("create a person", lambda: insert("person", acme, "person", person(ids["company"])), "person.created"),
        Step(
            "update one field",
            lambda: acme.update(conn, "person", ids["person"], {"city": "Paris"}),
            "person.updated",
            ["city"],
        ),
        Step("save with nothing changed", lambda: acme.update(conn, "person", ids["person"], {}), None),
        Step(
            "move to the trash",
            lambda: acme.soft_delete(conn, "person", ids["person"]),
            "person.deleted",
            ["deletedAt"],
        ),
        Step("restore", lambda: acme.restore(conn, "person", ids["person"]), "person.restored", ["deletedAt"]),
        Step(
            "create a deal",
            lambda: insert("deal", acme, "opportunity", deal(ids["company"], ids["person"])),
            "opportunity.created",
        ),
        Step(
            "move the deal's stage",
            lambda: acme.update(conn, "opportunity", ids["deal"], {"stage": "PROPOSAL"}),
            "opportunity.updated",
            ["stage"],
        ),
        Step("create a custom object's record", lambda: insert("pet", acme, "pet", PET), "pet.created"),
        Step("add a custom currency field, then set it", add_price_and_set_it, "pet.updated", ["price"]),
        Step(
            "destroy the person",
            lambda: acme.destroy(conn, "person", ids["person"]),
            "person.destroyed",
            also=("opportunity.updated",),  # the deal's pointOfContactId, set to null by the foreign key
        ),
        Step(
            "create a person in another workspace",
            lambda: insert("grace", other, "person", {"nameFirstName": "Grace"}),
            "person.created",
        ),
    ]
    by_step: list[list[Verdict]] = []
    try:
        async with node_receiver(tmp_path, with_body=True) as (port, verdicts):
            await add_webhook(dsn, acme.workspace_id, f"http://127.0.0.1:{port}/ascii", ["*.*"], SECRETS["/ascii"])
            await add_webhook(dsn, other.workspace_id, f"http://127.0.0.1:{port}/astral", ["*.*"], SECRETS["/astral"])
            await add_docs_webhook(dsn, acme.workspace_id, f"http://127.0.0.1:{port}/latin", SECRETS["/latin"])
            await start_shipped_connector(debezium, dsn, prefix)
            async with running(twenty) as twenty_daemon, running(docs):
                for step in steps:
                    before = len(verdicts)
                    await step.write()
                    # Acme's webhooks get each event twice (Twenty's body, the docs' body); the other workspace's once.
                    events = 0 if step.event is None else 1 + len(step.also)
                    wanted = events * (1 if "another workspace" in step.what else 2)
                    # One step at a time: each table is a topic of its own, so only this keeps the order of steps.
                    await wait_for(verdicts, before + wanted, 60, step.what)
                    await asyncio.sleep(0.3 if wanted else 1.5)  # room for anything that should not come
                    by_step.append(verdicts[before:])
                _, metrics = await get_text(f"http://{twenty_daemon.settings.http.listen}/metrics")
    finally:
        await conn.close()

    print()
    for step, got in zip(steps, by_step, strict=True):
        assert all(v.valid for v in got), f"{step.what}: the documented Node.js check refused {got}"
        if step.event is None:
            assert got == [], f"{step.what}: nothing should arrive, got {[v.detail['body'] for v in got]}"
            print(f"  {step.what:<42} -> skipped (webhookd_events_skipped_total)")
            continue
        also = [v for v in got if v.detail["body"].get("eventName", v.detail["body"].get("event")) in step.also]
        assert len(also) == len(step.also) * 2, f"{step.what}: {[v.detail['body'] for v in got]}"
        got = [v for v in got if v not in also]
        bodies = {v.path: v.detail["body"] for v in got}
        twenty_body = bodies["/astral" if "another workspace" in step.what else "/ascii"]
        assert twenty_body["eventName"] == step.event, step.what
        assert twenty_body.get("updatedFields") == step.updated_fields, step.what
        if "/latin" in bodies:
            assert bodies["/latin"]["event"] == step.event
            assert bodies["/latin"]["data"] == twenty_body["record"]
        print(
            f"  {step.what:<42} -> {step.event:<20} updatedFields={twenty_body.get('updatedFields')} "
            f"verified by node at {sorted(bodies)}"
        )
    record = {
        step.what: {v.path: v.detail["body"] for v in got if v.detail["body"].get("eventName") == step.event}
        for step, got in zip(steps, by_step, strict=True)
    }
    created = record["create a person"]["/ascii"]
    assert created["objectMetadata"] == {"id": acme.object_ids["person"], "nameSingular": "person"}
    assert created["workspaceId"] == acme.workspace_id
    assert created["record"]["name"] == {"firstName": "Ada", "lastName": "Lovelace"}
    assert created["record"]["emails"] == {
        "primaryEmail": "ada@example.com",
        "additionalEmails": ["ada@analytical.engine"],
    }
    assert created["record"]["companyId"] == ids["company"]
    assert created["record"]["createdAt"].endswith("Z")
    assert len(created["record"]["createdAt"]) == 24
    deal_body = record["create a deal"]["/ascii"]["record"]
    assert deal_body["amount"] == {"amountMicros": 1_500_000_000, "currencyCode": "EUR"}
    assert (deal_body["stage"], deal_body["tags"]) == ("MEETING", ["q4", "a,b"])
    assert deal_body["closeDate"] == "2025-03-31T17:00:00.123Z"
    pet = record["create a custom object's record"]["/ascii"]
    assert pet["objectMetadata"] == {"id": acme.object_ids["pet"], "nameSingular": "pet"}
    assert pet["record"]["traits"] == {"good": True, "age": 4.5, "big": 12345678901234567000}
    assert (pet["record"]["birthDate"], pet["record"]["weightKg"]) == ("2020-02-29", "12.50")
    priced = record["add a custom currency field, then set it"]["/ascii"]["record"]
    assert priced["price"] == {"amountMicros": 250_000_000, "currencyCode": "EUR"}
    assert record["destroy the person"]["/ascii"]["record"]["id"] == ids["person"]
    assert set(record["create a person in another workspace"]) == {"/astral"}
    assert metric(metrics, "webhookd_events_skipped_total", reason="unchanged") == 1


FLATTEN = {
    "transforms": "unwrap",
    "transforms.unwrap.type": "io.debezium.transforms.ExtractNewRecordState",
    "transforms.unwrap.add.fields": "op,table,schema,lsn,source.ts_ms",
    "transforms.unwrap.delete.tombstone.handling.mode": "rewrite",
}


async def test_the_wrapped_and_the_flattened_forms_give_the_envelopes_events(
    kafka: str, dsn: str, debezium: Debezium, receiver: Receiver
) -> None:
    acme, _ = await twenty_database(dsn)
    database = urlsplit(dsn).path.lstrip("/")
    forms = {"plain": ({}, False), "wrapped": ({}, True), "flattened": (FLATTEN, False)}
    daemons = []
    conn = await asyncpg.connect(dsn)
    try:
        for form, (extra, schemas) in forms.items():
            table = f"core.webhook_{form}"
            await migrate(conn, f'"core"."webhook_{form}"')
            await conn.execute(
                f'INSERT INTO {table} ("workspaceId", "targetUrl", operations, secret) VALUES ($1, $2, $3, $4)',
                uuid.UUID(acme.workspace_id),
                receiver.url(f"/{form}"),
                ["*.*"],
                "s3cr3t",
            )
            prefix = f"{form}{uuid.uuid4().hex[:6]}"
            overrides = {**shipped_connector(), **extra, "value.converter.schemas.enable": str(schemas).lower()}
            await debezium.start(
                database,
                [],
                publication="webhookd_twenty",
                topic_prefix=prefix,
                schemas_enable=schemas,
                overrides=overrides,
            )
            kafka_keys = debezium_topics(prefix, group_id=prefix)
            daemons.append(settings_for(kafka, dsn, prefix, kafka=kafka_keys, postgres={"subscriptions_table": table}))
        async with running(daemons[0]), running(daemons[1]), running(daemons[2]):
            person = await acme.insert(conn, "person", person_row_values())
            await receiver.wait_for(lambda: len(receiver.requests) >= 3, 60, "the creation in each form")
            await acme.update(conn, "person", person, {"city": "Paris"})
            await acme.soft_delete(conn, "person", person)
            await acme.destroy(conn, "person", person)
            await receiver.wait_for(lambda: len(receiver.requests) >= 12, 60, "four events in each form")
            await asyncio.sleep(1)
    finally:
        await conn.close()

    got = {form: [r.json() for r in receiver.at(f"/{form}")] for form in forms}
    names = ["person.created", "person.updated", "person.deleted", "person.destroyed"]
    for form, bodies in got.items():
        assert [b["event"] for b in bodies] == names, form
        print(f"  {form:<10} {[b['event'] for b in bodies]}")
    # The same records, but for what only the envelope's row before the change can tell: none here.
    assert [b["data"] for b in got["wrapped"]] == [b["data"] for b in got["plain"]]
    assert [b["data"] for b in got["flattened"]] == [b["data"] for b in got["plain"]]
    assert len({r.event_id for r in receiver.requests}) == 4  # each change has one id, whatever its form


def person_row_values() -> dict[str, Any]:
    return {
        "nameFirstName": "Ada",
        "nameLastName": "Lovelace",
        "emailsPrimaryEmail": "ada@example.com",
        "emailsAdditionalEmails": '["ada@analytical.engine"]',
        "city": "London",
    }


ROWS = 1500


async def test_a_daemon_reading_debezium_killed_mid_stream_loses_no_change(
    kafka: str, dsn: str, debezium: Debezium, receiver: Receiver, tmp_path: Path
) -> None:
    acme, _ = await twenty_database(dsn)
    prefix = f"crash{uuid.uuid4().hex[:6]}"
    for path in PATHS:
        receiver.behaviours[path] = _slow
        await add_webhook(dsn, acme.workspace_id, receiver.url(path), ["person.created"])
    await start_shipped_connector(debezium, dsn, prefix)
    conn = await asyncpg.connect(dsn)
    try:
        # Committed before the daemon starts: the stream is there to be read when the kill comes.
        for batch in range(ROWS // 100):
            async with conn.transaction():
                for i in range(100):
                    await acme.insert(conn, "person", {"nameFirstName": f"p{batch * 100 + i}"})
    finally:
        await conn.close()
    # The restarted process takes the dead one's place at once.
    kafka_keys = debezium_topics(prefix, group_instance_id=f"{prefix}-crash")
    config = config_for(kafka, dsn, prefix, kafka=kafka_keys, logging={"format": "json"})
    daemon = DaemonProcess(write_config(tmp_path / "c.yaml", config), {}, tmp_path / "daemon.log")
    try:
        daemon.start()
        await receiver.wait_for(lambda: len(receiver.requests) >= ROWS, 90, "a third of the pairs")
        daemon.kill()
        at_kill = len(receiver.requests)
        daemon.start()
        await receiver.wait_for(
            lambda: len(set(receiver.pairs())) >= ROWS * len(PATHS), 120, "every pair after the restart"
        )
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    counts = collections.Counter(receiver.pairs())
    names = {r.json()["data"]["name"]["firstName"] for r in receiver.requests}
    print(f"\n{ROWS} changes x {len(PATHS)} webhooks, killed after {at_kill} requests, "
          f"{sum(n - 1 for n in counts.values())} delivered twice or more")  # fmt: skip
    assert at_kill < ROWS * len(PATHS), "the kill came after everything was delivered"
    assert len(counts) == ROWS * len(PATHS)
    assert names == {f"p{i}" for i in range(ROWS)}
