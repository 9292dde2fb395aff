"""The capacity model of `make bench` (section attempt_log): from costs measured per delivery to a deployment's row
writes, WAL and storage, with round numbers whose results can be worked out by hand."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from bench.capacity_model import (
    DAY,
    GB,
    Assumptions,
    Capacity,
    Cost,
    Retention,
    Traffic,
    failures_at,
    rate_at,
    section_lines,
    size,
)


def _cost(kind: str, deliveries: int, *, rows: int, log_bytes: int, table_kept: int = 0, counts: int = 0) -> Cost:
    # WAL and time proportional to the rows, so that each way's share shows in the sums.
    return Cost(
        kind, kind, deliveries, deliveries, 1000, rows, log_bytes, table_kept * 3, table_kept, rows * 100, rows * 50,
        rows * 10, 0, rows * 1e-6, rows * 2e-6, counts,
    )  # fmt: skip


COSTS = {
    "full": _cost("full", 1000, rows=1000, log_bytes=300_000),
    "compact": _cost("compact", 1000, rows=1000, log_bytes=250_000),
    # 1,000 successes counted in 10 rows of 160 bytes.
    "aggregate": _cost("aggregate", 1000, rows=10, log_bytes=1_600, counts=10),
    "retried": _cost("retried", 100, rows=500, log_bytes=70_000, table_kept=180_000),
    "dead": _cost("dead", 10, rows=240, log_bytes=32_000, table_kept=22_000),
}
NO_FAILURES = Assumptions(retried=0.0, dead=0.0)


def test_first_tries_cost_their_measured_rows_bytes_and_wal_per_delivery() -> None:
    s = size(COSTS, 500, "compact", NO_FAILURES)
    assert s.writes == pytest.approx(500)
    assert s.log_wal == pytest.approx(500 * 100)
    assert s.wal == pytest.approx(500 * 160)
    assert s.busy == pytest.approx(500 * 3e-6)
    # 15 days of partitions: the retention and the day whole-day partitions keep.
    assert s.log_gb == pytest.approx(500 * 250 * DAY * 15 / GB)
    assert s.table_gb == 0


def test_failures_add_full_rows_and_the_retry_tables_live_rows_kept_for_the_retention() -> None:
    a = Assumptions(retried=0.01, dead=0.001)
    s = size(COSTS, 1000, "full", a)
    assert s.writes == pytest.approx(989 * 1 + 10 * 5 + 1 * 24)
    assert s.log_gb == pytest.approx((989 * 300 + 10 * 700 + 1 * 3200) * DAY * 15 / GB)
    assert s.table_gb == pytest.approx((10 * 1800 + 1 * 2200) * DAY * 14 / GB)


def test_aggregate_rows_follow_the_busy_webhooks_and_processes_not_the_rate() -> None:
    a = Assumptions(retried=0.0, dead=0.0, busy_webhooks=600, processes=2)
    # 2 processes x 600 webhooks a minute: 20 rows a second, at 1,000 deliveries a second as at 5,000.
    assert size(COSTS, 1000, "aggregate", a).writes == pytest.approx(20)
    assert size(COSTS, 5000, "aggregate", a).writes == pytest.approx(20)
    # Fewer successes in a minute than busy webhooks: a row per success at most.
    assert size(COSTS, 1, "aggregate", a).writes == pytest.approx(1)
    assert size(COSTS, 5000, "aggregate", a).log_gb == pytest.approx(20 * 160 * DAY * 15 / GB)


def test_the_rate_at_a_limit_is_where_the_sizing_reaches_it() -> None:
    a = Assumptions()
    for mode in ("full", "compact", "aggregate"):
        rate = rate_at(COSTS, mode, a, lambda s: s.log_wal, 1e6)
        assert size(COSTS, rate, mode, a).log_wal == pytest.approx(1e6)
    # 'aggregate' logs in full only the failures: it reaches the same WAL at a much higher rate.
    assert rate_at(COSTS, "aggregate", a, lambda s: s.log_wal, 1e6) > 5 * rate_at(
        COSTS, "compact", a, lambda s: s.log_wal, 1e6
    )


def test_the_failure_shares_that_reach_a_storage_target() -> None:
    a = Assumptions(retried=0.01, dead=0.001)
    k = failures_at(COSTS, 5000, "aggregate", a, 100)
    scaled = Assumptions(retried=0.01 * k, dead=0.001 * k)
    assert size(COSTS, 5000, "aggregate", scaled).gb == pytest.approx(100)


def test_the_section_uses_the_batched_runs_and_prints_every_rate_and_mode() -> None:
    one_by_one = replace(_cost("retried", 10, rows=70, log_bytes=7_000, table_kept=18_000), batch=1)
    retention = Retention(1_000_000, 12.0, 80_000, 1, 9_000.0, 200_000_000, 101, 1_000_000, 4_000.0, 90_000_000)
    capacity = Capacity([*COSTS.values(), one_by_one], retention, ["0001_state.sql"], "PostgreSQL 18")
    assert capacity.by_kind()["retried"] is COSTS["retried"]
    lines = section_lines(capacity, Assumptions())
    sizing = [line for line in lines if line.startswith(("| 500 |", "| 5,000 |"))]
    assert [line.split(" | ")[1] for line in sizing] == ["full", "compact", "aggregate"] * 2
    assert any("`DELETE` by 10,000" in line and "1,000,000" in line for line in lines)


def test_the_traffic_measured_is_shaped_as_the_daemon_makes_deliveries() -> None:
    traffic = Traffic(seed=1)
    deliveries = traffic.deliveries(2000, body=True)
    assert len({d.event_id for d in deliveries}) == 2000
    assert all(len(d.event_id) == 36 and 900 <= len(d.body) <= 1200 for d in deliveries)
    topic, partition, offset = deliveries[0].source.rsplit(":", 2)
    assert topic.startswith("crm.events")
    assert partition.isdigit()
    assert offset.isdigit()
    # Zipf-like: the busiest webhook takes far more than its even share, yet most webhooks are seen.
    counts = Counter(d.webhook.id for d in deliveries)
    assert counts.most_common(1)[0][1] > 100
    assert len(counts) > 400
    assert traffic.success().ok
    assert not traffic.failure().ok
