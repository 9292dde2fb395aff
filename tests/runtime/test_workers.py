"""`webhookd run --workers N`: several consumer processes of one group behind one port, as one pod runs them."""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path

import psutil

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
    write_config,
)


async def test_two_workers_split_the_partitions_answer_as_one_and_survive_a_killed_worker(
    kafka: str, dsn: str, receiver: Receiver
) -> None:
    topic = await fresh_topic(kafka, partitions=4)
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/hook"), ["*.*"])
    config = config_for(kafka, dsn, topic)
    listen = config["http"]["listen"]
    with tempfile.TemporaryDirectory(prefix="webhookd-workers-") as tmp:
        daemon = DaemonProcess(write_config(Path(tmp) / "c.yaml", config), {}, Path(tmp) / "d.log", ("--workers", "2"))
        try:
            daemon.start()
            await wait_ready(daemon, listen)
            assert daemon.proc is not None
            workers = psutil.Process(daemon.proc.pid).children()
            assert len(workers) == 2
            await produce(kafka, topic, [event("person.updated", ws, id=f"a{i}") for i in range(40)])
            await receiver.wait_for(
                lambda: len({r.event_id for r in receiver.requests}) >= 40, 60, "the first 40 events"
            )

            async def both_counted() -> bool:
                delivered = by_worker(
                    (await get_text(f"http://{listen}/metrics"))[1], "webhookd_deliveries_total", outcome="delivered"
                )
                return sum(delivered.values()) == 40 and len(delivered) == 2

            await until(both_counted, 10, "each worker's deliveries on the pod's /metrics")

            # A worker killed outright is started again; what it had not committed is delivered by one of them.
            workers[0].send_signal(signal.SIGKILL)
            await produce(kafka, topic, [event("person.updated", ws, id=f"b{i}") for i in range(40)])
            await receiver.wait_for(
                lambda: {f"b{i}" for i in range(40)} <= {r.event_id for r in receiver.requests},
                90,
                "every event after the kill",
            )
            await wait_ready(daemon, listen)
            status, text = await get_text(f"http://{listen}/metrics")
            assert status == 200
            assert "webhookd_worker_restarts_total 1.0" in text

            assert daemon.terminate(60) == 0
            await asyncio.sleep(0.1)
            assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        finally:
            daemon.kill()
