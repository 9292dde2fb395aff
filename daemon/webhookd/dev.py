"""`webhookd dev`: the whole walk on one machine, with nothing from outside.

It starts a local Kafka-compatible broker (Tansu) and a local Postgres, migrates, creates sample webhooks in two
workspaces, runs a receiver that checks every signature exactly as Twenty's documentation tells receivers to, feeds
a stream of sample events and runs the daemon on them, printing each delivery as it arrives. One of the sample
endpoints fails every first attempt, to show retries. Ctrl-C stops all of it and removes what it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import os
import random
import shutil
import signal
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer

from webhookd.children import free_port
from webhookd.config import ConfigError, Settings, load_settings
from webhookd.embedded import EmbeddedPostgres, KafkaBroker, create_topic
from webhookd.logs import setup_logging
from webhookd.service import Service
from webhookd.store.migrate import migrate

TOPIC = "crm.events"
WORKSPACE_A = "20202020-1c25-4d02-bf25-6aeccf7ea419"
WORKSPACE_B = "3b8e6458-5fc1-4e63-8563-008ccddaa6db"


@dataclass(frozen=True)
class SampleWebhook:
    """A demo subscription: where it points, what it wants, and its secret (the demo prints none of it)."""

    name: str
    workspace: str
    operations: tuple[str, ...]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    secret: str = field(default_factory=lambda: os.urandom(16).hex(), repr=False)

    def wants(self, workspace: str, event: str) -> bool:
        obj, _, action = event.partition(".")
        return workspace == self.workspace and bool({event, f"*.{action}", f"{obj}.*", "*.*"} & set(self.operations))


SAMPLES = (
    SampleWebhook("crm-sync", WORKSPACE_A, ("*.*",)),
    SampleWebhook("people-feed", WORKSPACE_A, ("person.*",)),
    SampleWebhook("flaky-deals", WORKSPACE_A, ("opportunity.updated", "company.created")),
    SampleWebhook("other-tenant", WORKSPACE_B, ("*.*",)),
)
DEV_DEFAULTS = {
    "WEBHOOKD_KAFKA__GROUP_ID": "webhookd-dev",
    "WEBHOOKD_KAFKA__SESSION_TIMEOUT_MS": "6000",
    "WEBHOOKD_KAFKA__FETCH_MAX_WAIT_MS": "20",
    "WEBHOOKD_DELIVERY__CONCURRENCY": "32",
    "WEBHOOKD_DELIVERY__TIMEOUT_SECONDS": "5",
    "WEBHOOKD_DELIVERY__RETRY_SCHEDULE": '["1s", "5s", "30s"]',
    "WEBHOOKD_DELIVERY__DRAIN_TIMEOUT_SECONDS": "5",
    "WEBHOOKD_EGRESS__ALLOW_PRIVATE": "true",
    "WEBHOOKD_LOGGING__FORMAT": "console",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EVENTS = ("person.created", "person.updated", "company.created", "opportunity.updated", "note.deleted")


class DemoReceiver:
    """Receives deliveries, verifies each like the Node.js snippet of Twenty's docs, and prints it."""

    def __init__(self, samples: tuple[SampleWebhook, ...]) -> None:
        self._by_name = {s.name: s for s in samples}
        self.seen: set[tuple[str, str]] = set()
        self.expected: set[tuple[str, str]] = set()
        self.all_seen = asyncio.Event()
        self.failures = 0
        self._failed_once: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        sample = self._by_name[request.match_info["name"]]
        body = await request.read()
        event_id = request.headers.get("X-Twenty-Webhook-Event-Id", "?")
        if sample.name == "flaky-deals" and event_id not in self._failed_once:
            self._failed_once.add(event_id)
            print(f"  receiver  {sample.name:<13} answers 503 to {event_id} (first try fails on purpose)")
            return web.Response(status=503, headers={"Retry-After": "1"})
        verified = signature_matches(sample.secret, request.headers, body)
        doc = orjson.loads(body)
        mark = "verified" if verified else "SIGNATURE MISMATCH"
        if not verified:
            self.failures += 1
        print(f"  receiver  {sample.name:<13} got {doc['event']:<20} {event_id:<18} signature {mark}")
        self.seen.add((event_id, sample.id))
        if self.expected <= self.seen:
            self.all_seen.set()
        return web.Response(status=200 if verified else 401)


def signature_matches(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Twenty's documented check of X-Twenty-Webhook-Signature."""
    timestamp = headers.get("X-Twenty-Webhook-Timestamp", "")
    # The raw body is what was signed; it is also byte for byte what Node's JSON.stringify(req.body) gives back.
    expected = hmac.new(secret.encode(), f"{timestamp}:".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("X-Twenty-Webhook-Signature", ""))


def dev_settings(config: Path | None, overrides: Mapping[str, str]) -> Settings | None:
    """A demo's settings, logging set up by them; None (after saying why) when the file or an override is bad."""
    if config is None:
        # Without a file, the same settings as config/dev.yaml: the demo receiver is on loopback, and retries must
        # show within a minute.
        overrides = {**DEV_DEFAULTS, **overrides}
    try:
        settings = load_settings(config, {**os.environ, **overrides})
    except ConfigError as exc:
        print(f"webhookd: {exc}")
        return None
    setup_logging(settings.logging.level, settings.logging.format)
    return settings


def run_dev(config: Path | None, events: int) -> int:
    """Entry point of `webhookd dev`; returns the exit status."""
    return asyncio.run(_dev(config, events))


async def _dev(config: Path | None, events: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="webhookd-dev-"))
    broker: KafkaBroker | None = None
    postgres: EmbeddedPostgres | None = None
    print("webhookd dev: starting a local broker and Postgres ...")
    try:
        broker = await asyncio.to_thread(KafkaBroker.start)
        postgres = await asyncio.to_thread(EmbeddedPostgres.start, workdir / "pgdata")
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
        await create_topic(broker.bootstrap, TOPIC, 3)
        await _prepare_database(settings, receiver_port)
        return await _demo(settings, receiver_port, events)
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


class DemoRun:
    """A demo's receiver on loopback and the daemon beside it, with Ctrl-C caught; `finish` stops both."""

    def __init__(self, settings: Settings, handle: Handler, path: str, port: int) -> None:
        self._settings, self._handle, self._path, self._port = settings, handle, path, port
        self.service = Service(settings)
        self.interrupted = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.serving: asyncio.Task[int] | None = None

    async def start(self, startup_timeout: float) -> None:
        app = web.Application()
        app.router.add_post(self._path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        self.serving = asyncio.create_task(self.service.serve(install_signal_handlers=False))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.interrupted.set)
        await asyncio.wait_for(self.service.started.wait(), timeout=startup_timeout)

    @property
    def going(self) -> bool:
        return not self.interrupted.is_set() and self.serving is not None and not self.serving.done()

    async def finish(self, status: int) -> int:
        """Stop the daemon and the receiver; the worse of `status` and the daemon's own."""
        if self.serving is not None:
            if not self.service.stopping.is_set():  # a daemon that stopped on its own must not be asked twice
                self.service.request_stop()
            status = max(status, await self.serving)
        if self._runner is not None:
            await self._runner.cleanup()
        return status


async def _demo(settings: Settings, receiver_port: int, events: int) -> int:
    receiver = DemoReceiver(SAMPLES)
    run = DemoRun(settings, receiver.handle, "/hooks/{name}", receiver_port)
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
        if events:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receiver.all_seen.wait(), timeout=60)
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
