"""A hung receiver holds only its own host's budget: deliveries that would queue behind it go to the retry table,
the partition keeps moving, every other receiver keeps its pace, and the hung one gets everything once it heals."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from tests.support import Receiver, add_webhook, event, fetch, new_workspace, produce, running, settings_for

EVENTS = 300
HEALTHY = 5


class Hang:
    """Hangs every request until healed, then answers at once."""

    def __init__(self) -> None:
        self.healed = asyncio.Event()

    async def __call__(self, _request: web.Request, _body: bytes) -> web.StreamResponse:
        await self.healed.wait()
        return web.Response(text="ok")


async def test_a_hung_receiver_does_not_slow_the_others_and_gets_everything_after_it_heals(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    healthy = [Receiver() for _ in range(HEALTHY)]
    for r in healthy:
        await r.start()
    try:
        for r in healthy:
            await add_webhook(dsn, ws, r.url("/ok"), ["*.*"])
        await add_webhook(dsn, ws, receiver.url("/hung"), ["*.*"])
        hang = Hang()
        receiver.behaviours["/hung"] = hang
        settings = settings_for(
            kafka, dsn, topic,
            delivery={
                "per_host_concurrency": 4, "timeout_seconds": 30, "host_wait_seconds": 0.2,
                "host_busy_retry_seconds": 1, "retry_schedule": ["1s"],
            },
        )  # fmt: skip
        async with running(settings):
            started = time.monotonic()
            await produce(kafka, topic, [event("person.created", ws, id=f"e{i}") for i in range(EVENTS)])
            for r in healthy:
                await r.wait_for(lambda r=r: len(r.requests) >= EVENTS, 60, "the healthy deliveries")  # type: ignore[misc]
            healthy_took = time.monotonic() - started
            assert receiver.open_requests <= 4, "the hung host got more than its budget"
            deferred = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'pending'")
            hang.healed.set()
            await receiver.wait_for(
                lambda: {f"e{i}" for i in range(EVENTS)} <= {r.event_id for r in receiver.requests},
                90,
                "every delivery to the healed receiver",
            )
            healed_took = time.monotonic() - started
        print(
            f"\n{EVENTS} events x {HEALTHY} healthy receivers in {healthy_took:.1f}s beside a hung one "
            f"({deferred[0]['n']} of its deliveries deferred to the retry table); all {EVENTS} reached it "
            f"{healed_took - healthy_took:.1f}s after it healed"
        )
        assert deferred[0]["n"] >= EVENTS // 2, "the hung receiver's deliveries should wait in the retry table"
        assert all(len({q.event_id for q in r.requests}) == EVENTS for r in healthy)
    finally:
        for r in healthy:
            await r.stop()
