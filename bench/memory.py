"""What memory costs: a backlog behind a receiver that never answers, and webhook tables from 100 to 100,000 rows.

The backlog case produces the events first, then starts the daemon against them: it reads as fast as backpressure
lets it, and its resident high-water mark (the kernel's VmHWM, which no sampling can miss) is the figure.

The table case loads N webhooks, one per workspace, and measures the daemon's start-to-ready time and resident
memory once ready, then in this process what the subscription index costs: a full reload from Postgres, the memory
of the index, and one event's match.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import tracemalloc
import uuid
from dataclasses import dataclass

import asyncpg

from bench.receivers import SilentReceiver, running
from bench.stack import SECRET, TABLE, DaemonRun, Stack, event_doc, produce
from webhookd.routing.subscriptions import SubscriptionStore
from webhookd.runtime.tls import PostgresConnect

_OPERATIONS = (["*.*"], ["person.*"], ["*.updated"], ["person.created", "company.updated"], ["opportunity.*"])


@dataclass(frozen=True)
class Backlog:
    """The peak resident memory while `events` waited behind a receiver that never answers."""

    events: int
    seconds: float
    consumed: float
    peak_rss_mib: float


async def backlog_peak_rss(stack: Stack, events: int, seconds: float) -> Backlog:
    with running(SilentReceiver()) as receiver:
        topic, workspace = await stack.new_topic(), str(uuid.uuid4())
        await stack.add_webhooks([f"http://127.0.0.1:{receiver.port}/never"], workspace)
        blob = "x" * 400  # a record of about half a kilobyte, as a CRM change is
        await produce(
            stack.broker.bootstrap,
            topic,
            (event_doc(f"b{i}", workspace, {"i": i, "notes": blob}) for i in range(events)),
        )
        async with DaemonRun(stack, topic) as daemon:
            await asyncio.sleep(seconds)
            consumed = await daemon.metric("webhookd_events_consumed_total")
            peak = daemon.peak_rss_mib()
    return Backlog(events, seconds, consumed, peak)


@dataclass(frozen=True)
class TableCost:
    """What `rows` webhooks cost: start-up, memory, a full reload and one event's match."""

    rows: int
    ready_seconds: float
    rss_mib: float
    index_mib: float
    reload_ms: float
    pause_ms: float  # the longest the event loop went without a turn during a reload
    check_ms: float  # the periodic check of a table unchanged since the last reload
    match_us: float  # one event's match, its workspace drawn from all of them
    hot_match_us: float  # the same, drawn from 100 busy workspaces: the index's own cost, without cache misses


async def _load_rows(stack: Stack, rows: int) -> list[str]:
    """`rows` webhooks, one per workspace, with a mix of operations; the workspaces, in order."""
    await stack.clear_webhooks()
    workspaces = [uuid.uuid4() for _ in range(rows)]
    conn = await asyncpg.connect(stack.dsn)
    try:
        await conn.copy_records_to_table(
            "webhook",
            schema_name="core",
            columns=["workspaceId", "targetUrl", "operations", "secret"],
            records=[
                (ws, f"https://hooks-{i % 997}.example.com/in/{i}", _OPERATIONS[i % len(_OPERATIONS)], SECRET)
                for i, ws in enumerate(workspaces)
            ],
        )
    finally:
        await conn.close()
    return [str(ws) for ws in workspaces]


class _Ticker:
    """The longest gap between turns of the event loop while it runs."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def stop(self) -> float:
        self._task.cancel()
        return self.longest * 1000


def _match_us(store: SubscriptionStore, workspaces: list[str]) -> float:
    picks = [random.choice(workspaces) for _ in range(20_000)]
    match = store.index.match
    started = time.perf_counter()
    for ws in picks:
        match(ws, "person", "updated")
    return (time.perf_counter() - started) / len(picks) * 1e6


async def _index_cost(stack: Stack, workspaces: list[str]) -> tuple[float, float, float, float, float, float]:
    """(index MiB, reload ms, longest loop pause ms, check ms, match µs, hot match µs), measured in this process."""
    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        store = SubscriptionStore(PostgresConnect(stack.dsn), pool, TABLE, refresh_seconds=30)
        reloads, pauses = [], []
        for _ in range(3):
            ticker = _Ticker()
            started = time.perf_counter()
            await store.reload()
            reloads.append((time.perf_counter() - started) * 1000)
            pauses.append(ticker.stop())
        checks = []
        for _ in range(3):
            started = time.perf_counter()
            await store.refresh()
            checks.append((time.perf_counter() - started) * 1000)
        tracemalloc.start()
        fresh = SubscriptionStore(PostgresConnect(stack.dsn), pool, TABLE, refresh_seconds=30)
        await fresh.reload()
        index_mib = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.stop()
        del fresh
        match_us, hot_match_us = _match_us(store, workspaces), _match_us(store, workspaces[:100])
    finally:
        await pool.close()
    return index_mib, statistics.median(reloads), max(pauses), statistics.median(checks), match_us, hot_match_us


async def table_cost(stack: Stack, rows: int) -> TableCost:
    workspaces = await _load_rows(stack, rows)
    topic = await stack.new_topic()
    async with DaemonRun(stack, topic) as daemon:
        await asyncio.sleep(1.0)  # let the first reload's garbage settle before reading its memory
        rss = daemon.rss_mib()
        ready = daemon.ready_seconds
    costs = await _index_cost(stack, workspaces)
    await stack.clear_webhooks()
    return TableCost(rows, ready, rss, *costs)
