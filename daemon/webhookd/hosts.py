"""Each receiving host's share of the in-flight budget, cut when the host stops answering.

A host may have up to `delivery.per_host_concurrency` requests in flight. Every timeout or connection error halves
its share and every answer gives one slot back: a receiver that hangs holds its full share only until its first
requests time out, then a slot or two (while its circuit breaker, in `health`, decides whether to stop sending at
all), and a receiver that recovers regains its share within a few round trips.

A delivery waiting for a slot gives up after `delivery.host_wait_seconds` only if the host finished nothing in that
time: a host that is merely busy (its slots turning over, perhaps waiting for the global budget) keeps its queue,
while one that holds every slot without an answer sends its queue to the durable retry path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass

# Outcomes that say the host cannot take what it was given: its share shrinks.
_OVERLOADED = frozenset({"timeout", "connection_error"})
# Idle hosts are forgotten, but one whose share was cut is remembered (so that it does not get its full share back
# the moment its last request times out), up to this many of them.
_REMEMBERED = 10_000


@dataclass(frozen=True)
class HostLimits:
    """How much of the budget one receiving host may hold, and what happens to deliveries it cannot take now."""

    concurrency: int  # the most requests in flight to one host
    wait_seconds: float  # how long a delivery waits for a host that finishes nothing before it is deferred
    busy_retry_seconds: float  # when a deferred delivery is tried again


class _Host:
    __slots__ = ("finished", "in_flight", "limit", "users", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.finished = 0  # slots given back so far: a waiter that sees this move knows the host is not stuck
        self.users = 0  # deliveries holding or waiting for a slot
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()


class _Waiter:
    """One delivery waiting for a slot at `host`: granted by a release, or failed with TimeoutError once the host has
    finished nothing for a whole `wait_seconds`.

    A timer rather than asyncio.wait or asyncio.timeout: every delivery beyond its host's share takes this path, and a
    bare future is the cheapest thing to wait on.
    """

    __slots__ = ("_host", "_loop", "_seen", "_timer", "_wait_seconds", "granted")

    def __init__(self, host: _Host, wait_seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.granted: asyncio.Future[None] = self._loop.create_future()
        self._host = host
        self._seen = host.finished
        self._wait_seconds = wait_seconds
        self._timer = self._loop.call_later(wait_seconds, self._check)

    def _check(self) -> None:
        if self.granted.done():
            return
        if self._host.finished == self._seen:
            self.granted.set_exception(TimeoutError())
        else:
            self._seen = self._host.finished
            self._timer = self._loop.call_later(self._wait_seconds, self._check)

    def stop(self) -> None:
        self._timer.cancel()


class HostBudgets:
    """Slots per host key (host:port); `acquire` then `release` with the attempt's outcome."""

    def __init__(self, limits: HostLimits) -> None:
        self._limits = limits
        self._hosts: dict[str, _Host] = {}

    @property
    def tracked(self) -> int:
        """Hosts in use or remembered for a cut share."""
        return len(self._hosts)

    def waiting(self, key: str) -> int:
        """Deliveries waiting for a slot at the host."""
        host = self._hosts.get(key)
        return len(host.waiters) if host is not None else 0

    def share(self, key: str) -> int:
        """The host's current share (the full one for a host not in use)."""
        host = self._hosts.get(key)
        return host.limit if host is not None else self._limits.concurrency

    async def acquire(self, key: str) -> bool:
        """Take a slot at the host; False when the host finished nothing for `wait_seconds` while this waited."""
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(self._limits.concurrency)
        host.users += 1
        if host.in_flight < host.limit and not host.waiters:
            host.in_flight += 1
            return True
        waiter = _Waiter(host, self._limits.wait_seconds)
        host.waiters.append(waiter.granted)
        try:
            await waiter.granted
        except BaseException as exc:
            if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
                # The slot was handed over just as the wait ended: pass it on.
                host.in_flight -= 1
                self._wake(host)
            else:
                # Taken out now: a host that frees no slot for long would otherwise pile up dead waiters. (A
                # release may have dropped it already, on its way past.)
                with contextlib.suppress(ValueError):
                    host.waiters.remove(waiter.granted)
            self._leave(key, host)
            if isinstance(exc, TimeoutError):
                return False
            raise
        finally:
            waiter.stop()
        return True

    def release(self, key: str, result: str | None) -> None:
        """Give the slot back; `result` (the attempt's result label, None if nothing was sent) adapts the share."""
        host = self._hosts[key]
        host.in_flight -= 1
        host.finished += 1
        if result in _OVERLOADED:
            host.limit = max(1, host.limit // 2)
        elif result is not None and host.limit < self._limits.concurrency:
            host.limit += 1
        self._wake(host)
        self._leave(key, host)

    def _wake(self, host: _Host) -> None:
        while host.waiters and host.in_flight < host.limit:
            waiter = host.waiters.popleft()
            if not waiter.done():
                host.in_flight += 1
                waiter.set_result(None)

    def _leave(self, key: str, host: _Host) -> None:
        host.users -= 1
        if host.users > 0:
            return
        if host.limit >= self._limits.concurrency:
            del self._hosts[key]
        elif len(self._hosts) > _REMEMBERED:
            for idle in [k for k, h in self._hosts.items() if h.users == 0]:
                del self._hosts[idle]
