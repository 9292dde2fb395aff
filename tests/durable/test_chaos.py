"""The short chaos run (`make chaos` runs the long one): SIGKILLs, a Postgres restart and a broker cut while
receivers fail half their requests, and still every (event, webhook) pair reaches its receiver."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import Plan, run


async def test_nothing_is_lost_through_kills_a_postgres_restart_and_a_broker_cut(tmp_path: Path) -> None:
    plan = Plan(events=150, kills=1, postgres_restarts=1, broker_cut_seconds=3, seed=7, deadline_seconds=240)
    report = await run(plan, tmp_path)
    print("\n" + report.table())
    assert report.lost == 0, report.table()
    assert report.exits == [], "the daemon ended by itself under faults it must ride out"
    assert sum(not f.startswith("startup refused") for f in report.faults) == 3
