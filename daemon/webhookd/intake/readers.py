"""The record reader `kafka.input_format` chooses: one Kafka record -> an Event, a Skip, a BadEvent, or a request
to load a workspace's layout first.

Reading stays synchronous on the consume loop's hot path; only a workspace seen for the first time (or a table or
column its layout does not know yet) sends the loop to Postgres, through `NeedsLayout`, before it reads that record
again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Protocol

from webhookd.intake.debezium import Change, WrappedSchemas, read_change
from webhookd.intake.native import decode
from webhookd.intake.twenty_catalog import NotTwenty, TwentyCatalog
from webhookd.intake.twenty_events import MappingSettings, Position, to_event
from webhookd.intake.twenty_layout import schema_for_workspace
from webhookd.model import BadEvent, Event, Skip
from webhookd.runtime.config import Settings


@dataclass(frozen=True, slots=True)
class NeedsLayout:
    """The record can be read once this workspace schema's layout is loaded."""

    schema: str
    table: str | None = None  # the table the record changed
    columns: frozenset[str] = frozenset()  # the columns of the row it carries


class RecordReader(Protocol):
    """Reads one record's value at its position."""

    def read(
        self, value: bytes | None, topic: str, partition: int, offset: int, timestamp_ms: int | None
    ) -> Event | Skip | BadEvent | NeedsLayout: ...

    async def load(self, needs: NeedsLayout, stopping: asyncio.Event) -> None: ...


class NativeReader:
    """Records in the contract's own JSON format.

    With a catalog (the `twenty` body format), an event of a workspace whose metadata is in this database gets its
    object's metadata id, as Twenty's own body has it.
    """

    def __init__(self, max_bytes: int, catalog: TwentyCatalog | None = None) -> None:
        self._max_bytes = max_bytes
        self._catalog = catalog

    def read(
        self, value: bytes | None, topic: str, partition: int, offset: int, timestamp_ms: int | None
    ) -> Event | Skip | BadEvent | NeedsLayout:
        event = decode(
            value, topic=topic, partition=partition, offset=offset, timestamp_ms=timestamp_ms, max_bytes=self._max_bytes
        )
        if self._catalog is None or not isinstance(event, Event):
            return event
        schema = schema_for_workspace(event.workspace_id)
        layout = self._catalog.cached(schema)
        if layout is None:
            return NeedsLayout(schema)
        if isinstance(layout, NotTwenty):
            return event
        obj = layout.by_name.get(event.object_and_action[0])
        return event if obj is None else dataclasses.replace(event, object_id=obj.object_id)

    async def load(self, needs: NeedsLayout, stopping: asyncio.Event) -> None:
        assert self._catalog is not None
        await self._catalog.load(needs.schema, stopping)


class DebeziumReader:
    """Debezium's change records of Twenty's workspace tables, read as Twenty's events."""

    def __init__(self, max_bytes: int, catalog: TwentyCatalog, settings: MappingSettings) -> None:
        self._max_bytes = max_bytes
        self._catalog = catalog
        self._settings = settings
        self._schemas = WrappedSchemas()

    def read(
        self, value: bytes | None, topic: str, partition: int, offset: int, timestamp_ms: int | None
    ) -> Event | Skip | BadEvent | NeedsLayout:
        if value is not None and len(value) > self._max_bytes:
            return BadEvent(
                "too_large", f"the record is {len(value)} bytes; delivery.max_event_bytes is {self._max_bytes}"
            )
        change = read_change(value, topic, self._schemas)
        if not isinstance(change, Change):
            return change
        layout = self._catalog.cached(change.schema)
        if layout is None:
            return NeedsLayout(change.schema)
        if isinstance(layout, NotTwenty):
            return Skip("not_twenty")
        if self._catalog.outdated(layout, change):
            # A custom object or field added since it was read.
            row = change.after if change.after is not None else change.before
            return NeedsLayout(change.schema, change.table, frozenset(row or ()))
        return to_event(change, layout, self._settings, Position(topic, partition, offset, timestamp_ms))

    async def load(self, needs: NeedsLayout, stopping: asyncio.Event) -> None:
        await self._catalog.load(needs.schema, stopping, for_table=needs.table, for_columns=needs.columns)


def reader_for(settings: Settings, catalog: TwentyCatalog) -> RecordReader:
    """The reader `kafka.input_format` chooses, built as the daemon builds it, so that a record read again (by
    `deliveries replay`) becomes the very event the daemon made of it."""
    if settings.kafka.input_format == "debezium":
        mapping = MappingSettings(settings.twenty.snapshot_events, settings.twenty.unavailable_value_placeholder)
        return DebeziumReader(settings.delivery.max_event_bytes, catalog, mapping)
    # Twenty's body names the object's metadata id, which only the catalog knows.
    twenty_body = settings.delivery.body_format == "twenty"
    return NativeReader(settings.delivery.max_event_bytes, catalog if twenty_body else None)
