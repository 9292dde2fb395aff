"""Cluster-wide rate limits: processes lease slots of an endpoint's schedule in Postgres and hand them out locally.

The first tests drive the local handout on a clock they control, against a ledger that answers what they script;
the others run several pacers (each with its own pool, as separate processes would have) against a real Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from tests.support import fetch
from webhookd.endpoints.pacing import Grant, Pacer, PostgresLedger
from webhookd.endpoints.slots import LeasedSlots

URL = "https://receiver.example/hooks?token=not-for-postgres"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records how long each delivery was told to sleep for its slot, without sleeping."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)
        await asyncio.sleep(0)


class ScriptedLedger:
    """Answers each lease with `grant(wanted)`; records what was asked."""

    def __init__(self, start_in: float = 0.0, granted: int | None = None, error: Exception | None = None) -> None:
        self.start_in = start_in
        self.granted = granted
        self.error = error
        self.asked: list[int] = []

    async def lease(self, key: bytes, wanted: int, rate: float, burst: float, horizon: float) -> Grant:
        assert URL.encode() not in key, "the URL itself reached the ledger"
        self.asked.append(wanted)
        await asyncio.sleep(0)  # an answer takes at least a turn of the event loop, as a round trip does
        if self.error is not None:
            raise self.error
        return Grant(wanted if self.granted is None else self.granted, self.start_in)

    async def prune(self) -> None:
        pass


def pacer(ledger: ScriptedLedger, members: int = 1) -> tuple[Pacer, Clock, Sleeps]:
    clock, sleeps = Clock(), Sleeps()
    return Pacer(ledger, members=lambda: members, clock=clock, sleep=sleeps), clock, sleeps


async def test_deliveries_asking_together_share_one_lease_and_get_slots_one_interval_apart() -> None:
    ledger = ScriptedLedger()
    p, _, sleeps = pacer(ledger)
    answers = await asyncio.gather(*(p.reserve(URL, 40.0, max_wait=1.0) for _ in range(10)))
    assert answers == [None] * 10
    assert ledger.asked == [10], "the waiting deliveries did not share one lease"
    # The first slot is now (no sleep), each next one 1/40 s later.
    assert sleeps.seconds == pytest.approx([0.025 * i for i in range(1, 10)])


async def test_a_lease_covers_a_quarter_second_of_the_rate_however_many_deliveries_wait() -> None:
    ledger = ScriptedLedger()
    p, _, _ = pacer(ledger)
    answers = await asyncio.gather(*(p.reserve(URL, 20.0, max_wait=10.0) for _ in range(100)))
    assert answers == [None] * 100
    assert ledger.asked == [5] * 20, "one round trip should serve five deliveries at 20/s"


async def test_a_delivery_without_a_slot_within_its_wait_is_told_when_to_come_back_without_asking_again() -> None:
    ledger = ScriptedLedger(start_in=3.0, granted=0)  # the schedule is full for the next 3 s
    p, clock, _ = pacer(ledger, members=2)
    first = await p.reserve(URL, 10.0, max_wait=1.0)
    second = await p.reserve(URL, 10.0, max_wait=1.0)
    # From the next free slot, returns spaced at this process's share of the rate: 2 processes at 10/s.
    assert first == pytest.approx(3.0 + 0.2)
    assert second == pytest.approx(3.0 + 0.4)
    assert ledger.asked == [1], "Postgres was asked again although it had said it was full for 3 s"
    clock.now += 2.5  # the schedule has room within max_wait again
    await p.reserve(URL, 10.0, max_wait=1.0)
    assert len(ledger.asked) == 2


async def test_an_unlimited_endpoint_never_asks_for_a_lease() -> None:
    ledger = ScriptedLedger(error=AssertionError("an unlimited endpoint asked Postgres"))
    p, _, sleeps = pacer(ledger)
    assert [await p.reserve(URL, None, max_wait=1.0) for _ in range(1000)] == [None] * 1000
    assert ledger.asked == []
    assert sleeps.seconds == []
    assert p.tracked == 0


async def test_without_postgres_each_process_paces_at_its_share_and_asks_again_only_after_a_while() -> None:
    ledger = ScriptedLedger(error=OSError("connection refused"))
    p, clock, sleeps = pacer(ledger, members=2)
    answers = [await p.reserve(URL, 10.0, max_wait=1.0) for _ in range(8)]
    assert p.offline
    assert answers == [None] * 8
    # 10/s shared by 2 processes: a second's burst at 5/s (five at once), then one every 0.2 s.
    assert [s for s in sleeps.seconds if s > 1e-9] == pytest.approx([0.2, 0.4, 0.6])
    assert ledger.asked == [1]
    clock.now += 10
    assert not p.offline
    await p.reserve(URL, 10.0, max_wait=1.0)
    assert len(ledger.asked) == 2, "Postgres was not tried again once the offline period ended"


def test_a_leased_slot_is_handed_out_at_most_once_and_dropped_a_second_after_its_time() -> None:
    slots = LeasedSlots()
    slots.add(100.0, 3, 0.5)  # 100.0, 100.5, 101.0
    assert slots.take(100.0, max_wait=0.1) == 100.0
    assert slots.take(100.0, max_wait=0.1) is None, "a slot 0.5 s away was handed out with a wait of 0.1 s"
    assert slots.take(100.0, max_wait=0.5) == 100.5
    assert slots.take(102.5, max_wait=1.0) is None, "a slot 1.5 s old was kept for a later burst"
    assert len(slots) == 0


async def _pools(dsn: str, n: int) -> list[asyncpg.Pool]:
    pools = []
    for _ in range(n):
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert pool is not None
        pools.append(pool)
    return pools


class CountingLedger(PostgresLedger):
    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.leases = 0

    async def lease(self, key: bytes, wanted: int, rate: float, burst: float, horizon: float) -> Grant:
        self.leases += 1
        return await super().lease(key, wanted, rate, burst, horizon)


@dataclass
class Backlog:
    """Processes (pacers with pools of their own) whose deliveries all go to one endpoint, for a while."""

    pacers: list[Pacer]
    ledgers: list[CountingLedger]
    sent: list[float] = field(default_factory=list)
    deferred: int = 0

    async def run(self, busy: list[Pacer], rate: float, seconds: float, per_process: int = 20) -> tuple[float, int]:
        """Keep `per_process` deliveries asking in each busy pacer; the rate after the first second (the burst's)
        and the most sent within any one second after it."""
        started = time.monotonic()
        until = started + seconds

        async def deliveries(pacer: Pacer) -> None:
            while time.monotonic() < until:
                come_back = await pacer.reserve(URL, rate, max_wait=1.0)
                if come_back is None:
                    self.sent.append(time.monotonic())
                else:  # the durable retry path, in short
                    self.deferred += 1
                    await asyncio.sleep(come_back)

        await asyncio.gather(*(deliveries(p) for p in busy for _ in range(per_process)))
        assert not any(p.offline for p in self.pacers), "a lease failed: the pacers fell back to pacing in memory"
        steady = [t for t in self.sent if started + 1 <= t < until]
        busiest = max(sum(1 for t in steady if s <= t < s + 1) for s in steady if s < until - 1)
        return len(steady) / (seconds - 1), busiest

    @property
    def leases(self) -> int:
        return sum(ledger.leases for ledger in self.ledgers)


@contextlib.asynccontextmanager
async def processes(dsn: str, n: int) -> AsyncIterator[Backlog]:
    pools = await _pools(dsn, n)
    ledgers = [CountingLedger(pool) for pool in pools]
    try:
        yield Backlog([Pacer(ledger, members=lambda: n) for ledger in ledgers], ledgers)
    finally:
        for pool in pools:
            await pool.close()


async def test_four_processes_with_a_backlog_deliver_the_endpoints_rate_between_them(dsn: str) -> None:
    rate, seconds = 50.0, 10.0
    async with processes(dsn, 4) as backlog:
        steady, busiest = await backlog.run(backlog.pacers, rate, seconds)
    sent, leases = len(backlog.sent), backlog.leases
    print(
        f"\n4 processes x 20 deliveries at {rate:.0f}/s for {seconds:.0f} s: {steady:.1f}/s after the first second, "
        f"busiest second {busiest}; {sent} sent, {backlog.deferred} deferred, {leases} leases "
        f"({leases / sent:.3f} round trips a delivery)"
    )
    assert rate * 0.95 <= steady <= rate * 1.05
    assert busiest <= rate * 1.1
    # Nothing of the URL is stored: one row, keyed by its hash.
    rows = await fetch(dsn, "SELECT endpoint_key FROM webhookd.pacing")
    assert len(rows) == 1
    assert b"receiver.example" not in rows[0]["endpoint_key"]


async def test_one_process_with_a_backlog_gets_the_whole_rate_while_the_others_send_nothing(dsn: str) -> None:
    rate, seconds = 50.0, 5.0
    async with processes(dsn, 4) as backlog:
        steady, busiest = await backlog.run(backlog.pacers[:1], rate, seconds)
    print(f"\n1 busy process of 4 at {rate:.0f}/s: {steady:.1f}/s, {backlog.leases} leases for {len(backlog.sent)}")
    assert rate * 0.95 <= steady <= rate * 1.05
    assert busiest <= rate * 1.1


async def test_a_process_refused_is_told_when_the_shared_schedule_frees_and_gets_its_slot_then(dsn: str) -> None:
    one, two = await _pools(dsn, 2)
    first, second = Pacer(PostgresLedger(one)), Pacer(PostgresLedger(two))
    try:
        # 2/s with no wait allowed: the burst (half a second's slots, so two) goes to the first process...
        assert await first.reserve(URL, 2.0, max_wait=0.0) is None
        assert await first.reserve(URL, 2.0, max_wait=0.0) is None
        # ...and the second process, with its own pool, finds the same schedule full.
        come_back = await second.reserve(URL, 2.0, max_wait=0.0)
        assert come_back is not None
        assert 0.4 <= come_back <= 1.1, f"told to come back in {come_back:.2f} s for a slot 0.5 s away"
        await asyncio.sleep(come_back)
        assert await second.reserve(URL, 2.0, max_wait=0.0) is None, "no slot when told to come back"
    finally:
        await one.close()
        await two.close()


async def test_an_unlimited_endpoint_leaves_no_schedule_in_postgres(dsn: str) -> None:
    [pool] = await _pools(dsn, 1)
    ledger = CountingLedger(pool)
    try:
        p = Pacer(ledger)
        assert [await p.reserve(URL, None, max_wait=1.0) for _ in range(100)] == [None] * 100
    finally:
        await pool.close()
    assert ledger.leases == 0
    assert await fetch(dsn, "SELECT * FROM webhookd.pacing") == []


async def test_a_slot_given_back_goes_to_the_next_delivery_without_asking_postgres_again() -> None:
    ledger = ScriptedLedger(granted=1)  # one slot per lease
    p, _, _ = pacer(ledger)
    assert await p.reserve(URL, 10.0, max_wait=1.0) is None
    p.give_back(URL)  # its endpoint stalled before the delivery was sent
    assert await p.reserve(URL, 10.0, max_wait=1.0) is None
    assert ledger.asked == [1], "the slot given back was lost: Postgres was asked for another"


async def test_without_postgres_a_slot_given_back_goes_to_the_next_delivery() -> None:
    ledger = ScriptedLedger(error=OSError("connection refused"))
    p, _, sleeps = pacer(ledger)
    for _ in range(10):  # the second's burst at 10/s
        assert await p.reserve(URL, 10.0, max_wait=1.0) is None
    p.give_back(URL)
    assert await p.reserve(URL, 10.0, max_wait=1.0) is None
    assert [s for s in sleeps.seconds if s > 1e-9] == [], "the slot given back was not the next delivery's"
