"""Limits kept cluster-wide: two daemons of two workers each, one consumer group on a topic of four partitions.

- Rate limit: one webhook limited to 50 a second with `webhookd endpoints limit`, and a backlog far above that in
  every partition; the receiver notes each arrival, and the rate is counted over a window that opens some seconds
  after the first delivery (the group's rebalances and the first burst are over by then). Each process's share
  comes from its `webhookd_deliveries_total{outcome="delivered"}` over the same window.
- Retry-After: a steady stream to an unlimited webhook over every partition; once every process has delivered, the
  receiver answers one request 429 with `Retry-After: 30`. What was already on its way may still arrive in the
  first half second; nothing sent afterwards may, in any process, until the pause ends.

The daemons run with the default delivery settings; the receiver is a process of its own.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from bench.receivers import ScriptedReceiver
from bench.stack import DaemonRun, Stack, event_doc, produce

DAEMONS = 2
WORKERS = 2
PROCESSES = DAEMONS * WORKERS
PARTITIONS = PROCESSES  # a partition for each process: every one of them has a share of the work
LIMIT = 50
# The window opens this long after the first delivery: the group's rebalances and the first burst are over by then.
SETTLE_SECONDS = 8.0
WINDOW_SECONDS = 60.0
RETRY_AFTER = 30
# What was already on its way when the 429 came may still arrive within this long after it.
GRACE_SECONDS = 0.5
# The stream of the Retry-After case, events a second, spread evenly over the partitions.
STREAM_RATE = 80
_TIMEOUT = 120.0


@dataclass(frozen=True)
class LimitAccuracy:
    """Arrivals at an endpoint limited to `limit` a second, over `seconds`, and who sent them."""

    limit: float
    seconds: float
    arrivals: int
    busiest: int  # the most arrivals in any one second of the window
    by_process: dict[str, int]  # "daemon/worker": deliveries made in the window

    @property
    def rate(self) -> float:
        return self.arrivals / self.seconds

    @property
    def error(self) -> float:
        return self.rate / self.limit - 1


@dataclass(frozen=True)
class PauseKept:
    """Arrivals after one 429 with `Retry-After: retry_after`, in seconds after it."""

    retry_after: int
    in_flight: int  # within GRACE_SECONDS of the 429
    during: int  # from then until the pause's end
    first_after: float | None  # the first arrival after GRACE_SECONDS, if any


def _daemons(stack: Stack, topic: str) -> list[DaemonRun]:
    group = {"group_id": f"bench-cluster-{uuid.uuid4().hex[:8]}"}
    return [DaemonRun(stack, topic, WORKERS, kafka=group) for _ in range(DAEMONS)]


@contextlib.asynccontextmanager
async def _running(daemons: list[DaemonRun]) -> AsyncIterator[None]:
    """`daemons` started together, so that they join the group in one rebalance, and stopped together."""
    try:
        async with asyncio.TaskGroup() as starting:
            for daemon in daemons:
                starting.create_task(daemon.__aenter__())
        yield
    finally:
        await asyncio.gather(*(daemon.__aexit__() for daemon in daemons))


async def _delivered(daemons: list[DaemonRun]) -> dict[str, int]:
    """Deliveries each process has made so far, as "daemon/worker"."""
    found: dict[str, int] = {}
    for n, daemon in enumerate(daemons):
        for sample in await daemon.samples("webhookd_deliveries_total"):
            if sample.labels.get("outcome") == "delivered":
                found[f"{n}/{sample.labels['worker']}"] = int(sample.value)
    return found


async def _first_arrival(receiver: ScriptedReceiver) -> float:
    deadline = time.monotonic() + _TIMEOUT
    while not (arrivals := (await receiver.state()).arrivals):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing arrived within {_TIMEOUT:.0f} s of the cluster's start")
        await asyncio.sleep(0.1)
    return arrivals[0]


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def _limit(webhook: str, config: str) -> None:
    """`webhookd endpoints limit`, as an operator runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhookd", "endpoints", "limit", webhook, str(LIMIT), "--config", config,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"webhookd endpoints limit exited with {proc.returncode}: {out.decode(errors='replace')}")


async def limit_accuracy(stack: Stack, window: float = WINDOW_SECONDS) -> LimitAccuracy:
    """Arrivals over `window` seconds at an endpoint limited to LIMIT a second, behind a backlog in every partition."""
    async with ScriptedReceiver() as receiver:
        topic, workspace = await stack.new_topic(PARTITIONS), str(uuid.uuid4())
        await stack.add_webhooks([receiver.url(0, f"/log/{uuid.uuid4().hex[:8]}/limited")], workspace)
        webhook = await stack.fetchval('SELECT id FROM core.webhook WHERE "workspaceId" = $1', uuid.UUID(workspace))
        daemons = _daemons(stack, topic)
        await _limit(str(webhook), str(daemons[0].config))
        # Half as much again as the window can take at the limit: every process has a backlog for it throughout.
        events = int(LIMIT * (SETTLE_SECONDS + window) * 1.5)
        await produce(stack.broker.bootstrap, topic, (event_doc(f"l{i}", workspace, {"i": i}) for i in range(events)))
        async with _running(daemons):
            start = await _first_arrival(receiver) + SETTLE_SECONDS
            await _sleep_until(start)
            before = await _delivered(daemons)
            await _sleep_until(start + window)
            after = await _delivered(daemons)
            arrivals = (await receiver.state()).arrivals
    await stack.forget_deliveries([workspace])
    arrived = arrivals[bisect.bisect_left(arrivals, start) : bisect.bisect_left(arrivals, start + window)]
    busiest = max((bisect.bisect_left(arrived, t + 1) - i for i, t in enumerate(arrived)), default=0)
    by_process = {p: n - before.get(p, 0) for p, n in sorted(after.items())}
    return LimitAccuracy(LIMIT, window, len(arrived), busiest, by_process)


@contextlib.asynccontextmanager
async def _streaming(stack: Stack, topic: str, workspace: str) -> AsyncIterator[None]:
    """STREAM_RATE events a second, one to each partition in turn, until the block ends."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, enable_idempotence=False)
    await producer.start()

    async def stream() -> None:
        for i in itertools.count():
            for partition in range(PARTITIONS):
                await producer.send(topic, event_doc(f"s{i}-{partition}", workspace, {"i": i}), partition=partition)
            await asyncio.sleep(PARTITIONS / STREAM_RATE)

    task = asyncio.create_task(stream())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()


async def pause_kept(stack: Stack, retry_after: int = RETRY_AFTER) -> PauseKept:
    """What arrives after one 429 with `Retry-After: retry_after`, while every process has deliveries to send."""
    async with ScriptedReceiver() as receiver:
        topic, workspace = await stack.new_topic(PARTITIONS), str(uuid.uuid4())
        await stack.add_webhooks([receiver.url(0, f"/log/{uuid.uuid4().hex[:8]}/pausing")], workspace)
        daemons = _daemons(stack, topic)
        async with _running(daemons), _streaming(stack, topic, workspace):
            deadline = time.monotonic() + _TIMEOUT
            while len([n for n in (await _delivered(daemons)).values() if n]) < PROCESSES:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not every process delivered within {_TIMEOUT:.0f} s")
                await asyncio.sleep(0.2)
            await receiver.refuse_once(retry_after)
            while (refused_at := (await receiver.state()).refused_at) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("no request came to be answered 429")
                await asyncio.sleep(0.05)
            # A few seconds past the pause: the first request after it, and what it held back, are part of it.
            await _sleep_until(refused_at + retry_after + 3)
            arrivals = (await receiver.state()).arrivals
    await stack.forget_deliveries([workspace])
    after = [t - refused_at for t in arrivals if t > refused_at]
    return PauseKept(
        retry_after,
        in_flight=sum(1 for t in after if t < GRACE_SECONDS),
        during=sum(1 for t in after if GRACE_SECONDS <= t < retry_after),
        first_after=min((t for t in after if t >= GRACE_SECONDS), default=None),
    )
