"""Limits that mean the same on any number of processes: two daemons of two workers each, one consumer group, share
an endpoint's rate limit (set by an operator with `webhookd endpoints limit`) and a receiver's `Retry-After`, as one
process would keep them."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.daemon_tools import fresh_topic, wait_ready
from tests.support import (
    DaemonProcess,
    Receiver,
    add_webhook,
    by_worker,
    config_for,
    event,
    get_text,
    new_workspace,
    produce,
    until,
    webhookd_cli,
    write_config,
)

# Rates measured against a limit: `make test` runs these alone, after the others, never beside another test.
pytestmark = pytest.mark.alone

DAEMONS = 2
WORKERS = 2
LIMIT = 50.0
# Measured once every process has joined the group and settled in: the first seconds hold rebalances and the burst.
SETTLE_SECONDS = 6.0
WINDOW_SECONDS = 10.0


@contextlib.asynccontextmanager
async def _cluster(configs: list[dict[str, Any]]) -> Any:
    """DAEMONS processes of WORKERS workers each, ready, stopped (and checked to stop cleanly) afterwards."""
    with tempfile.TemporaryDirectory(prefix="webhookd-cluster-") as tmp:
        daemons = [
            DaemonProcess(
                write_config(Path(tmp) / f"c{n}.yaml", config), {}, Path(tmp) / f"d{n}.log", ("--workers", str(WORKERS))
            )
            for n, config in enumerate(configs)
        ]
        try:
            for daemon in daemons:
                daemon.start()
            for daemon, config in zip(daemons, configs, strict=True):
                await wait_ready(daemon, config["http"]["listen"])
            yield daemons
            for daemon in daemons:
                assert daemon.terminate(60) == 0
        finally:
            for daemon in daemons:
                daemon.kill()


def _configs(kafka: str, dsn: str, topic: str, **sections: dict[str, Any]) -> list[dict[str, Any]]:
    return [config_for(kafka, dsn, topic, logging={"level": "warning", "format": "json"}, **sections) for _ in range(2)]


async def test_an_endpoint_limited_to_fifty_a_second_gets_fifty_a_second_from_two_daemons_of_two_workers(
    kafka: str, dsn: str, receiver: Receiver
) -> None:
    topic = await fresh_topic(kafka, partitions=DAEMONS * WORKERS)
    ws = new_workspace()
    webhook_id = await add_webhook(dsn, ws, receiver.url("/limited"), ["*.*"])
    configs = _configs(kafka, dsn, topic, delivery={"retry_schedule": ["1s"] * 5, "retry_poll_interval_seconds": 0.2})
    config_file = write_config(Path(tempfile.mkdtemp(prefix="webhookd-limit-")) / "c.yaml", configs[0])
    status, out = await webhookd_cli("endpoints", "limit", webhook_id, str(LIMIT), "--config", str(config_file))
    assert status == 0, out
    # More than the window can take at the limit, spread over every partition: every process has a backlog for it.
    events = int(LIMIT * (SETTLE_SECONDS + WINDOW_SECONDS) * 1.5)
    await produce(kafka, topic, [event("person.updated", ws, id=f"e{i}") for i in range(events)])
    async with _cluster(configs):
        await receiver.wait_for(lambda: len(receiver.requests) > 0, 60, "the first delivery")
        start = receiver.requests[0].at + SETTLE_SECONDS
        await asyncio.sleep(max(0.0, start + WINDOW_SECONDS - time.monotonic()) + 0.5)
        arrived = [r.at for r in receiver.requests if start <= r.at < start + WINDOW_SECONDS]
        per_process = {
            f"{n}/{worker}": count
            for n, config in enumerate(configs)
            for worker, count in by_worker(
                (await get_text(f"http://{config['http']['listen']}/metrics"))[1],
                "webhookd_deliveries_total",
                outcome="delivered",
            ).items()
        }
    rate = len(arrived) / WINDOW_SECONDS
    busiest = max(sum(1 for t in arrived if s <= t < s + 1) for s in arrived)
    print(
        f"\nlimit {LIMIT:.0f}/s, {DAEMONS} daemons x {WORKERS} workers: {rate:.1f}/s over {WINDOW_SECONDS:.0f} s "
        f"(busiest second {busiest}); delivered by each process: {per_process}"
    )
    assert sum(1 for count in per_process.values() if count > 0) >= 3, "the processes did not all share the endpoint"
    assert abs(rate - LIMIT) <= 0.1 * LIMIT, f"{rate:.1f}/s against a limit of {LIMIT:.0f}/s"


async def test_a_retry_after_from_one_process_pauses_the_endpoint_in_every_process(
    kafka: str, dsn: str, receiver: Receiver
) -> None:
    topic = await fresh_topic(kafka, partitions=DAEMONS * WORKERS)
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/pausing"), ["*.*"])
    pause = 4.0
    asked_at: list[float] = []

    async def pause_once(_request: web.Request, _body: bytes) -> web.StreamResponse:
        if not asked_at and len(receiver.requests) >= 40:  # once every process is sending
            asked_at.append(time.monotonic())
            return web.Response(status=429, headers={"Retry-After": str(int(pause))})
        return web.Response(text="ok")

    receiver.behaviours["/pausing"] = pause_once
    configs = _configs(kafka, dsn, topic, delivery={"retry_schedule": ["1s"] * 5, "retry_poll_interval_seconds": 0.2})
    async with _cluster(configs):
        # A steady stream over every partition, so that every process has something for the endpoint at all times.
        async def stream() -> None:
            for i in range(400):
                await produce(kafka, topic, [event("person.updated", ws, id=f"s{i}-{k}") for k in range(4)])
                await asyncio.sleep(0.05)

        streaming = asyncio.create_task(stream())
        try:

            async def asked() -> bool:
                return bool(asked_at)

            await until(asked, 60, "the receiver's 429")
            await asyncio.sleep(pause + 3)
        finally:
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
    paused_at = asked_at[0]
    # What was already on its way when the 429 came may still arrive; nothing sent afterwards may, until it ends.
    grace = 0.5
    during = [r.at - paused_at for r in receiver.requests if paused_at + grace <= r.at < paused_at + pause]
    after = [r for r in receiver.requests if r.at >= paused_at + pause]
    print(
        f"\nRetry-After: {pause:.0f} seen by one of {DAEMONS * WORKERS} processes: {len(during)} requests from "
        f"{grace} s after it until it ended, {len(after)} after"
    )
    assert not during, f"requests arrived during the pause, at {[round(t, 2) for t in during[:10]]} s"
    assert after, "nothing was sent once the pause ended"
