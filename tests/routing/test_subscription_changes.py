"""Subscription rows changed while the daemon runs take effect within 2 seconds, without a restart.

After each change, probe events are produced every 100 ms; the change has taken effect at the first probe from which
on every probe is delivered as the new row says. The contract holds if that probe was produced at most 2 s after the
change was committed. The periodic full reload stays at its default of 30 s and the whole sequence runs inside that
window, so what is proven is the LISTEN/NOTIFY path."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.support import Receiver, add_webhook, new_workspace, running, settings_for

CONTRACT_SECONDS = 2.0
PROBE_INTERVAL = 0.1
# A probe's verdict is read once its control delivery arrived this long ago: the deliveries of one record to
# several webhooks are sent together, so a delivery to the subject would have arrived by then.
SETTLE_SECONDS = 0.3
# Enough consecutive probes in the new state to believe the change took effect for good.
STABLE_PROBES = 5
GIVE_UP_SECONDS = CONTRACT_SECONDS + 2.0
PERIODIC_RELOAD_SECONDS = 30.0  # the daemon's default for postgres.subscriptions_refresh_seconds


@dataclass
class Prober:
    """Produces one event per workspace every 100 ms to partition 0, so they are consumed in production order."""

    producer: AIOKafkaProducer
    topic: str
    receiver: Receiver
    workspaces: tuple[str, str]
    sent: list[tuple[str, float]] = field(default_factory=list)  # probe name, when its records were in the log

    async def probe(self, name: str) -> None:
        for label, ws in zip("ab", self.workspaces, strict=True):
            record = {"event": "person.created", "workspaceId": ws, "data": {"probe": name}, "id": f"{name}-{label}"}
            await self.producer.send_and_wait(self.topic, orjson.dumps(record), partition=0)
        self.sent.append((name, time.monotonic()))

    def delivered(self, name: str, label: str, path: str) -> bool:
        return (f"{name}-{label}", path) in self.receiver.pairs()

    def settled(self, name: str) -> bool:
        now = time.monotonic()
        controls = [
            r for r in self.receiver.requests
            if (r.event_id, r.path) in {(f"{name}-a", "/control-a"), (f"{name}-b", "/control-b")}
        ]  # fmt: skip
        return len(controls) == 2 and all(now - r.at >= SETTLE_SECONDS for r in controls)

    async def time_to_effect(self, step: str, changed_at: float, in_effect: Callable[[str], bool]) -> float:
        """Seconds from the change to the first probe from which on every probe shows it (`in_effect`)."""
        first = len(self.sent)
        deadline = changed_at + GIVE_UP_SECONDS
        next_probe = time.monotonic()
        while True:
            await self.probe(f"{step}-{len(self.sent) - first}")
            verdicts = [in_effect(name) for name, _ in self.sent[first:] if self.settled(name)]
            # The first probe of the final run of probes that show the change.
            start = len(verdicts)
            while start > 0 and verdicts[start - 1]:
                start -= 1
            if len(verdicts) - start >= STABLE_PROBES:
                return self.sent[first + start][1] - changed_at
            if time.monotonic() > deadline:
                shown = "".join("+" if v else "-" for v in verdicts)
                raise AssertionError(f"{step}: not in effect {GIVE_UP_SECONDS}s after the change (probes: {shown})")
            next_probe += PROBE_INTERVAL
            await asyncio.sleep(max(0.0, next_probe - time.monotonic()))


@pytest.fixture
async def producer(kafka: str) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=False, linger_ms=0)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def test_inserts_updates_deletes_and_workspace_moves_take_effect_within_two_seconds(
    kafka: str, dsn: str, topic: str, receiver: Receiver, producer: AIOKafkaProducer
) -> None:
    ws_a, ws_b = new_workspace(), new_workspace()
    # Each webhook is the subject of one change; the control webhooks receive every probe, which tells when a probe
    # has been handled.
    await add_webhook(dsn, ws_a, receiver.url("/control-a"), ["*.*"])
    await add_webhook(dsn, ws_b, receiver.url("/control-b"), ["*.*"])
    ops = await add_webhook(dsn, ws_a, receiver.url("/ops"), ["company.created"])
    url = await add_webhook(dsn, ws_a, receiver.url("/url-old"), ["person.created"])
    soft = await add_webhook(dsn, ws_a, receiver.url("/soft"), ["*.*"])
    hard = await add_webhook(dsn, ws_a, receiver.url("/hard"), ["person.*"])
    moved = await add_webhook(dsn, ws_a, receiver.url("/moved"), ["*.created"])
    prober = Prober(producer, topic, receiver, (ws_a, ws_b))
    delivered = prober.delivered
    timings: dict[str, float] = {}

    conn = await asyncpg.connect(dsn)
    try:
        started = time.monotonic()
        async with running(settings_for(kafka, dsn, topic)):
            # The starting state, so that no later step can pass because its subject never received anything.
            await prober.probe("before")
            await receiver.wait_for(lambda: prober.settled("before"), 10, "the first probe")
            start = {path: delivered("before", "a", path) for path in ("/ops", "/url-old", "/soft", "/hard", "/moved")}
            assert start == {"/ops": False, "/url-old": True, "/soft": True, "/hard": True, "/moved": True}
            assert not delivered("before", "b", "/moved")

            async def change(step: str, sql: str, *args: object, in_effect: Callable[[str], bool]) -> None:
                await conn.execute(sql, *args)
                timings[step] = await prober.time_to_effect(step, time.monotonic(), in_effect)

            await change(
                "insert",
                'INSERT INTO core.webhook ("workspaceId", "targetUrl", operations, secret) VALUES ($1, $2, $3, $4)',
                uuid.UUID(ws_a), receiver.url("/inserted"), ["person.created"], "s3cr3t",
                in_effect=lambda n: delivered(n, "a", "/inserted"),
            )  # fmt: skip
            await change(
                "operations widened",
                "UPDATE core.webhook SET operations = $2 WHERE id = $1",
                uuid.UUID(ops), ["company.created", "person.*"],
                in_effect=lambda n: delivered(n, "a", "/ops"),
            )  # fmt: skip
            await change(
                "operations narrowed",
                "UPDATE core.webhook SET operations = $2 WHERE id = $1",
                uuid.UUID(ops), ["person.updated"],
                in_effect=lambda n: not delivered(n, "a", "/ops"),
            )  # fmt: skip
            await change(
                "targetUrl updated",
                'UPDATE core.webhook SET "targetUrl" = $2 WHERE id = $1',
                uuid.UUID(url), receiver.url("/url-new"),
                in_effect=lambda n: delivered(n, "a", "/url-new") and not delivered(n, "a", "/url-old"),
            )  # fmt: skip
            await change(
                "soft delete",
                'UPDATE core.webhook SET "deletedAt" = now() WHERE id = $1',
                uuid.UUID(soft),
                in_effect=lambda n: not delivered(n, "a", "/soft"),
            )  # fmt: skip
            await change(
                "undelete",
                'UPDATE core.webhook SET "deletedAt" = NULL WHERE id = $1',
                uuid.UUID(soft),
                in_effect=lambda n: delivered(n, "a", "/soft"),
            )  # fmt: skip
            await change(
                "hard delete",
                "DELETE FROM core.webhook WHERE id = $1",
                uuid.UUID(hard),
                in_effect=lambda n: not delivered(n, "a", "/hard"),
            )  # fmt: skip
            await change(
                "moved to another workspace",
                'UPDATE core.webhook SET "workspaceId" = $2 WHERE id = $1',
                uuid.UUID(moved), uuid.UUID(ws_b),
                in_effect=lambda n: delivered(n, "b", "/moved") and not delivered(n, "a", "/moved"),
            )  # fmt: skip
            finished = time.monotonic()
    finally:
        await conn.close()

    print("time from change to effect: " + ", ".join(f"{step} {t:.2f}s" for step, t in timings.items()))
    late = {step: round(t, 2) for step, t in timings.items() if t > CONTRACT_SECONDS}
    assert late == {}, f"changes took effect later than {CONTRACT_SECONDS}s after they were made"
    assert finished - started < PERIODIC_RELOAD_SECONDS, (
        "the sequence outlasted the periodic reload, so that reload, not LISTEN/NOTIFY, may have applied a change"
    )
