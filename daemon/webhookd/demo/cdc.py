"""`webhookd dev --cdc`: a row change in a Twenty-shaped database becomes a signed webhook, on one machine.

It starts Apache Kafka, a Postgres with logical decoding and a Twenty-shaped database (`embedded.twenty`), Kafka
Connect with Debezium's Postgres connector configured by `deploy/debezium/twenty-connector.json` (the file a team
deploys), and the daemon reading Debezium's topics in Twenty's body format. Then it writes to the database as
Twenty's API does (create, update, an update of `updatedAt` alone, trash, restore, destroy, a custom field added)
and prints what each write made Debezium send and the receiver get, with the signature checked as Twenty's
documentation tells receivers to. The jars come from Maven Central on the first run. Without Java 17 and Maven it
says what is missing and exits 2. Ctrl-C stops all of it, while it starts too; whatever fails to start ends it at
once, saying why, with status 1 (as `webhookd dev`, whose `Interrupts` and waits it shares).
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from webhookd.demo.lifecycle import DemoFailed, DemoRun, Interrupted, Interrupts, dev_settings, in_thread
from webhookd.demo.receiver import signature_matches
from webhookd.durable.migrate import migrate
from webhookd.embedded import EmbeddedPostgres, create_database
from webhookd.embedded.apache_kafka import ApacheKafka
from webhookd.embedded.jars import JavaMissing, java_executable, maven_executable, resolve_jars
from webhookd.embedded.kafka_connect import KafkaConnect
from webhookd.embedded.twenty import TwentyWorkspace, create_twenty_core
from webhookd.runtime.children import free_port
from webhookd.runtime.config import Settings

# The connector a team deploys; the demo changes only where it connects.
CONNECTOR_FILE = Path(__file__).resolve().parents[2] / "deploy" / "debezium" / "twenty-connector.json"
_CONNECTION_KEYS = ("database.hostname", "database.port", "database.user", "database.password", "database.dbname")
_CDC_SETTINGS = {"wal_level": "logical", "max_replication_slots": "4", "max_wal_senders": "4"}
_STEP_SECONDS = 1.5


def run_dev_cdc(config: Path | None, rounds: int) -> int:
    """Entry point of `webhookd dev --cdc`; returns the exit status."""
    try:
        java_executable()
        maven_executable()
    except JavaMissing as exc:
        print(f"webhookd dev --cdc runs Apache Kafka and Debezium, which need Java 17+ and Maven: {exc}")
        return 2
    if not CONNECTOR_FILE.is_file():
        print(f"webhookd dev --cdc reads the Debezium connector from the source tree; {CONNECTOR_FILE} is missing")
        return 2
    return asyncio.run(_dev_cdc(config, rounds))


class CdcReceiver:
    """Receives Twenty-format deliveries, checks each signature, and prints what arrived."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self.arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.failures = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        verified = signature_matches(self._secret, request.headers, body)
        doc = orjson.loads(body)
        updated = doc.get("updatedFields")
        print(
            f"  receiver  {doc.get('eventName', '?'):<20} record {doc.get('record', {}).get('id', '?')[:8]}"
            + (f" updatedFields={updated}" if updated is not None else "")
            + f"  signature {'verified' if verified else 'MISMATCH'}"
        )
        if not verified:
            self.failures += 1
        await self.arrived.put(doc)
        return web.Response(status=200 if verified else 401)


async def _dev_cdc(config: Path | None, rounds: int) -> int:
    with Interrupts() as interrupts:
        try:
            return await _start_and_demo(config, rounds, interrupts)
        except DemoFailed as exc:
            print(f"webhookd dev --cdc: {exc}")
            return 1
        except Interrupted:
            print("webhookd dev --cdc: interrupted while starting")
            return interrupts.status


async def _start_and_demo(config: Path | None, rounds: int, interrupts: Interrupts) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="webhookd-dev-cdc-"))
    kafka: ApacheKafka | None = None
    postgres: EmbeddedPostgres | None = None
    connect: KafkaConnect | None = None
    print("webhookd dev --cdc: fetching the jars (minutes, the first time) and starting Apache Kafka and Postgres ...")
    try:
        await in_thread("fetching the jars from Maven Central", resolve_jars, interrupts)
        interrupts.check()
        kafka = await in_thread("starting Apache Kafka", ApacheKafka.start, interrupts)
        interrupts.check()
        postgres = await in_thread(
            "starting the local Postgres",
            lambda: EmbeddedPostgres.start(workdir / "pgdata", settings=_CDC_SETTINGS, tcp_port=free_port()),
            interrupts,
        )
        interrupts.check()
        dsn = await interrupts.race(create_database(postgres.dsn, "twenty"))
        metrics_port, receiver_port = free_port(), free_port()
        overrides = {
            "WEBHOOKD_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
            "WEBHOOKD_KAFKA__TOPICS": "[]",
            "WEBHOOKD_KAFKA__TOPIC_PATTERN": r"twenty\.workspace_.*",
            "WEBHOOKD_KAFKA__INPUT_FORMAT": "debezium",
            "WEBHOOKD_KAFKA__METADATA_MAX_AGE_MS": "1000",  # a table's first change makes its topic
            "WEBHOOKD_DELIVERY__BODY_FORMAT": "twenty",
            "WEBHOOKD_POSTGRES__DSN": dsn,
            "WEBHOOKD_HTTP__LISTEN": f"127.0.0.1:{metrics_port}",
        }
        settings = dev_settings(config, overrides)
        if settings is None:
            return 2
        secret = os.urandom(16).hex()
        workspace = await interrupts.race(_prepare(settings, f"http://127.0.0.1:{receiver_port}/hooks/crm", secret))
        print(f"webhookd dev --cdc: Apache Kafka on {kafka.bootstrap}; starting Kafka Connect with Debezium ...")
        connector = _connector(postgres)
        bootstrap = kafka.bootstrap
        connect = await in_thread(
            "starting Kafka Connect", lambda: KafkaConnect.start(bootstrap, connector), interrupts
        )
        interrupts.check()
        running = connect
        # Raced, not waited out: once Connect is stopped below, the thread's wait ends by itself.
        await interrupts.race(
            in_thread("starting Debezium's connector", lambda: running.wait_until_running(120), interrupts)
        )
        await interrupts.race(_wait_streaming(settings.postgres.dsn, connector["slot.name"]))
        return await _demo(settings, workspace, CdcReceiver(secret), receiver_port, rounds, interrupts)
    finally:
        print("webhookd dev --cdc: stopping Kafka Connect, Apache Kafka and Postgres ...")
        for server in (connect, kafka, postgres):
            if server is not None:
                await asyncio.to_thread(server.stop)
        shutil.rmtree(workdir, ignore_errors=True)


async def _wait_streaming(dsn: str, slot: str) -> None:
    """Until the connector's replication slot streams: its task says RUNNING before, and takes no snapshot."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(600):
            if await conn.fetchval("SELECT active FROM pg_replication_slots WHERE slot_name = $1", slot):
                return
            await asyncio.sleep(0.1)
        raise DemoFailed(f"Debezium's replication slot {slot} did not start streaming within 60 s")
    finally:
        await conn.close()


def _connector(postgres: EmbeddedPostgres) -> dict[str, Any]:
    shipped = json.loads(CONNECTOR_FILE.read_text())
    config = {key: value for key, value in shipped["config"].items() if key not in _CONNECTION_KEYS}
    assert postgres.tcp_port is not None
    return {
        **config,
        "name": shipped["name"],
        "database.hostname": postgres.host,
        "database.port": str(postgres.tcp_port),
        "database.user": "postgres",
        "database.password": "unused",  # 127.0.0.1 is trusted; the connector insists on a value
        "database.dbname": "twenty",
        "heartbeat.interval.ms": "1000",
    }


async def _prepare(settings: Settings, url: str, secret: str) -> TwentyWorkspace:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        await create_twenty_core(conn)
        await migrate(conn, settings.postgres.subscriptions_table_sql)
        workspace = await TwentyWorkspace.create(conn, "Acme")
        # What the README asks a superuser to do once: every table, so new workspaces and objects need no restart.
        publication = json.loads(CONNECTOR_FILE.read_text())["config"]["publication.name"]
        await conn.execute(f'CREATE PUBLICATION "{publication}" FOR ALL TABLES')
        await conn.execute(
            f'INSERT INTO {settings.postgres.subscriptions_table_sql} ("workspaceId", "targetUrl", operations, '
            "description, secret) VALUES ($1, $2, $3, 'webhookd dev --cdc', $4)",
            uuid.UUID(workspace.workspace_id),
            url,
            ["*.*"],
            secret,
        )
        return workspace
    finally:
        await conn.close()


async def _demo(
    settings: Settings, ws: TwentyWorkspace, receiver: CdcReceiver, port: int, rounds: int, interrupts: Interrupts
) -> int:
    run = DemoRun(settings, receiver.handle, "/hooks/crm", port, interrupts)
    conn = await asyncpg.connect(settings.postgres.dsn)
    status = 0
    try:
        await run.start(startup_timeout=120)
        print(f"webhookd dev --cdc: daemon up; metrics on http://{settings.http.listen}/metrics. Ctrl-C stops it.")
        round_number = 0
        while run.going and (not rounds or round_number < rounds):
            round_number += 1
            for what, step in _round(conn, ws, round_number):
                print(f"  twenty    {what}")
                await step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.interrupted.wait(), timeout=_STEP_SECONDS)
                if run.interrupted.is_set():
                    break
        if rounds:
            await asyncio.sleep(3)  # the last deliveries
            status = 0 if receiver.failures == 0 and receiver.arrived.qsize() > 0 else 1
            print(f"webhookd dev --cdc: {receiver.arrived.qsize()} deliveries, {receiver.failures} failed verification")
    finally:
        await conn.close()
        status = await run.finish(status)
    return status


def _round(conn: asyncpg.Connection, ws: TwentyWorkspace, n: int) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    """One round of what Twenty's API does to records, as (what it is, the write)."""
    ids: dict[str, str] = {}

    async def create() -> None:
        ids["company"] = await ws.insert(conn, "company", {"name": f"Acme {n}", "employees": 10 * n})
        ids["person"] = await ws.insert(
            conn,
            "person",
            {
                "nameFirstName": "Ada",
                "nameLastName": f"Lovelace {n}",
                "emailsPrimaryEmail": f"ada{n}@example.com",
                "emailsAdditionalEmails": '["ada@analytical.engine"]',
                "city": "London",
                "companyId": ids["company"],
            },
        )

    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("creates a company and a person", create),
        ("updates the person's city", lambda: ws.update(conn, "person", ids["person"], {"city": "Paris"})),
        ("saves the person unchanged (updatedAt only: skipped)", lambda: ws.update(conn, "person", ids["person"], {})),
        ("moves the person to the trash", lambda: ws.soft_delete(conn, "person", ids["person"])),
        ("restores the person", lambda: ws.restore(conn, "person", ids["person"])),
        ("destroys the person", lambda: ws.destroy(conn, "person", ids["person"])),
    ]
    if n == 1:
        steps.append(
            (
                "adds a custom currency field `price` to pet, then creates a pet",
                lambda: _new_field_and_pet(conn, ws),
            )
        )
    return steps


async def _new_field_and_pet(conn: asyncpg.Connection, ws: TwentyWorkspace) -> None:
    await ws.add_field(conn, "pet", "price", "CURRENCY", {"priceAmountMicros": "numeric", "priceCurrencyCode": "text"})
    await ws.insert(
        conn,
        "pet",
        {
            "name": "Rex",
            "species": "DOG",
            "priceAmountMicros": decimal.Decimal(250_000_000),
            "priceCurrencyCode": "EUR",
        },
    )
