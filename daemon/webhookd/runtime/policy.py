"""The policy numbers derived from the configuration, each defined once: leases, probes, rebalances, shutdown.

They are not configuration keys of their own: each follows from keys an operator sets (the delivery timeout, the
drain timeout, the concurrency), so that raising one of those keeps every number that depends on it consistent.
The deploy test reads the shutdown budget from here to check the manifests' grace period against it.
"""

from __future__ import annotations

import asyncio
from typing import Final

from webhookd.runtime.config import Settings

# Liveness fails only if the consume loop has not polled for this long: far beyond any healthy pause.
STALL_SECONDS: Final = 60.0
# Records read past an unfinished one; a few bytes each, so this caps memory, not throughput.
MAX_TRACKED_RECORDS: Final = 100_000
# Everything a shutdown does after the drain, together: handing unfinished deliveries to the retry table, the last
# outcome and attempt-log writes, the endpoint sync, leaving the cluster, the final offset commit and leaving the
# group. Each step takes what it needs from this one budget; only an unreachable Postgres or Kafka uses it up.
SHUTDOWN_AFTER_DRAIN_SECONDS: Final = 20.0
# Kept back from the steps before the final commit, so that a slow Postgres never leaves the commit without time.
_COMMIT_RESERVE_SECONDS: Final = 6.0
_LEAVE_GROUP_RESERVE_SECONDS: Final = 1.0
# A step is always given this long, however little is left: an awaited call with no time at all would only fail.
_LEAST_STEP_SECONDS: Final = 0.1


def shutdown_seconds(settings: Settings) -> float:
    """The longest a graceful shutdown takes, from the signal to the exit: what a pod's grace period must exceed."""
    return settings.delivery.drain_timeout_seconds + SHUTDOWN_AFTER_DRAIN_SECONDS


def probe_seconds(settings: Settings) -> float:
    """How long a circuit's probe may take: it may wait for its host and the global budget before it starts."""
    d = settings.delivery
    return d.timeout_seconds + d.host_wait_seconds + 5


def lease_seconds(settings: Settings) -> float:
    """How long a claimed retry row stays this process's.

    Long enough to cover waiting for a slot, the attempt and writing its outcome; expiry only risks a duplicate,
    while a killed replica's claims wait this long before another replica takes them.
    """
    d = settings.delivery
    return 3 * d.timeout_seconds + d.host_wait_seconds + 5


def retries_in_flight(settings: Settings) -> int:
    """Retries claimed at once: while as many as may be sent are sent, as many again are being claimed or are
    writing their outcomes, so that a backlog keeps every slot busy."""
    return 2 * settings.delivery.concurrency


def rebalance_timeout_ms(settings: Settings) -> int:
    """A revocation waits up to the drain timeout for deliveries; the group must wait at least as long."""
    return int((settings.delivery.drain_timeout_seconds + 10) * 1000)


class ShutdownClock:
    """The time left of one shutdown: the drain's part, then the steps after it sharing one budget."""

    def __init__(self, settings: Settings) -> None:
        self._loop = asyncio.get_running_loop()
        self._drain = settings.delivery.drain_timeout_seconds
        self._deadline = self._loop.time() + shutdown_seconds(settings)

    def left(self) -> float:
        return max(0.0, self._deadline - self._loop.time())

    def drain(self) -> float:
        """For the drain: its configured timeout, less whatever the steps after it would then lack."""
        return max(_LEAST_STEP_SECONDS, min(self._drain, self.left() - SHUTDOWN_AFTER_DRAIN_SECONDS))

    def step(self, cap: float) -> float:
        """For one step before the final commit: at most `cap`, never eating into the commit's reserve."""
        return self._bounded(cap, _COMMIT_RESERVE_SECONDS)

    def commit(self, cap: float) -> float:
        """For the final commit: at most `cap`, leaving a moment to leave the group."""
        return self._bounded(cap, _LEAVE_GROUP_RESERVE_SECONDS)

    def last(self, cap: float) -> float:
        """For the last step: whatever is left, at most `cap`."""
        return self._bounded(cap, 0.0)

    def _bounded(self, cap: float, reserve: float) -> float:
        return max(_LEAST_STEP_SECONDS, min(cap, self.left() - reserve))
