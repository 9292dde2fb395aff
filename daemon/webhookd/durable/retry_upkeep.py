"""The retry table looked after between claims, at a cost that does not grow with the backlog: its gauges, the sweep
for ordered records whose wake-up was lost, and the deletion of delivered rows past
`endpoints.attempt_log_retention_seconds` (dead letters stay for operators). The retry poller runs each chore when
it falls due; each returns the seconds until its next turn.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from webhookd.durable.held_connection import HeldConnection
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.durable.retry_upkeep")

# The depth is the sum that triggers keep (webhookd.pending_count), not a count of rows; the size and the dead
# versions come from the files' sizes and the statistics Postgres keeps anyway.
_TABLE_STATS = """
SELECT (SELECT coalesce(sum(pending), 0) FROM webhookd.pending_count)::bigint AS depth,
       pg_total_relation_size('webhookd.deliveries') AS bytes,
       pg_stat_get_dead_tuples('webhookd.deliveries'::regclass) AS dead_rows
"""
# The records whose earliest pending delivery still waits ('infinity') for one before it that is no longer pending:
# its wake-up (record._PROMOTE) was lost to a race with another process writing it, or the one before it left by a
# path that wakes nobody (an operator's command). Made due now. Only records with a waiting row are visited, each
# by one jump in deliveries_in_order_waiting to its first waiting row, which is the record's earliest pending one
# unless deliveries_in_order has one before it; `after` is the record to start after, `slice` how many to visit.
_FIRST_WAITING = """SELECT w.webhook_id, w.order_key, w.id FROM webhookd.deliveries w
    WHERE w.status = 'pending' AND w.next_attempt_at = 'infinity' AND (w.webhook_id, w.order_key) > {after}
    ORDER BY w.webhook_id, w.order_key, w.order_pos, w.id LIMIT 1"""
_SWEEP = f"""
WITH RECURSIVE firsts AS (
    ({_FIRST_WAITING.format(after="{after}")})
    UNION ALL
    SELECT n.* FROM firsts f CROSS JOIN LATERAL ({_FIRST_WAITING.format(after="(f.webhook_id, f.order_key)")}) n
), visited AS (
    SELECT * FROM firsts LIMIT {{slice}}
), woken AS (
    UPDATE webhookd.deliveries d SET next_attempt_at = now(), updated_at = now()
    FROM visited v
    WHERE d.id = v.id AND d.status = 'pending' AND d.next_attempt_at = 'infinity' AND NOT EXISTS (
        SELECT 1 FROM webhookd.deliveries e
        WHERE e.webhook_id = d.webhook_id AND e.order_key = d.order_key AND e.status = 'pending'
          AND (e.order_pos, e.id) < (d.order_pos, d.id)
    )
    RETURNING d.id
)
SELECT (SELECT count(*) FROM woken) AS woken, count(*) AS visited,
       (array_agg(webhook_id::text ORDER BY webhook_id DESC, order_key DESC))[1] AS webhook_id,
       (array_agg(order_key ORDER BY webhook_id DESC, order_key DESC))[1] AS order_key
FROM visited
"""
_NO_RECORD = ("00000000-0000-0000-0000-000000000000", "")  # before any record: order keys are never empty
# From the poller, `_SWEEP_SLICE` records a statement, whatever the backlog: a pass goes on at the next polls.
_UNBLOCK_SLICE = _SWEEP.format(after="($1::uuid, $2::text)", slice="$3")
_SWEEP_SLICE = 1000
# How often a pass starts: a lost wake-up costs a record at most this long, and the pass's slices.
UNBLOCK_SECONDS = 15.0
# Delivered rows older than the retention, oldest first, a batch per statement through deliveries_delivered; SKIP
# LOCKED lets every replica prune at once, each taking other rows. $2 is where the last batch reached: the scan
# starts there rather than walking again over the index entries of the rows it just deleted.
_PRUNE = """
WITH gone AS (
    DELETE FROM webhookd.deliveries WHERE id = ANY(ARRAY(
        SELECT id FROM webhookd.deliveries
        WHERE status = 'delivered' AND delivered_at < now() - make_interval(secs => $1) AND delivered_at >= $2
        ORDER BY delivered_at LIMIT {batch} FOR UPDATE SKIP LOCKED
    ))
    RETURNING delivered_at
)
SELECT count(*) AS removed, max(delivered_at) AS reached FROM gone
"""
_PRUNE_BATCH = 1000
_PRUNE = _PRUNE.format(batch=_PRUNE_BATCH)  # a constant, so that a generic plan knows how few rows it reads
# Batches a round at most: a table never pruned before delays claims a bounded time a round.
_PRUNE_BATCHES, PRUNE_SECONDS = 10, 60.0
_NEVER = datetime.min.replace(tzinfo=UTC)
# Between two slices of a sweep's pass, or two rounds of pruning that left work; and between two samples.
_SLICE_SECONDS, _SAMPLE_SECONDS = 1.0, 5.0


class RetryTableUpkeep:
    """The chores, and where the sweep and the pruning stand between two of their steps."""

    def __init__(self, conn: HeldConnection, metrics: Metrics, delivered_retention: float | None) -> None:
        self._conn = conn
        self._metrics = metrics
        self._retention = delivered_retention
        self._swept_to: tuple[str, str] | None = None
        self._pruned_to = _NEVER

    async def sample(self) -> float:
        """Set the retry table's gauges; returns the seconds until the next sample."""
        async with self._conn.use() as conn:
            stats = await conn.fetchrow(_TABLE_STATS)
        assert stats is not None
        self._metrics.retry_queue_depth.set(stats["depth"])
        self._metrics.retry_table_bytes.set(stats["bytes"])
        self._metrics.retry_table_dead_rows.set(stats["dead_rows"])
        return _SAMPLE_SECONDS

    async def sweep(self) -> float:
        """Wake the next slice of records whose wake-up was lost; returns the seconds until the next slice."""
        async with self._conn.use() as conn:
            done = await conn.fetchrow(_UNBLOCK_SLICE, *(self._swept_to or _NO_RECORD), _SWEEP_SLICE)
        assert done is not None
        if done["woken"]:
            log.info("retry_records_unblocked", records=done["woken"])
        more = done["visited"] >= _SWEEP_SLICE
        self._swept_to = (done["webhook_id"], done["order_key"]) if more else None
        return _SLICE_SECONDS if more else UNBLOCK_SECONDS

    async def prune(self) -> float:
        """Delete delivered rows past the retention, a few batches; returns the seconds until the next round."""
        retention = self._retention
        if retention is None:
            return PRUNE_SECONDS
        removed = 0
        for _ in range(_PRUNE_BATCHES):
            async with self._conn.use() as conn:
                batch = await conn.fetchrow(_PRUNE, retention, self._pruned_to)
            assert batch is not None
            removed += batch["removed"]
            if batch["removed"] < _PRUNE_BATCH:
                # From the start again next round: rows another replica had locked and then kept are found then.
                self._pruned_to = _NEVER
                break
            self._pruned_to = batch["reached"]
        if removed:
            log.info("retry_table_pruned", removed=removed)
        return PRUNE_SECONDS if self._pruned_to is _NEVER else _SLICE_SECONDS
