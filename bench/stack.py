"""What every part of the benchmark shares: the real broker and Postgres, webhooks loaded into the subscription
table, events produced to a fresh topic, and `webhookd run` as a process of its own, measured from outside."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil
import yaml
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from webhookd.durable.migrate import migrate
from webhookd.embedded import EmbeddedPostgres, KafkaBroker, create_database, create_topic
from webhookd.runtime.children import free_port

SECRET = "bench-secret"
TABLE = '"core"."webhook"'


@dataclass
class Stack:
    """The broker and Postgres every run of the benchmark shares, and a folder for configs and logs."""

    broker: KafkaBroker
    postgres: EmbeddedPostgres
    dsn: str
    workdir: Path
    profile: Path | None = None  # where py-spy's samples of each daemon run go, if anywhere

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, workdir: Path, profile: Path | None = None) -> AsyncIterator[Stack]:
        broker = await asyncio.to_thread(KafkaBroker.start)
        try:
            postgres = await asyncio.to_thread(EmbeddedPostgres.start, workdir / "postgres")
            try:
                dsn = await create_database(postgres.dsn, "bench")
                conn = await asyncpg.connect(dsn)
                try:
                    await migrate(conn, TABLE)
                finally:
                    await conn.close()
                yield cls(broker, postgres, dsn, workdir, profile)
            finally:
                await asyncio.to_thread(postgres.stop)
        finally:
            await asyncio.to_thread(broker.stop)

    async def new_topic(self, partitions: int = 4) -> str:
        topic = f"bench.{uuid.uuid4().hex[:8]}"
        await create_topic(self.broker.bootstrap, topic, partitions)
        return topic

    async def add_webhooks(self, urls: Iterable[str], workspace: str, operations: list[str] | None = None) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.executemany(
                'INSERT INTO core.webhook ("workspaceId", "targetUrl", operations, secret) VALUES ($1, $2, $3, $4)',
                [(uuid.UUID(workspace), url, operations or ["*.*"], SECRET) for url in urls],
            )
        finally:
            await conn.close()

    async def fetchval(self, query: str, *args: Any) -> Any:
        """The first value of `query`'s first row, on a connection of its own."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    async def forget_deliveries(self, workspaces: Iterable[str]) -> None:
        """Drops the retry table's rows of `workspaces`: a later daemon of the bench would otherwise spend its time
        retrying them against receivers that are gone."""
        ids = [uuid.UUID(w) for w in workspaces]
        await self.fetchval("DELETE FROM webhookd.deliveries WHERE workspace_id = ANY($1::uuid[])", ids)

    async def clear_webhooks(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("TRUNCATE core.webhook CASCADE")
        finally:
            await conn.close()


def event_doc(event_id: str, workspace: str, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": event_id, "event": "person.updated", "workspaceId": workspace, "data": data})


async def produce(bootstrap: str, topic: str, values: Iterable[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5)
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value)
        await producer.flush()
    finally:
        await producer.stop()


def process_tree(pid: int | None) -> list[int]:
    """A process and its descendants as they are now (a daemon's workers, Postgres's backends, nginx's worker)."""
    if pid is None:
        return []
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of these processes so far (those that have ended count nothing)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(psutil.Process(pid).cpu_times()[:2])
    return total


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


class DaemonRun:
    """`webhookd run` (or `--workers N`) on `topic` as its own process; ready within `ready_seconds` of its start."""

    def __init__(self, stack: Stack, topic: str, workers: int = 1, **sections: dict[str, Any]) -> None:
        self.stack = stack
        self.listen = f"127.0.0.1:{free_port()}"
        self.workers = workers
        run_id = uuid.uuid4().hex[:8]
        config: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": stack.broker.bootstrap,
                "topics": [topic],
                "group_id": f"bench-{run_id}",
                "fetch_max_wait_ms": 20,  # as config/dev.yaml sets it for Tansu, which holds every fetch that long
            },
            "postgres": {"dsn": stack.dsn},
            "egress": {"allow_private": True},
            "http": {"listen": self.listen},
            "logging": {"level": "warning", "format": "json"},
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        self.config = stack.workdir / f"{run_id}.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = stack.workdir / f"{run_id}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._profiler: asyncio.subprocess.Process | None = None
        self.ready_seconds = float("nan")
        self.run_id = run_id

    async def __aenter__(self) -> DaemonRun:
        try:
            return await self._start()
        except BaseException:
            await self.__aexit__()
            raise

    async def _start(self) -> DaemonRun:
        with self.log.open("wb") as log:
            started = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "webhookd", "run", "--config", str(self.config), "--workers", str(self.workers),
                stdout=log, stderr=log,
            )  # fmt: skip
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"webhookd exited with {self.proc.returncode}: see {self.log}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"http://{self.listen}/readyz") as response:
                        if response.status == 200:
                            break
                if time.monotonic() - started > 120:
                    raise TimeoutError(f"webhookd was not ready within 120 s: see {self.log}")
                await asyncio.sleep(0.02)
        self.ready_seconds = time.monotonic() - started
        if self.stack.profile is not None:
            # Attached once ready, so that the samples are of the work measured, not of start-up.
            self.stack.profile.mkdir(parents=True, exist_ok=True)
            self._profiler = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(self.proc.pid), "--rate", "250", "--format", "raw", "--subprocesses",
                "--output", str(self.stack.profile / f"{self.run_id}.txt"),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._profiler is not None:
            with contextlib.suppress(ProcessLookupError):  # py-spy may have ended on its own (no ptrace, say)
                self._profiler.send_signal(signal.SIGINT)
            await self._profiler.wait()
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def cpu_seconds(self) -> float:
        """CPU time of the daemon so far, its workers' included."""
        assert self.proc is not None
        return cpu_seconds(process_tree(self.proc.pid))

    def rss_mib(self) -> float:
        assert self.proc is not None
        return _status_kib(self.proc.pid, "VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        """The kernel's high-water mark of this process's resident memory (VmHWM): nothing between samples missed."""
        assert self.proc is not None
        return _status_kib(self.proc.pid, "VmHWM") / 1024

    async def samples(self, name: str) -> list[Sample]:
        """Every sample called `name` on /metrics (with `--workers N`, one per worker)."""
        async with aiohttp.ClientSession() as http, http.get(f"http://{self.listen}/metrics") as response:
            text = await response.text()
        return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]

    async def metric(self, name: str) -> float:
        """The sum of every sample called `name` on /metrics."""
        return sum(s.value for s in await self.samples(name))
