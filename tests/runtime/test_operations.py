"""What an operator sees and relies on: metrics that match what receivers saw, probes, and shutdowns that are
graceful within their deadline (or immediate on a second signal) without losing a delivery."""

from __future__ import annotations

import asyncio
import re
import signal
import tempfile
import time
from pathlib import Path

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.shipped.test_deploy import metric_names_in_deploy
from tests.support import (
    DaemonProcess,
    Receiver,
    add_webhook,
    config_for,
    event,
    fetch,
    get_text,
    new_workspace,
    produce,
    running,
    settings_for,
    write_config,
)

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def always_500(_request: web.Request, _body: bytes) -> web.StreamResponse:
    return web.Response(status=500)


async def test_metrics_count_what_the_receivers_saw(kafka: str, dsn: str, topic: str, receiver: Receiver) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/ok"), ["*.*"])
    await add_webhook(dsn, ws, receiver.url("/fail"), ["*.*"])
    receiver.behaviours["/fail"] = always_500
    settings = settings_for(kafka, dsn, topic, delivery={"retry_schedule": ["100ms"]})
    base = f"http://{settings.http.listen}"
    async with running(settings):
        await produce(kafka, topic, [*(event("person.created", ws) for _ in range(10)), b"not json", b"{}"], 1)
        await receiver.wait_for(lambda: len(receiver.at("/fail")) == 20 and len(receiver.at("/ok")) == 10, 30, "all")
        await asyncio.sleep(1.0)  # the dead letters' writes and one commit interval
        health, _ = await get_text(base + "/healthz")
        ready, _ = await get_text(base + "/readyz")
        status, text = await get_text(base + "/metrics")
    assert (health, ready, status) == (200, 200, 200)
    m = _samples(text)
    assert m[("webhookd_events_consumed_total", (("topic", topic),))] == 12
    assert sum(v for (name, _), v in m.items() if name == "webhookd_events_invalid_total") == 2
    assert m[("webhookd_delivery_attempts_total", (("result", "2xx"),))] == len(receiver.at("/ok")) == 10
    assert m[("webhookd_delivery_attempts_total", (("result", "5xx"),))] == len(receiver.at("/fail")) == 20
    assert m[("webhookd_deliveries_total", (("outcome", "delivered"),))] == 10
    assert m[("webhookd_deliveries_total", (("outcome", "dead_lettered"),))] == 10
    assert m[("webhookd_delivery_duration_seconds_count", ())] == 30
    assert m[("webhookd_event_delivery_latency_seconds_count", ())] == 10
    assert m[("webhookd_inflight_deliveries", ())] == 0
    assert m[("webhookd_subscriptions", ())] == 2
    assert ("webhookd_retry_queue_depth", ()) in m
    assert m[("webhookd_consumer_lag", (("partition", "1"), ("topic", topic)))] == 0
    dead = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'dead'")
    assert dead[0]["n"] == 10
    # Every series the alerts and the dashboard query is served by a running daemon (labelled series without a
    # value yet show as their family, so names are compared by family).
    families = {family.name for family in text_string_to_metric_families(text)}
    for name in metric_names_in_deploy():
        assert re.sub(r"_(total|bucket|sum|count)$", "", name) in families, f"{name} is queried but not exported"
    # Bounded labels: nothing that names a receiver, a webhook or a workspace.
    for (_, labels), _ in m.items():
        for _, value in labels:
            assert "://" not in value
            assert not _UUID.match(value)


class _SlowUntilHealed:
    """Hangs every request until `healed`, then answers at once (the restarted daemon finds a healthy receiver)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.healed = False

    async def __call__(self, _request: web.Request, _body: bytes) -> web.StreamResponse:
        if not self.healed:
            await asyncio.sleep(self.seconds)
        return web.Response(text="ok")


async def _shutdown_then_restart(
    kafka: str, dsn: str, topic: str, receiver: Receiver, *, drain: float, hang: float, second_signal: bool
) -> tuple[int, float, int]:
    ws = new_workspace()
    slow = _SlowUntilHealed(hang)
    # Twenty endpoints: each one, slow from its first request, is given one slot until it answers.
    for n in range(20):
        await add_webhook(dsn, ws, receiver.url(f"/slow/{n}"), ["*.*"])
        receiver.behaviours[f"/slow/{n}"] = slow
    total = 20
    config = config_for(
        kafka, dsn, topic,
        delivery={"concurrency": 20, "drain_timeout_seconds": drain, "timeout_seconds": 30, "retry_schedule": ["1s"]},
        logging={"format": "json"},
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="webhookd-shutdown-") as tmp:
        daemon = DaemonProcess(write_config(Path(tmp) / "c.yaml", config), {}, Path(tmp) / "daemon.log")
        try:
            daemon.start()
            await produce(kafka, topic, [event("person.updated", ws, id=f"e{i}") for i in range(total)])
            await receiver.wait_for(lambda: receiver.open_requests >= 20, 30, "slow deliveries in flight")
            assert daemon.proc is not None
            signalled = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            if second_signal:
                await asyncio.sleep(0.3)
                daemon.proc.send_signal(signal.SIGINT)
            status = await asyncio.to_thread(daemon.proc.wait, 60)
            took = time.monotonic() - signalled
            slow.healed = True
            daemon.start()
            await receiver.wait_for(
                lambda: {f"e{i}" for i in range(total)} <= {r.event_id for r in receiver.requests if r.at > signalled},
                60,
                "every event after the restart",
            )
            # In a thread: the receiver runs on this loop, and must answer what the daemon still has in flight.
            await asyncio.to_thread(daemon.terminate)
        finally:
            daemon.kill()
    return status, took, total


async def test_sigterm_drains_within_the_deadline_exits_0_and_loses_nothing(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    status, took, total = await _shutdown_then_restart(
        kafka, dsn, topic, receiver, drain=1.0, hang=20, second_signal=False
    )
    print(f"\nSIGTERM with 20 deliveries hanging: exit {status} after {took:.2f}s (drain deadline 1 s)")
    assert status == 0
    assert took < 1.0 + 10, "shutdown overran its deadline"
    # Only the retry path writes rows for deliveries that succeed; these are the ones handed over at shutdown.
    rows = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'delivered'")
    assert rows[0]["n"] >= 1, "unfinished deliveries should have been handed to the retry table"
    assert total


async def test_a_second_signal_exits_at_once_and_loses_nothing(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    status, took, _ = await _shutdown_then_restart(kafka, dsn, topic, receiver, drain=30.0, hang=20, second_signal=True)
    print(f"\nSIGTERM then SIGINT: exit {status} after {took:.2f}s (drain deadline 30 s)")
    assert status != 0
    assert took < 3.0
