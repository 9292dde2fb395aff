"""One endpoint's lane through the scheduler: its waiting deliveries, what it has in flight, and the limit it earns.

An endpoint (one target URL) starts with one request in flight and earns more with every answer while it uses what
it has (slow start, as TCP does: one more per answer until its first loss, then one more per round of answers), and
loses half at each timeout or connection error. A receiver that hangs from its first request never holds more than
its first slot; one that answers fast soon has what its pace needs. One that stalls (answers nothing while it has
requests in flight) drops to one slot.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from collections.abc import Callable

# Outcomes that say the endpoint cannot take what it was given: its limit is halved.
_OVERLOADED = frozenset({"timeout", "connection_error"})
# Every endpoint starts with one slot, as TCP's slow start would with a window of one: a receiver that never answers
# holds no more than that while it is found stalled, so five of them beside fifty healthy endpoints take under 5% of
# a budget of 128. One that answers doubles its limit with every round trip.
INITIAL_LIMIT = 1
# An endpoint idle this long starts again from the initial limit: what it earned says little about it now.
_IDLE_RESET_SECONDS = 10.0


class Place(enum.Enum):
    """Where a lane with waiting deliveries waits for a slot."""

    NOWHERE = 0  # not waiting, or waiting for its own requests to finish (at its limit)
    READY = 1  # under its fair share, for the budget
    OVER = 2  # at or over its fair share, for what the others leave
    HOST = 3  # for its host


class Host:
    """One receiving host:port: what all its endpoints have in flight, and the lanes waiting for its room."""

    __slots__ = ("blocked", "in_flight", "lanes", "last_progress")

    def __init__(self) -> None:
        self.in_flight = 0
        self.lanes = 0  # lanes known for this host
        self.last_progress = 0.0
        self.blocked: collections.deque[Lane] = collections.deque()  # lanes waiting for this host's room


class Lane:
    """One endpoint's requests: its queue, what it has in flight, and the limit it has earned."""

    __slots__ = (
        "busy",
        "ceiling",
        "host",
        "host_key",
        "in_flight",
        "key",
        "last_progress",
        "limit",
        "over_entries",
        "place",
        "queue",
        "stalled",
    )

    def __init__(self, key: str, host_key: str, host: Host, limit: float, ceiling: float) -> None:
        self.key = key
        self.host_key = host_key
        self.host = host
        self.queue: collections.deque[asyncio.Future[bool]] = collections.deque()
        self.in_flight = 0
        self.limit = limit
        self.ceiling = ceiling  # where slow start ends: half the limit at the last loss
        self.last_progress = 0.0  # when it last answered, or began to be asked
        self.stalled = False
        self.busy = False  # counted among the endpoints in use
        self.place = Place.NOWHERE
        self.over_entries = 0  # entries of this lane in the over-share queue (all but the last are stale)

    def resume(self, now: float, initial: Callable[[], float]) -> None:
        """Begin to be asked again after a quiet spell; one idle too long starts over from `initial()` (asked only
        then: this runs on every acquire of an idle lane)."""
        if now - self.last_progress > _IDLE_RESET_SECONDS:
            self.limit = min(self.limit, initial())
        self.last_progress = now

    def adapt(self, result: str, most: float) -> None:
        """Learn from an attempt's result: half the limit on overload, else one more (slow start) or a fraction of one
        (past the ceiling), never beyond `most`."""
        if result in _OVERLOADED:
            self.ceiling = max(1.0, self.limit / 2)
            self.limit = self.ceiling
            return
        # Grown only while used: an endpoint given more than it needs would hold it all the day it hangs.
        if 2 * (self.in_flight + 1) < self.limit:
            return
        step = 1.0 if self.limit < self.ceiling else 1.0 / self.limit
        self.limit = min(self.limit + step, most)

    def stall(self) -> None:
        """It answered nothing for too long: one slot until it answers, then slow start up to half what it had."""
        if not self.stalled:
            self.stalled = True
            self.ceiling = max(1.0, self.limit / 2)
            self.limit = 1.0
