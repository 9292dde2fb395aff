"""At least once on Apache Kafka: the crash and rebalance tests of tests/durable/test_crash_recovery.py, run here
against a real Kafka node, and two daemons of one group, one of them SIGKILLed mid-stream, losing nothing."""

from __future__ import annotations

import asyncio
import collections
import tempfile
from pathlib import Path

from aiohttp import web

from tests.daemon_tools import wait_ready
from tests.durable.test_crash_recovery import (
    test_a_daemon_killed_mid_stream_loses_nothing_after_restart,
    test_a_second_daemon_joining_takes_partitions_and_nothing_is_lost,
)
from tests.support import (
    DaemonProcess,
    Receiver,
    add_webhook,
    config_for,
    event,
    get_text,
    metric,
    new_workspace,
    produce,
    write_config,
)

__all__ = [
    "test_a_daemon_killed_mid_stream_loses_nothing_after_restart",
    "test_a_second_daemon_joining_takes_partitions_and_nothing_is_lost",
    "test_two_daemons_in_one_group_one_killed_mid_stream_lose_nothing",
]

EVENTS = 3000
PATHS = ("/a", "/b", "/c")


async def _slow(_request: web.Request, _body: bytes) -> web.StreamResponse:
    # A little latency keeps the stream going long enough for the kill to land in the middle of it.
    await asyncio.sleep(0.01)
    return web.Response(text="ok")


async def _delivered(listen: str) -> float:
    return metric((await get_text(f"http://{listen}/metrics"))[1], "webhookd_deliveries_total", outcome="delivered")


async def test_two_daemons_in_one_group_one_killed_mid_stream_lose_nothing(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    for path in PATHS:
        receiver.behaviours[path] = _slow
        await add_webhook(dsn, ws, receiver.url(path), ["*.*"])
    expected = {(f"e{i}", path) for i in range(EVENTS) for path in PATHS}
    with tempfile.TemporaryDirectory(prefix="webhookd-kafka-group-") as tmp:
        daemons: list[DaemonProcess] = []
        listens: list[str] = []
        for name in ("survivor", "victim"):
            # Plain membership: the group learns of the victim's death only when its session times out (6 s).
            config = config_for(kafka, dsn, topic, logging={"format": "json"})
            listens.append(config["http"]["listen"])
            daemons.append(
                DaemonProcess(write_config(Path(tmp) / f"{name}.yaml", config), {}, Path(tmp) / f"{name}.log")
            )
        survivor, victim = daemons
        try:
            for daemon, listen in zip(daemons, listens, strict=True):
                daemon.start()
                await wait_ready(daemon, listen)
            await produce(kafka, topic, [event("person.updated", ws, id=f"e{i}") for i in range(EVENTS)])
            await receiver.wait_for(lambda: len(receiver.requests) >= len(expected) // 3, 90, "a third of the pairs")
            # Both must have been delivering, or the kill would prove nothing about a shared group.
            by_daemon = [await _delivered(listen) for listen in listens]
            victim.kill()
            at_kill = len(receiver.requests)
            await receiver.wait_for(lambda: expected <= set(receiver.pairs()), 120, "every pair after the kill")
            assert survivor.terminate() == 0
        finally:
            for daemon in daemons:
                daemon.kill()
    counts = collections.Counter(receiver.pairs())
    duplicates = sum(n - 1 for n in counts.values())
    print(
        f"\n{len(expected)} pairs; before the kill the survivor had delivered {by_daemon[0]:.0f} and the victim "
        f"{by_daemon[1]:.0f}; killed after {at_kill} requests; {duplicates} delivered twice or more"
    )
    assert all(n > 0 for n in by_daemon)
    assert at_kill < len(expected), "the kill came after everything was delivered"
    assert set(counts) == expected
