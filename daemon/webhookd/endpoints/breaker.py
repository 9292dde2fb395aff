"""The circuit breaker of one endpoint: stop sending to a receiver that mostly fails, probe it now and then.

Closed, it counts outcomes in a sliding window of time buckets. It opens when the window holds enough attempts and
too many failed, or when the last few attempts all failed (a receiver that hangs yields too few attempts to fill a
window, since its share of the budget shrinks with every timeout). Open, nothing is sent for a cool-down; then one
probe goes out (half-open) while everything else still waits. A probe that succeeds closes the circuit, one that
fails opens it again for twice as long, up to a maximum. Deliveries refused by an open circuit are deferred by the
caller, never dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

_BUCKETS = 10
_NEVER = -(2**62)  # the epoch of a bucket that holds nothing


class State(enum.Enum):
    """Where the circuit stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSettings:
    """When a circuit opens and for how long (the `endpoints.circuit_*` keys)."""

    failure_ratio: float
    min_requests: int
    consecutive_failures: int  # this many timeouts or connection errors in a row open it whatever the window holds
    window_seconds: float
    cooldown_seconds: float
    max_cooldown_seconds: float
    probe_seconds: float  # how long a probe may take: the delivery timeout


class Breaker:
    """One endpoint's circuit; every method takes the current (monotonic) time so tests can drive it."""

    __slots__ = (
        "_consecutive",
        "_cooldown",
        "_counts",
        "_epochs",
        "_probe_deadline",
        "_settings",
        "open_until",
        "state",
    )

    def __init__(self, settings: BreakerSettings) -> None:
        self._settings = settings
        self.state = State.CLOSED
        self.open_until = 0.0
        self._cooldown = settings.cooldown_seconds
        self._probe_deadline = 0.0
        self._consecutive = 0
        # Bucket i counts the attempts of time slice `_epochs[i]`; a slice older than the window is stale.
        self._epochs = [_NEVER] * _BUCKETS
        self._counts = [[0, 0] for _ in range(_BUCKETS)]  # [attempts, failures]

    def admit(self, now: float) -> tuple[bool, float]:
        """(True, 0) to send now, the first call after a cool-down being the probe; (False, seconds) to wait."""
        if self.state is State.CLOSED:
            return True, 0.0
        if self.state is State.OPEN:
            if now < self.open_until:
                return False, self.open_until - now
            self.state = State.HALF_OPEN
            self._probe_deadline = now + self._settings.probe_seconds
            return True, 0.0
        if now > self._probe_deadline:
            # The probe's outcome never came (its attempt was abandoned): let another delivery probe.
            self._probe_deadline = now + self._settings.probe_seconds
            return True, 0.0
        return False, max(self._probe_deadline - now, 1.0)

    def holds(self, now: float) -> bool:
        """Whether `admit` would refuse now, without taking the probe."""
        if self.state is State.OPEN:
            return now < self.open_until
        return self.state is State.HALF_OPEN and now <= self._probe_deadline

    @property
    def probing(self) -> bool:
        return self.state is State.HALF_OPEN

    def abandon_probe(self, now: float) -> None:
        """The admitted probe was not sent after all (its host was busy): the next delivery may probe."""
        if self.state is State.HALF_OPEN:
            self._probe_deadline = now

    def record(self, now: float, failed: bool, probe: bool = False, unreachable: bool = False) -> None:
        """Count one outcome; `probe` when it is the outcome of the attempt `admit` let through as the probe,
        `unreachable` when the receiver did not answer at all (a timeout or a connection error)."""
        if self.state is State.HALF_OPEN:
            if not probe:
                return  # an attempt that began before the circuit opened says nothing of the receiver now
            if failed:
                self._cooldown = min(self._cooldown * 2, self._settings.max_cooldown_seconds)
                self._open(now)
            else:
                self._close()
            return
        if self.state is State.OPEN:
            return  # an attempt that began before the circuit opened; the decision is made
        attempts, failures = self._add(now, failed)
        # Only silence counts in a row: a receiver that answers, even 500, is alive, and the ratio judges it.
        self._consecutive = self._consecutive + 1 if unreachable else 0
        s = self._settings
        if failed and (
            (attempts >= s.min_requests and failures >= s.failure_ratio * attempts)
            or self._consecutive >= s.consecutive_failures
        ):
            self._open(now)

    def reset(self) -> None:
        """Close at once (an operator re-enabled the endpoint)."""
        self._close()

    def _open(self, now: float) -> None:
        self.state = State.OPEN
        self.open_until = now + self._cooldown

    def _close(self) -> None:
        self.state = State.CLOSED
        self._consecutive = 0
        self._cooldown = self._settings.cooldown_seconds
        self._epochs = [_NEVER] * _BUCKETS

    def _add(self, now: float, failed: bool) -> tuple[int, int]:
        width = self._settings.window_seconds / _BUCKETS
        epoch = int(now / width)
        slot = epoch % _BUCKETS
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._counts[slot] = [0, 0]
        counts = self._counts[slot]
        counts[0] += 1
        counts[1] += failed
        attempts = failures = 0
        for i in range(_BUCKETS):
            if epoch - self._epochs[i] < _BUCKETS:
                attempts += self._counts[i][0]
                failures += self._counts[i][1]
        return attempts, failures
