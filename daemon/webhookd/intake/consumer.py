"""Kafka group membership, the fetch loop with backpressure, and offset commits.

The loop reads records, has each one decoded, matched and handed to the dispatcher, and commits, per partition, the
contiguous prefix of records whose deliveries are all settled. When too many deliveries are unsettled it stops
taking records until a quarter of the room is free again (woken by the records that settle), so memory stays bounded
however large the backlog. It does not poll meanwhile: a poll of paused partitions throws away what aiokafka had
prefetched, to be fetched again. Only a pipeline full for longer than `_MEMBERSHIP_POLL_SECONDS` polls its paused
partitions, so that the group never mistakes a busy member for a dead one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from webhookd.delivery.body_formats import BodyFormat
from webhookd.delivery.dispatch import Dispatcher
from webhookd.durable.outcomes import OutcomeWriter
from webhookd.intake.offsets import PartitionOffsets
from webhookd.intake.readers import NeedsLayout, RecordReader
from webhookd.intake.rejects import Rejects
from webhookd.intake.topics import TopicSelection
from webhookd.model import BadEvent, Delivery, Event, Skip
from webhookd.routing.router import Router
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.intake.consumer")

_COMMIT_TIMEOUT = 10.0
# The group counts a member that has not polled for max_poll_interval_ms (5 minutes) as gone.
_MEMBERSHIP_POLL_SECONDS = 30.0
# The `partition` label of the one lag series of all the topics that only kafka.topic_pattern names.
_ALL_PARTITIONS = "all"
# How often a full pipeline looks again without being woken (for room freed by bad-event writes, and for `stopping`).
_ROOM_CHECK_SECONDS = 0.2


@dataclass(frozen=True)
class ConsumeSettings:
    """What the loop needs from the configuration."""

    max_pending: int  # unsettled first attempts before fetching pauses
    max_tracked: int  # records between the commit point and the newest one read, across partitions
    max_poll_records: int
    commit_interval: float
    revoke_timeout: float


class Consumer:
    """Owns the AIOKafkaConsumer from start to stop."""

    def __init__(
        self,
        kafka: AIOKafkaConsumer,
        topics: TopicSelection,
        reader: RecordReader,
        body_format: BodyFormat,
        dispatcher: Dispatcher,
        router: Router,
        outcomes: OutcomeWriter,
        metrics: Metrics,
        settings: ConsumeSettings,
        *,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self._kafka = kafka
        self._topics = topics
        self._reader = reader
        self._body_format = body_format
        self._dispatcher = dispatcher
        self._router = router
        self._metrics = metrics
        self._settings = settings
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}
        self._rejects = Rejects(outcomes, metrics, on_fatal)
        self._paused = False
        self._room_freed = asyncio.Event()
        self._waiting_for_room = False
        self.last_poll = 0.0  # loop time of the last fetch (or of the start), for /healthz
        self.consuming = False  # True once the group gave us an assignment, for /readyz
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        pattern = self._topics.pattern()
        if pattern is None:
            self._kafka.subscribe(list(self._topics.topics), listener=_Rebalance(self))
        else:
            self._kafka.subscribe(pattern=pattern, listener=_Rebalance(self))
        await self._kafka.start()
        # The loop is about to start: until its first fetch returns, /healthz must count from now, not from zero.
        self.last_poll = asyncio.get_running_loop().time()

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and hand out records until `stopping` is set; then return, leaving in-flight work running."""
        self._stopping = stopping
        loop = asyncio.get_running_loop()
        next_commit = loop.time() + self._settings.commit_interval
        last_fetch = loop.time()
        while not stopping.is_set():
            room = self._room()
            if room <= 0:
                await self._wait_for_room()
                if loop.time() - last_fetch >= _MEMBERSHIP_POLL_SECONDS:
                    self._set_paused(True)
                    await self._kafka.getmany(timeout_ms=0)  # returns nothing: every partition is paused
                    last_fetch = loop.time()
            else:
                self._set_paused(False)
                batch = await self._kafka.getmany(
                    timeout_ms=200, max_records=max(1, min(self._settings.max_poll_records, room))
                )
                last_fetch = loop.time()
                for tp, records in batch.items():
                    offsets = self._partitions.get(tp)
                    if offsets is None:  # fetched just before a revocation; the new owner reads it again
                        continue
                    for record in records:
                        await self._handle(tp, offsets, record)
            self.last_poll = loop.time()
            if loop.time() >= next_commit:
                await self.commit()
                self._update_lag()
                next_commit = loop.time() + self._settings.commit_interval

    async def _wait_for_room(self) -> None:
        """Until a quarter of the pending budget is free (or a short while has passed)."""
        self._room_freed.clear()
        self._waiting_for_room = True
        try:
            await asyncio.wait_for(self._room_freed.wait(), _ROOM_CHECK_SECONDS)
        except TimeoutError:
            pass
        finally:
            self._waiting_for_room = False

    def _settled(self, offsets: PartitionOffsets, offset: int) -> Callable[[], None]:
        def settled() -> None:
            offsets.finished(offset)
            if self._waiting_for_room and self._room() >= max(1, self._settings.max_pending // 4):
                self._room_freed.set()

        return settled

    def _room(self) -> int:
        """How many more records may be taken now.

        Unsettled deliveries bound the work; bad events waiting for their write and the records tracked behind an
        unfinished one bound the memory, should Postgres stall while records without subscribers keep flowing.
        """
        busy = self._dispatcher.pending + self._rejects.writing
        tracked = sum(o.tracked for o in self._partitions.values())
        return min(self._settings.max_pending - busy, self._settings.max_tracked - tracked)

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        assigned = list(self._kafka.assignment())
        if paused:
            self._kafka.pause(*assigned)
            log.debug("fetch_paused", pending=self._dispatcher.pending)
        else:
            self._kafka.resume(*assigned)

    async def _handle(self, tp: TopicPartition, offsets: PartitionOffsets, record: ConsumerRecord) -> None:
        offsets.started(record.offset)
        self._metrics.events_consumed.labels(self._topics.label(tp.topic)).inc()
        event = self._read(tp, record)
        if isinstance(event, NeedsLayout):
            # Rare: a workspace's first change, or a table or column added since its layout was read.
            await self._keeping_membership(self._reader.load(event, self._stopping))
            event = self._read(tp, record)
            if isinstance(event, NeedsLayout):  # the layout was read, and is already outdated again
                event = BadEvent("layout_changing", f"the layout of schema {event.schema} changed while read")
        if isinstance(event, BadEvent):
            self._rejects.keep(tp, record, event, lambda: offsets.finished(record.offset))
            return
        if isinstance(event, Skip):
            self._rejects.skipped(event)
            offsets.finished(record.offset)
            return
        self._dispatch(tp, offsets, record, event)

    def _read(self, tp: TopicPartition, record: ConsumerRecord) -> Event | Skip | BadEvent | NeedsLayout:
        try:
            return self._reader.read(record.value, tp.topic, tp.partition, record.offset, record.timestamp)
        except Exception as exc:
            # A reader's own defect must cost one record, kept for an operator, not the partition: raised out of
            # here, it would stop the daemon, and the same record would stop it again after every restart.
            log.exception("record_unreadable", topic=tp.topic, partition=tp.partition, offset=record.offset)
            return BadEvent("unreadable", f"reading the record failed: {type(exc).__name__}: {exc}"[:500])

    async def _keeping_membership(self, work: Awaitable[None]) -> None:
        """Await `work` (a layout read from Postgres, which may be down) without leaving the group meanwhile."""
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        waited_since = loop.time()
        while True:
            done, _ = await asyncio.wait({task}, timeout=_ROOM_CHECK_SECONDS)
            if done:
                self._set_paused(False)
                task.result()
                return
            self.last_poll = loop.time()  # alive, and waiting on purpose: /healthz must not restart the pod
            if loop.time() - waited_since >= _MEMBERSHIP_POLL_SECONDS:
                self._set_paused(True)
                await self._kafka.getmany(timeout_ms=0)  # returns nothing: every partition is paused
                waited_since = loop.time()

    def _dispatch(self, tp: TopicPartition, offsets: PartitionOffsets, record: ConsumerRecord, event: Event) -> None:
        source = f"{tp.topic}:{tp.partition}:{record.offset}"
        webhooks, order_keys = self._router.route(event, source)
        if not webhooks:
            offsets.finished(record.offset)
            return
        deliveries = [
            Delivery(
                event_id=event.id,
                event_name=event.name,
                workspace_id=event.workspace_id,
                webhook=webhook,
                body=body,
                kafka_timestamp_ms=event.kafka_timestamp_ms,
                source=source,
            )
            for webhook, body in zip(webhooks, self._body_format.bodies(event, webhooks), strict=True)
        ]
        if order_keys is not None:  # only where a webhook keeps its records' order
            for delivery, key in zip(deliveries, order_keys, strict=True):
                if key is not None:
                    delivery.order_key, delivery.order_pos = key, record.offset
        self._dispatcher.submit(deliveries, self._settled(offsets, record.offset))

    async def commit(self, only: set[TopicPartition] | None = None) -> str | None:
        """Commit each partition's settled prefix (of the partitions in `only`, if given).

        Returns None once every position it meant to commit is committed (or there was none), else why not.
        """
        positions: dict[TopicPartition, int] = {}
        for tp, offsets in self._partitions.items():
            if (only is None or tp in only) and offsets.needs_commit():
                position = offsets.commit_position()
                assert position is not None
                positions[tp] = position
        if not positions:
            return None
        try:
            # Bounded: aiokafka waits for a coordinator as long as the broker is away, and the loop must go on.
            await asyncio.wait_for(self._kafka.commit(positions), _COMMIT_TIMEOUT)
        except TimeoutError:
            error = f"no answer from Kafka within {_COMMIT_TIMEOUT:g} s"
            log.warning("commit_failed", error=error)
            return error
        except (CommitFailedError, KafkaError) as exc:
            # The group moved on (a rebalance is under way); the next owner starts from the last good commit.
            error = str(exc) or type(exc).__name__
            log.warning("commit_failed", error=error)
            return error
        for tp, position in positions.items():
            still_ours = self._partitions.get(tp)  # a rebalance may have taken the partition while we waited
            if still_ours is not None:
                still_ours.committed = position
        return None

    def _update_lag(self) -> None:
        # A topic_pattern that matches a new topic replaces aiokafka's assignment before our revocation callback
        # runs; until then a partition we still track may no longer be assigned, and has no high watermark.
        assigned = self._kafka.assignment()
        matched = 0  # the lag of the topics only the pattern names, one series for all of them
        for tp, offsets in self._partitions.items():
            if tp not in assigned:
                continue
            highwater = self._kafka.highwater(tp)
            position = offsets.committed if offsets.committed is not None else offsets.commit_position()
            if highwater is not None and position is not None:
                lag = max(highwater - position, 0)
                if tp.topic in self._topics.topics:
                    self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
                else:
                    matched += lag
        if self._topics.topic_pattern is not None:
            self._metrics.consumer_lag.labels(self._topics.topic_pattern, _ALL_PARTITIONS).set(matched)

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions are leaving us: let their deliveries settle (within the timeout), commit, forget them."""
        ours = {tp for tp in partitions if tp in self._partitions}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.revoke_timeout
        while any(self._partitions[tp].in_flight for tp in ours) and loop.time() < deadline:  # noqa: ASYNC110
            # Counts change in the callbacks of many tasks; polling only while a rebalance waits is simpler than an
            # event per partition on the hot path.
            await asyncio.sleep(0.05)
        await self.commit(ours)
        for tp in ours:
            self._partitions.pop(tp).revoked = True
            if tp.topic in self._topics.topics:
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in ours))

    def assigned(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions.setdefault(tp, PartitionOffsets())
        if self._paused:
            self._kafka.pause(*partitions)
        self.consuming = True
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))

    async def wait_bad_writes(self) -> None:
        await self._rejects.wait()

    async def stop(self) -> None:
        try:
            await self._kafka.stop()
        except asyncio.CancelledError:
            # aiokafka's fetcher, closed while a fetch waits to be tried again (the broker is away), awaits the fetch
            # it has just cancelled and lets that CancelledError out (aio-libs/aiokafka#647), before the client is
            # closed. Only a cancellation of this task itself may pass; otherwise the shutdown must go on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.warning("kafka_stop_incomplete", error="a fetch was cancelled under aiokafka's own stop")
            await self._kafka._client.close()  # what stop() did not reach; it would otherwise reconnect forever


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type information
    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._consumer.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._consumer.assigned(set(assigned))
