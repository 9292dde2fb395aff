"""One Debezium change record of the Postgres connector -> a `Change`, or why it is skipped or bad.

Three shapes arrive, depending on the Kafka Connect converter and transforms a team chose:
- the envelope `{"before","after","source","op","ts_ms",...}` (JsonConverter with `schemas.enable=false`);
- the same envelope wrapped as `{"schema":...,"payload":...}` (`schemas.enable=true`, Kafka Connect's default);
- a flattened row (ExtractNewRecordState) carrying `__op`, `__table`, `__schema` or `__db`, `__deleted`,
  `__source_ts_ms` and `__lsn` as columns of its own (`add.fields`, `delete.tombstone.handling.mode=rewrite`),
  wrapped or not.
Only the envelope says what a row was before an update; the flattened form is read as far as it goes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from webhookd.intake.native import json_kind, parse_json
from webhookd.model import BadEvent, Skip

# The operations of Debezium's envelope: create, update, delete, read (snapshot), truncate, message.
_OPS = frozenset("cudrtm")
# Columns that ExtractNewRecordState adds to a flattened row (`add.fields`, `delete.tombstone.handling.mode=rewrite`).
_FLAT_PREFIX = "__"
# Event ids stay well inside the 256 characters a native event id may have.
_MAX_READABLE_ID = 200
# How a wrapped record starts, and what stands between its schema and its payload (see WrappedSchemas).
_WRAPPED_START: Final = b'{"schema":'
_PAYLOAD_KEY: Final = b',"payload":'
_SCHEMA_TAIL: Final = 200  # the end of S, naming its table (`...person.Envelope`): what it is looked up by
_MAX_SCHEMAS: Final = 256


# Not frozen: a frozen dataclass sets each field through object.__setattr__, a microsecond of every record's
# reading for a guard no caller needs (a Change lives only from its record to its event).
@dataclass(slots=True)
class Change:
    """One row change as Debezium saw it, before any of Twenty's meaning is given to it."""

    op: str  # c, u, d or r
    schema: str
    table: str
    before: dict[str, Any] | None  # None where the connector did not send it (flattened, replica identity)
    after: dict[str, Any] | None
    ts_ms: int | None  # the commit time (source.ts_ms)
    lsn: int | None
    # Debezium's schema of each column, where the record carried one (the wrapped form); None otherwise.
    column_schemas: Mapping[str, Mapping[str, Any]] | None = None


@dataclass(slots=True)
class _ValueSchema:
    """A wrapped record's schema, and Debezium's schema of each column of its rows, worked out once."""

    doc: Any
    prefix: bytes = b""  # the record's bytes up to its payload, where they were remembered
    rows: dict[str | None, dict[str, Mapping[str, Any]] | None] = field(default_factory=dict)

    def row(self, name: str | None) -> dict[str, Mapping[str, Any]] | None:
        if name not in self.rows:
            self.rows[name] = _row_schemas(self.doc, name)
        return self.rows[name]


class WrappedSchemas:
    """The schemas of wrapped records seen so far, each parsed once, looked up by the bytes that spell it.

    Kafka Connect's JsonConverter writes `{"schema":S,"payload":P}`, S the same bytes in every record of a table
    until its columns change, and most of the record: a record whose S is known has only its P parsed. Held by the
    reader that reads the records, at most `_MAX_SCHEMAS` of them: a Twenty table's parsed schema takes about
    160 KiB, so the cache stays near 40 MiB however many tables there are.
    """

    def __init__(self) -> None:
        self._entries: dict[bytes, _ValueSchema] = {}

    def known(self, value: bytes) -> tuple[_ValueSchema, Any] | None:
        """Schema and payload of a wrapped record whose schema was seen before, its payload alone parsed; else None."""
        if not value.startswith(_WRAPPED_START):
            return None
        end = value.find(_PAYLOAD_KEY)
        key = value[max(end - _SCHEMA_TAIL, 0) : end]
        known = self._entries.get(key) if end > 0 else None
        if known is None or len(known.prefix) != end or not value.startswith(known.prefix) or value[-1:] != b"}":
            return None
        self._entries[key] = self._entries.pop(key)  # the most recently used goes last, the least first
        try:
            return known, orjson.loads(memoryview(value)[end + len(_PAYLOAD_KEY) : -1])
        except orjson.JSONDecodeError:
            return None  # not `{"schema":S,"payload":P}` after all: read in full

    def remember(self, value: bytes, schema: Any) -> _ValueSchema:
        """The schema of a wrapped record read in full, kept by the bytes that spell it where those are certain."""
        found = _ValueSchema(schema)
        end = value.find(_PAYLOAD_KEY)
        if value.startswith(_WRAPPED_START) and end > 0:
            try:
                # The bytes read alone as the schema only if the split is where the JSON says it is.
                same = orjson.loads(memoryview(value)[len(_WRAPPED_START) : end]) == schema
            except orjson.JSONDecodeError:
                same = False
            if same:
                if len(self._entries) >= _MAX_SCHEMAS:
                    # The least recently used goes: a table per workspace makes many schemas, few of them busy.
                    del self._entries[next(iter(self._entries))]
                found.prefix = value[:end]
                self._entries[value[max(end - _SCHEMA_TAIL, 0) : end]] = found
        return found


def read_change(value: bytes | None, topic: str, schemas: WrappedSchemas | None = None) -> Change | Skip | BadEvent:
    """Read one record value; a tombstone, a truncate or a logical message is a Skip, never a bad event.

    With `schemas`, the schema of a wrapped record is parsed once for all the records that repeat it.
    """
    if value is None:
        return Skip("tombstone")
    value_schema: _ValueSchema | None = None
    known = schemas.known(value) if schemas is not None else None
    if known is not None:
        value_schema, doc = known
    else:
        doc = parse_json(value)
        if isinstance(doc, BadEvent):
            return doc
        if doc is None:
            # JsonConverter without schemas writes a deleted row's tombstone (ExtractNewRecordState's default for a
            # delete) as the JSON text `null` where the value has a schema: a tombstone all the same.
            return Skip("tombstone")
        if not isinstance(doc, dict):
            return BadEvent("not_an_object", f"the change record is {json_kind(doc)}, not an object")
        if "payload" in doc and "schema" in doc and len(doc) == 2:
            schema = doc["schema"]
            value_schema = schemas.remember(value, schema) if schemas is not None else _ValueSchema(schema)
            doc = doc["payload"]
    if value_schema is not None:
        if doc is None:  # a tombstone written by the converter with its schema
            return Skip("tombstone")
        if not isinstance(doc, dict):
            return BadEvent("not_an_object", "the change record's `payload` is not an object")
    if "op" in doc and "source" in doc:
        return _from_envelope(doc, value_schema)
    if "__op" in doc or "__table" in doc or "__deleted" in doc:
        return _from_flattened(doc, value_schema, topic)
    return BadEvent(
        "not_debezium",
        f"neither a Debezium envelope (`op`, `source`) nor a flattened row (`__op`, `__table`): keys {sorted(doc)[:8]}",
    )


def _from_envelope(doc: dict[str, Any], value_schema: _ValueSchema | None) -> Change | Skip | BadEvent:
    op = doc["op"]
    if not isinstance(op, str) or op not in _OPS:  # in this order: an array or an object is unhashable
        return BadEvent("invalid_field", f"`op` is {str(op)[:20]!r}, not one of c, u, d, r, t, m")
    if op in "tm":
        return Skip("truncate" if op == "t" else "message")
    source = doc["source"]
    if not isinstance(source, dict):
        return BadEvent("wrong_type", "`source` must be an object")
    schema, table = source.get("schema"), source.get("table")
    if not isinstance(schema, str) or not isinstance(table, str):
        return BadEvent("missing_field", "`source.schema` and `source.table` must name the changed table")
    before, after = doc.get("before"), doc.get("after")
    for name, row in (("before", before), ("after", after)):
        if row is not None and not isinstance(row, dict):
            return BadEvent("wrong_type", f"{schema}.{table}: `{name}` must be an object or null")
    if op in "cru" and after is None:
        return BadEvent("missing_field", f"{schema}.{table}: a change with op {op!r} has no `after` row")
    if op == "d" and before is None:
        return BadEvent("missing_field", f"{schema}.{table}: a delete has no `before` row")
    return Change(
        op=op,
        schema=schema,
        table=table,
        before=before,
        after=after,
        ts_ms=_integer(source.get("ts_ms")),
        lsn=_integer(source.get("lsn")),
        column_schemas=None if value_schema is None else value_schema.row("after" if after is not None else "before"),
    )


def _from_flattened(doc: dict[str, Any], value_schema: _ValueSchema | None, topic: str) -> Change | Skip | BadEvent:
    row = {key: value for key, value in doc.items() if not key.startswith(_FLAT_PREFIX)}
    op = doc.get("__op")
    deleted = doc.get("__deleted") in ("true", True)
    if op is None:
        op = "d" if deleted else "u"  # without `__op`, only a rewritten delete can be told from an upsert
    if not isinstance(op, str) or op not in _OPS:
        return BadEvent("invalid_field", f"`__op` is {str(op)[:20]!r}, not one of c, u, d, r, t, m")
    if op in "tm":
        return Skip("truncate" if op == "t" else "message")
    schema = _flattened_schema(doc, topic)
    table = doc.get("__table")
    if not isinstance(table, str):
        table = _topic_parts(topic)[1]
    if schema is None or table is None:
        return BadEvent(
            "missing_field",
            "a flattened change record needs `__schema` and `__table` (ExtractNewRecordState's "
            "`add.fields=op,schema,table,lsn,source.ts_ms`) or a topic named <prefix>.<schema>.<table>",
        )
    return Change(
        op=op,
        schema=schema,
        table=table,
        before=row if op == "d" else None,
        after=None if op == "d" else row,
        ts_ms=_integer(doc.get("__source_ts_ms")),
        lsn=_integer(doc.get("__lsn")),
        column_schemas=None if value_schema is None else value_schema.row(None),
    )


def _flattened_schema(doc: dict[str, Any], topic: str) -> str | None:
    schema = doc.get("__schema")
    if isinstance(schema, str):
        return schema
    # `__db` is the database on Postgres; a routing transform or a MySQL habit may still put the schema there.
    db = doc.get("__db")
    if isinstance(db, str) and db.startswith("workspace_"):
        return db
    return _topic_parts(topic)[0]


def _topic_parts(topic: str) -> tuple[str | None, str | None]:
    """Schema and table from Debezium's default topic name, <topic.prefix>.<schema>.<table>."""
    parts = topic.split(".")
    return (parts[-2], parts[-1]) if len(parts) >= 3 else (None, None)


def _row_schemas(value_schema: Any, row: str | None) -> dict[str, Mapping[str, Any]] | None:
    """Debezium's schema of each column of the row (`after`/`before` in an envelope, the value when flattened)."""
    if not isinstance(value_schema, dict):
        return None
    struct: Any = value_schema
    if row is not None:
        struct = next(
            (f for f in value_schema.get("fields", ()) if isinstance(f, dict) and f.get("field") == row), None
        )
    if not isinstance(struct, dict):
        return None
    return {f["field"]: f for f in struct.get("fields", ()) if isinstance(f, dict) and isinstance(f.get("field"), str)}


def _integer(value: Any) -> int | None:
    return value if type(value) is int else None


def change_id(change: Change, key: str, topic: str, partition: int, offset: int) -> str:
    """The event id: the same for the same change however often Debezium sends it again.

    Table, primary key and the change's position in the write-ahead log identify it; without an LSN (a flattened
    record without `__lsn`) the Kafka position is all there is.
    """
    position = str(change.lsn) if change.lsn is not None else f"{topic}:{partition}:{offset}"
    text = f"{change.schema}.{change.table}:{key}:{position}:{change.op}"
    if len(text) <= _MAX_READABLE_ID and text.isascii() and text.isprintable() and " " not in text:
        return text
    # The id travels in a header, where only visible ASCII is safe: a digest stands in for an unusual key.
    return f"dbz:{hashlib.sha256(text.encode()).hexdigest()}:{position}:{change.op}"
