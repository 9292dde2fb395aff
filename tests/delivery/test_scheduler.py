"""Fair shares of the in-flight budget: each endpoint starts small and earns slots with answers, the budget goes
round the endpoints that wait, an endpoint that answers nothing gives its slots back and its deliveries are deferred,
and a host's cap holds whatever its endpoints do."""

from __future__ import annotations

import asyncio

from webhookd.delivery.lanes import INITIAL_LIMIT, Lane
from webhookd.delivery.scheduler import Scheduler, SchedulerLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scheduler(concurrency: int = 16, host: int = 16, wait: float = 1.0) -> tuple[Scheduler, Clock]:
    clock = Clock()
    return Scheduler(SchedulerLimits(concurrency, host, wait), clock), clock


def ask(s: Scheduler, endpoint: str, host: str = "h:443") -> asyncio.Task[Lane | None]:
    return asyncio.create_task(s.acquire(endpoint, host))


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def earn(s: Scheduler, endpoint: str, host: str, rounds: int) -> None:
    """Rounds of requests that use the endpoint's whole limit, all answered."""
    for _ in range(rounds):
        lanes = [await s.acquire(endpoint, host) for _ in range(int(s.limit_of(endpoint) or 1))]
        for lane in lanes:
            assert lane is not None
            s.release(lane, "2xx")


async def test_an_endpoint_that_never_answers_holds_only_its_first_slots_while_its_sibling_keeps_going() -> None:
    s, _ = scheduler()
    hung = [ask(s, "http://h/hung") for _ in range(10)]
    await settle()
    assert sum(t.done() for t in hung) == INITIAL_LIMIT
    healthy = [await s.acquire("http://h/ok", "h:443") for _ in range(INITIAL_LIMIT)]
    assert all(lane is not None for lane in healthy), "a sibling on the same host was held up"
    for t in hung:
        t.cancel()
    await asyncio.gather(*hung, return_exceptions=True)


async def test_answers_grow_the_limit_while_it_is_used_and_timeouts_halve_it_without_touching_siblings() -> None:
    s, _ = scheduler(concurrency=64, host=64)
    await earn(s, "http://h/a", "h:443", rounds=20)
    grown = s.limit_of("http://h/a")
    assert grown is not None
    assert grown >= 32, "slow start did not grow an endpoint that used its slots"
    sibling = await s.acquire("http://h/b", "h:443")
    assert sibling is not None
    s.release(sibling, "2xx")
    sibling_limit = s.limit_of("http://h/b")
    lane = await s.acquire("http://h/a", "h:443")
    assert lane is not None
    s.release(lane, "timeout")
    assert s.limit_of("http://h/a") == grown / 2
    assert s.limit_of("http://h/b") == sibling_limit, "one endpoint's timeout cut its sibling"


async def test_an_endpoint_that_does_not_use_its_slots_does_not_earn_more() -> None:
    s, _ = scheduler(concurrency=64, host=64)
    for _ in range(100):
        lane = await s.acquire("http://h/one-at-a-time", "h:443")
        assert lane is not None
        s.release(lane, "2xx")
    limit = s.limit_of("http://h/one-at-a-time")
    assert limit is not None
    assert limit <= 3, "an endpoint that never had more than one request in flight earned a large share"


async def test_freed_slots_go_round_the_waiting_endpoints_in_turn() -> None:
    s, _ = scheduler(concurrency=4, host=4)
    held = [await s.acquire(f"http://h{i}/x", f"h{i}:80") for i in range(4)]
    waiting = {name: [ask(s, f"http://{name}/x", f"{name}:80") for _ in range(3)] for name in ("a", "b", "c")}
    await settle()
    order: list[str] = []
    for lane in held:
        assert lane is not None
        s.release(lane, "2xx")
        await settle()
        order += [name for name, tasks in waiting.items() for t in tasks if t.done() and name not in order]
    assert sorted(order[:3]) == ["a", "b", "c"], "one endpoint took the freed slots before the others had one"
    for tasks in waiting.values():
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_an_endpoint_over_its_fair_share_waits_while_one_under_it_waits() -> None:
    s, _ = scheduler(concurrency=4, host=4)
    # "big" earns a large limit alone, then holds 3 of the 4 slots when "small" arrives.
    await earn(s, "http://big/x", "big:80", rounds=10)
    await earn(s, "http://small/x", "small:80", rounds=3)
    big = [await s.acquire("http://big/x", "big:80") for _ in range(3)]
    small = await s.acquire("http://small/x", "small:80")
    more_big = ask(s, "http://big/x", "big:80")
    more_small = ask(s, "http://small/x", "small:80")
    await settle()
    assert not more_big.done()
    assert not more_small.done()
    assert big[0] is not None
    s.release(big[0], "2xx")
    await settle()
    assert more_small.done(), "the endpoint under its share was not served"
    assert not more_big.done(), "the endpoint over its share was served first"
    assert small is not None
    s.release(small, "2xx")
    await settle()
    assert more_big.done(), "a free slot stayed idle while an endpoint over its share waited"


async def test_an_endpoint_that_answers_nothing_is_stalled_and_its_queue_deferred_until_it_answers() -> None:
    s, clock = scheduler(concurrency=8, host=8, wait=1.0)
    hung = [await s.acquire("http://h/hung", "h:443") for _ in range(INITIAL_LIMIT)]
    queued = ask(s, "http://h/hung")
    await settle()
    assert not queued.done()
    clock.now += 1.5
    s.sweep()
    await settle()
    assert await queued is None, "the stalled endpoint's queue was not deferred"
    assert await s.acquire("http://h/hung", "h:443") is None, "a new delivery went to a stalled endpoint"
    assert s.in_flight == INITIAL_LIMIT, "what a stalled endpoint has in flight still counts: receivers rely on it"
    lane = hung[0]
    assert lane is not None
    s.release(lane, "timeout")
    assert not s.stalled("http://h/hung"), "an answer (even a timeout) ends the stall"
    assert s.limit_of("http://h/hung") == 1


async def test_a_delivery_waiting_on_the_budget_is_never_deferred_however_long_it_waits() -> None:
    s, clock = scheduler(concurrency=2, host=2, wait=1.0)
    busy = [await s.acquire(f"http://a/{i}", "a:80") for i in range(2)]
    waiting = ask(s, "http://b/x", "b:80")
    await settle()
    for _ in range(20):
        clock.now += 0.5
        s.sweep()
        await settle()
    assert not waiting.done(), "a delivery that only waited for the budget was deferred"
    lane = busy[0]
    assert lane is not None
    s.release(lane, "timeout")
    await settle()
    assert waiting.done()
    assert waiting.result() is not None


async def test_the_host_cap_holds_across_its_endpoints_and_a_host_that_answers_nothing_defers_its_queue() -> None:
    s, clock = scheduler(concurrency=16, host=3, wait=1.0)
    held = [await s.acquire(f"http://h/{i}", "h:443") for i in range(3)]
    blocked = ask(s, "http://h/3")
    elsewhere = await s.acquire("http://other/x", "other:443")
    await settle()
    assert not blocked.done(), "the host got more than its cap"
    assert elsewhere is not None
    clock.now += 1.5
    s.sweep()
    await settle()
    assert await blocked is None, "a delivery kept waiting for a host that answers nothing"
    assert all(lane is not None for lane in held)


async def test_a_larger_host_share_serves_the_deliveries_waiting_for_it() -> None:
    s, _ = scheduler(concurrency=16, host=1)
    assert await s.acquire("http://h/a", "h:443") is not None
    waiting = ask(s, "http://h/b")
    await settle()
    assert not waiting.done()
    s.set_host_concurrency(2)
    await settle()
    assert waiting.done()
    assert waiting.result() is not None


async def test_a_cancelled_waiter_leaves_no_slot_taken() -> None:
    s, _ = scheduler(concurrency=1, host=1)
    lane = await s.acquire("http://h/a", "h:443")
    assert lane is not None
    waiter = ask(s, "http://h/a")
    await settle()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    s.release(lane, "2xx")
    assert s.in_flight == 0
    assert s.waiting == 0
    assert await s.acquire("http://h/a", "h:443") is not None
