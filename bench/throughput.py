"""Signed deliveries a second, four ways, to the same receiver at the same concurrency.

- The raw ceiling: plain aiohttp POSTs of the same bodies, signed the same way, without Kafka or Postgres.
- The lean ceiling: webhookd's own sender and HTTP client in the same bare loop (what the daemon's bookkeeping is
  measured against once aiohttp is out of the way).
- webhookd end to end: from producing the events to the receiver's last 2xx (produce, Kafka, match, sign, POST,
  commit), `webhookd run` as its own process, ready before the clock starts.
- A naive consumer, as a user would write it first: one event at a time, look its webhooks up, await each POST,
  commit each record.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from bench.receivers import Receiver
from bench.stack import SECRET, DaemonRun, Stack, cpu_seconds, event_doc, produce
from webhookd.delivery.egress import EgressPolicy
from webhookd.delivery.http_client import ClientLimits, HttpClient
from webhookd.delivery.payload import build_body
from webhookd.delivery.sender import Sender
from webhookd.delivery.signing import Signer
from webhookd.model import Delivery, Webhook

CONCURRENCY = 64
_TIMEOUT = 600.0


def bodies_for(events: int, webhooks: int) -> list[bytes]:
    """The bodies the daemon sends for `events` events to `webhooks` webhooks each, in the same shape."""
    return [
        build_body("person.updated", {"i": i, "name": "Ada Lovelace"}, "2026-01-01T00:00:00.000Z")
        for i in range(events * webhooks)
    ]


@dataclass(frozen=True)
class Run:
    """One measured run: deliveries a second, CPU microseconds the measured process spent on each, and the cores
    that other processes took meanwhile (by name: the broker, the receiver, the bench itself), if asked."""

    rate: float
    cpu_us: float
    cores: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, deliveries: int, seconds: float, cpu_seconds: float) -> Run:
        return cls(deliveries / seconds, cpu_seconds / deliveries * 1e6)


async def ceiling(url: str, bodies: list[bytes], concurrency: int = CONCURRENCY) -> Run:
    """Plain aiohttp: the same bodies, signed the same way, at the same concurrency; deliveries a second."""
    signer = Signer("twenty")
    secret = SECRET.encode()
    queue = list(enumerate(bodies))
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                i, body = queue.pop()
                headers = {"Content-Type": "application/json"}
                headers.update(signer.headers(f"b{i}", body, secret, None, time.time()))
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"the receiver answered {response.status}")

        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Run.of(len(bodies), time.monotonic() - started, time.process_time() - cpu)


async def lean_ceiling(url: str, bodies: list[bytes], concurrency: int = CONCURRENCY) -> Run:
    """webhookd's sender and HTTP client in the same bare loop: sign, lay out, POST, classify; nothing else."""
    policy = EgressPolicy(allow_private=True)
    limits = ClientLimits(body_limit=4096, idle_per_origin=concurrency, idle_total=concurrency)
    sender = Sender(HttpClient(policy, ssl.create_default_context(), limits), policy, 10.0, 60.0, Signer("twenty"))
    webhook = Webhook("bench", "bench", url, ("*.*",), SECRET.encode())
    queue = [Delivery(f"b{i}", "person.updated", "bench", webhook, body, None, "") for i, body in enumerate(bodies)]
    try:

        async def worker() -> None:
            while queue:
                result = await sender.attempt(queue.pop())
                if result.result != "2xx":
                    raise RuntimeError(f"the receiver answered {result.result}: {result.error}")

        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Run.of(len(bodies), time.monotonic() - started, time.process_time() - cpu)
    finally:
        await sender.close()


async def until_count(count: Callable[[], int], target: int, started: float) -> None:
    while count() < target:
        if time.monotonic() - started > _TIMEOUT:
            raise TimeoutError(f"only {count()} of {target} deliveries arrived within {_TIMEOUT:.0f} s")
        await asyncio.sleep(0.02)


async def daemon_rate(
    stack: Stack,
    receiver: Receiver,
    events: int,
    webhooks: int,
    workers: int = 1,
    concurrency: int = CONCURRENCY,
    watch: dict[str, Callable[[], list[int]]] | None = None,
) -> Run:
    """`webhookd run` end to end: deliveries a second, from the moment it is ready to the last of events x webhooks.

    The events are in Kafka before the daemon starts, so the clock runs only while webhookd works: consume, match,
    sign, POST, commit. (Producing them meanwhile would take the bench's own share of the same two cores.)
    """
    topic, workspace = await stack.new_topic(), str(uuid.uuid4())
    run = uuid.uuid4().hex[:6]
    await stack.add_webhooks([f"http://127.0.0.1:{receiver.port}/{run}/{n}" for n in range(webhooks)], workspace)
    await produce(
        stack.broker.bootstrap,
        topic,
        (event_doc(f"{run}-{i}", workspace, {"i": i, "name": "Ada Lovelace"}) for i in range(events)),
    )
    target = receiver.count + events * webhooks
    # delivery.per_host_concurrency holds for the whole cluster, each worker taking its share: scaled with the
    # workers, every worker has the same budget to the receiver as a daemon of one, and the cap never binds.
    delivery = {"concurrency": concurrency, "per_host_concurrency": concurrency * workers}
    async with DaemonRun(stack, topic, workers, delivery=delivery) as daemon:
        # Counted from here: with several workers, the first to join delivers while the others are still starting.
        # Listed once the daemon is ready: Postgres's backends for the daemon's connections exist by then.
        watched = {name: pids() for name, pids in (watch or {}).items()}
        others = {name: cpu_seconds(pids) for name, pids in watched.items()}
        started, cpu, before = time.monotonic(), daemon.cpu_seconds(), receiver.count
        machine = psutil.cpu_times()
        await until_count(lambda: receiver.count, target, started)
        seconds = time.monotonic() - started
        measured = Run.of(target - before, seconds, daemon.cpu_seconds() - cpu)
        if watch is None:
            return measured
        cores = {name: (cpu_seconds(pids) - others[name]) / seconds for name, pids in watched.items()}
        now = psutil.cpu_times()
        cores["machine"] = ((now.user + now.system) - (machine.user + machine.system)) / seconds
        # Time the hypervisor gave the machine's cores to others: what makes a shared machine's runs disagree.
        cores["steal"] = (getattr(now, "steal", 0.0) - getattr(machine, "steal", 0.0)) / seconds
        cores["webhookd"] = measured.rate * measured.cpu_us / 1e6
        return Run(measured.rate, measured.cpu_us, cores)


async def naive_rate(stack: Stack, receiver: Receiver, events: int) -> Run:
    """The consumer a user writes first: per event, look up its webhooks, POST to each, await, commit."""
    topic, workspace = await stack.new_topic(), str(uuid.uuid4())
    await stack.add_webhooks([f"http://127.0.0.1:{receiver.port}/naive"], workspace)
    await produce(
        stack.broker.bootstrap,
        topic,
        (event_doc(f"n{i}", workspace, {"i": i, "name": "Ada Lovelace"}) for i in range(events)),
    )
    signer = Signer("twenty")
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.broker.bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    conn = await asyncpg.connect(stack.dsn)
    await consumer.start()
    try:
        async with aiohttp.ClientSession() as http:
            done, started, cpu = 0, 0.0, 0.0
            while done < events:
                record = await consumer.getone()
                if done == 0:  # from the first record on: the group join is not the consumer's pace
                    started, cpu = time.monotonic(), time.process_time()
                doc = orjson.loads(record.value or b"{}")
                hooks = await conn.fetch(
                    'SELECT "targetUrl", secret FROM core.webhook WHERE "workspaceId" = $1 AND "deletedAt" IS NULL '
                    "AND ($2 = ANY(operations) OR '*.*' = ANY(operations))",
                    uuid.UUID(doc["workspaceId"]),
                    doc["event"],
                )
                body = build_body(doc["event"], doc["data"], "2026-01-01T00:00:00.000Z")
                for hook in hooks:
                    headers = {"Content-Type": "application/json"}
                    headers.update(signer.headers(doc["id"], body, hook["secret"].encode(), None, time.time()))
                    async with http.post(hook["targetUrl"], data=body, headers=headers) as response:
                        await response.read()
                tp = TopicPartition(record.topic, record.partition)
                await consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "")})
                done += 1
            return Run.of(events, time.monotonic() - started, time.process_time() - cpu)
    finally:
        await consumer.stop()
        await conn.close()
