"""The attempt log: every HTTP attempt, kept in Postgres for operators, written with COPY in batches.

What is kept of an attempt depends on what it was, and for a first-try success (attempt 1, a 2xx, and no row of
its own in webhookd.deliveries) on `endpoints.attempt_log`:

- failures, every attempt of a delivery that has a row (retries, deferred deliveries) and, but with 'aggregate',
  the pairs a webhook's filter kept back: a row of `webhookd.attempt_log` in full, whatever the mode;
- a first-try success: with 'full' the same full row; with 'compact' a row of `webhookd.first_tries` with what
  `deliveries show` and `deliveries replay` need (event, webhook, source, time, duration, status); with
  'aggregate' only a count in `webhookd.attempt_counts`, per webhook and minute, as are filtered pairs.

Adding an attempt only appends a tuple to a list; a background task copies the lists to Postgres every second, so
the hot path never waits on Postgres. The log is for diagnosis, not for delivery, so nothing in it may stop the
daemon: if Postgres stays away long enough for a buffer to fill, its oldest entries are let go, and a warning says
how many; a batch Postgres refuses for good (a value it rejects, a permission or column taken away) is let go with
an error saying why, and the writer goes on with the next. The counts of a minute are written once the minute is
over (a process killed loses at most its current minute's counts). The tables are partitioned by day and kept by
`attempt_partitions`: retention drops whole days.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from webhookd.durable.attempt_partitions import KEEP_SECONDS, STATS_SECONDS, TABLES, PartitionKeeper, keep
from webhookd.durable.outcomes import clean_text
from webhookd.durable.transient import TRANSIENT, describe_error
from webhookd.model import ATTEMPT_LOG_FORMS, AttemptLogForm, AttemptResult, Delivery, Event
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.durable.attempts")

_FULL = (
    "event_id",
    "webhook_id",
    "workspace_id",
    "event_name",
    "attempt",
    "at",
    "duration_ms",
    "result",
    "status",
    "error",
    "source",
    "row_id",
)
_COMPACT = ("event_id", "webhook_id", "source", "at", "duration_ms", "status")
_COUNTS = ("minute", "webhook_id", "result", "attempts", "duration_ms", "max_duration_ms")
_EXCERPT = 300  # characters of an error or response body kept per attempt

# A minute's counts of one webhook and result: [attempts, sum of their durations (ms), the longest (ms)].
_Count = list[float]


class PartitionPending(Exception):
    """A batch's day has no partition and it could not be made now (the keeper's lock or the database busy): the
    rows wait for the next flush."""


def transient(exc: BaseException) -> bool:
    """Whether copying the same rows again may succeed. asyncpg reports a value it cannot encode (an integer out of
    range) as a DataError that is also an InterfaceError, which TRANSIENT lists for connections that broke: that one
    would fail again forever, and is a ValueError too."""
    return (isinstance(exc, TRANSIENT) and not isinstance(exc, ValueError)) or isinstance(exc, PartitionPending)


def _no_partition(exc: BaseException) -> bool:
    """A row no partition takes: a check violation that names no constraint (whatever the server's language)."""
    return isinstance(exc, asyncpg.CheckViolationError) and not getattr(exc, "constraint_name", None)


class AttemptLog:
    """Buffers attempts and copies them to Postgres; `run` is the writer, which has `keeper` look after the
    partitions between writes; `close` flushes what is left.

    `pool` reaches the attempt log's database; `main_pool` the daemon's own (the same unless postgres.attempts_dsn
    is set), where the attempt log of earlier releases waits to be emptied.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        retention_seconds: float,
        mode: AttemptLogForm = "compact",
        *,
        metrics: Metrics | None = None,
        main_pool: asyncpg.Pool | None = None,
        flush_interval: float = 1.0,
        max_buffered: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._clock = clock  # seconds since the epoch: the minutes counts are kept by
        self._retention = retention_seconds
        self.keeper = PartitionKeeper(pool, main_pool if main_pool is not None else pool, retention_seconds, metrics)
        self.mode = mode
        self._metrics = metrics
        self._flush_interval = flush_interval
        self._max_buffered = max_buffered
        self._full: list[tuple[Any, ...]] = []
        self._compact: list[tuple[Any, ...]] = []
        self._counts: dict[tuple[int, str, str], _Count] = {}
        self._dropped = 0

    def add(self, delivery: Delivery, attempt: int, result: AttemptResult) -> None:
        ms = result.duration * 1000
        if self.mode != "full" and result.ok and attempt == 1 and delivery.row_id is None:
            if self.mode == "compact":
                row = (delivery.event_id, delivery.webhook.id, delivery.source, datetime.now(UTC), ms, result.status)
                self._compact.append(row)
                self._trim(self._compact)
            else:
                self._count(delivery.webhook.id, "2xx", ms)
            return
        error = result.describe() if not result.ok else None
        self._full.append(
            (
                delivery.event_id,
                delivery.webhook.id,
                delivery.workspace_id,
                delivery.event_name,
                attempt,
                datetime.now(UTC),
                ms,
                result.result,
                result.status,
                clean_text(error[:_EXCERPT]) if error else None,
                delivery.source,
                delivery.row_id,
            )
        )
        self._trim(self._full)

    def add_filtered(self, event: Event, webhook_id: str, source: str, why: str) -> None:
        """A pair that a webhook's filter kept from being sent: attempt 0, result `filtered`, never a failure; it is
        here so that `deliveries show --event` can say why nothing went out (with 'aggregate', only counted)."""
        if self.mode == "aggregate":
            self._count(webhook_id, "filtered", 0.0)
            return
        row = (event.id, webhook_id, event.workspace_id, event.name, 0, datetime.now(UTC), 0.0, "filtered", None)
        self._full.append((*row, clean_text(why[:_EXCERPT]), source, None))
        self._trim(self._full)

    def _count(self, webhook_id: str, result: str, ms: float) -> None:
        key = (int(self._clock()) // 60, webhook_id, result)
        count = self._counts.get(key)
        if count is None:
            self._counts[key] = [1, ms, ms]
        else:
            count[0] += 1
            count[1] += ms
            count[2] = max(count[2], ms)

    def _trim(self, rows: list[tuple[Any, ...]]) -> None:
        if len(rows) > self._max_buffered:
            excess = len(rows) - self._max_buffered
            del rows[:excess]
            self._dropped += excess

    async def run(self) -> None:
        """The writer: flushes every `flush_interval`, and keeps the partitions (at once, then every few minutes),
        until cancelled. No error of the log's own ends it: deliveries must not stop for want of diagnostics."""
        loop = asyncio.get_running_loop()
        next_keep = next_stats = loop.time()
        while True:
            if loop.time() >= next_keep:
                await self.keeper.maintain()
                next_keep = next_stats = loop.time() + KEEP_SECONDS
            elif loop.time() >= next_stats:
                await self.keeper.read_stats()
                next_stats = loop.time() + STATS_SECONDS
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception as exc:  # flush() raises only errors that may pass, its batch still buffered
                buffered = len(self._full) + len(self._compact)
                log.warning("attempt_log_write_retrying", error=describe_error(exc), buffered=buffered)

    async def flush(self, *, final: bool = False) -> int:
        """Copy the buffered attempts (and the counts of the minutes that are over, or all of them when `final`) to
        Postgres; returns how many rows.

        On a transient error the batch stays buffered and the error is raised. On any other the batch is let go, as
        it would fail again forever, with an `attempt_log_write_failed` error that says why; 0 is returned.
        """
        if self._dropped:
            log.warning("attempt_log_overflow", dropped=self._dropped, kept=len(self._full) + len(self._compact))
            if self._metrics is not None:
                self._metrics.attempt_log_dropped.inc(self._dropped)
            self._dropped = 0
        full, self._full = self._full, []
        compact, self._compact = self._compact, []
        counts = self._take_counts(final)
        total = len(full) + len(compact) + len(counts)
        if not total:
            return 0
        started = time.perf_counter()
        try:
            await self._write(full, compact, counts)
        except BaseException as exc:
            if isinstance(exc, Exception) and not transient(exc):
                log.error("attempt_log_write_failed", error=describe_error(exc), dropped=total)
                if self._metrics is not None:
                    self._metrics.attempt_log_dropped.inc(total)
                return 0
            # Kept for the next flush, or for close() when the writer was cancelled in the middle of the copy.
            self._full[:0] = full
            self._compact[:0] = compact
            self._put_back(counts)
            self._trim(self._full)
            self._trim(self._compact)
            raise
        if self._metrics is not None:
            self._metrics.attempt_log_write_duration.observe(time.perf_counter() - started)
            for form, rows in zip(ATTEMPT_LOG_FORMS, (full, compact, counts), strict=True):
                if rows:
                    self._metrics.attempt_log_rows_by_form[form].inc(len(rows))
        return total

    def _take_counts(self, final: bool) -> list[tuple[Any, ...]]:
        now = int(self._clock()) // 60
        done = [key for key in self._counts if final or key[0] < now]
        rows = []
        for key in done:
            n, total_ms, max_ms = self._counts.pop(key)
            rows.append((datetime.fromtimestamp(key[0] * 60, UTC), key[1], key[2], int(n), total_ms, max_ms))
        return rows

    def _put_back(self, rows: list[tuple[Any, ...]]) -> None:
        for minute, webhook_id, result, n, total_ms, max_ms in rows:
            key = (int(minute.timestamp()) // 60, webhook_id, result)
            count = self._counts.setdefault(key, [0, 0.0, 0.0])
            count[0] += n
            count[1] += total_ms
            count[2] = max(count[2], max_ms)

    async def _write(
        self, full: list[tuple[Any, ...]], compact: list[tuple[Any, ...]], counts: list[tuple[Any, ...]]
    ) -> None:
        batches = [(TABLES["full"], _FULL, full), (TABLES["compact"], _COMPACT, compact)]
        batches.append((TABLES["aggregate"], _COUNTS, counts))
        async with self._pool.acquire() as conn:
            for second_try in (False, True):
                try:
                    # One transaction: a batch is written whole or stays buffered whole.
                    async with conn.transaction():
                        for table, columns, rows in batches:
                            if rows:
                                await conn.copy_records_to_table(
                                    table, schema_name="webhookd", columns=columns, records=rows
                                )
                    return
                except asyncpg.CheckViolationError as exc:
                    # A day without its partition yet: past midnight before the keeper's round, or a database
                    # migrated days before the first daemon. Made now; a row no partition takes even then (a day
                    # older than the retention, or a clock far ahead) fails the batch for good, with its reason.
                    if second_try or not _no_partition(exc):
                        raise
                    try:
                        await keep(conn, self._retention)
                    except (*TRANSIENT, asyncpg.PostgresError) as busy:
                        raise PartitionPending(f"{exc}; making it failed: {busy}") from busy

    async def close(self, timeout: float) -> None:
        """Write what is buffered, the current minute's counts included, within `timeout`."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(final=True), timeout)
