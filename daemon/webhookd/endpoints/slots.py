"""Slots of an endpoint's schedule that this process has leased from Postgres and not handed out yet.

Each is a time on this process's clock, earliest first. A slot not taken within a second of its time is dropped: the
schedule in Postgres has moved on, and sending it late would exceed the rate the other processes keep to.
"""

from __future__ import annotations

import collections

# A leased slot not taken this long after its time is dropped.
_STALE_SECONDS = 1.0


class LeasedSlots:
    """Slots leased and not handed out yet, as times on this process's clock, earliest first."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: collections.deque[float] = collections.deque()

    def __len__(self) -> int:
        return len(self._times)

    def add(self, start: float, count: int, interval: float) -> None:
        self._times.extend(start + i * interval for i in range(count))

    def take(self, now: float, max_wait: float) -> float | None:
        """The earliest slot if it is at most `max_wait` away, taken; else None (and the slot stays)."""
        times = self._times
        while times and times[0] < now - _STALE_SECONDS:
            times.popleft()
        if times and times[0] <= now + max_wait:
            return times.popleft()
        return None

    def put_back(self, at: float) -> None:
        """A slot taken and not used is handed out again first (no later than the earliest one held)."""
        self._times.appendleft(min(at, self._times[0]) if self._times else at)

    @property
    def last(self) -> float | None:
        return self._times[-1] if self._times else None
