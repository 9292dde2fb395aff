"""Latency from an event's Kafka timestamp to its arrival at the receiver, at a steady rate below capacity.

The producer stamps each record (CreateTime) and writes the same milliseconds into the event's data as `sent_ms`;
the receiver notes its clock minus `sent_ms` on arrival. One machine, one clock.

The rate runs for `WARM_UP` seconds before the measured window, and those events are reported apart (their
largest latency): a fresh daemon's endpoint starts with one slot and earns the rest one round trip at a time, as
TCP's slow start does, so at a few thousand events a second against a 50 ms receiver its first half second queues.
That is the start of a run, not its steady state at half capacity, which is what the percentiles describe.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer

from bench.receivers import LatencyReceiver, NginxReceiver, running
from bench.stack import DaemonRun, Stack

_TICK = 0.01  # the producer sends every 10 ms what the rate asks for
WARM_UP = 2.0


@dataclass(frozen=True)
class Latency:
    """Milliseconds from Kafka timestamp to receiver, over `count` events at `rate` a second."""

    receiver: str
    rate: float
    count: int
    warm_up_max: float  # the largest latency of the events sent in the warm-up, before the measured window
    p50: float
    p99: float
    max: float


async def latency_at(
    stack: Stack, delay: float, rate: float, seconds: float, concurrency: int, prefer_nginx: bool = True
) -> Latency:
    """Produce `rate` events a second for `seconds` to one webhook; milliseconds from timestamp to receiver.

    The daemon runs at `concurrency`, its one receiving host included: as the throughput run that measured the
    capacity `rate` is half of.
    """
    receiver: NginxReceiver | LatencyReceiver = (
        NginxReceiver(delay, latency_log=True) if NginxReceiver.available() and prefer_nginx else LatencyReceiver(delay)
    )
    with running(receiver):
        topic, workspace = await stack.new_topic(), str(uuid.uuid4())
        await stack.add_webhooks([f"http://127.0.0.1:{receiver.port}/latency"], workspace)
        async with DaemonRun(stack, topic, delivery={"concurrency": concurrency, "per_host_concurrency": concurrency}):
            await receiver.latencies()  # nothing yet; the daemon is ready
            producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, enable_idempotence=False)
            await producer.start()
            try:
                sent, started, warm_up = 0, time.monotonic(), 0
                warm: list[float] = []
                while (elapsed := time.monotonic() - started) < WARM_UP + seconds:
                    if not warm_up and elapsed >= WARM_UP:
                        # Read without pausing the rate (a pause would send a burst after it): the warm-up's last
                        # few events, still on their way, are counted in the measured window.
                        warm_up = sent
                        warm = await receiver.latencies()
                    while sent < elapsed * rate:
                        ms = int(time.time() * 1000)
                        data = {"i": sent, "sent_ms": ms}
                        doc = {"id": f"l{sent}", "event": "person.updated", "workspaceId": workspace, "data": data}
                        await producer.send(topic, orjson.dumps(doc), timestamp_ms=ms)
                        sent += 1
                    await asyncio.sleep(_TICK)
                await producer.flush()
            finally:
                await producer.stop()
            latencies: list[float] = []
            deadline = time.monotonic() + 60
            while len(warm) + len(latencies) < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                latencies += await receiver.latencies()
    if len(warm) + len(latencies) < sent:
        raise RuntimeError(f"only {len(warm) + len(latencies)} of {sent} events arrived")
    # Arrivals are logged as they come: the warm-up's stragglers, if any, stay in the measured window.
    ordered = sorted(latencies)
    return Latency(
        receiver=receiver.name,
        rate=(sent - warm_up) / seconds,
        count=len(ordered),
        warm_up_max=max(warm, default=float("nan")),
        p50=statistics.median(ordered),
        p99=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        max=ordered[-1],
    )
