"""Test tools shared by the integration tests: a recording receiver, the daemon in-process or as a process,
and small helpers to produce events and write subscriptions. Everything runs against the real broker and Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import yaml
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from webhookd import cli
from webhookd.durable.migrate import migrate
from webhookd.embedded import create_database
from webhookd.runtime.children import free_port
from webhookd.runtime.config import Settings
from webhookd.runtime.service import Service

Behaviour = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event_id(self) -> str:
        return self.headers["X-Twenty-Webhook-Event-Id"]

    def json(self) -> Any:
        return orjson.loads(self.body)


async def ok(_request: web.Request, _body: bytes) -> web.StreamResponse:
    return web.Response(text="ok")


@dataclass
class Receiver:
    """An HTTP receiver on loopback that records every request; each path can be given its own behaviour."""

    port: int = field(default_factory=free_port)
    requests: list[Received] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    open_requests: int = 0
    max_open_requests: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.open_requests += 1
        self.max_open_requests = max(self.max_open_requests, self.open_requests)
        try:
            body = await request.read()
            self.requests.append(Received(request.path, dict(request.headers), body, time.monotonic()))
            self._arrived.set()
            return await self.behaviours.get(request.path, ok)(request, body)
        finally:
            self.open_requests -= 1

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Cancel a handler when its client goes away, so open_requests counts what the daemon really has in flight.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=True
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    def pairs(self) -> list[tuple[str, str]]:
        return [(r.event_id, r.path) for r in self.requests]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; got {len(self.requests)} requests"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.2))


# The Tansu brokers the fixtures started, by bootstrap address. Tansu holds a new group's first assignment for about
# half the session timeout (in whole seconds), and a member that comes back or dies for about the whole of it; nearly
# every test starts a daemon, so on these brokers the groups get 2 s, the most that still joins in one second (6 s
# joins in three). Heartbeats then go every 0.67 s: only a loop stalled for over a second loses its partitions.
# Apache Kafka refuses a session under its group.min.session.timeout.ms (6 s unless set), and an outside broker
# may be either, so every other broker keeps 6 s.
tansu_brokers: set[str] = set()


def config_for(bootstrap: str, dsn: str, topic: str, /, **sections: dict[str, Any]) -> dict[str, Any]:
    """Configuration for a test daemon: its own group, loopback allowed, fast commits; `sections` override keys."""
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": [topic],
            "group_id": f"g-{topic}",
            "session_timeout_ms": 2000 if bootstrap in tansu_brokers else 6000,
            "commit_interval_ms": 200,
            "fetch_max_wait_ms": 20,  # Tansu holds a fetch for the full wait even when records arrive
        },
        "postgres": {"dsn": dsn},
        "delivery": {
            "timeout_seconds": 5,
            "retry_schedule": ["200ms", "200ms"],
            "retry_poll_interval_seconds": 0.1,
            "drain_timeout_seconds": 5,
        },
        "egress": {"allow_private": True},
        # Many tests use receivers that fail on purpose and count their attempts; the circuit breaker would hold
        # those back. The tests of endpoint health and isolation turn it on with the settings they prove.
        "endpoints": {"circuit_min_requests": 1000, "circuit_consecutive_failures": 1000},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "logging": {"level": "info", "format": "console"},
    }
    for section, keys in sections.items():
        data.setdefault(section, {}).update(keys)
    return data


def settings_for(bootstrap: str, dsn: str, topic: str, /, **sections: dict[str, Any]) -> Settings:
    return Settings.model_validate(config_for(bootstrap, dsn, topic, **sections))


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Service]:
    """The daemon in this process, consuming (partitions assigned) when the block starts, stopped after it."""
    service = Service(settings)
    task = asyncio.create_task(service.serve(install_signal_handlers=False))
    try:
        deadline = time.monotonic() + 30
        while not (service.started.is_set() and service._res is not None and service._res.consumer.consuming):
            # Readiness is what the test waits for; the service exposes it through the same state /readyz reads.
            if task.done():
                raise AssertionError(f"the daemon stopped during startup with status {task.result()}")
            if time.monotonic() > deadline:
                raise AssertionError("the daemon got no partitions within 30 s")
            await asyncio.sleep(0.05)
        yield service
    finally:
        service.request_stop()
        status = await asyncio.wait_for(task, 60)
        assert status == 0, f"the daemon exited with status {status}"


async def produce(
    kafka: str, topic: str, records: Sequence[dict[str, Any] | bytes], partition: int | None = None
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=False, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, r if isinstance(r, bytes) else orjson.dumps(r), partition=partition)
            for r in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def event(name: str, workspace: str, data: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "event": name,
        "workspaceId": workspace,
        "data": data if data is not None else {"id": str(uuid.uuid4())},
        **extra,
    }


async def add_webhook(
    dsn: str,
    workspace: str,
    url: str,
    operations: list[str],
    secret: str = "s3cr3t",
    *,
    deleted: bool = False,
) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        webhook_id: uuid.UUID = await conn.fetchval(
            'INSERT INTO core.webhook ("workspaceId", "targetUrl", operations, secret, "deletedAt") '
            "VALUES ($1, $2, $3, $4, CASE WHEN $5 THEN now() END) RETURNING id",
            uuid.UUID(workspace),
            url,
            operations,
            secret,
            deleted,
        )
    finally:
        await conn.close()
    return str(webhook_id)


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def committed_offset(kafka: str, group: str, tp: TopicPartition) -> int | None:
    """The group's committed position of a partition, as the broker keeps it."""
    # A consumer of the group that never subscribes only reads the group's commits; it does not join the group.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(tp)
        return offset
    finally:
        await consumer.stop()


# A migrated database per server (by admin DSN) and test process, the template of every database the tests ask for:
# copying one costs less than running every migration again.
_templates: dict[str, str] = {}
_template_lock = asyncio.Lock()


async def migrated_database(admin_dsn: str) -> str:
    """A new database on the server of `admin_dsn`, with webhookd's schema and Twenty's table; returns its DSN."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    template = await _template(admin_dsn)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_database_name(template)}"')
    finally:
        await conn.close()
    return urlunsplit(urlsplit(template)._replace(path=f"/{name}"))


async def _template(admin_dsn: str) -> str:
    async with _template_lock:
        if admin_dsn not in _templates:
            dsn = await create_database(admin_dsn, f"template_{uuid.uuid4().hex[:12]}")
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn, '"core"."webhook"')
            finally:
                await conn.close()
            # A copy is refused while anyone is connected to its template, so no one may connect to it any more.
            conn = await asyncpg.connect(admin_dsn)
            try:
                await conn.execute(
                    f'ALTER DATABASE "{_database_name(dsn)}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false'
                )
            finally:
                await conn.close()
            _templates[admin_dsn] = dsn
        return _templates[admin_dsn]


def _database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


async def drop_template(admin_dsn: str) -> None:
    """Drop the template `migrated_database` made on this server, if it made one."""
    template = _templates.pop(admin_dsn, None)
    if template is None:
        return
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'ALTER DATABASE "{_database_name(template)}" WITH IS_TEMPLATE false')
        await conn.execute(f'DROP DATABASE "{_database_name(template)}"')
    finally:
        await conn.close()


async def get_text(url: str) -> tuple[int, str]:
    """Status and body of a GET, e.g. of the daemon's /metrics, /healthz or /readyz."""
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def by_worker(text: str, name: str, **labels: str) -> dict[str, float]:
    """The samples of `name` whose labels include `labels`, by the `worker` label of a pod's /metrics."""
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    }


def new_workspace() -> str:
    return str(uuid.uuid4())


@dataclass
class DaemonProcess:
    """`webhookd run` as a real process, for the tests that kill it."""

    config: Path
    env: dict[str, str]
    log: Path
    args: tuple[str, ...] = ()  # more options for `webhookd run`, such as ("--workers", "2")
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "webhookd", "run", "--config", str(self.config), *self.args],
            env={**os.environ, **self.env},
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


async def webhookd_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the `webhookd` command as a user would; its exit status and what it printed (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "webhookd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def webhookd_command(*args: str) -> tuple[int, str]:
    """Like `webhookd_cli`, but in this process (a thread of its own): the same code without a Python start-up,
    for the tests that run many operator commands; its exit status and what it printed."""

    def call() -> tuple[int, str]:
        out = io.StringIO()
        with _output_of_this_thread(out):
            try:
                status = cli.main(list(args))
            except SystemExit as exc:  # argparse's way out, for --help and bad usage
                status = exc.code if isinstance(exc.code, int) else 2
        return status, out.getvalue()

    return await asyncio.to_thread(call)


class _ByThread(io.TextIOBase):
    """sys.stdout or sys.stderr while commands run in threads of this process: what a command's thread writes goes
    to that command's output, the rest where it went before. A daemon running in this process logs to sys.stdout
    too, and a line it logs in the middle of a command must not end up in what the command printed."""

    def __init__(self, before: TextIO) -> None:
        self.before = before

    def _target(self) -> TextIO:
        return _thread_outputs.get(threading.get_ident(), self.before)

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()

    def writable(self) -> bool:
        return True


_thread_outputs: dict[int, TextIO] = {}
_thread_outputs_lock = threading.Lock()
_streams_before: list[TextIO] = []


@contextlib.contextmanager
def _output_of_this_thread(out: TextIO) -> Iterator[None]:
    with _thread_outputs_lock:
        if not _thread_outputs:
            _streams_before[:] = [sys.stdout, sys.stderr]
            sys.stdout, sys.stderr = _ByThread(sys.stdout), _ByThread(sys.stderr)
        _thread_outputs[threading.get_ident()] = out
    try:
        yield
    finally:
        with _thread_outputs_lock:
            del _thread_outputs[threading.get_ident()]
            if not _thread_outputs:
                sys.stdout, sys.stderr = _streams_before


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Wait until `check` holds, asking every 0.1 s; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path
