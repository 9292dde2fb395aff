"""`webhookd dev`: the whole walk on one machine, with nothing from outside.

It starts a local Kafka-compatible broker (Tansu) and a local Postgres, migrates, creates sample webhooks in two
workspaces, runs a receiver that checks every signature exactly as Twenty's documentation tells receivers to, feeds
a stream of sample events and runs the daemon on them, printing each delivery as it arrives. One of the sample
endpoints fails every first attempt, to show retries. Ctrl-C stops all of it and removes what it created.

Whatever fails to start (the broker, Postgres, the daemon) ends the demo at once, saying why, with status 1; a
Ctrl-C (or SIGTERM) while things start stops what has started, in order, with status 128 + the signal's number.
`Interrupts`, `in_thread` and `wait_started` are shared with `webhookd dev --cdc`.
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
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
import orjson
import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer

from webhookd.durable.migrate import migrate
from webhookd.embedded import EmbeddedPostgres, KafkaBroker, create_topic
from webhookd.runtime.children import free_port
from webhookd.runtime.config import ConfigError, Settings, load_settings
from webhookd.runtime.logs import setup_logging
from webhookd.runtime.service import Service

log = structlog.get_logger("webhookd.dev")
T = TypeVar("T")

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


class Interrupted(Exception):
    """A signal came while the demo was starting; `Interrupts.status` is the exit status."""


class DemoFailed(Exception):
    """Something the demo needs did not start; the message says what and why."""


class Interrupts:
    """SIGINT and SIGTERM, caught from a demo's first moment until its last cleanup, as an event.

    Without it, asyncio would cancel whatever the demo awaits at a Ctrl-C: a server that a thread is starting then
    comes up after its `finally` has run, and nobody stops it until exit; a wait for the daemon would not notice.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal: int | None = None

    def __enter__(self) -> Self:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._caught, sig)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _caught(self, sig: int) -> None:
        if self.signal is None:
            self.signal = sig
        self.event.set()

    @property
    def status(self) -> int:
        """The shell's exit status for a process ended by the signal: 130 for Ctrl-C."""
        return 128 + (self.signal or signal.SIGINT)

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted

    async def race(self, step: Awaitable[T]) -> T:
        """`step`'s result; or, as soon as a signal comes, Interrupted, the step cancelled."""
        task = asyncio.ensure_future(step)
        await first_of(task, self.event.wait())
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Interrupted


async def first_of(*waits: Awaitable[Any], timeout: float | None = None) -> None:
    """Until the first of `waits` ends, or `timeout` s. The others are cancelled, except tasks: those are only
    watched, their owners decide (and read their outcome)."""
    futures = [asyncio.shield(w) if isinstance(w, asyncio.Task) else asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # read, so that asyncio does not report it as never retrieved


async def in_thread(what: str, blocking: Callable[[], T], interrupts: Interrupts) -> T:
    """`blocking()` (a server's start, say), run in a thread; DemoFailed saying that `what` failed, when it does.

    A signal does not cancel it: a server that a start is about to return must be kept, to be stopped in order,
    and starts are bounded by their own timeouts. The caller keeps what is returned, then calls
    `interrupts.check()`; it races the call only where abandoning the thread leaves nothing behind.
    """
    try:
        return await asyncio.to_thread(blocking)
    except Exception as exc:
        interrupts.check()  # a Ctrl-C reached a child in our process group too (Maven): not a failure
        raise DemoFailed(f"{what} failed: {exc}") from exc


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


async def wait_started(
    started: asyncio.Event, serving: asyncio.Task[int], interrupts: Interrupts, timeout: float
) -> None:
    """Until the daemon has `started`. DemoFailed as soon as `serving` ends first or after `timeout` s, Interrupted as
    soon as a signal comes: a daemon that cannot start must not be waited for."""
    await first_of(started.wait(), serving, interrupts.event.wait(), timeout=timeout)
    if started.is_set():
        return
    if serving.done():
        raise DemoFailed(f"the daemon did not start (exit status {serving.result()}): see the error it logged")
    interrupts.check()
    raise DemoFailed(f"the daemon did not start within {timeout:g} s; its log above shows how far it came")


class DemoRun:
    """A demo's receiver on loopback and the daemon beside it; `finish` stops both."""

    def __init__(self, settings: Settings, handle: Handler, path: str, port: int, interrupts: Interrupts) -> None:
        self._settings, self._handle, self._path, self._port = settings, handle, path, port
        self.service = Service(settings)
        self._interrupts = interrupts
        self.interrupted = interrupts.event
        self._runner: web.AppRunner | None = None
        self.serving: asyncio.Task[int] | None = None

    async def start(self, startup_timeout: float) -> None:
        app = web.Application()
        app.router.add_post(self._path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        self.serving = asyncio.create_task(self._serve())
        await wait_started(self.service.started, self.serving, self._interrupts, startup_timeout)

    async def _serve(self) -> int:
        try:
            return await self.service.serve(install_signal_handlers=False)
        except Exception as exc:  # a bug: shown with its traceback where the daemon logs, and the demo ends
            log.error("daemon_failed", exc_info=exc)
            return 1

    @property
    def going(self) -> bool:
        return not self.interrupted.is_set() and self.serving is not None and not self.serving.done()

    async def finish(self, status: int) -> int:
        """Stop the daemon and the receiver; the worse of `status` and the daemon's own."""
        if self.serving is not None:
            # A daemon that stopped (or never started) on its own must not be asked again: a second request exits.
            if not self.serving.done() and not self.service.stopping.is_set():
                self.service.request_stop()
            status = max(status, await self.serving)
        if self._runner is not None:
            await self._runner.cleanup()
        return status


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
