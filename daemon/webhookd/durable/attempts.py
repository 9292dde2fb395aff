"""The attempt log: every HTTP attempt, kept in Postgres for operators, written with COPY in batches.

Adding an attempt only appends a tuple to a list; a background task copies the list to `webhookd.attempts` every
second, so the hot path never waits on Postgres. The log is for diagnosis, not for delivery, so nothing in it may
stop the daemon: if Postgres stays away long enough for the buffer to fill, the oldest entries are let go, and a
warning says how many; a batch Postgres refuses for good (a value it rejects, a permission or column taken away) is
let go with an error saying why, and the writer goes on with the next. Old attempts are pruned after the retention
period, in small batches so that no long lock or transaction builds up.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from webhookd.durable.outcomes import clean_text
from webhookd.durable.transient import TRANSIENT
from webhookd.model import AttemptResult, Delivery, Event

log = structlog.get_logger("webhookd.durable.attempts")

_COLUMNS = (
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
)
_EXCERPT = 300  # characters of an error or response body kept per attempt
_PRUNE = """
DELETE FROM webhookd.attempts WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM webhookd.attempts WHERE at < now() - make_interval(secs => $1) LIMIT 10000
))
"""


def transient(exc: BaseException) -> bool:
    """Whether copying the same rows again may succeed. asyncpg reports a value it cannot encode (an integer out of
    range) as a DataError that is also an InterfaceError, which TRANSIENT lists for connections that broke: that one
    would fail again forever, and is a ValueError too."""
    return isinstance(exc, TRANSIENT) and not isinstance(exc, ValueError)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class AttemptLog:
    """Buffers attempts and copies them to Postgres; `run` is the writer, `close` flushes what is left."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        retention_seconds: float,
        flush_interval: float = 1.0,
        max_buffered: int = 200_000,
        prune_interval: float = 600.0,
    ) -> None:
        self._pool = pool
        self._retention = retention_seconds
        self._flush_interval = flush_interval
        self._max_buffered = max_buffered
        self._prune_interval = prune_interval
        self._rows: list[tuple[Any, ...]] = []
        self._dropped = 0

    def add(self, delivery: Delivery, attempt: int, result: AttemptResult) -> None:
        error = result.describe() if not result.ok else None
        self._rows.append(
            (
                delivery.event_id,
                delivery.webhook.id,
                delivery.workspace_id,
                delivery.event_name,
                attempt,
                datetime.now(UTC),
                result.duration * 1000,
                result.result,
                result.status,
                clean_text(error[:_EXCERPT]) if error else None,
                delivery.source,
            )
        )
        self._trim()

    def add_filtered(self, event: Event, webhook_id: str, source: str, why: str) -> None:
        """A pair that a webhook's filter kept from being sent: attempt 0, result `filtered`, never a failure; it is
        here so that `deliveries show --event` can say why nothing went out."""
        self._rows.append(
            (
                event.id,
                webhook_id,
                event.workspace_id,
                event.name,
                0,
                datetime.now(UTC),
                0.0,
                "filtered",
                None,
                clean_text(why[:_EXCERPT]),
                source,
            )
        )
        self._trim()

    def _trim(self) -> None:
        if len(self._rows) > self._max_buffered:
            excess = len(self._rows) - self._max_buffered
            del self._rows[:excess]
            self._dropped += excess

    async def run(self) -> None:
        """The writer: flushes every `flush_interval` and prunes every `prune_interval`, until cancelled. No error
        of the log's own ends it: deliveries must not stop for want of diagnostics."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + 5.0
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception as exc:  # flush() raises only errors that may pass, its batch still buffered
                log.warning("attempt_log_write_retrying", error=_describe(exc), buffered=len(self._rows))
                continue
            if loop.time() < next_prune:
                continue
            try:
                await self.prune()
            except Exception as exc:
                if transient(exc):
                    log.warning("attempt_log_prune_retrying", error=_describe(exc))
                    continue  # at the next flush
                # Trying every second would only repeat the error; old attempts wait one more interval.
                log.error("attempt_log_prune_failed", error=_describe(exc), retry_in_seconds=self._prune_interval)
            next_prune = loop.time() + self._prune_interval

    async def flush(self) -> int:
        """Copy the buffered attempts to Postgres; returns how many.

        On a transient error the batch stays buffered and the error is raised. On any other the batch is let go, as
        it would fail again forever, with an `attempt_log_write_failed` error that says why; 0 is returned.
        """
        if self._dropped:
            log.warning("attempt_log_overflow", dropped=self._dropped, kept=len(self._rows))
            self._dropped = 0
        rows, self._rows = self._rows, []
        if not rows:
            return 0
        try:
            async with self._pool.acquire() as conn:
                await conn.copy_records_to_table("attempts", schema_name="webhookd", columns=_COLUMNS, records=rows)
        except BaseException as exc:
            if isinstance(exc, Exception) and not transient(exc):
                log.error("attempt_log_write_failed", error=_describe(exc), dropped=len(rows))
                return 0
            # Kept for the next flush, or for close() when the writer was cancelled in the middle of the copy.
            self._rows[:0] = rows
            self._trim()
            raise
        return len(rows)

    async def prune(self) -> int:
        """Delete attempts older than the retention period; returns how many went."""
        removed = 0
        while True:
            status = await self._pool.execute(_PRUNE, self._retention)
            count = int(status.rpartition(" ")[2])
            removed += count
            if count < 10000:
                break
        if removed:
            log.info("attempt_log_pruned", removed=removed)
        return removed

    async def close(self, timeout: float) -> None:
        """Write what is buffered, within `timeout`."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout)
