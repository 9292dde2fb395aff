"""Twenty's layout of one workspace: which table is which object, and which columns make up which field.

Twenty keeps each workspace in a schema of its own, `workspace_<base36 of the workspace id>`, with a table per
object (`person`; a custom object's table starts with `_`: `_pet`). A composite field spans several columns named
field + sub-field (`name` -> `nameFirstName`, `nameLastName`); its object and field metadata say which. This module
turns the rows read from the catalog (`twenty_catalog`) into plans that `twenty_events` follows for every change,
so that the per-record work is a lookup per column.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from webhookd.intake.column_values import Decoder, NumericAs, decoder_for

WORKSPACE_SCHEMA_PREFIX: Final = "workspace_"
# Twenty's composite field types: each stores its sub-fields in columns of their own.
COMPOSITE_TYPES: Final = frozenset(
    {"FULL_NAME", "CURRENCY", "ADDRESS", "LINKS", "EMAILS", "PHONES", "ACTOR", "RICH_TEXT_V2", "RICH_TEXT"}
)
# Twenty's relation field types; a MANY_TO_ONE side keeps the other record's id in a join column (`companyId`).
RELATION_TYPES: Final = frozenset({"RELATION", "MORPH_RELATION"})
# What Twenty's record formatting puts where the column holds null (its "null-equivalent" values).
_EMPTY_LIST_FIELD_TYPES: Final = frozenset({"ARRAY", "MULTI_SELECT"})
_EMPTY_LIST_SUB_FIELDS: Final = frozenset({"additionalEmails", "secondaryLinks", "additionalPhones"})
# Sub-fields Twenty turns into numbers: parseInt for a currency's micros, parseFloat for coordinates.
_NUMERIC_SUB_FIELDS: Final[dict[str, NumericAs]] = {
    "amountMicros": "integer",
    "addressLat": "float",
    "addressLng": "float",
}
# Types whose values Debezium sends as JSON strings, booleans or 32-bit integers: written as they came, they are
# what JavaScript writes, so a record of them and of decoded values needs no rewriting (`payload`).
_JAVASCRIPT_READY = frozenset(
    {"text", "character varying", "character", "uuid", "boolean", "smallint", "integer", "tsvector", "bytea"}
)
# Postgres types whose Debezium encoding also depends on the connector's settings, which only a wrapped record's
# schema tells: `timestamp` (time.precision.mode) and numerics with a fixed scale (decimal.handling.mode).
_SETTING_DEPENDENT = ("timestamp without time zone", "numeric(", "money")


def workspace_id_from_schema(schema: str) -> str | None:
    """The workspace id of a `workspace_<base36>` schema (Twenty's uuidToBase36, reversed), or None."""
    if not schema.startswith(WORKSPACE_SCHEMA_PREFIX):
        return None
    digits = schema[len(WORKSPACE_SCHEMA_PREFIX) :]
    if not digits or len(digits) > 25 or not digits.isalnum() or not digits.isascii():
        return None
    number = int(digits, 36)
    if number >= 1 << 128:
        return None
    return str(uuid.UUID(int=number))


def schema_for_workspace(workspace_id: str) -> str:
    """Twenty's schema name for a workspace: `workspace_` and the id's 128-bit number in base 36."""
    number = uuid.UUID(workspace_id).int
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
        if number == 0:
            return WORKSPACE_SCHEMA_PREFIX + digits


@dataclass(frozen=True, slots=True)
class ColumnPlan:
    """Where one column's value goes in the record, and how it is decoded."""

    field: str  # the field's name: the record's key
    sub: str | None  # the key inside a composite field; None for a field of one column
    decode: Decoder | None  # None: the value passes as Debezium sent it
    pg_type: str
    element_type: str | None
    setting_dependent: bool
    numeric_as: NumericAs = "text"
    if_null: Any = None  # what Twenty shows for a null: "" for text, [] for lists
    relation: str | None = None  # for a join column, the relation field it serves (`company` for `companyId`)

    def decoder(self, column_schema: Mapping[str, Any] | None) -> Decoder | None:
        """The decoder for a record that carries this column's Debezium schema (or none: the catalog's)."""
        if column_schema is None or not self.setting_dependent:
            return self.decode
        return decoder_for(self.pg_type, self.element_type, column_schema, self.numeric_as)


@dataclass(frozen=True)
class ObjectLayout:
    """One object of one workspace, with a plan for each column of its table."""

    name_singular: str
    object_id: str | None  # Twenty's objectMetadata.id; None where the metadata is not in this database
    table: str
    columns: dict[str, ColumnPlan]
    # Columns whose values may need `payload`'s rewriting for JavaScript: neither decoded nor JavaScript-ready.
    unready: frozenset[str] = frozenset()
    # Columns that changes carry but Postgres' catalog does not list (added by a transform, say), even when read
    # again for them: passed on as they come, and no reason to read the layout again.
    unknown_columns: set[str] = field(default_factory=set)


@dataclass
class WorkspaceLayout:
    """Every object of one workspace, by table; built from the catalog by `build_layout`."""

    workspace_id: str
    schema: str
    objects: dict[str, ObjectLayout]  # by table name
    by_name: dict[str, ObjectLayout] = field(default_factory=dict)  # by nameSingular
    loaded_at: float = field(default_factory=time.monotonic)
    has_metadata: bool = True
    # When it was read, by Postgres' clock (the clock of Debezium's commit times), in ms since the epoch.
    read_at_ms: int | None = None
    # Tables that were not Twenty objects even when read again for a change of theirs.
    unknown_tables: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.by_name = {layout.name_singular: layout for layout in self.objects.values()}


@dataclass(frozen=True, slots=True)
class ObjectRow:
    """A row of Twenty's object metadata."""

    id: str
    name_singular: str
    is_custom: bool


@dataclass(frozen=True, slots=True)
class FieldRow:
    """A row of Twenty's field metadata."""

    object_id: str
    name: str
    type: str
    join_column: str | None = None  # a relation's `settings.joinColumnName`, where set


@dataclass(frozen=True, slots=True)
class ColumnRow:
    """A column of a workspace table, from Postgres' catalog."""

    table: str
    column: str
    pg_type: str  # format_type(), e.g. `numeric(10,2)`, `timestamp with time zone`, `text[]`
    element_type: str | None  # for arrays, the element's format_type()


def table_of(obj: ObjectRow) -> str:
    """The table Twenty keeps an object in: its singular name, after `_` for a custom object."""
    return f"_{obj.name_singular}" if obj.is_custom else obj.name_singular


def build_layout(
    workspace_id: str,
    schema: str,
    objects: Iterable[ObjectRow],
    fields: Iterable[FieldRow],
    columns: Iterable[ColumnRow],
    *,
    has_metadata: bool = True,
) -> WorkspaceLayout:
    """Plans for every table of a workspace schema.

    Without Twenty's metadata (`has_metadata=False`), each table is an object named after it (less a leading `_`)
    and each column a field of its own.
    """
    by_table: dict[str, list[ColumnRow]] = {}
    for column in columns:
        by_table.setdefault(column.table, []).append(column)
    by_object: dict[str, list[FieldRow]] = {}
    for f in fields:
        by_object.setdefault(f.object_id, []).append(f)
    layouts: dict[str, ObjectLayout] = {}
    if has_metadata:
        for obj in objects:
            # Custom objects live in `_<name>`; which objects count as custom moved between Twenty's versions
            # (isCustom, then "not of the standard application"), so the table that exists decides.
            table = table_of(obj)
            other = obj.name_singular if obj.is_custom else f"_{obj.name_singular}"
            if table not in by_table and other in by_table:
                table = other
            plans = _plans(by_table.get(table, ()), by_object.get(obj.id, ()))
            layouts[table] = ObjectLayout(obj.name_singular, obj.id, table, plans, _unready(plans))
    else:
        for table, table_columns in by_table.items():
            plans = _plans(table_columns, ())
            layouts[table] = ObjectLayout(table.removeprefix("_"), None, table, plans, _unready(plans))
    return WorkspaceLayout(workspace_id, schema, layouts, has_metadata=has_metadata)


def _plans(columns: Iterable[ColumnRow], fields: Iterable[FieldRow]) -> dict[str, ColumnPlan]:
    types = {f.name: f.type for f in fields}
    joins = {f.join_column or f"{f.name}Id": f.name for f in fields if f.type in RELATION_TYPES}
    # Longest names first, so that a column of `addressBilling` is never taken for one of `address`.
    prefixes = sorted((name for name, kind in types.items() if kind in COMPOSITE_TYPES), key=len, reverse=True)
    plans: dict[str, ColumnPlan] = {}
    for column in columns:
        name, sub = column.column, None
        # A field of its own (`nameSuffix` beside the composite `name`) is never a sub-field.
        for prefix in () if column.column in types else prefixes:
            rest = column.column[len(prefix) :]
            if column.column.startswith(prefix) and rest[:1].isupper():
                name, sub = prefix, rest[0].lower() + rest[1:]
                break
        numeric_as = _NUMERIC_SUB_FIELDS.get(sub, "text") if sub is not None else "text"
        plans[column.column] = ColumnPlan(
            field=name,
            sub=sub,
            decode=decoder_for(column.pg_type, column.element_type, None, numeric_as),
            pg_type=column.pg_type,
            element_type=column.element_type,
            setting_dependent=column.pg_type.startswith(_SETTING_DEPENDENT),
            numeric_as=numeric_as,
            if_null=_null_equivalent(types.get(name), sub, column.pg_type),
            relation=joins.get(column.column),
        )
    return plans


def _unready(plans: dict[str, ColumnPlan]) -> frozenset[str]:
    """The columns whose values the record cannot be written with as they are (see `_JAVASCRIPT_READY`)."""
    return frozenset(column for column, plan in plans.items() if not _javascript_ready(plan))


def _javascript_ready(plan: ColumnPlan) -> bool:
    # Every decoder returns what JavaScript writes; a key JavaScript would enumerate first (`"0"`) is reordered.
    if plan.field.isdecimal() or (plan.sub is not None and plan.sub.isdecimal()):
        return False
    if plan.decode is not None or plan.setting_dependent:
        return True
    kind = plan.element_type if plan.element_type is not None else plan.pg_type
    base = kind.partition("(")[0].strip()
    return base in _JAVASCRIPT_READY or kind.endswith(('_enum"', "_enum"))  # enums are sent as their label


def _null_equivalent(field_type: str | None, sub: str | None, pg_type: str) -> Any:
    """What Twenty's formatting shows for a null in this column (its null-equivalent values), or None."""
    if sub is not None:
        if sub in _EMPTY_LIST_SUB_FIELDS:
            return []
        return "" if pg_type == "text" else None
    if field_type == "TEXT":
        return ""
    if field_type in _EMPTY_LIST_FIELD_TYPES:
        return []
    return None
