"""A receiver that stops answering, behind a large backlog: the daemon keeps its memory bounded (it reads only as fast
as it settles deliveries, here by deferring them to the retry table once their endpoints are found stalled, and
pauses fetching otherwise) and never has more requests in flight than `delivery.concurrency`."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import psutil
from aiohttp import web

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

BACKLOG = 50_000
CONCURRENCY = 40


class AnswerThenHang:
    """Answers at once for a moment, then never again: its endpoint has earned the whole budget when it hangs."""

    def __init__(self) -> None:
        self._first: float | None = None

    async def __call__(self, _request: web.Request, _body: bytes) -> web.StreamResponse:
        now = time.monotonic()
        if self._first is None:
            self._first = now
        if now - self._first >= 0.3:
            await asyncio.sleep(3600)
        return web.Response(text="ok")


async def test_a_backlog_behind_a_hung_receiver_keeps_memory_and_inflight_bounded(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/hung"), ["*.*"])
    receiver.behaviours["/hung"] = AnswerThenHang()
    padding = "x" * 400  # records of a realistic size, so that reading ahead would show in memory
    await produce(kafka, topic, [event("person.updated", ws, {"note": padding, "n": i}) for i in range(BACKLOG)])
    config = config_for(
        kafka,
        dsn,
        topic,
        delivery={
            "concurrency": CONCURRENCY,
            "per_host_concurrency": 1000,
            "timeout_seconds": 1.5,
            "retry_schedule": ["1h"],
        },
        logging={"level": "warning", "format": "json"},
    )
    metrics_url = f"http://{config['http']['listen']}/metrics"
    samples: list[float] = []
    with tempfile.TemporaryDirectory(prefix="webhookd-backlog-") as tmp:
        daemon = DaemonProcess(write_config(Path(tmp) / "c.yaml", config), {}, Path(tmp) / "daemon.log")
        try:
            daemon.start()
            assert daemon.proc is not None
            process = psutil.Process(daemon.proc.pid)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                samples.append(process.memory_info().rss / 2**20)
                await asyncio.sleep(0.25)
            _, metrics = await get_text(metrics_url)
            assert daemon.terminate() == 0
        finally:
            daemon.kill()
    consumed = metric(metrics, "webhookd_events_consumed_total")
    # Every event has one delivery: what was read is what was settled (delivered, deferred or failed and written)
    # and at most the pending bound (4 x concurrency) besides.
    settled = (
        metric(metrics, "webhookd_deliveries_total", outcome="delivered")
        + metric(metrics, "webhookd_deliveries_deferred_total")
        + metric(metrics, "webhookd_delivery_attempts_total", result="timeout")
    )
    print(
        f"\nbacklog {BACKLOG}: consumed {consumed:.0f} in 10 s, settled {settled:.0f}; RSS first {samples[4]:.1f} MiB, "
        f"peak {max(samples):.1f} MiB, last {samples[-1]:.1f} MiB; receiver saw at most "
        f"{receiver.max_open_requests} requests at once (concurrency {CONCURRENCY})"
    )
    assert receiver.max_open_requests <= CONCURRENCY
    assert receiver.max_open_requests >= CONCURRENCY // 2, "the limit was never approached: the test proves nothing"
    assert consumed <= settled + 4 * CONCURRENCY, f"read {consumed:.0f} events, settled {settled:.0f}: read ahead"
    # Bounded. The deferral path warms up over the first half minute, which is all this run sees (a 150 s run of
    # this scene levels off at 95-115 MiB while it consumes 20,000 events), so the bound is on the peak.
    assert max(samples) < 160, samples
