"""The breaker's and the throttle's rules on a clock the test drives: when a circuit opens, probes and closes, and how
a rate limit and a receiver's Retry-After space deliveries out."""

from __future__ import annotations

import pytest

from webhookd.endpoints.breaker import Breaker, BreakerSettings, State
from webhookd.endpoints.throttle import Throttle

SETTINGS = BreakerSettings(
    failure_ratio=0.5,
    min_requests=10,
    consecutive_failures=50,
    window_seconds=60,
    cooldown_seconds=30,
    max_cooldown_seconds=100,
    probe_seconds=5,
)


def test_the_circuit_stays_closed_below_the_minimum_number_of_requests() -> None:
    breaker = Breaker(SETTINGS)
    for i in range(9):
        breaker.record(1000 + i, failed=True)
    assert breaker.state is State.CLOSED
    assert breaker.admit(1010) == (True, 0.0)


def test_the_circuit_opens_when_the_failure_ratio_is_reached_over_the_window() -> None:
    breaker = Breaker(SETTINGS)
    for i in range(5):
        breaker.record(1000 + i, failed=False)
    for i in range(5):
        breaker.record(1010 + i, failed=True)
    assert breaker.state is State.OPEN
    allowed, wait = breaker.admit(1020)
    assert not allowed
    assert wait == pytest.approx(30 - 6)


def test_unanswered_attempts_in_a_row_open_the_circuit_before_the_window_is_full() -> None:
    breaker = Breaker(BreakerSettings(**{**SETTINGS.__dict__, "consecutive_failures": 3}))
    breaker.record(1000, failed=True, unreachable=True)
    breaker.record(1001, failed=True)  # a 500: the receiver answers, so the run of silence is broken
    breaker.record(1002, failed=True, unreachable=True)
    breaker.record(1003, failed=True, unreachable=True)
    assert not breaker.holds(1003)
    breaker.record(1004, failed=True, unreachable=True)
    assert breaker.holds(1004)


def test_old_outcomes_leave_the_window() -> None:
    breaker = Breaker(SETTINGS)
    for i in range(9):
        breaker.record(1000 + i, failed=True)
    # Two minutes later the nine failures are out of the window: one more is not enough to open.
    breaker.record(1130, failed=True)
    assert breaker.state is State.CLOSED


def test_after_the_cooldown_one_probe_goes_and_its_success_closes_the_circuit() -> None:
    breaker = Breaker(SETTINGS)
    for _i in range(10):
        breaker.record(1000, failed=True)
    assert breaker.state is State.OPEN
    assert breaker.admit(1031) == (True, 0.0)  # the probe
    assert breaker.probing
    allowed, _ = breaker.admit(1031.5)
    assert not allowed, "a second delivery went out while the probe was under way"
    breaker.record(1032, failed=False, probe=True)
    assert not breaker.holds(1032)
    assert breaker.admit(1032) == (True, 0.0)
    assert not breaker.probing


def test_a_failed_probe_opens_the_circuit_for_twice_as_long_up_to_the_maximum() -> None:
    breaker = Breaker(SETTINGS)
    for _ in range(10):
        breaker.record(1000, failed=True)
    now = 1000.0
    waits = []
    for _ in range(4):
        now = breaker.open_until
        assert breaker.admit(now)[0]
        breaker.record(now, failed=True, probe=True)
        waits.append(breaker.open_until - now)
    assert waits == [60, 100, 100, 100]


def test_while_probing_only_the_probes_outcome_counts() -> None:
    breaker = Breaker(SETTINGS)
    for _ in range(10):
        breaker.record(1000, failed=True)
    assert breaker.admit(1031)[0]
    # Attempts that began before the circuit opened come back late: they say nothing of the receiver now.
    breaker.record(1031.2, failed=False)
    breaker.record(1031.3, failed=True)
    assert breaker.holds(1031.4)
    assert breaker.open_until == 1030, "a stale failure must not reopen the circuit for longer"
    breaker.record(1032, failed=False, probe=True)
    assert not breaker.holds(1032)


def test_a_probe_that_was_never_sent_lets_the_next_delivery_probe() -> None:
    breaker = Breaker(SETTINGS)
    for _ in range(10):
        breaker.record(1000, failed=True)
    assert breaker.admit(1031)[0]
    breaker.abandon_probe(1031)
    assert breaker.admit(1031.1)[0]


def test_the_throttle_lets_a_second_of_burst_through_then_paces_deliveries() -> None:
    throttle = Throttle(rate=10)
    waits = [throttle.reserve(100.0, max_wait=1.0) for _ in range(15)]
    assert all(allowed for allowed, _ in waits)
    assert [w for _, w in waits[:10]] == [0.0] * 10
    assert [round(w, 2) for _, w in waits[10:]] == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_over_the_allowed_wait_the_throttle_refuses_and_spaces_the_returns_at_the_pace() -> None:
    throttle = Throttle(rate=2)
    for _ in range(2):
        assert throttle.reserve(100.0, max_wait=0.0)[0]
    refused = [throttle.reserve(100.0, max_wait=0.0) for _ in range(4)]
    assert not any(allowed for allowed, _ in refused)
    returns = [w for _, w in refused]
    assert returns == sorted(returns)
    assert returns[1] - returns[0] == pytest.approx(0.5)


def test_a_receivers_pause_holds_everything_until_it_ends_even_without_a_rate_limit() -> None:
    throttle = Throttle(rate=None)
    assert throttle.pause(100.0, 20)
    assert not throttle.pause(101.0, 5), "a shorter pause must not cut the longer one"
    assert throttle.reserve(110.0, max_wait=1.0) == (False, 10.0)
    assert throttle.reserve(120.0, max_wait=1.0) == (True, 0.0)


def test_a_slot_given_back_is_the_next_deliverys_at_once() -> None:
    throttle = Throttle(rate=2)
    for _ in range(2):  # the second's burst
        assert throttle.reserve(100.0, max_wait=0.0)[0]
    assert not throttle.reserve(100.0, max_wait=0.0)[0]
    throttle.give_back()  # the second one's endpoint stalled before it was sent
    assert throttle.reserve(100.0, max_wait=0.0) == (True, 0.0)
    assert not throttle.reserve(100.0, max_wait=0.0)[0]
