"""Failed attempts are retried from Postgres with backoff, Retry-After is honoured, and after the last attempt the
delivery is dead-lettered with its last status, while later events of the partition keep flowing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from tests.support import Behaviour, Receiver, add_webhook, event, fetch, new_workspace, produce, running, settings_for


def fail_first(times: int, response: Callable[[], web.Response] | None = None, hang: float = 0.0) -> Behaviour:
    """Fail the first `times` attempts of each event (a response is built anew each time: aiohttp sends one once)."""
    seen: dict[str, int] = {}

    async def behaviour(request: web.Request, _body: bytes) -> web.StreamResponse:
        event_id = request.headers["X-Twenty-Webhook-Event-Id"]
        seen[event_id] = seen.get(event_id, 0) + 1
        if seen[event_id] <= times:
            if hang:
                await asyncio.sleep(hang)
            return response() if response is not None else web.Response(status=500, text="boom")
        return web.Response(text="ok")

    return behaviour


async def test_a_500_then_a_200_is_delivered_after_a_retry(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/flaky"), ["*.*"])
    receiver.behaviours["/flaky"] = fail_first(2)
    async with running(settings_for(kafka, dsn, topic, delivery={"retry_schedule": ["100ms", "100ms", "100ms"]})):
        await produce(kafka, topic, [event("person.created", ws, id="e1")])
        await receiver.wait_for(lambda: len(receiver.requests) == 3, 20, "two failures and a success")
        await asyncio.sleep(0.5)
    rows = await fetch(dsn, "SELECT status, attempts, last_status FROM webhookd.deliveries")
    assert [(r["status"], r["attempts"]) for r in rows] == [("delivered", 3)]
    assert len(receiver.requests) == 3
    assert {r.event_id for r in receiver.requests} == {"e1"}
    assert len({r.headers["X-Twenty-Webhook-Nonce"] for r in receiver.requests}) == 3


async def test_a_timeout_then_a_200_is_delivered_after_a_retry(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/slow"), ["*.*"])
    receiver.behaviours["/slow"] = fail_first(1, hang=3.0)
    settings = settings_for(kafka, dsn, topic, delivery={"timeout_seconds": 0.5, "retry_schedule": ["100ms"]})
    async with running(settings):
        await produce(kafka, topic, [event("person.created", ws, id="e1")])
        await receiver.wait_for(lambda: len(receiver.requests) == 2, 20, "a timeout then a success")
        await asyncio.sleep(0.3)
    rows = await fetch(dsn, "SELECT status, attempts, last_error FROM webhookd.deliveries")
    assert [(r["status"], r["attempts"]) for r in rows] == [("delivered", 2)]


async def test_retry_after_delays_the_next_attempt(kafka: str, dsn: str, topic: str, receiver: Receiver) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/busy"), ["*.*"])
    receiver.behaviours["/busy"] = fail_first(1, lambda: web.Response(status=429, headers={"Retry-After": "2"}))
    async with running(settings_for(kafka, dsn, topic, delivery={"retry_schedule": ["50ms"], "retry_jitter": 0})):
        await produce(kafka, topic, [event("person.created", ws)])
        await receiver.wait_for(lambda: len(receiver.requests) == 2, 20, "the retry")
    gap = receiver.requests[1].at - receiver.requests[0].at
    assert gap >= 2.0, f"the retry came {gap:.2f}s after a Retry-After of 2s"
    assert gap < 8.0  # loose: the point is the lower bound; a loaded machine may poll late


async def test_after_the_last_attempt_the_delivery_is_dead_and_the_partition_moves_on(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/down"), ["person.*"])
    await add_webhook(dsn, ws, receiver.url("/up"), ["*.*"])
    receiver.behaviours["/down"] = fail_first(1000, lambda: web.Response(status=502, text="bad gateway"))
    settings = settings_for(kafka, dsn, topic, delivery={"retry_schedule": ["50ms", "50ms"]})
    async with running(settings):
        await produce(kafka, topic, [event("person.created", ws, id="doomed")], partition=0)
        await receiver.wait_for(lambda: len(receiver.at("/down")) == 3, 20, "three attempts")
        later = [event("company.created", ws, id=f"later-{i}") for i in range(5)]
        await produce(kafka, topic, later, partition=0)
        await receiver.wait_for(lambda: len(receiver.at("/up")) == 6, 20, "the later events")
        await asyncio.sleep(0.5)
    assert len(receiver.at("/down")) == 3, "no attempt after the last one of the schedule"
    rows = await fetch(
        dsn, "SELECT event_id, status, attempts, last_status, last_error FROM webhookd.deliveries WHERE status='dead'"
    )
    assert [(r["event_id"], r["attempts"], r["last_status"]) for r in rows] == [("doomed", 3, 502)]
    assert "bad gateway" in rows[0]["last_error"]
