"""Per-webhook filters, compiled, and their evaluation: which of the events a webhook subscribes to it receives.

`WebhookFilter.rejects` says why an event is not for a webhook (an update that changed none of its fields, or a
record a predicate does not hold for), reading the event's record through `LazyRecord`: parsed at most once per
event, and only if a predicate asks. The language itself, its meaning and its limits are described in
`webhookd.routing.filter_parsing`, which builds these from a webhook's stored text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import orjson

FilterReason = Literal["updated_fields", "record"]
FILTER_REASONS: tuple[FilterReason, ...] = ("updated_fields", "record")

Op = Literal["=", "in", "is null", "is not null"]
Scalar = str | int | float | bool | None

_UNPARSED: Final = object()


@dataclass(frozen=True, slots=True)
class Predicate:
    """One `where` predicate, compiled: its path as a tuple of keys and its values split by JSON type.

    Splitting by type is what keeps equality strict without building a tagged pair per check: a record value is
    looked up only among the values of its own type, so `True` never meets `1` (which Python holds equal).
    """

    text: str  # canonical: parses to an equal predicate, and is what `describe` shows
    path: tuple[str, ...]
    op: Op
    values: tuple[Scalar, ...] = ()  # as parsed, in order: one for `=`, 1 to 100 for `in`
    strings: frozenset[str] = field(default=frozenset(), repr=False)
    numbers: frozenset[int | float] = field(default=frozenset(), repr=False)
    booleans: frozenset[bool] = field(default=frozenset(), repr=False)
    null: bool = field(default=False, repr=False)  # whether null (and so a missing key) is among the values
    negated: bool = field(default=False, repr=False)  # `is not null`, compiled as the negation of `is null`

    def holds(self, record: object) -> bool:
        value = record
        for key in self.path:
            if type(value) is not dict:
                value = None
                break
            value = value.get(key)
        kind = type(value)
        if kind is str:
            found = value in self.strings
        elif kind is int or kind is float:
            found = value in self.numbers
        elif kind is bool:
            found = value in self.booleans
        elif value is None:
            found = self.null
        else:  # an object or an array equals no scalar
            found = False
        return found != self.negated


@dataclass(frozen=True, slots=True)
class WebhookFilter:
    """What a webhook wants of the events it subscribes to; the default rejects nothing."""

    updated_fields: frozenset[str] | None = None
    where: tuple[Predicate, ...] = ()

    @property
    def needs_record(self) -> bool:
        return bool(self.where)

    def rejects(self, action: str, updated_fields: tuple[str, ...] | None, record: LazyRecord) -> FilterReason | None:
        """Why the event is not for this webhook, or None when it is; the record is parsed only if a predicate asks."""
        wanted = self.updated_fields
        # An empty set would drop every update; it is read as "no condition", as build_filter makes it.
        if wanted and updated_fields is not None and action == "updated" and wanted.isdisjoint(updated_fields):
            return "updated_fields"
        if self.where:
            value = record.value
            for predicate in self.where:
                if not predicate.holds(value):
                    return "record"
        return None

    def describe(self) -> list[str]:
        lines = []
        if self.updated_fields:
            lines.append(f"updatedFields has any of: {', '.join(sorted(self.updated_fields))}")
        lines.extend(f"where {predicate.text}" for predicate in self.where)
        return lines


class LazyRecord:
    """The event's record (its `data` JSON bytes), parsed with orjson at most once, on first use, shared by every
    webhook of one event."""

    __slots__ = ("_data", "_value")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._value: object = _UNPARSED

    @property
    def value(self) -> object:
        value = self._value
        if value is _UNPARSED:
            try:
                value = orjson.loads(self._data)
            except orjson.JSONDecodeError:
                # Events are validated before they get here; a filter must never be what fails a delivery.
                value = {}
            self._value = value
        return value
