"""Kafka records read again by their position (topic, partition, offset), as the attempt log's `source` names them,
for `deliveries replay`: outside any consumer group, bounded in time, and never an exception for a record that Kafka
no longer holds (retention passed, the topic recreated, truncated or compacted), only the reason, per position.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from webhookd.operate.output import UsageError
from webhookd.runtime.config import Settings
from webhookd.runtime.tls import TLSError, transport

# A wanted offset this far past the position is sought rather than read up to: reading is cheaper than a new fetch
# only while the records in between are few.
_SKIP_AHEAD = 1000


@dataclass(frozen=True, slots=True)
class Where:
    """A Kafka record's position, as the attempt log's `source` names it."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


def parse_source(source: str | None) -> Where | None:
    """`topic:partition:offset` as a Where; None for NULL (written before webhookd recorded it) or anything else."""
    if not source:
        return None
    topic, _, rest = source.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    try:
        where = Where(topic, int(partition), int(rest))
    except ValueError:
        return None
    return where if topic and where.partition >= 0 and where.offset >= 0 else None


@dataclass(slots=True)
class Fetched:
    """Records read, positions Kafka no longer has (and why), positions not read (and why)."""

    records: dict[Where, ConsumerRecord] = field(default_factory=dict)
    gone: dict[Where, str] = field(default_factory=dict)
    unread: dict[Where, str] = field(default_factory=dict)


async def fetch_records(settings: Settings, positions: Iterable[Where], timeout: float, *, records: bool) -> Fetched:
    """Whether Kafka still has these records and, with `records`, the records: never an exception; what is gone or
    could not be read within `timeout` seconds is said in the answer."""
    wanted = set(positions)
    fetched = Fetched()
    try:
        security = transport(settings).kafka
    except TLSError as exc:
        raise UsageError(str(exc)) from None
    servers = list(settings.kafka.bootstrap_servers)
    admin = AIOKafkaAdminClient(bootstrap_servers=servers, client_id=settings.kafka.client_id, **security)
    # No group: a replay reads where it is told and commits nothing, beside the daemons' group.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        client_id=settings.kafka.client_id,
        group_id=None,
        enable_auto_commit=False,
        # An offset that retention removed between the check and the fetch must fail, not read from elsewhere.
        auto_offset_reset="none",
        **security,
    )
    why: str | None = None
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            # Every topic, never some by name: asking a broker for a missing topic by name may create it.
            described = await admin.describe_topics()
            partitions = {
                t["topic"]: {p["partition"] for p in t["partitions"]} for t in described if not t["error_code"]
            }
            await consumer.start()
            left = await _available(consumer, partitions, wanted, fetched)
            if records and left:
                await _read(consumer, left, fetched)
    except TimeoutError:
        why = f"not read from Kafka within {timeout:g} s (--kafka-timeout)"
    except (KafkaError, OSError) as exc:
        why = f"Kafka at {','.join(settings.kafka.bootstrap_servers)} failed: {exc or type(exc).__name__}"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), 5)
    if why is not None:
        fetched.unread = {w: why for w in wanted if w not in fetched.records and w not in fetched.gone}
    return fetched


async def _available(
    consumer: Any, partitions: dict[str, set[int]], wanted: Collection[Where], fetched: Fetched
) -> dict[Any, list[int]]:
    """The wanted offsets still to read, ascending by partition (assigned, each sought to its first): those that
    Kafka no longer holds go to `fetched.gone`, those that a first fetch brought along to `fetched.records`."""
    by_partition: dict[Any, list[int]] = {}
    for where in wanted:
        by_partition.setdefault(TopicPartition(where.topic, where.partition), []).append(where.offset)
    present = []
    for tp, offsets in by_partition.items():
        if tp.topic not in partitions:
            why = f"topic {tp.topic} does not exist any more"
        elif tp.partition not in partitions[tp.topic]:
            why = f"topic {tp.topic} has no partition {tp.partition}"
        else:
            present.append(tp)
            continue
        fetched.gone.update({Where(tp.topic, tp.partition, o): why for o in offsets})
    if not present:
        return {}
    first = await consumer.beginning_offsets(present)
    listed_end = await consumer.end_offsets(present)
    left: dict[Any, list[int]] = {}
    for tp in present:
        for offset in sorted(by_partition[tp]):
            if offset < first[tp]:
                fetched.gone[Where(tp.topic, tp.partition, offset)] = _retention_passed(first[tp])
            else:
                left.setdefault(tp, []).append(offset)
    if not left:
        return left
    # The listed end only bounds where a first fetch starts (beyond it a broker refuses the fetch): some brokers list
    # less than they hold (Tansu lists where a partition's last batch starts). The high watermark that fetch answers
    # with is the end.
    consumer.assign(list(left))
    for tp, offsets in left.items():
        consumer.seek(tp, min(offsets[-1], listed_end[tp]))
    waiting = set(left)
    while waiting:
        _keep(await consumer.getmany(*waiting, timeout_ms=200), left, fetched)
        waiting = {tp for tp in waiting if consumer.highwater(tp) is None}
    for tp in list(left):
        end = consumer.highwater(tp)
        for offset in left[tp]:
            if offset >= end:
                fetched.gone[Where(tp.topic, tp.partition, offset)] = (
                    f"the partition ends before it (at offset {end}): the topic was recreated or truncated"
                )
        rest = [o for o in left[tp] if o < end and Where(tp.topic, tp.partition, o) not in fetched.records]
        _next(consumer, tp, left, rest)
    return left


def _retention_passed(first: int) -> str:
    return f"the partition now starts at offset {first}: the topic's retention removed this record"


def _keep(batches: dict[Any, list[ConsumerRecord]], left: dict[Any, list[int]], fetched: Fetched) -> None:
    for tp, records in batches.items():
        wanted = set(left.get(tp, ()))
        for record in records:
            if record.offset in wanted:
                fetched.records[Where(tp.topic, tp.partition, record.offset)] = record


async def _read(consumer: Any, left: dict[Any, list[int]], fetched: Fetched) -> None:
    """Read each partition forward from its smallest wanted offset past its largest, keeping the wanted records;
    `_available` has assigned them and sought each to its smallest."""
    while left:
        try:
            batches = await consumer.getmany(*left, timeout_ms=500)
        except OffsetOutOfRangeError:
            # Retention moved a partition's start past a wanted offset since it was checked.
            first = await consumer.beginning_offsets(list(left))
            for tp in list(left):
                for offset in [o for o in left[tp] if o < first[tp]]:
                    fetched.gone[Where(tp.topic, tp.partition, offset)] = _retention_passed(first[tp])
                _next(consumer, tp, left, [o for o in left[tp] if o >= first[tp]])
            continue
        _keep(batches, left, fetched)
        for tp in list(left):
            position = await consumer.position(tp)
            for offset in (o for o in left[tp] if o < position):
                where = Where(tp.topic, tp.partition, offset)
                if where not in fetched.records:
                    fetched.gone[where] = "no record at this offset any more (compacted away?)"
            rest = [o for o in left[tp] if o >= position]
            if rest and rest[0] - position <= _SKIP_AHEAD:
                left[tp] = rest  # read on from here
            else:
                _next(consumer, tp, left, rest)


def _next(consumer: Any, tp: Any, left: dict[Any, list[int]], rest: list[int]) -> None:
    """Go on with `rest` of a partition from its first offset, or stop fetching the partition when none is left."""
    if rest:
        left[tp] = rest
        consumer.seek(tp, rest[0])
    else:
        del left[tp]
        consumer.pause(tp)
