"""Where a delivery goes after one pass: the one rule that turns an attempt's result, or a hold, into a settlement,
and the job that tells a record done once each of its deliveries is settled.

`settle` is pure and synchronous (the jitter's random source is the only input besides the arguments), so that every
way a delivery can end is decided here and tested without a receiver, a clock or Postgres; the dispatcher only
carries out what a settlement says.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from webhookd.model import AttemptResult, Hold, Settled


class RecordJob:
    """The deliveries of one record; calls `on_done` once the last of them is settled."""

    __slots__ = ("on_done", "remaining")

    def __init__(self, remaining: int, on_done: Callable[[], None]) -> None:
        self.remaining = remaining
        self.on_done = on_done

    def one_done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.on_done()


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again: `schedule[n-1]` seconds after attempt n, spread by jitter; after the last, dead."""

    schedule: tuple[float, ...]
    jitter: float
    uniform: Callable[[float, float], float] = field(default=random.uniform, compare=False)

    def delay_after(self, attempts: int, result: AttemptResult) -> float | None:
        if not result.retryable or attempts > len(self.schedule):
            return None
        base = self.schedule[attempts - 1]
        # Jitter spreads the retries of a burst that failed together, so a recovering receiver is not hit at once.
        delay = base * (1 + self.uniform(-self.jitter, self.jitter))
        if result.retry_after is not None:
            delay = max(delay, result.retry_after)
        return delay


@dataclass(frozen=True, slots=True)
class Settlement:
    """Where the delivery goes: delivered, pending (again in `retry_in` seconds) or dead; what its row records."""

    status: Settled
    retry_in: float
    last_status: int | None  # the receiver's HTTP status, when it answered
    error: str | None
    attempted: bool  # whether the pass made an HTTP attempt (a hold makes none, and costs no attempt)


def settle(outcome: AttemptResult | Hold, attempts: int, policy: RetryPolicy, *, disabled: bool) -> Settlement:
    """The settlement of a pass that ended in `outcome`, `attempts` attempts made so far (this one included).

    `disabled`: the endpoint is disabled now (perhaps by this very answer), so a failure is not tried again.
    """
    if isinstance(outcome, Hold):
        if outcome.reason == "disabled":
            return Settlement("dead", 0.0, None, outcome.error, attempted=False)
        return Settlement("pending", outcome.retry_in, None, outcome.error, attempted=False)
    if outcome.ok:
        return Settlement("delivered", 0.0, outcome.status, None, attempted=True)
    delay = None if disabled else policy.delay_after(attempts, outcome)
    if delay is None:
        return Settlement("dead", 0.0, outcome.status, outcome.describe(), attempted=True)
    return Settlement("pending", delay, outcome.status, outcome.describe(), attempted=True)
