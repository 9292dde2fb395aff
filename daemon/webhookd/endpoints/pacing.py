"""Cluster-wide rate limits: each endpoint's schedule lives in Postgres, and processes lease slots of it in batches.

A rate limit (`endpoints.rate_limit_per_second`, or a webhook's own from `webhookd endpoints limit`) promises the
receiver that many deliveries a second from the whole cluster, whatever the number of replicas and workers. Each
endpoint (one target URL) has one row in `webhookd.pacing`, keyed by the SHA-256 of the URL, holding its theoretical
arrival time (GCRA): the end of the slots leased so far. A process that needs slots for an endpoint runs one
statement, `webhookd.pace_lease`, that takes k slots from the schedule's end (or from a second ago, for an endpoint
that has been idle: the burst a single process allows too) and moves the end by k/rate. Postgres answers with the
first slot's time as seconds from its own now, so the processes' clocks never matter. The process hands the slots
out to its deliveries, 1/rate apart, each sleeping until its slot.

Postgres grants a lease only if its first slot starts within `max_wait` (`delivery.host_wait_seconds`), so the
schedule never runs further ahead than that and one lease; otherwise it refuses and says when its next free slot
is. A delivery that cannot have a slot within `max_wait` is told when to come back and goes to the durable retry
path (the caller's business); the return times are spaced at this process's share of the rate, so that a backlog
returns as a trickle. A refused process asks again once the schedule may have room, at a random point of the time
the other processes' next leases may take: refused together, they would otherwise all ask again together, and all
but one be refused again.

Cost. A lease is one round trip to Postgres (one row, locked for microseconds; the table is unlogged, so a lease
waits for no WAL flush). Its size is the demand this process shows for the endpoint: the deliveries waiting for it
or, if more, a second's worth of the calls lately seen (deliveries come one after another as others finish; slots
not taken at once serve the next ones within their `max_wait`), at most a quarter of a second of the rate
(`_LEASE_SECONDS`). Deliveries that ask while a lease is in flight share it. So a process that sends an endpoint its
whole rate asks at most about four times a second whatever the rate, and processes contending for one endpoint add
their refusals. Measured at 50/s (tests/endpoints/test_pacing.py): one busy process, 0.12 round trips a delivery; 4 busy
processes contending, 0.11-0.13, refusals included. An endpoint that gets a delivery now and then costs one round
trip per delivery. Unlimited endpoints never reach Postgres: `reserve` returns at once.

If Postgres cannot be reached (or a lease takes longer than `_LEASE_TIMEOUT`), each endpoint is paced in memory at
rate/N for `_OFFLINE_SECONDS`, N being the number of live processes last seen by `webhookd.members`, before a lease
is tried again. Holding deliveries instead would stop every limited receiver for the length of the outage although
nothing is wrong with it; pacing at the share keeps the cluster within the limit as long as N holds (a scale-up
during the outage goes over it by the ratio of the new count to the old, until Postgres is back).

A slot leased but not taken within a second of its time (demand stopped, or its delivery was cancelled) is dropped,
so every delivery goes at most a second after its slot: over any window of W seconds the receiver gets at most
rate x (W + 1), the bound the burst allows anyway. Dropped slots are lost to the cluster: at most one lease's worth
each time a process's demand stops, so a receiver gets at most its rate, never more.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import structlog

from webhookd.durable.transient import TRANSIENT
from webhookd.endpoints.slots import LeasedSlots
from webhookd.endpoints.throttle import Throttle, burst_seconds

log = structlog.get_logger("webhookd.endpoints.pacing")

# A lease covers at most this long at the endpoint's rate: Postgres is asked about four times a second by a busy
# process, and a process that stops wanting slots wastes at most this much of the schedule.
_LEASE_SECONDS = 0.25
# A lease that has not answered by then counts as Postgres being unreachable.
_LEASE_TIMEOUT = 1.0
# After a failed lease, endpoints are paced in memory at this process's share for this long before Postgres is
# asked again: an outage costs one timeout per period, not one per delivery.
_OFFLINE_SECONDS = 5.0
# Calls are counted over periods of this length to size leases to a process's demand.
_DEMAND_SECONDS = 0.25
# Endpoints idle this long are forgotten here, and schedules idle this long removed from Postgres.
_IDLE_SECONDS = 60.0
_PRUNE_SECONDS = 600.0

_LEASE = "SELECT granted, start_in FROM webhookd.pace_lease($1, $2, $3, $4, $5)"
# A schedule that ended this long ago is the same as none: its endpoint gets its burst either way.
_PRUNE = "DELETE FROM webhookd.pacing WHERE tat < clock_timestamp() - make_interval(secs => $1)"


@dataclass(frozen=True, slots=True)
class Grant:
    """What a lease got: `granted` slots, the first `start_in` seconds from when Postgres answered (negative within
    the burst), the others 1/rate apart; with none granted, `start_in` is when the next free slot is."""

    granted: int
    start_in: float


class Ledger(Protocol):
    """Where the schedules are kept: Postgres in the daemon, a fake in tests."""

    async def lease(self, key: bytes, wanted: int, rate: float, burst: float, horizon: float) -> Grant:
        """`wanted` slots if the first starts within `horizon` seconds, else none."""
        ...

    async def prune(self) -> None:
        """Remove schedules that have been idle for a long time."""


class PostgresLedger:
    """Schedules in `webhookd.pacing`, leased through `webhookd.pace_lease` (migration 0005)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def lease(self, key: bytes, wanted: int, rate: float, burst: float, horizon: float) -> Grant:
        # The timeout covers waiting for a pool connection too, which a busy pool can make the longest part.
        async with asyncio.timeout(_LEASE_TIMEOUT):
            row = await self._pool.fetchrow(_LEASE, key, wanted, rate, burst, horizon)
        assert row is not None  # a function with OUT parameters returns one row
        return Grant(int(row["granted"]), float(row["start_in"]))

    async def prune(self) -> None:
        await self._pool.execute(_PRUNE, _PRUNE_SECONDS)


def batch_size(rate: float) -> int:
    """The most slots one lease takes: `_LEASE_SECONDS` of the rate, at least one."""
    return max(1, math.ceil(rate * _LEASE_SECONDS))


def endpoint_key(url: str) -> bytes:
    """The key of an endpoint's schedule: what Postgres may hold instead of a URL that may carry a token."""
    return hashlib.sha256(url.encode()).digest()


class _Pace:
    """One endpoint's state in this process."""

    __slots__ = (
        "ask_at",
        "asked",
        "asked_since",
        "deferred_at",
        "demand",
        "fallback",
        "free_at",
        "key",
        "last_used",
        "lease",
        "slots",
        "waiting",
    )

    def __init__(self, key: bytes, now: float) -> None:
        self.key = key
        self.slots = LeasedSlots()
        self.waiting = 0  # callers waiting for the lease in flight or the next one
        # Calls counted since `asked_since`, and the rate of calls a second they last showed: deliveries often come
        # one after another (as others finish), and a lease sized to those waiting at the moment would be one slot.
        self.asked = 0
        self.asked_since = now
        self.demand = 0.0
        self.lease: asyncio.Task[None] | None = None
        # After a refusal: when the schedule's next free slot was, and when to ask Postgres again (asking sooner is
        # useless: the schedule has nothing within max_wait before then).
        self.free_at = 0.0
        self.ask_at = 0.0
        self.deferred_at = 0.0  # the last return time handed to a deferred delivery
        self.fallback: Throttle | None = None  # the in-memory pace while Postgres is unreachable
        self.last_used = 0.0


class Pacer:
    """Cluster-wide slots of rate-limited endpoints; see the module's docstring.

    `members` gives the number of live daemon processes (`Membership.live`): the share used while Postgres is
    unreachable, and the spacing of return times.
    """

    def __init__(
        self,
        ledger: Ledger,
        members: Callable[[], int] = lambda: 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._ledger = ledger
        self._members = members
        self._clock = clock
        self._sleep = sleep
        self._paces: dict[str, _Pace] = {}
        self._offline_until = 0.0

    @property
    def offline(self) -> bool:
        """Whether endpoints are paced in memory now, Postgres having failed a lease a moment ago."""
        return self._clock() < self._offline_until

    async def reserve(self, endpoint_url: str, rate: float | None, max_wait: float) -> float | None:
        """Wait for a slot of the endpoint's schedule, at most `max_wait` seconds.

        None: the slot has come, send now (at once, with no Postgres at all, when `rate` is None: unlimited).
        A number: no slot within `max_wait`; come back in that many seconds. Callers of one Pacer are expected to
        pass the same `max_wait`, since a lease is sized to the horizon of the caller that started it.
        """
        if rate is None:
            return None
        pace = self._paces.get(endpoint_url)
        if pace is None:
            pace = self._paces[endpoint_url] = _Pace(endpoint_key(endpoint_url), self._clock())
        pace.asked += 1
        while True:
            now = pace.last_used = self._clock()
            slot = pace.slots.take(now, max_wait)
            if slot is not None:
                if slot > now:
                    await self._sleep(slot - now)
                return None
            later = pace.slots.last
            if later is not None:  # every slot held here is further away than max_wait
                return self._defer(pace, now, later, rate)
            if now < self._offline_until:
                return await self._reserve_locally(pace, now, rate, max_wait)
            if now < pace.ask_at:
                return self._defer(pace, now, pace.free_at, rate)
            await self._join_lease(pace, rate, max_wait)

    async def _join_lease(self, pace: _Pace, rate: float, max_wait: float) -> None:
        pace.waiting += 1
        try:
            if pace.lease is None:
                # Started as a task and sized when it runs, so that every delivery that asks in this same turn of
                # the event loop is counted in its demand; shielded, because one waiter's cancellation must not
                # cancel the lease the others wait for.
                pace.lease = asyncio.create_task(self._lease(pace, rate, max_wait))
            await asyncio.shield(pace.lease)
        finally:
            pace.waiting -= 1

    async def _lease(self, pace: _Pace, rate: float, max_wait: float) -> None:
        try:
            try:
                grant = await self._ledger.lease(
                    pace.key, self._wanted(pace, rate), rate, burst_seconds(rate), max_wait
                )
            except TRANSIENT as exc:
                if not self.offline:
                    log.warning(
                        "pacing_in_memory",
                        error=str(exc) or type(exc).__name__,
                        seconds=_OFFLINE_SECONDS,
                        members=self._members(),
                    )
                self._offline_until = self._clock() + _OFFLINE_SECONDS
                return
            # The answer's own clock: Postgres's now lies somewhere in the round trip, and taking its end errs on
            # the late side, which can only slow the endpoint by that much, never speed it up.
            now = self._clock()
            if grant.granted > 0:
                pace.slots.add(now + grant.start_in, grant.granted, 1.0 / rate)
            else:
                # The processes refused together would all come back together, and all but one be refused again:
                # each comes back at a random point of the time the others' next leases may take.
                others = (self._members() - 1) * batch_size(rate) / rate
                pace.free_at = now + grant.start_in
                pace.ask_at = pace.free_at - max_wait + random.uniform(0.0, others)
        finally:
            pace.lease = None

    def _wanted(self, pace: _Pace, rate: float) -> int:
        """A lease's size: the deliveries waiting for it or, if more, a second of the calls lately seen (slots not
        taken at once serve the next calls, within their max_wait), but at most a batch."""
        now = self._clock()
        if now - pace.asked_since >= _DEMAND_SECONDS:
            pace.demand = pace.asked / (now - pace.asked_since)
            pace.asked, pace.asked_since = 0, now
        return max(1, min(batch_size(rate), max(pace.waiting, math.ceil(pace.demand))))

    def _defer(self, pace: _Pace, now: float, free_at: float, rate: float) -> float:
        """A return time from when the endpoint's next free slot is, spaced from the others at this process's share
        of the rate."""
        pace.deferred_at = max(pace.deferred_at, free_at) + max(1, self._members()) / rate
        return pace.deferred_at - now

    async def _reserve_locally(self, pace: _Pace, now: float, rate: float, max_wait: float) -> float | None:
        share = rate / max(1, self._members())
        if pace.fallback is None:
            pace.fallback = Throttle(share)
        pace.fallback.rate = share
        allowed, wait = pace.fallback.reserve(now, max_wait)
        if not allowed:
            return wait
        if wait > 0:
            await self._sleep(wait)
        return None

    def give_back(self, endpoint_url: str) -> None:
        """A slot that `reserve` gave and that was not used: the next delivery to the endpoint gets it instead."""
        pace = self._paces.get(endpoint_url)
        if pace is None:
            return
        now = self._clock()
        if pace.fallback is not None and now < self._offline_until:
            pace.fallback.give_back()
        else:
            pace.slots.put_back(now)

    def forget_idle(self) -> None:
        """Drop the endpoints nobody has asked about for a while (their state here holds nothing worth keeping)."""
        cutoff = self._clock() - _IDLE_SECONDS
        for url in [u for u, p in self._paces.items() if p.last_used < cutoff and p.lease is None and not p.waiting]:
            del self._paces[url]

    @property
    def tracked(self) -> int:
        return len(self._paces)

    async def run(self) -> None:
        """A watched task of the service: forgets idle endpoints every minute and prunes idle schedules from
        Postgres every ten minutes (every replica does; the statement is cheap and idempotent)."""
        rounds = 0
        while True:
            await asyncio.sleep(_IDLE_SECONDS)
            self.forget_idle()
            rounds += 1
            if rounds * _IDLE_SECONDS >= _PRUNE_SECONDS:
                rounds = 0
                try:
                    await self._ledger.prune()
                except TRANSIENT as exc:
                    log.warning("pacing_prune_failed", error=str(exc) or type(exc).__name__)
