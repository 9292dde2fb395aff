"""The attempt log's day partitions: made ahead of time and dropped whole after the retention, and what an operator
is shown of them.

The work itself is Postgres's (`webhookd.keep_attempt_partitions`, `webhookd.retire_attempts`): they run as the
role that migrated, since the daemon's own role may create and drop nothing. Retention therefore costs a `DROP
TABLE` a day per table, whatever the number of rows, and leaves no dead rows behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from webhookd.durable.migrate import DAYS_AHEAD
from webhookd.durable.transient import describe_error
from webhookd.endpoints.sync import Connection
from webhookd.model import ATTEMPT_LOG_FORMS, AttemptLogForm
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.durable.attempt_partitions")

# The table of each form. Its partitions are named <table>_YYYYMMDD after the day (UTC) they hold.
TABLES: dict[AttemptLogForm, str] = {"full": "attempt_log", "compact": "first_tries", "aggregate": "attempt_counts"}

# How often the partitions are made and dropped, and how often their sizes are read for the metrics.
KEEP_SECONDS = 300.0
STATS_SECONDS = 60.0

_PARTITIONS = """
SELECT p.relname AS parent, c.relname AS child, pg_total_relation_size(c.oid) AS bytes
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent
JOIN pg_namespace n ON n.oid = p.relnamespace
WHERE n.nspname = 'webhookd' AND p.relname = ANY($1::text[])
"""


@dataclass(frozen=True, slots=True)
class FormStats:
    """One form's table: its day partitions, the first day it holds, and its size on disk."""

    partitions: int
    oldest_day: datetime | None
    bytes: int


def partition_day(name: str) -> datetime:
    """The start (midnight UTC) of the day a partition holds, from its name."""
    return datetime.strptime(name[-8:], "%Y%m%d").replace(tzinfo=UTC)


async def keep(conn: Connection | asyncpg.Pool, retention: float) -> tuple[int, int]:
    """Make the coming days' partitions and drop those past the retention; returns (created, dropped). Does nothing
    while another process does it."""
    row = await conn.fetchrow("SELECT * FROM webhookd.keep_attempt_partitions($1, $2)", retention, DAYS_AHEAD)
    assert row is not None  # a function with OUT parameters returns one row
    return int(row["created"]), int(row["dropped"])


async def retire_old_table(conn: Connection | asyncpg.Pool, retention: float) -> bool:
    """Empty the attempt log of earlier releases (webhookd.attempts) once no daemon writes it and its rows are all
    past the retention; returns whether it did. The table stays, empty: earlier releases refuse to start without
    it, and a rollback must stay possible."""
    return bool(await conn.fetchval("SELECT webhookd.retire_attempts($1)", retention))


async def form_stats(conn: Connection | asyncpg.Pool) -> dict[AttemptLogForm, FormStats]:
    """Every form's partitions and size, from the catalogs: no table is read."""
    rows = await conn.fetch(_PARTITIONS, list(TABLES.values()))
    stats: dict[AttemptLogForm, FormStats] = {}
    for form in ATTEMPT_LOG_FORMS:
        mine = [r for r in rows if r["parent"] == TABLES[form]]
        days = [partition_day(r["child"]) for r in mine]
        stats[form] = FormStats(len(mine), min(days) if days else None, sum(int(r["bytes"]) for r in mine))
    return stats


class PartitionKeeper:
    """What the attempt log's writer has done between writes: the partitions kept, the table of earlier releases
    emptied when its time comes, and the sizes published. `pool` reaches the attempt log's database, `main_pool` the
    daemon's own. Errors are logged, never raised: the next round tries again."""

    def __init__(
        self, pool: asyncpg.Pool, main_pool: asyncpg.Pool, retention: float, metrics: Metrics | None = None
    ) -> None:
        self._pool = pool
        self._main_pool = main_pool
        self._retention = retention
        self._metrics = metrics
        if metrics is not None:
            metrics.attempt_log_retention.set(retention)

    async def maintain(self) -> None:
        """Make the coming days' partitions, drop those past the retention, empty the table of earlier releases
        once nothing needs it, and read the sizes for the metrics."""
        try:
            created, dropped = await keep(self._pool, self._retention)
            if created or dropped:
                log.info("attempt_log_partitions_kept", created=created, dropped=dropped)
            if await retire_old_table(self._main_pool, self._retention):
                log.info("attempt_log_old_table_emptied", table="webhookd.attempts")
        except Exception as exc:
            # A partition missing when its day comes is made by the first write that needs it.
            log.warning("attempt_log_keep_failed", error=describe_error(exc), retry_in_seconds=KEEP_SECONDS)
        await self.read_stats()

    async def read_stats(self) -> None:
        if self._metrics is None:
            return
        try:
            stats = await form_stats(self._pool)
        except Exception as exc:
            log.warning("attempt_log_stats_failed", error=describe_error(exc))
            return
        m = self._metrics
        for form, s in stats.items():
            m.attempt_log_bytes.labels(form).set(s.bytes)
            m.attempt_log_partitions.labels(form).set(s.partitions)
            age = (datetime.now(UTC) - s.oldest_day).total_seconds() if s.oldest_day is not None else 0.0
            m.attempt_log_oldest_partition_age.labels(form).set(age)
