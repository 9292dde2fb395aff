"""A producer's record, however deep, never takes the daemon down: it is delivered or kept as a bad event, and the
events behind it on its partition keep flowing. Run against a real process, since a crash is what is at stake."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from tests.daemon_tools import wait_ready
from tests.support import (
    DaemonProcess,
    Receiver,
    add_webhook,
    config_for,
    event,
    fetch,
    new_workspace,
    produce,
    write_config,
)

# 674 levels of {"k": ...}: a 4.1 KB record, well under delivery.max_event_bytes, valid JSON that orjson parses.
DEPTH = 674


async def test_a_deeply_nested_event_neither_crashes_the_daemon_nor_stops_its_partition(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/hook"), ["*.*"])
    nested = b'{"k":' * DEPTH + b"1" + b"}" * DEPTH
    record = b'{"event":"person.created","workspaceId":"%s","id":"deep","data":{"n":%s}}' % (ws.encode(), nested)
    config = config_for(kafka, dsn, topic, logging={"format": "json"})
    with tempfile.TemporaryDirectory(prefix="webhookd-deep-") as tmp:
        daemon = DaemonProcess(write_config(Path(tmp) / "c.yaml", config), {}, Path(tmp) / "daemon.log")
        try:
            daemon.start()
            assert daemon.proc is not None
            await wait_ready(daemon, config["http"]["listen"])
            await produce(kafka, topic, [record, event("person.created", ws, id="behind")], partition=0)
            deadline = time.monotonic() + 15
            # "behind" follows the deep record on its partition: once it arrived, the deep one was delivered or kept.
            while time.monotonic() < deadline and daemon.proc.poll() is None:
                if "behind" in {r.event_id for r in receiver.requests}:
                    break
                await asyncio.sleep(0.1)
            status = daemon.proc.poll()
            log = (Path(tmp) / "daemon.log").read_text(errors="replace")
            assert status is None, f"the daemon died with status {status}: {log[-500:]}"
            assert await asyncio.to_thread(daemon.terminate) == 0
        finally:
            daemon.kill()
    assert "behind" in {r.event_id for r in receiver.requests}
    delivered = [r for r in receiver.at("/hook") if r.event_id == "deep"]
    bad = await fetch(dsn, "SELECT reason FROM webhookd.bad_events")
    # Delivered exactly as JavaScript would re-serialize it, or refused as a bad event; either way not lost silently.
    assert delivered or bad, bad
    for deep in delivered:
        assert deep.body.startswith(b'{"event":"person.created","data":{"n":' + nested + b"},")
