"""A Debezium `Change` of a workspace table -> the event Twenty's server would emit for it.

| op | Twenty's action |
| --- | --- |
| c | created |
| u | deleted when `deletedAt` went from null to a value (moved to trash), restored when it went back, else updated |
| d | destroyed |
| r | created, only with `twenty.snapshot_events: created`; skipped otherwise |

The record is the row after the change (before it, for destroyed) in Twenty's API shape: composite fields regrouped,
values decoded (`column_values`), nulls shown as Twenty's formatting shows them (`""` for text, `[]` for lists).
For every update (moves to and from the trash included, as Twenty's server does) `updatedFields` lists the fields,
not the columns, whose value changed, without `updatedAt` and `searchVector`, and a relation's join column with the
relation's name; an update that changed nothing else is skipped. Where the connector did not send
the row before the change (a flattened record, or a table without `REPLICA IDENTITY FULL`), it is left out, not
guessed. Debezium's placeholder for a value it did not read is never delivered: the value before the change stands
in where it was sent (an unchanged TOASTed column), and the key is left out where it was not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from webhookd.delivery.payload import TooDeep, javascript_json, js_iso_timestamp
from webhookd.intake.column_values import DEFAULT_PLACEHOLDER, Undecodable, is_unavailable, placeholder_base64
from webhookd.intake.debezium import Change, change_id
from webhookd.intake.native import usable_timestamp
from webhookd.intake.twenty_layout import ColumnPlan, ObjectLayout, WorkspaceLayout
from webhookd.model import BadEvent, Event, Skip

# Objects whose changes Twenty's server never sends to webhooks (its entity-events listener drops their batches).
_NOT_SENT_BY_TWENTY: Final = frozenset({"timelineActivity"})
# Changed on every write by Twenty itself: a change of these alone is no change a receiver asked about.
_BOOKKEEPING_FIELDS: Final = frozenset({"updatedAt", "searchVector"})
_DELETED_AT: Final = "deletedAt"


@dataclass(frozen=True)
class MappingSettings:
    """What the mapping needs from `twenty.*`."""

    snapshot_events: str = "skip"  # or "created"
    placeholder: str = DEFAULT_PLACEHOLDER
    placeholder_b64: str = field(init=False)  # how the placeholder reads in a bytes or precise-decimal column

    def __post_init__(self) -> None:
        object.__setattr__(self, "placeholder_b64", placeholder_base64(self.placeholder))


@dataclass(slots=True)  # one per record: not frozen, whose field-by-field object.__setattr__ costs half a µs
class Position:
    """Where the change record was read, for its id when the change has no LSN and its timestamp fallback."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


def to_event(
    change: Change, workspace: WorkspaceLayout, settings: MappingSettings, at: Position
) -> Event | Skip | BadEvent:
    """The Twenty event of one change of a workspace table."""
    placeholder, placeholder_b64 = settings.placeholder, settings.placeholder_b64
    layout = workspace.objects.get(change.table)
    if layout is None:
        where = f"{change.schema}.{change.table}"
        return BadEvent("unknown_table", f"{where}: no object of workspace {workspace.workspace_id} has this table")
    if layout.name_singular in _NOT_SENT_BY_TWENTY:
        return Skip("not_sent_by_twenty")
    op = change.op
    if op == "r" and settings.snapshot_events != "created":
        return Skip("snapshot")
    before, after = change.before, change.after
    if op == "d":
        assert before is not None
        action, row = "destroyed", before
    else:
        assert after is not None
        row = after
        action = "created" if op in "cr" else _update_action(before, after, placeholder, placeholder_b64)
    updated: tuple[str, ...] | None = None
    if op == "u":
        # Twenty's server lists them for moves to and from the trash too (`["deletedAt"]`).
        updated = _updated_fields(layout, before, after, placeholder, placeholder_b64)
        if updated is not None and not updated:
            return Skip("unchanged")
    plans = layout.columns
    try:
        record = _record(layout, row, before if op == "u" else None, change, placeholder, placeholder_b64)
        # Decoded values are already what JavaScript writes; only a record with other values needs looking at.
        ready = row.keys() <= plans.keys() and layout.unready.isdisjoint(row)
        data = orjson.dumps(record) if ready else javascript_json(record)
    except _BadColumn as exc:
        return BadEvent("undecodable", f"{change.schema}.{change.table}.{exc.column}: {exc.reason}")
    except TooDeep as exc:
        return BadEvent("too_deep", f"{change.schema}.{change.table}: {exc}")
    except (ValueError, TypeError) as exc:
        where = f"{change.schema}.{change.table}"
        return BadEvent("unserializable", f"{where}: the record cannot be written as JSON: {exc}")
    kafka_ms = usable_timestamp(at.timestamp_ms)  # a producer's CreateTime can be anything, -1 included
    timestamp_ms = change.ts_ms if change.ts_ms is not None else kafka_ms
    if timestamp_ms is None:
        where = f"{change.schema}.{change.table}"
        return BadEvent("missing_field", f"{where}: neither `source.ts_ms` nor a Kafka timestamp says when")
    try:
        timestamp = js_iso_timestamp(timestamp_ms)
    except ValueError as exc:
        return BadEvent("invalid_field", f"{change.schema}.{change.table}: `source.ts_ms` {exc}")
    key = row.get("id")
    return Event(
        id=change_id(change, str(key) if key is not None else "", at.topic, at.partition, at.offset),
        name=f"{layout.name_singular}.{action}",
        workspace_id=workspace.workspace_id,
        timestamp=timestamp,
        data=data,
        kafka_timestamp_ms=kafka_ms,
        updated_fields=updated,
        object_id=layout.object_id,
    )


def _update_action(before: dict[str, Any] | None, after: dict[str, Any], placeholder: str, placeholder_b64: str) -> str:
    now = after.get(_DELETED_AT)
    was: Any = ...  # unknown
    if before is not None and _DELETED_AT in before:
        was = before[_DELETED_AT]
        if is_unavailable(was, placeholder, placeholder_b64):
            was = ...
    if was is ...:
        # Without the row before, a trashed row is taken as moved to trash now: Twenty edits no trashed record.
        return "deleted" if now is not None else "updated"
    if was is None and now is not None:
        return "deleted"
    if was is not None and now is None:
        return "restored"
    return "updated"


def _updated_fields(
    layout: ObjectLayout,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    placeholder: str,
    placeholder_b64: str,
) -> tuple[str, ...] | None:
    """The fields whose value changed; None where the row before the change is not fully known."""
    if before is None or after is None:
        return None
    changed: dict[str, None] = {}
    plans = layout.columns
    for column, new in after.items():
        if column not in before:
            return None  # replica identity not FULL: only the key was sent
        old = before[column]
        # Debezium compares nothing; its encodings are the same on both sides, so equal text means an equal value.
        if old == new or is_unavailable(new, placeholder, placeholder_b64):
            continue
        if is_unavailable(old, placeholder, placeholder_b64):
            return None
        plan = plans.get(column)
        if plan is None:
            changed[column] = None
        elif plan.if_null is not None and _same_for_twenty(plan, old, new):
            continue
        elif plan.field not in _BOOKKEEPING_FIELDS:
            if plan.relation is not None:
                changed[plan.relation] = None  # Twenty names both the relation and its join column
            changed[plan.field] = None
    return tuple(changed)


def _same_for_twenty(plan: ColumnPlan, old: Any, new: Any) -> bool:
    """Whether a null and a value are one to Twenty, which compares records after formatting: a null text is ""
    and a null list is [], so a null that became "" (or the reverse) changed nothing a receiver sees."""
    if old is not None and new is not None:
        return False
    value = new if old is None else old
    try:
        decoded = plan.decode(value) if plan.decode is not None else value
    except Undecodable:
        return False
    return bool(decoded == plan.if_null)


class _BadColumn(Exception):
    def __init__(self, column: str, reason: str) -> None:
        super().__init__(column, reason)
        self.column = column
        self.reason = reason


def _record(
    layout: ObjectLayout,
    row: dict[str, Any],
    before: dict[str, Any] | None,
    change: Change,
    placeholder: str,
    placeholder_b64: str,
) -> dict[str, Any]:
    record: dict[str, Any] = {}
    plans = layout.columns
    schemas = change.column_schemas
    for column, value in row.items():
        # This runs for every column of every change: `is_unavailable`'s tests inline, the common ones first.
        kind = type(value)
        if (kind is str and value in (placeholder, placeholder_b64)) or (
            (kind is list or kind is dict) and is_unavailable(value, placeholder, placeholder_b64)
        ):
            # Unchanged and not read by the connector: the value before the change is the same value.
            value = before.get(column) if before is not None else None
            if value is None or is_unavailable(value, placeholder, placeholder_b64):
                continue
        plan = plans.get(column)
        if plan is None:
            record[column] = value
            continue
        if value is None:
            value = plan.if_null
        else:
            decode = plan.decode
            if schemas is not None and plan.setting_dependent:
                decode = plan.decoder(schemas.get(column))
            if decode is not None:
                try:
                    value = decode(value)
                except Undecodable as exc:
                    raise _BadColumn(column, f"{plan.pg_type}: {exc}") from None
        sub = plan.sub
        if sub is None:
            record[plan.field] = value
        else:
            group = record.get(plan.field)
            if group is None:
                record[plan.field] = {sub: value}
            else:
                group[sub] = value
    return record
