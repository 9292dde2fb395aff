"""A host's share of the in-flight budget: the full per-host concurrency while it answers, halved by each timeout,
remembered while the host is sick, and given back one slot per answer, so that a hung receiver soon holds a slot
or two instead of its full share."""

from __future__ import annotations

import asyncio

from webhookd.hosts import HostBudgets, HostLimits

LIMITS = HostLimits(concurrency=8, wait_seconds=0.05, busy_retry_seconds=10)


async def test_a_host_gets_its_full_share_and_waiters_beyond_it_give_up_after_the_wait() -> None:
    budgets = HostBudgets(LIMITS)
    assert all([await budgets.acquire("h:443") for _ in range(8)])
    assert not await budgets.acquire("h:443"), "a ninth request went to a host with a share of eight"
    assert await budgets.acquire("other:443"), "another host must not be held up"


async def test_timeouts_halve_the_share_and_a_sick_host_is_remembered_when_idle() -> None:
    budgets = HostBudgets(LIMITS)
    for _ in range(8):
        assert await budgets.acquire("h:443")
    for _ in range(8):
        budgets.release("h:443", "timeout")
    assert budgets.share("h:443") == 1
    assert await budgets.acquire("h:443")
    assert not await budgets.acquire("h:443")
    budgets.release("h:443", "2xx")
    assert budgets.share("h:443") == 2


async def test_answers_give_the_share_back_one_slot_at_a_time() -> None:
    budgets = HostBudgets(LIMITS)
    for _ in range(2):
        await budgets.acquire("h:443")
    budgets.release("h:443", "connection_error")
    budgets.release("h:443", "timeout")
    assert budgets.share("h:443") == 2
    for expected in range(3, 9):
        await budgets.acquire("h:443")
        budgets.release("h:443", "5xx")  # a receiver that answers, even with errors, is not overloaded
        assert budgets.share("h:443") == expected
    # Back at its full share and idle, the host is forgotten: nothing left to remember.
    assert budgets.tracked == 0


async def test_deliveries_that_gave_up_waiting_leave_nothing_behind_at_a_host_that_never_frees_a_slot() -> None:
    budgets = HostBudgets(HostLimits(concurrency=1, wait_seconds=0.001, busy_retry_seconds=10))
    assert await budgets.acquire("h:443")
    results = await asyncio.gather(*(budgets.acquire("h:443") for _ in range(200)))
    assert not any(results)
    assert budgets.waiting("h:443") == 0


async def test_a_slot_freed_while_a_delivery_waits_goes_to_that_delivery() -> None:
    budgets = HostBudgets(HostLimits(concurrency=2, wait_seconds=1.0, busy_retry_seconds=10))
    assert await budgets.acquire("h:443")
    assert await budgets.acquire("h:443")
    waiter = asyncio.create_task(budgets.acquire("h:443"))
    await asyncio.sleep(0.01)
    budgets.release("h:443", "2xx")
    assert await waiter


async def test_a_cancelled_waiter_leaves_no_slot_taken() -> None:
    budgets = HostBudgets(HostLimits(concurrency=2, wait_seconds=5.0, busy_retry_seconds=10))
    assert await budgets.acquire("h:443")
    assert await budgets.acquire("h:443")
    waiter = asyncio.create_task(budgets.acquire("h:443"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    budgets.release("h:443", "2xx")
    budgets.release("h:443", "2xx")
    assert budgets.tracked == 0, "a cancelled waiter left the host in use"
    assert [await budgets.acquire("h:443") for _ in range(2)] == [True, True]
