"""Who may send now: the in-flight budget shared fairly across endpoints, each endpoint's own adaptive limit (its
`Lane`), and a cap per receiving host.

When more endpoints want slots than there are, freed slots go round the waiting endpoints in turn, and one that
already holds its fair share (the budget divided among the endpoints in use) is served only when no endpoint under
its share waits: a slow endpoint cannot pile up the budget of fast ones, yet no slot stays idle while anyone waits.

An endpoint that has answered nothing for `wait_seconds` while requests to it are in flight is stalled: its limit
drops to one, and its queue, like every delivery for it until it answers again, goes back to the caller to be
deferred to the durable retry path, so that the partitions move on. A delivery is never deferred for waiting on the
budget or on its host while they turn over: only for an endpoint (or a whole host) that answers nothing. What a
stalled endpoint has in flight stays counted until it ends (`delivery.concurrency` is a bound on sockets and
receivers rely on it): a receiver that hangs after earning a large share, while nobody else wanted the slots, holds
them until `delivery.timeout_seconds`; one that hangs from the start, or while the budget is contended, holds its
few.

The host cap bounds the requests in flight to one host:port, whatever its endpoints. It is fixed (this process's
share of `delivery.per_host_concurrency`), so one endpoint's failures never cut its siblings' limits on the same
host.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from webhookd.delivery.lanes import INITIAL_LIMIT, Host, Lane, Place

# Idle endpoints are forgotten once this many are known.
_REMEMBERED = 10_000


@dataclass(frozen=True)
class SchedulerLimits:
    """The budgets, and how long an endpoint may answer nothing before its deliveries are deferred."""

    concurrency: int  # requests in flight in this process, stalled ones aside
    host_concurrency: int  # requests in flight to one host from this process (its share of the cluster's cap)
    wait_seconds: float


class Scheduler:
    """Grants slots (`acquire`) and takes them back with the attempt's outcome (`release`)."""

    def __init__(self, limits: SchedulerLimits, clock: Callable[[], float] | None = None) -> None:
        self._concurrency = limits.concurrency
        self._host_cap = limits.host_concurrency
        self._wait = limits.wait_seconds
        self._clock = clock
        self._lanes: dict[str, Lane] = {}
        self._hosts: dict[str, Host] = {}
        self._in_flight = 0
        self._active = 0  # lanes with requests in flight or waiting
        self._ready: collections.deque[Lane] = collections.deque()
        self._over: collections.deque[Lane] = collections.deque()
        self._sweep_handle: asyncio.TimerHandle | None = None

    # --- what the dispatcher and the metrics read ----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests under way."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Deliveries waiting for a slot."""
        return sum(len(lane.queue) for lane in self._lanes.values())

    def limit_of(self, endpoint: str) -> float | None:
        """The endpoint's current limit, None if it is not known."""
        lane = self._lanes.get(endpoint)
        return lane.limit if lane is not None else None

    def stalled(self, endpoint: str) -> bool:
        lane = self._lanes.get(endpoint)
        return lane is not None and lane.stalled

    def set_host_concurrency(self, cap: int) -> None:
        """This process's share of the per-host cap changed (replicas came or went)."""
        grew = cap > self._host_cap
        self._host_cap = cap
        if grew:
            for host in self._hosts.values():
                self._unblock(host, len(host.blocked))
            self._pump()

    # --- the delivery path ---------------------------------------------------------------------------------------

    async def acquire(self, endpoint: str, host_key: str) -> Lane | None:
        """A slot for one request to `endpoint`, or None: it has answered nothing for a while; defer the delivery."""
        lane = self._lanes.get(endpoint)
        if lane is None:
            lane = self._new_lane(endpoint, host_key)
        if lane.stalled:
            return None
        if not lane.busy:
            lane.resume(self._now(), self._initial)
        host = lane.host
        if (
            not lane.queue
            and lane.in_flight < lane.limit
            and host.in_flight < self._host_cap
            and self._in_flight < self._concurrency
            and not self._ready
            and not self._over
        ):
            self._take(lane)
            return lane
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        lane.queue.append(waiter)
        self._count(lane)
        self._offer(lane)
        self._pump()
        self._arm_sweep()
        try:
            granted = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release(lane, None)  # granted just as the wait ended: the slot goes to the next one
            else:
                with contextlib.suppress(ValueError):  # already handed a verdict and taken out
                    lane.queue.remove(waiter)
                self._count(lane)
            raise
        return lane if granted else None

    def release(self, lane: Lane, result: str | None) -> None:
        """Give the slot back; `result` (the attempt's result label, None if nothing reached the receiver) teaches
        the endpoint's limit."""
        host = lane.host
        lane.in_flight -= 1
        host.in_flight -= 1
        self._in_flight -= 1
        if result is not None:
            now = self._now()
            lane.last_progress = host.last_progress = now
            lane.stalled = False
            lane.adapt(result, float(min(self._host_cap, self._concurrency)))
        elif not lane.in_flight:
            lane.stalled = False  # its last request was called off: nothing is left to show that it hangs
        if host.blocked:
            self._unblock(host, 1)
        if lane.queue:
            if lane.place is Place.OVER and lane.in_flight < self._fair():
                self._place(lane, Place.READY)  # below its share again: its entry in the over queue goes stale
            else:
                self._offer(lane)
        self._count(lane)
        self._pump()

    # --- inside --------------------------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _initial(self) -> float:
        return float(min(INITIAL_LIMIT, self._host_cap, self._concurrency))

    def _new_lane(self, endpoint: str, host_key: str) -> Lane:
        if len(self._lanes) >= _REMEMBERED:
            self._forget_idle()
        host = self._hosts.get(host_key)
        if host is None:
            host = self._hosts[host_key] = Host()
        host.lanes += 1
        ceiling = float(min(self._host_cap, self._concurrency))
        lane = self._lanes[endpoint] = Lane(endpoint, host_key, host, self._initial(), ceiling)
        return lane

    def _forget_idle(self) -> None:
        for key in [k for k, lane in self._lanes.items() if not lane.busy and lane.place is Place.NOWHERE]:
            lane = self._lanes.pop(key)
            lane.host.lanes -= 1
            if lane.host.lanes == 0 and not lane.host.in_flight:
                del self._hosts[lane.host_key]

    def _fair(self) -> int:
        return max(1, self._concurrency // max(1, self._active))

    def _count(self, lane: Lane) -> None:
        busy = lane.in_flight > 0 or bool(lane.queue)
        if busy != lane.busy:
            lane.busy = busy
            self._active += 1 if busy else -1

    def _take(self, lane: Lane) -> None:
        lane.in_flight += 1
        lane.host.in_flight += 1
        self._in_flight += 1
        self._count(lane)

    def _offer(self, lane: Lane) -> None:
        """Put a lane with waiting deliveries where it waits for a slot (nowhere, if at its own limit)."""
        if lane.place is not Place.NOWHERE or not lane.queue or lane.in_flight >= lane.limit:
            return
        if lane.host.in_flight >= self._host_cap:
            self._place(lane, Place.HOST)
        elif lane.in_flight < self._fair():
            self._place(lane, Place.READY)
        else:
            self._place(lane, Place.OVER)

    def _place(self, lane: Lane, place: Place) -> None:
        lane.place = place
        if place is Place.READY:
            self._ready.append(lane)
        elif place is Place.OVER:
            self._over.append(lane)
            lane.over_entries += 1
            if len(self._over) > 2 * len(self._lanes) + 64:
                self._compact_over()
        elif place is Place.HOST:
            lane.host.blocked.append(lane)

    def _compact_over(self) -> None:
        """Drop stale entries: lanes promoted back under their share leave one behind each time."""
        kept: collections.deque[Lane] = collections.deque()
        for lane in self._over:
            lane.over_entries -= 1
            if lane.place is Place.OVER and lane.over_entries == 0:
                kept.append(lane)
        for lane in kept:
            lane.over_entries = 1
        self._over = kept

    def _unblock(self, host: Host, count: int) -> None:
        for _ in range(min(count, len(host.blocked))):
            lane = host.blocked.popleft()
            lane.place = Place.NOWHERE
            self._offer(lane)

    def _pump(self) -> None:
        """Hand free slots to waiting lanes: those under their share first, in turn, then the others."""
        while self._in_flight < self._concurrency:
            if self._ready:
                lane = self._ready.popleft()
            elif self._over:
                lane = self._over.popleft()
                lane.over_entries -= 1
                if lane.place is not Place.OVER or lane.over_entries:
                    continue  # stale: the lane was promoted, or a later entry of it stands
            else:
                return
            lane.place = Place.NOWHERE
            self._serve(lane)

    def _serve(self, lane: Lane) -> None:
        queue = lane.queue
        while queue and queue[0].done():  # cancelled while waiting
            queue.popleft()
        if not queue:
            self._count(lane)
            return
        if lane.in_flight >= lane.limit:
            return  # its own next release offers it again
        if lane.host.in_flight >= self._host_cap:
            self._place(lane, Place.HOST)
            return
        waiter = queue.popleft()
        self._take(lane)
        waiter.set_result(True)
        self._offer(lane)

    # --- stalls --------------------------------------------------------------------------------------------------

    def _arm_sweep(self) -> None:
        if self._sweep_handle is None:
            loop = asyncio.get_running_loop()
            self._sweep_handle = loop.call_later(max(self._wait / 4, 0.01), self._periodic_sweep)

    def _periodic_sweep(self) -> None:
        self._sweep_handle = None
        if self.sweep():
            self._arm_sweep()

    def sweep(self) -> bool:
        """Find stalled endpoints and hosts and send their queues back; True while anything is waiting or in flight
        (the sweep runs again while so)."""
        now = self._now()
        watching = False
        for lane in list(self._lanes.values()):
            if not lane.busy:
                continue
            watching = True
            if now - lane.last_progress < self._wait:
                continue
            if lane.in_flight:
                self._stall(lane)
            elif lane.queue and lane.place is Place.HOST and now - lane.host.last_progress >= self._wait:
                # Waiting for a host that holds every slot without an answer: it is as stuck as its endpoints.
                self._defer_queue(lane)
        self._pump()
        return watching

    def _stall(self, lane: Lane) -> None:
        lane.stall()
        self._defer_queue(lane)

    def _defer_queue(self, lane: Lane) -> None:
        while lane.queue:
            waiter = lane.queue.popleft()
            if not waiter.done():
                waiter.set_result(False)
        self._count(lane)
