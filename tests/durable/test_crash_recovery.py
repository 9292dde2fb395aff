"""At least once through crashes and rebalances: a daemon killed with SIGKILL mid-stream and started again, or a
second daemon joining the group, leaves no (event, webhook) pair undelivered."""

from __future__ import annotations

import asyncio
import collections
import tempfile
from pathlib import Path

from tests.support import (
    DaemonProcess,
    Receiver,
    add_webhook,
    config_for,
    event,
    new_workspace,
    produce,
    running,
    settings_for,
    write_config,
)

EVENTS = 2500
PATHS = ("/a", "/b", "/c")


async def test_a_daemon_killed_mid_stream_loses_nothing_after_restart(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    for path in PATHS:
        await add_webhook(dsn, ws, receiver.url(path), ["*.*"])
    expected = {(f"e{i}", path) for i in range(EVENTS) for path in PATHS}
    # Static membership lets the restarted process take the dead member's place without waiting out its session.
    config = config_for(kafka, dsn, topic, kafka={"group_instance_id": "crash-test"}, logging={"format": "json"})
    with tempfile.TemporaryDirectory(prefix="webhookd-crash-") as tmp:
        daemon = DaemonProcess(write_config(Path(tmp) / "c.yaml", config), {}, Path(tmp) / "daemon.log")
        try:
            daemon.start()
            await produce(kafka, topic, [event("person.updated", ws, id=f"e{i}") for i in range(EVENTS)])
            await receiver.wait_for(lambda: len(receiver.requests) >= len(expected) // 3, 60, "a third of the pairs")
            daemon.kill()
            at_kill = len(receiver.requests)
            daemon.start()
            await receiver.wait_for(lambda: expected <= set(receiver.pairs()), 120, "every pair after the restart")
            assert daemon.terminate() == 0
        finally:
            daemon.kill()
    counts = collections.Counter(receiver.pairs())
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\n{len(expected)} pairs, killed after {at_kill} requests, {duplicates} delivered twice or more")
    assert set(counts) == expected


async def test_a_second_daemon_joining_takes_partitions_and_nothing_is_lost(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    for path in PATHS:
        await add_webhook(dsn, ws, receiver.url(path), ["*.*"])
    total = 2000
    expected = {(f"e{i}", path) for i in range(total) for path in PATHS}
    settings = settings_for(kafka, dsn, topic)
    async with running(settings):
        await produce(kafka, topic, [event("person.updated", ws, id=f"e{i}") for i in range(total // 2)])
        await receiver.wait_for(lambda: len(receiver.requests) >= 300, 30, "the first daemon's deliveries")
        async with running(settings_for(kafka, dsn, topic)) as second:
            # `running` returns once the newcomer holds partitions, so the group has rebalanced by now.
            assert second._res is not None
            taken = len(second._res.consumer._partitions)
            await produce(kafka, topic, [event("person.updated", ws, id=f"e{i}") for i in range(total // 2, total)])
            await receiver.wait_for(lambda: expected <= set(receiver.pairs()), 90, "every pair")
        print(f"\nthe second daemon took {taken} of 4 partitions")
        assert 1 <= taken <= 3
        await asyncio.sleep(0.2)
    counts = collections.Counter(receiver.pairs())
    print(f"\n{len(expected)} pairs, {sum(n - 1 for n in counts.values())} delivered twice or more")
    assert set(counts) == expected
