"""A backlog of due retries drained from Postgres, against the same deliveries made live from Kafka.

The backlog is what a receiver's outage leaves behind: one row per delivery in `webhookd.deliveries`, pending, one
failed attempt made, due since a moment ago, its body as the live run's. The rows are copied in once `webhookd run`
is ready on an empty topic, and the clock runs from the first delivery to the receiver's last 2xx: the retry poller
finds due rows within `delivery.retry_poll_interval_seconds`, a wait that is no part of how fast it drains them. The
live rate is `bench.throughput.daemon_rate` with as many deliveries, to the same receiver at the same concurrency.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.receivers import Receiver
from bench.stack import DaemonRun, Stack
from bench.throughput import CONCURRENCY, Run, bodies_for, until_count

_COLUMNS = (
    "event_id",
    "webhook_id",
    "workspace_id",
    "event_name",
    "body",
    "event_time",
    "source",
    "status",
    "attempts",
    "next_attempt_at",
    "last_status",
    "last_error",
)

_ERROR = "HTTP 503: Service Unavailable"


def _backlog(run: str, webhook: uuid.UUID, workspace: uuid.UUID, topic: str, rows: int) -> Iterator[tuple[Any, ...]]:
    """The rows a receiver that answered 503 to `rows` events of a 4-partition topic leaves behind, due now."""
    now = datetime.now(UTC)
    due = now - timedelta(seconds=1)
    for i, body in enumerate(bodies_for(rows, 1)):
        source = f"{topic}:{i % 4}:{i // 4}"
        yield (f"{run}-{i}", webhook, workspace, "person.updated", body, now, source, "pending", 1, due, 503, _ERROR)


async def drain_rate(stack: Stack, receiver: Receiver, rows: int) -> Run:
    """`webhookd run` draining `rows` due retries to one webhook: deliveries a second, from their commit to the last."""
    topic, workspace, run = await stack.new_topic(), uuid.uuid4(), uuid.uuid4().hex[:6]
    await stack.add_webhooks([f"http://127.0.0.1:{receiver.port}/{run}/0"], str(workspace))
    conn = await asyncpg.connect(stack.dsn)
    try:
        webhook = await conn.fetchval('SELECT id FROM core.webhook WHERE "workspaceId" = $1', workspace)
        # Every run drains a backlog of the same size into a table of the same size, not the runs before it as well.
        await conn.execute("TRUNCATE webhookd.deliveries")
        delivery = {"concurrency": CONCURRENCY, "per_host_concurrency": CONCURRENCY}
        async with DaemonRun(stack, topic, delivery=delivery) as daemon:
            target = receiver.count + rows
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "deliveries",
                    schema_name="webhookd",
                    columns=_COLUMNS,
                    records=_backlog(run, webhook, workspace, topic, rows),
                )
                # The statistics autovacuum would have gathered while a real backlog built up; committed with the
                # rows, so that the first claims are planned for a table that holds them.
                await conn.execute("ANALYZE webhookd.deliveries")
            # From the first delivery: finding the rows took up to the poll interval, which is not the drain's pace.
            await until_count(lambda: receiver.count, target - rows + 1, time.monotonic())
            started, cpu, first = time.monotonic(), daemon.cpu_seconds(), receiver.count
            await until_count(lambda: receiver.count, target, started)
            return Run.of(target - first, time.monotonic() - started, daemon.cpu_seconds() - cpu)
    finally:
        await conn.close()
