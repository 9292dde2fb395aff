"""`webhookd dev`: the whole walk on one machine, with nothing from outside.

It starts a local Kafka-compatible broker (Tansu) and a local Postgres, migrates, creates sample webhooks in two
workspaces, runs a receiver that checks every signature exactly as Twenty's documentation tells receivers to, feeds
a stream of sample events and runs the daemon on them, printing each delivery as it arrives. One of the sample
endpoints fails every first attempt, to show retries. Ctrl-C stops all of it and removes what it created.

Whatever fails to start (the broker, Postgres, the daemon) ends the demo at once, saying why, with status 1; a
Ctrl-C (or SIGTERM) while things start stops what has started, in order, with status 128 + the signal's number.
What both demos share to start and stop is in `webhookd.demo.lifecycle`; the sample webhooks' receiver is in
`webhookd.demo.receiver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import shutil
import tempfile
import uuid
from pathlib import Path

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from webhookd.demo.lifecycle import DemoFailed, DemoRun, Interrupted, Interrupts, dev_settings, first_of, in_thread
from webhookd.demo.receiver import DemoReceiver, SampleWebhook
from webhookd.durable.migrate import migrate
from webhookd.embedded import EmbeddedPostgres, KafkaBroker, create_topic
from webhookd.runtime.children import free_port
from webhookd.runtime.config import Settings

TOPIC = "crm.events"
WORKSPACE_A = "20202020-1c25-4d02-bf25-6aeccf7ea419"
WORKSPACE_B = "3b8e6458-5fc1-4e63-8563-008ccddaa6db"

SAMPLES = (
    SampleWebhook("crm-sync", WORKSPACE_A, ("*.*",)),
    SampleWebhook("people-feed", WORKSPACE_A, ("person.*",)),
    SampleWebhook("flaky-deals", WORKSPACE_A, ("opportunity.updated", "company.created")),
    SampleWebhook("other-tenant", WORKSPACE_B, ("*.*",)),
)
EVENTS = ("person.created", "person.updated", "company.created", "opportunity.updated", "note.deleted")


def run_dev(config: Path | None, events: int) -> int:
    """Entry point of `webhookd dev`; returns the exit status."""
    return asyncio.run(_dev(config, events))


async def _dev(config: Path | None, events: int) -> int:
    with Interrupts() as interrupts:
        workdir = Path(tempfile.mkdtemp(prefix="webhookd-dev-"))
        broker: KafkaBroker | None = None
        postgres: EmbeddedPostgres | None = None
        print("webhookd dev: starting a local broker and Postgres ...")
        try:
            broker = await in_thread("starting the local broker (Tansu)", KafkaBroker.start, interrupts)
            interrupts.check()
            postgres = await in_thread(
                "starting the local Postgres", lambda: EmbeddedPostgres.start(workdir / "pgdata"), interrupts
            )
            interrupts.check()
            print(f"webhookd dev: broker pid {broker.pid} on {broker.bootstrap}, Postgres pid {postgres.pid}")
            receiver_port, metrics_port = free_port(), free_port()
            overrides = {
                "WEBHOOKD_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
                "WEBHOOKD_KAFKA__TOPICS": f"[{TOPIC}]",
                "WEBHOOKD_POSTGRES__DSN": postgres.dsn,
                "WEBHOOKD_HTTP__LISTEN": f"127.0.0.1:{metrics_port}",
            }
            settings = dev_settings(config, overrides)
            if settings is None:
                return 2
            await interrupts.race(create_topic(broker.bootstrap, TOPIC, 3))
            await interrupts.race(_prepare_database(settings, receiver_port))
            return await _demo(settings, receiver_port, events, interrupts)
        except DemoFailed as exc:
            print(f"webhookd dev: {exc}")
            return 1
        except Interrupted:
            print("webhookd dev: interrupted while starting")
            return interrupts.status
        finally:
            print("webhookd dev: stopping the broker and Postgres ...")
            if broker is not None:
                await asyncio.to_thread(broker.stop)
            if postgres is not None:
                await asyncio.to_thread(postgres.stop)
            shutil.rmtree(workdir, ignore_errors=True)


async def _prepare_database(settings: Settings, receiver_port: int) -> None:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        await migrate(conn, settings.postgres.subscriptions_table_sql)
        for sample in SAMPLES:
            await conn.execute(
                f'INSERT INTO {settings.postgres.subscriptions_table_sql} (id, "workspaceId", "targetUrl", '
                "operations, description, secret) VALUES ($1, $2, $3, $4, $5, $6)",
                uuid.UUID(sample.id),
                uuid.UUID(sample.workspace),
                f"http://127.0.0.1:{receiver_port}/hooks/{sample.name}",
                list(sample.operations),
                f"webhookd dev sample: {sample.name}",
                sample.secret,
            )
    finally:
        await conn.close()


async def _demo(settings: Settings, receiver_port: int, events: int, interrupts: Interrupts) -> int:
    receiver = DemoReceiver(SAMPLES)
    run = DemoRun(settings, receiver.handle, "/hooks/{name}", receiver_port, interrupts)
    producer = AIOKafkaProducer(bootstrap_servers=list(settings.kafka.bootstrap_servers), enable_idempotence=False)
    await producer.start()
    status = 0
    try:
        await run.start(startup_timeout=60)
        print(f"webhookd dev: daemon up; metrics on http://{settings.http.listen}/metrics. Ctrl-C stops everything.")
        for n in itertools.count(1):
            if not run.going or (events and n > events):
                break
            workspace = WORKSPACE_A if random.random() < 0.8 else WORKSPACE_B
            name = random.choice(EVENTS)
            event_id = f"evt-{n:05d}"
            record = {
                "event": name,
                "workspaceId": workspace,
                "id": event_id,
                "data": {"id": str(uuid.uuid4()), "name": f"Sample {n}", "amount": n * 1.5, "tags": ["demo"]},
            }
            receiver.expected |= {(event_id, s.id) for s in SAMPLES if s.wants(workspace, name)}
            receiver.all_seen.clear()
            await producer.send_and_wait(TOPIC, orjson.dumps(record))
            print(f"  producer  {name:<20} {event_id} for workspace {workspace[:8]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.interrupted.wait(), timeout=0.5)
        if events and run.serving is not None:
            await first_of(receiver.all_seen.wait(), run.serving, run.interrupted.wait(), timeout=60)
            missing = len(receiver.expected - receiver.seen)
            arrived = len(receiver.expected) - missing
            print(
                f"webhookd dev: {arrived}/{len(receiver.expected)} deliveries arrived, "
                f"{receiver.failures} failed verification"
            )
            status = 0 if missing == 0 and receiver.failures == 0 else 1
    finally:
        await producer.stop()
        status = await run.finish(status)
    return status
