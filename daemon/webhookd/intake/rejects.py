"""Records that become no delivery: skips counted by reason, and bad events kept in Postgres for an operator.

A bad event's record is finished (its offset may be committed) only once it is written: its write is a task of its
own, tracked here so that backpressure counts it, a shutdown waits for it, and a write that fails for good stops
the daemon instead of holding the partition's commit point forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from aiokafka import ConsumerRecord, TopicPartition

from webhookd.durable.outcomes import BadRecord, OutcomeWriter
from webhookd.model import BadEvent, Skip
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.intake.rejects")


class Rejects:
    """Counts skipped records and writes bad ones; `writing` is how many writes are under way."""

    def __init__(self, outcomes: OutcomeWriter, metrics: Metrics, on_fatal: Callable[[BaseException], None]) -> None:
        self._outcomes = outcomes
        self._metrics = metrics
        self._on_fatal = on_fatal  # the failures of the writes started here, which nobody else awaits
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def writing(self) -> int:
        return len(self._writes)

    def skipped(self, skip: Skip) -> None:
        self._metrics.skips_by_reason[skip.reason].inc()  # every SkipReason has its counter

    def keep(self, tp: TopicPartition, record: ConsumerRecord, bad: BadEvent, finished: Callable[[], None]) -> None:
        """Count, log and write the bad event; `finished` once it is written."""
        self._metrics.events_invalid.labels(bad.reason).inc()
        log.warning(
            "bad_event",
            topic=tp.topic,
            partition=tp.partition,
            offset=record.offset,
            reason=bad.reason,
            detail=bad.detail,
        )
        kept = BadRecord(tp.topic, tp.partition, record.offset, f"{bad.reason}: {bad.detail}", record.value or b"")

        async def keep() -> None:
            await self._outcomes.bad_event(kept)
            finished()

        task = asyncio.create_task(keep())
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        # The writer retries what may pass; what reaches here will not, and the record can never be committed past.
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._on_fatal(exc)

    async def wait(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes))
