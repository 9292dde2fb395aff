"""Endpoint health across processes. A receiver's Retry-After pauses its endpoint in every process: the process that
saw it writes and announces the pause at once, the others apply it as the notification arrives, and a process that
starts later reads it. With a pacer, the rate limit is the cluster's: health defers what the pacer cannot place."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from tests.support import fetch, until
from webhookd.endpoints.breaker import BreakerSettings
from webhookd.endpoints.pacing import Grant, Pacer
from webhookd.endpoints.state import EndpointHealth
from webhookd.endpoints.sync import EndpointBook
from webhookd.model import SEND_NOW, AttemptResult, Delivery, Go, Hold, Webhook
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.runtime.metrics import Metrics
from webhookd.runtime.tls import PostgresConnect

# A breaker that needs a thousand failures to open (ratio, requests, in a row, window, cooldowns, probe): these
# tests are about pauses and pace, not circuits.
BREAKER = BreakerSettings(0.7, 1000, 1000, 60, 30, 60, 10)
# Long enough that only an urgent write can explain a pause arriving within a second.
SYNC_SECONDS = 30.0


def webhook(url: str) -> Webhook:
    return Webhook(
        id=str(uuid.uuid4()),
        workspace_id=str(uuid.uuid4()),
        target_url=url,
        operations=("*.*",),
        secret=b"s3cr3t",
        host_key="receiver.test:80",
    )


def delivery(to: Webhook) -> Delivery:
    return Delivery("e1", "person.created", to.workspace_id, to, b"{}", None, "t:0:0")


def health(pacer: Pacer | None = None) -> EndpointHealth:
    return EndpointHealth(BREAKER, default_rate=None, max_wait=1.0, metrics=Metrics(), pacer=pacer)


@dataclass
class Process:
    """What one daemon process holds for endpoint health: its pool, health, book and the book's tasks."""

    pool: asyncpg.Pool
    health: EndpointHealth
    book: EndpointBook


@contextlib.asynccontextmanager
async def process(dsn: str, index: SubscriptionIndex | None) -> AsyncIterator[Process]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    h = health()
    book = EndpointBook(pool, h, SYNC_SECONDS, 0, PostgresConnect(dsn), index)
    await book.load()
    tasks = [asyncio.create_task(book.run()), asyncio.create_task(book.follow_pauses())]
    try:
        await until(lambda: _listening(book), 10, "the pause listener")
        yield Process(pool, h, book)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()


async def _listening(book: EndpointBook) -> bool:
    return book.listening


async def test_a_retry_after_seen_by_one_process_holds_the_endpoint_in_the_others_within_a_second(dsn: str) -> None:
    url = "http://receiver.test/hook?token=t0"
    seen, sibling = webhook(url), webhook(url)  # two webhooks of one receiver: its pause holds both
    index = SubscriptionIndex()
    index.put(seen)
    index.put(sibling)
    async with process(dsn, index) as a, process(dsn, index) as b:
        assert b.health.admit(delivery(sibling)) is SEND_NOW
        a.health.observe(delivery(seen), SEND_NOW, AttemptResult("4xx", status=429, retry_after=30.0))
        paused_at = time.monotonic()
        while not isinstance(verdict := b.health.admit(delivery(sibling)), Hold):
            assert time.monotonic() - paused_at < 1.0, "the other process still sends a second after the 429"
            await asyncio.sleep(0.005)
        took = time.monotonic() - paused_at
        print(f"\nRetry-After: 30 seen by one process held the endpoint in another {took * 1000:.0f} ms later")
        assert verdict.reason == "rate_limited"
        assert 29.0 <= verdict.retry_in <= 30 * 1.5
        # The same pause holds in a process that starts after it was announced.
        async with process(dsn, index) as c:
            late = c.health.admit(delivery(seen))
            assert isinstance(late, Hold), "a process started during the pause sent to the endpoint"
            assert late.retry_in >= 29.0
    [row] = await fetch(
        dsn,
        "SELECT extract(epoch FROM rate_limited_until - now())::float8 AS left FROM webhookd.endpoints "
        "WHERE webhook_id = $1::uuid",
        seen.id,
    )
    assert 28.0 <= row["left"] <= 30.5


def test_a_pause_for_a_webhook_not_used_here_holds_from_its_first_delivery() -> None:
    h = health()
    later = webhook("http://receiver.test/later")
    h.apply_pause(later.id, 20.0)  # neither used here nor given a URL: kept until the webhook shows up
    verdict = h.admit(delivery(later))
    assert isinstance(verdict, Hold)
    assert verdict.reason == "rate_limited"
    assert verdict.retry_in >= 19.0
    held, _ = h.retry_holds()
    assert later.id in held, "the retry poller would still claim the paused webhook's deliveries"


def test_a_pause_announced_again_is_not_published_again() -> None:
    h = health()
    hook = webhook("http://receiver.test/echo")
    h.apply_pause(hook.id, 20.0, hook.target_url)
    assert not h.urgent.is_set()
    assert h.take_changes().states == {}, "a pause read from Postgres would be written back (and announced) again"


class Schedule:
    """A ledger that grants what is asked, or, once `free_in` is set, nothing for that long; records the rates."""

    def __init__(self, free_in: float | None = None) -> None:
        self.free_in = free_in
        self.rates: list[float] = []

    async def lease(self, key: bytes, wanted: int, rate: float, burst: float, horizon: float) -> Grant:
        self.rates.append(rate)
        return Grant(wanted, 0.0) if self.free_in is None else Grant(0, self.free_in)

    async def prune(self) -> None:
        pass


async def admitted(h: EndpointHealth, d: Delivery) -> Go | Hold:
    """What the dispatcher does: admit, then ask the cluster's pace when the endpoint has a limit."""
    verdict = h.admit(d)
    if isinstance(verdict, Go) and verdict.paced:
        verdict = await h.pace(d, verdict)
    return verdict


def sends_now(verdict: Go | Hold) -> bool:
    return isinstance(verdict, Go) and verdict.wait == 0


async def test_with_a_pacer_health_paces_at_the_strictest_limit_and_defers_what_the_schedule_cannot_place() -> None:
    ledger = Schedule()
    h = health(Pacer(ledger))
    url = "http://receiver.test/paced"
    strict, lax, unlimited = webhook(url), webhook(url), webhook("http://receiver.test/free")
    h.apply_rate(strict.id, 2.0)
    h.apply_rate(lax.id, 50.0)
    assert sends_now(await admitted(h, delivery(lax)))
    assert sends_now(await admitted(h, delivery(strict)))
    assert ledger.rates == [50.0, 2.0], "the endpoint was not paced at the strictest of its webhooks' limits"
    ledger.free_in = 3.0
    verdict = await admitted(h, delivery(lax))
    assert isinstance(verdict, Hold)
    assert verdict.reason == "rate_limited"
    assert 3.0 <= verdict.retry_in <= 4.0
    assert sends_now(await admitted(h, delivery(unlimited)))
    assert len(ledger.rates) == 3, "an unlimited endpoint asked for a lease"


async def test_with_a_pacer_the_rate_is_not_also_paced_in_memory_and_a_pause_still_holds() -> None:
    h = health(Pacer(Schedule()))  # a schedule that grants every slot at once
    hook = webhook("http://receiver.test/both")
    h.apply_rate(hook.id, 2.0)
    # Paced in memory as well, the third of these would wait half a second and the fourth be deferred.
    assert all([sends_now(await admitted(h, delivery(hook))) for _ in range(10)])
    h.apply_pause(hook.id, 10.0, hook.target_url)
    verdict = await admitted(h, delivery(hook))
    assert isinstance(verdict, Hold)
    assert verdict.retry_in >= 10.0


@pytest.mark.parametrize("paced_by_cluster", [False, True], ids=["in_memory", "cluster"])
async def test_a_slot_of_the_rate_limit_given_back_by_a_stalled_endpoint_is_the_next_deliverys(
    paced_by_cluster: bool,
) -> None:
    # A schedule of one slot a lease and none after it: a slot not given back would be lost for 3 s.
    h = EndpointHealth(BREAKER, default_rate=None, max_wait=0.0, metrics=Metrics(), pacer=None)
    if paced_by_cluster:
        ledger = Schedule()
        h = health(Pacer(ledger))
    hook = webhook("http://receiver.test/stalled")
    h.apply_rate(hook.id, 1.0)
    first = await admitted(h, delivery(hook))
    assert isinstance(first, Go)
    if paced_by_cluster:
        ledger.free_in = 3.0  # the cluster's schedule has nothing more for a while
    else:
        assert isinstance(await admitted(h, delivery(hook)), Hold), "the rate limit let a second delivery through"
    # What the dispatcher does when the scheduler finds the endpoint stalled: the delivery goes back unsent.
    h.give_back(delivery(hook), first)
    assert sends_now(await admitted(h, delivery(hook)))
