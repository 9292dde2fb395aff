"""The daemon processes alive in the cluster: each heartbeats a row, the count rises as processes join and falls as
they leave or stop beating, and each process's share of a cluster-wide cap follows it."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.support import fetch, running, settings_for
from webhookd.runtime.members import Membership, share

INTERVAL = 0.1


async def test_the_live_count_rises_as_processes_join_and_falls_as_they_leave_or_die(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        a, b, c = (Membership(pool, INTERVAL) for _ in range(3))
        shares: list[int] = []
        a.follow(lambda live: shares.append(a.share(32)))
        assert [await a.beat(), await b.beat(), await c.beat()] == [1, 2, 3]
        assert await a.beat() == 3
        assert shares == [32, 10], "the share did not follow the live count"
        await b.leave()
        assert await a.beat() == 2, "a process that left was still counted"
        assert shares[-1] == 16
        # c stops beating (killed): it counts until it has missed a few heartbeats, then no more.
        await asyncio.sleep(4 * INTERVAL)
        assert await a.beat() == 1
        assert shares[-1] == 32
    finally:
        await pool.close()


async def test_a_heartbeat_deletes_the_rows_of_processes_gone_for_good(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        await pool.execute(
            "INSERT INTO webhookd.members (member_id, seen_at) VALUES ('gone', now() - interval '1 hour'), "
            "('recent', now() - interval '5 seconds')"
        )
        me = Membership(pool, INTERVAL)
        assert await me.beat() == 1
    finally:
        await pool.close()
    rows = await fetch(dsn, "SELECT member_id FROM webhookd.members ORDER BY member_id")
    # Not live, but not gone long enough to be forgotten: it may be a process that stalled for a few seconds.
    assert sorted(r["member_id"] for r in rows) == sorted([me.member_id, "recent"])


async def test_heartbeats_run_until_cancelled_and_a_leaving_process_takes_its_row_with_it(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        one, two = Membership(pool, INTERVAL), Membership(pool, INTERVAL)
        tasks = [asyncio.create_task(m.run()) for m in (one, two)]
        await asyncio.sleep(3 * INTERVAL)
        assert one.live == two.live == 2
        tasks[1].cancel()
        await two.leave()
        await asyncio.sleep(3 * INTERVAL)
        assert one.live == 1
        tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await one.leave()
    finally:
        await pool.close()
    assert await fetch(dsn, "SELECT * FROM webhookd.members") == []


async def test_a_running_daemon_counts_itself_among_the_members_and_takes_its_row_away_when_it_stops(
    kafka: str, dsn: str, topic: str
) -> None:
    async with running(settings_for(kafka, dsn, topic)) as service:
        assert service._res is not None
        assert service._res.membership.live == 1
        rows = await fetch(dsn, "SELECT member_id FROM webhookd.members")
        assert [r["member_id"] for r in rows] == [service._res.membership.member_id]
    assert await fetch(dsn, "SELECT * FROM webhookd.members") == [], "a stopped daemon was left among the members"


def test_a_share_divides_the_cap_rounding_down_and_never_below_one_slot() -> None:
    assert share(32, 1) == 32
    assert share(32, 3) == 10  # 30 in flight across the cluster: within the cap
    assert share(32, 4) == 8
    assert share(2, 4) == 1  # a cap below the process count: each still gets one
    assert share(8, 0) == 8
