"""What a process learns about endpoints between syncs, and how lessons a failed sync put back meet newer ones."""

from __future__ import annotations

from webhookd.endpoints.changes import Changes, Delta, merge
from webhookd.model import AttemptResult

URL = "https://receiver.example/hooks"
OK = AttemptResult("2xx", status=200)
DOWN = AttemptResult("5xx", status=502, error="bad gateway")


def learned(*attempts: tuple[AttemptResult, float]) -> Delta:
    changes = Changes()
    for result, wall in attempts:
        changes.learn("w1", URL, result, wall)
    return changes.deltas["w1"]


def test_failures_in_a_row_count_from_the_first_and_a_success_clears_them() -> None:
    failing = learned((OK, 1.0), (DOWN, 2.0), (DOWN, 3.0))
    assert (failing.attempts, failing.failures, failing.consecutive) == (3, 2, 2)
    assert (failing.failing_since, failing.last_failure, failing.last_success) == (2.0, 3.0, 1.0)
    assert failing.last_error == "HTTP 502: bad gateway"
    healed = learned((DOWN, 2.0), (OK, 4.0))
    assert (healed.consecutive, healed.failing_since, healed.last_error) == (0, None, None)


def test_an_older_delta_put_back_under_a_newer_one_keeps_the_counts_and_the_newest_facts() -> None:
    old = learned((DOWN, 1.0), (DOWN, 2.0))
    new = learned((DOWN, 5.0))
    both = merge(old, new)
    assert (both.attempts, both.failures, both.consecutive) == (3, 3, 3)
    assert (both.failing_since, both.last_failure) == (1.0, 5.0), "the failing streak began with the older delta"


def test_a_success_in_the_newer_delta_ends_the_older_streak() -> None:
    both = merge(learned((DOWN, 1.0), (DOWN, 2.0)), learned((OK, 6.0), (DOWN, 7.0)))
    assert (both.consecutive, both.failing_since, both.last_success) == (1, 7.0, 6.0)
    assert both.saw_success


def test_nothing_older_leaves_the_newer_delta_as_it_is() -> None:
    new = learned((OK, 1.0))
    assert merge(None, new) is new
