"""Failed attempts are retried from Postgres with backoff, Retry-After is honoured, and after the last attempt the
delivery is dead-lettered with its last status, while later events of the partition keep flowing. A backlog of due
retries drains as fast as they settle, and what the retry path writes goes to Postgres in batches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, cast

import asyncpg
from aiohttp import web

from tests.support import Behaviour, Receiver, add_webhook, event, fetch, new_workspace, produce, running, settings_for
from webhookd.delivery.dispatch import Dispatcher
from webhookd.durable.outcomes import OutcomeWriter
from webhookd.durable.retries import RetryPoller, RetrySettings
from webhookd.runtime.metrics import Metrics


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


async def due_rows(dsn: str, webhook_id: str, workspace: str, count: int, attempts: int = 1) -> None:
    """`count` deliveries to one webhook left behind by failed attempts, all due now, written in one transaction."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            INSERT INTO webhookd.deliveries
                (event_id, webhook_id, workspace_id, event_name, body, source, attempts, next_attempt_at, last_status)
            SELECT 'due-' || i, $1::uuid, $2::uuid, 'person.updated',
                   convert_to('{"event":"person.updated","data":{"i":' || i || '},"timestamp":"x"}', 'UTF8'),
                   'backlog:0:' || i, $4, now() - interval '1 second', 503
            FROM generate_series(1, $3) AS i
            """,
            webhook_id,
            workspace,
            count,
            attempts,
        )
    finally:
        await conn.close()


async def test_a_backlog_of_due_retries_drains_as_retries_settle_not_once_per_poll_interval(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    webhook = await add_webhook(dsn, ws, receiver.url("/back"), ["*.*"])
    # Claimed a poll interval at a time, 400 rows at 8 in flight would take 40 intervals: over three minutes.
    delivery = {"concurrency": 8, "retry_poll_interval_seconds": 5}
    async with running(settings_for(kafka, dsn, topic, delivery=delivery)):
        await due_rows(dsn, webhook, ws, 400)
        await receiver.wait_for(lambda: len(receiver.requests) >= 400, 60, "the backlog")
        await asyncio.sleep(0.3)
    span = receiver.requests[-1].at - receiver.requests[0].at
    assert span < 15, f"400 due retries took {span:.1f} s from first to last"
    assert len({r.event_id for r in receiver.requests}) == 400
    rows = await fetch(dsn, "SELECT status, attempts, count(*) AS n FROM webhookd.deliveries GROUP BY 1, 2")
    assert [(r["status"], r["attempts"], r["n"]) for r in rows] == [("delivered", 2, 400)]


async def test_the_deliveries_of_a_deleted_webhook_are_dead_lettered_together_with_their_attempts(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    gone = await add_webhook(dsn, ws, receiver.url("/gone"), ["*.*"], deleted=True)
    live = await add_webhook(dsn, ws, receiver.url("/live"), ["*.*"])
    async with running(settings_for(kafka, dsn, topic)):
        await due_rows(dsn, gone, ws, 300, attempts=3)
        await due_rows(dsn, live, ws, 5)
        await receiver.wait_for(lambda: len(receiver.at("/live")) == 5, 30, "the live webhook's retries")
        for _ in range(100):
            dead = await fetch(
                dsn, "SELECT attempts, last_error, xmin::text AS tx FROM webhookd.deliveries WHERE status = 'dead'"
            )
            if len(dead) == 300:
                break
            await asyncio.sleep(0.1)
    assert len(dead) == 300
    assert {(r["attempts"], r["last_error"]) for r in dead} == {
        (3, "the webhook no longer exists or no longer subscribes to this event")
    }
    # One transaction per claim, not one per row (each row's xmin is the transaction that wrote it last).
    assert len({r["tx"] for r in dead}) <= 3
    assert receiver.at("/gone") == []


class _Busy:
    """The part of the dispatcher the poller reads: how many retries are under way, and a wake-up when one settles."""

    def __init__(self) -> None:
        self.retries_in_flight = 0
        self.retry_settled = asyncio.Event()

    def settle(self) -> None:
        self.retries_in_flight -= 1
        self.retry_settled.set()


class _CountingPoller(RetryPoller):
    """Claims as many rows as asked for (a backlog that never ends), submitting them to `_Busy`."""

    def __init__(self, pool: asyncpg.Pool, busy: _Busy, settings: RetrySettings) -> None:
        nothing = cast(Any, None)  # the index, endpoint health and outcomes only serve the real claim
        super().__init__(pool, cast(Dispatcher, busy), nothing, nothing, nothing, Metrics(), settings)
        self.busy = busy
        self.claims: list[int] = []

    async def claim(self, limit: int) -> int:
        self.claims.append(limit)
        self.busy.retries_in_flight += limit
        return limit


async def test_the_poller_claims_again_once_a_quarter_of_its_room_is_free_without_waiting_the_interval(
    dsn: str,
) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        busy = _Busy()
        poller = _CountingPoller(pool, busy, RetrySettings(poll_interval=30, max_in_flight=40, lease_seconds=60))
        task = asyncio.create_task(poller.run())
        try:
            for _ in range(50):
                if poller.claims:
                    break
                await asyncio.sleep(0.02)
            for _ in range(9):  # settled one by one: each wakes the poller, none makes a claim worth its cost
                busy.settle()
                await asyncio.sleep(0.02)
            assert poller.claims == [40]
            busy.settle()  # the tenth: a quarter of the room
            for _ in range(50):
                if len(poller.claims) > 1:
                    break
                await asyncio.sleep(0.02)
            assert poller.claims == [40, 10]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await asyncio.wait_for(pool.close(), 10)  # the poller gave its connection back


async def test_an_outcome_never_undoes_what_another_replica_settled_and_writes_survive_a_cut_connection(
    dsn: str,
) -> None:
    ws = new_workspace()
    webhook = str(uuid.uuid4())
    await due_rows(dsn, webhook, ws, 3)
    ids = [r["id"] for r in await fetch(dsn, "SELECT id FROM webhookd.deliveries ORDER BY id")]
    conn = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await conn.execute("UPDATE webhookd.deliveries SET status = 'delivered' WHERE id = $1", ids[0])
        outcomes = OutcomeWriter(pool)
        outcomes.start()
        writes = [
            outcomes.update(row, status="dead", attempts=2, retry_in=0, last_status=500, error="HTTP 500")
            for row in ids[:2]
        ]
        await asyncio.gather(*writes)
        # The outcome writer keeps its connection between batches; cut it, and the next write takes another.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await outcomes.update(ids[2], status="pending", attempts=2, retry_in=60, last_status=None, error="x\x00y")
        await outcomes.close(5)
    finally:
        await conn.close()
        await asyncio.wait_for(pool.close(), 10)
    rows = await fetch(dsn, "SELECT status, attempts, last_error FROM webhookd.deliveries ORDER BY id")
    assert [(r["status"], r["attempts"], r["last_error"]) for r in rows] == [
        ("delivered", 1, None),
        ("dead", 2, "HTTP 500"),
        ("pending", 2, "x\ufffdy"),
    ]
