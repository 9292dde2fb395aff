"""Where a delivery goes after one pass, decided by `settle` alone: no receiver, no clock, no Postgres."""

from __future__ import annotations

import pytest

from webhookd.delivery.settling import RecordJob, RetryPolicy, settle
from webhookd.model import AttemptResult, Hold, HoldReason

# The jitter's random source returns the low end, so delays are exact: 10 s at -10% is 9 s.
POLICY = RetryPolicy(schedule=(10.0, 60.0), jitter=0.1, uniform=lambda low, _high: low)


def test_a_2xx_is_delivered_and_counts_as_an_attempt() -> None:
    settled = settle(AttemptResult("2xx", status=204), 1, POLICY, disabled=False)
    assert (settled.status, settled.last_status, settled.error, settled.attempted) == ("delivered", 204, None, True)


def test_a_failure_with_attempts_left_waits_its_schedule_spread_by_the_jitter() -> None:
    settled = settle(AttemptResult("5xx", status=503, error="busy"), 1, POLICY, disabled=False)
    assert settled.status == "pending"
    assert settled.retry_in == pytest.approx(9.0)
    assert (settled.last_status, settled.error) == (503, "HTTP 503: busy")


def test_a_retry_after_longer_than_the_schedule_is_honoured() -> None:
    settled = settle(AttemptResult("4xx", status=429, retry_after=120.0), 2, POLICY, disabled=False)
    assert (settled.status, settled.retry_in) == ("pending", 120.0)


def test_the_attempt_after_the_last_step_of_the_schedule_is_dead() -> None:
    settled = settle(AttemptResult("timeout", error="no answer in time"), 3, POLICY, disabled=False)
    assert (settled.status, settled.retry_in, settled.error) == ("dead", 0.0, "timeout: no answer in time")


def test_a_blocked_destination_is_dead_at_once() -> None:
    settled = settle(AttemptResult("blocked", error="private address"), 1, POLICY, disabled=False)
    assert settled.status == "dead"


def test_a_failure_on_an_endpoint_disabled_meanwhile_is_dead_however_many_attempts_are_left() -> None:
    settled = settle(AttemptResult("5xx", status=500), 1, POLICY, disabled=True)
    assert (settled.status, settled.last_status) == ("dead", 500)


@pytest.mark.parametrize("reason", ["circuit_open", "rate_limited", "endpoint_busy"])
def test_a_hold_waits_as_long_as_it_says_and_costs_no_attempt(reason: HoldReason) -> None:
    settled = settle(Hold(reason, 12.5, f"deferred: {reason}"), 0, POLICY, disabled=False)
    assert (settled.status, settled.retry_in, settled.attempted) == ("pending", 12.5, False)
    assert settled.last_status is None


def test_a_hold_on_a_disabled_endpoint_is_a_dead_letter_without_an_attempt() -> None:
    settled = settle(Hold("disabled", 0.0, "endpoint disabled: by an operator"), 4, POLICY, disabled=False)
    assert (settled.status, settled.attempted, settled.error) == ("dead", False, "endpoint disabled: by an operator")


def test_a_record_is_done_once_its_last_delivery_is_settled_and_only_then() -> None:
    done: list[bool] = []
    job = RecordJob(3, lambda: done.append(True))
    job.one_done()
    job.one_done()
    assert done == []
    job.one_done()
    assert done == [True]
