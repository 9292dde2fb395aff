"""The rate limit of one endpoint, and the pause a receiver asks for with `Retry-After` on 429 or 503.

The limit is a generic cell rate (GCRA): one delivery every 1/rate seconds, with a burst of up to a second's worth.
A delivery that would have to wait longer than the caller allows is not given a slot; the caller defers it to the
durable retry path and it is sent later, never dropped.
"""

from __future__ import annotations


def burst_seconds(rate: float) -> float:
    """How far behind the present an idle endpoint's schedule may start: a second's worth of slots at once."""
    interval = 1.0 / rate
    return max(1.0, interval) - interval


class Throttle:
    """One endpoint's pace; every method takes the current (monotonic) time."""

    __slots__ = ("_deferred_tat", "_tat", "paused_until", "rate")

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._tat = 0.0  # theoretical arrival time of the next delivery at the configured pace
        # Deferred deliveries are given return times spaced at the pace too, so that they come back as a trickle.
        self._deferred_tat = 0.0
        self.paused_until = 0.0

    def reserve(self, now: float, max_wait: float) -> tuple[bool, float]:
        """(True, wait): a slot `wait` seconds from now. (False, wait): none within `max_wait`; come back later."""
        if now < self.paused_until:
            return False, self.paused_until - now
        if self.rate is None:
            return True, 0.0
        interval = 1.0 / self.rate
        start = max(self._tat, now)
        wait = max(0.0, start - burst_seconds(self.rate) - now)
        if wait > max_wait:
            self._deferred_tat = max(self._deferred_tat, start) + interval
            return False, self._deferred_tat - now
        self._tat = start + interval
        return True, wait

    def give_back(self) -> None:
        """A slot reserved and then not used (its endpoint stalled before it was sent) is the next one's again."""
        if self.rate is not None:
            # A schedule moved back behind the present is the same as one at the present: `reserve` starts there.
            self._tat -= 1.0 / self.rate

    def pause(self, now: float, seconds: float) -> bool:
        """Send nothing for `seconds`; True if that extends the pause already in force."""
        until = now + seconds
        if until <= self.paused_until:
            return False
        self.paused_until = until
        return True
