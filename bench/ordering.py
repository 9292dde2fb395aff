"""What per-record ordering costs: one webhook, events of 1,000 distinct records, ordered against unordered.

Both runs are `webhookd run` end to end, as `throughput` measures it (the events are in Kafka before the daemon
starts; the clock runs from ready to the last 2xx). The events are keyed by record, as Debezium keys a table's
changes, so that each record's events share a partition and have an order to keep. The ordered webhook sends each
record's deliveries one after the other, and the first of each line asks Postgres (in batches) whether the record
has a delivery waiting in the retry table; the unordered one sends them all at once.
"""

from __future__ import annotations

import time
import uuid

import orjson
from aiokafka import AIOKafkaProducer

from bench.receivers import Receiver
from bench.stack import DaemonRun, Stack
from bench.throughput import CONCURRENCY, Run, until_count

RECORDS = 1_000


async def ordered_rate(stack: Stack, receiver: Receiver, events: int, ordered: bool) -> Run:
    """Deliveries a second to one webhook, ordered per record or not, from ready to the last of `events`."""
    topic, workspace = await stack.new_topic(), str(uuid.uuid4())
    run = uuid.uuid4().hex[:6]
    url = f"http://127.0.0.1:{receiver.port}/{run}/ordered" if ordered else f"http://127.0.0.1:{receiver.port}/{run}"
    await stack.add_webhooks([url], workspace)
    if ordered:
        await stack.fetchval(
            "INSERT INTO webhookd.webhook_options (webhook_id, options) "
            """SELECT id, '{"ordered": true}' FROM core.webhook WHERE "targetUrl" = $1""",
            url,
        )
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, enable_idempotence=False, linger_ms=5)
    await producer.start()
    try:
        for i in range(events):
            record = f"r{i % RECORDS}"
            value = {
                "id": f"{run}-{i}",
                "event": "opportunity.updated",
                "workspaceId": workspace,
                "data": {"id": record, "stage": "WON", "position": i},
            }
            await producer.send(topic, orjson.dumps(value), key=record.encode())
        await producer.flush()
    finally:
        await producer.stop()
    target = receiver.count + events
    delivery = {"concurrency": CONCURRENCY, "per_host_concurrency": CONCURRENCY}
    async with DaemonRun(stack, topic, delivery=delivery) as daemon:
        started, cpu, before = time.monotonic(), daemon.cpu_seconds(), receiver.count
        await until_count(lambda: receiver.count, target, started)
        return Run.of(target - before, time.monotonic() - started, daemon.cpu_seconds() - cpu)
