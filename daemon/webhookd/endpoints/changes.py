"""What this process learned about endpoints since the last sync to Postgres, and how two such lessons combine.

Kept apart from the endpoint state that produces them: a sync that fails puts its changes back under whatever was
learned meanwhile (`merge`), and that rule is checked on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from webhookd.model import AttemptResult


@dataclass(slots=True)
class Delta:
    """What one webhook's attempts showed since the last sync, in wall-clock seconds."""

    url: str
    attempts: int = 0
    failures: int = 0
    consecutive: int = 0  # failures since the last success seen here
    saw_success: bool = False
    last_success: float | None = None
    last_failure: float | None = None
    failing_since: float | None = None  # the first failure after the last success seen here
    last_status: int | None = None
    last_error: str | None = None


@dataclass(slots=True)
class Changes:
    """What the next sync must write: attempt deltas, new disables, and endpoints whose published state moved."""

    deltas: dict[str, Delta] = field(default_factory=dict)
    disables: dict[str, tuple[str, float]] = field(default_factory=dict)  # webhook id -> (reason, wall time)
    # webhook id -> (circuit open until, paused until) on the health's clock, or None. Written to Postgres as time
    # left, which Postgres adds to its own now, so that no process's wall clock is trusted with them.
    states: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    at: float = 0.0  # the health's clock when these changes were taken

    def seconds_left(self, until: float | None) -> float | None:
        return None if until is None else max(until - self.at, 0.0)

    def learn(self, webhook_id: str, url: str, result: AttemptResult, wall: float) -> None:
        """Add one attempt of the webhook, made at `wall` (epoch seconds), to its delta."""
        delta = self.deltas.get(webhook_id)
        if delta is None:
            delta = self.deltas[webhook_id] = Delta(url)
        delta.url = url
        delta.attempts += 1
        delta.last_status = result.status
        if result.ok:
            delta.saw_success = True
            delta.last_success = wall
            delta.consecutive = 0
            delta.failing_since = None
            delta.last_error = None
        else:
            delta.failures += 1
            delta.consecutive += 1
            delta.last_failure = wall
            if delta.failing_since is None:
                delta.failing_since = wall
            delta.last_error = result.describe()


def merge(old: Delta | None, new: Delta) -> Delta:
    """One delta covering `old` then `new`."""
    if old is None:
        return new
    return Delta(
        url=new.url,
        attempts=old.attempts + new.attempts,
        failures=old.failures + new.failures,
        consecutive=new.consecutive if new.saw_success else old.consecutive + new.consecutive,
        saw_success=old.saw_success or new.saw_success,
        last_success=new.last_success if new.last_success is not None else old.last_success,
        last_failure=new.last_failure if new.last_failure is not None else old.last_failure,
        failing_since=new.failing_since if new.saw_success else (old.failing_since or new.failing_since),
        last_status=new.last_status,
        last_error=new.last_error,
    )
