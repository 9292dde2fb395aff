"""What reading a Debezium change record costs against a native event of the same record: pure CPU, no broker.

One Twenty `person` row, about the width of Twenty's own table (a full name, emails, a LinkedIn link, a creator,
a salary, a company, timestamps, a position), is updated: one field changes, and `updatedAt` with it, as on every
write Twenty makes. The same update is then written as Kafka would hold it in four forms:

- native: the event in the contract's own format, `{"event","workspaceId","data","updatedFields"}`, whose `data` is
  the record in Twenty's API shape, exactly as the mapping writes it (composites regrouped, timestamps in
  milliseconds);
- Debezium's envelope, `{"before","after","source","op",...}` (JsonConverter, `schemas.enable=false`), with the
  row before the change as `REPLICA IDENTITY FULL` sends it;
- the row flattened by ExtractNewRecordState (`add.fields=op,table,schema,lsn,source.ts_ms`,
  `delete.tombstone.handling.mode=rewrite`);
- the envelope wrapped in `{"schema","payload"}` with the schema Debezium's Postgres connector writes for it.

The records are built here, to the shapes Debezium documents (decimal.handling.mode=precise, timestamptz as
ZonedTimestamp strings with microseconds), so that the bench needs no Java.

Each form goes through what the consume loop does with a record: its reader (`NativeReader`, `DebeziumReader`
over a catalog that already holds the workspace's layout), the subscription index's match and the `docs` body. Runs
take turns (native, envelope, flattened, wrapped, native, ...) and the medians are reported, because a shared
machine is noisy; CPU is `time.process_time`, the process's own.
"""

from __future__ import annotations

import base64
import gc
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from bench.throughput import Run
from webhookd.delivery.body_formats import DocsBody, docs_body
from webhookd.intake.readers import DebeziumReader, NativeReader, NeedsLayout
from webhookd.intake.twenty_catalog import NotTwenty, TwentyCatalog
from webhookd.intake.twenty_events import MappingSettings
from webhookd.intake.twenty_layout import (
    ColumnRow,
    FieldRow,
    ObjectRow,
    WorkspaceLayout,
    build_layout,
    schema_for_workspace,
)
from webhookd.model import BadEvent, Event, Skip, Webhook
from webhookd.routing.subscription_index import SubscriptionIndex

WORKSPACE: Final = "3b8e6458-5fc1-4e63-8563-008ccddaa6db"
SCHEMA: Final = schema_for_workspace(WORKSPACE)
PERSON_OBJECT: Final = "0d6b5c4a-0000-4000-8000-000000000001"
DEBEZIUM_TOPIC: Final = f"twenty.{SCHEMA}.person"
NATIVE_TOPIC: Final = "twenty.events"
MAX_BYTES: Final = 1_048_576  # delivery.max_event_bytes' default
# Record i's commit is at COMMIT_MS + i, in Debezium's source block and as its Kafka record's timestamp: a native
# event without a `timestamp` of its own takes the Kafka one, so both forms give the same event time.
COMMIT_MS: Final = 1_739_201_450_123
TARGET: Final = 1.3

_TEXT, _UUID, _JSONB, _TSTZ = "text", "uuid", "jsonb", "timestamp with time zone"
# Twenty keeps ACTOR's source in an enum type of the workspace schema; format_type() names it so.
_ACTOR_SOURCE = f'{SCHEMA}."person_createdBySource_enum"'
_ACTOR_SOURCES = "EMAIL,CALENDAR,WORKFLOW,AGENT,API,IMPORT,MANUAL,SYSTEM,WEBHOOK"
# The columns of Twenty's `person` table (less the phones, xLink and searchVector), in its order, with the
# salary a workspace commonly adds as a custom CURRENCY field.
COLUMNS: Final = (
    ("id", _UUID),
    ("nameFirstName", _TEXT),
    ("nameLastName", _TEXT),
    ("emailsPrimaryEmail", _TEXT),
    ("emailsAdditionalEmails", _JSONB),
    ("linkedinLinkPrimaryLinkUrl", _TEXT),
    ("linkedinLinkPrimaryLinkLabel", _TEXT),
    ("linkedinLinkSecondaryLinks", _JSONB),
    ("jobTitle", _TEXT),
    ("city", _TEXT),
    ("avatarUrl", _TEXT),
    ("position", "double precision"),
    ("createdAt", _TSTZ),
    ("updatedAt", _TSTZ),
    ("deletedAt", _TSTZ),
    ("companyId", _UUID),
    ("createdBySource", _ACTOR_SOURCE),
    ("createdByWorkspaceMemberId", _UUID),
    ("createdByName", _TEXT),
    ("createdByContext", _JSONB),
    ("salaryAmountMicros", "numeric"),
    ("salaryCurrencyCode", _TEXT),
)
FIELDS: Final = (
    ("id", "UUID"),
    ("name", "FULL_NAME"),
    ("emails", "EMAILS"),
    ("linkedinLink", "LINKS"),
    ("jobTitle", "TEXT"),
    ("city", "TEXT"),
    ("avatarUrl", "TEXT"),
    ("position", "POSITION"),
    ("createdAt", "DATE_TIME"),
    ("updatedAt", "DATE_TIME"),
    ("deletedAt", "DATE_TIME"),
    ("company", "RELATION"),
    ("createdBy", "ACTOR"),
    ("salary", "CURRENCY"),
)
# Debezium's Kafka Connect schema of each Postgres type (decimal.handling.mode=precise: a numeric without a fixed
# scale is a VariableScaleDecimal struct).
_CONNECT_TYPES: Final[dict[str, dict[str, Any]]] = {
    _UUID: {"type": "string", "name": "io.debezium.data.Uuid", "version": 1},
    _TEXT: {"type": "string"},
    _JSONB: {"type": "string", "name": "io.debezium.data.Json", "version": 1},
    _TSTZ: {"type": "string", "name": "io.debezium.time.ZonedTimestamp", "version": 1},
    "double precision": {"type": "double"},
    _ACTOR_SOURCE: {
        "type": "string",
        "name": "io.debezium.data.Enum",
        "version": 1,
        "parameters": {"allowed": _ACTOR_SOURCES},
    },
    "numeric": {
        "type": "struct",
        "fields": [
            {"type": "int32", "optional": False, "field": "scale"},
            {"type": "bytes", "optional": False, "field": "value"},
        ],
        "name": "io.debezium.data.VariableScaleDecimal",
        "version": 1,
        "doc": "Variable scaled decimal",
    },
}
_REQUIRED_COLUMNS: Final = frozenset({"id", "position", "createdAt", "updatedAt", "createdBySource", "createdByName"})

_FIRST_NAMES = ("Ada", "Grace", "Alan", "Katherine", "Edsger", "Barbara", "Donald", "Frances", "Tim", "Radia")
_LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Johnson", "Dijkstra", "Liskov", "Knuth", "Allen", "Berners", "Perlman")
_CITIES = ("Paris", "London", "New York", "Berlin", "Lisbon", "São Paulo", "Tokyo", "Montréal", None)
_TITLES = ("Head of Sales", "CTO", "Account Executive", "Product Manager", "Founder", "VP Engineering", "")
_CURRENCIES = ("EUR", "USD", "GBP", "BRL")

Reader = Callable[[bytes | None, str, int, int, int | None], Event | Skip | BadEvent | NeedsLayout]


@dataclass(frozen=True)
class Form:
    """One way the same updates sit in Kafka, and the reader the daemon would read them with."""

    label: str
    values: list[bytes]
    topic: str
    read: Reader
    same_event: bool = True  # the native event of the same update: checked to give the same body

    @property
    def bytes_per_record(self) -> float:
        return sum(map(len, self.values)) / len(self.values)


@dataclass(frozen=True)
class Row:
    """One line of the table: a form's median rate and CPU, and its CPU against the native event's."""

    label: str
    bytes_per_record: float
    rate: float
    cpu_us: float
    ratio: float  # to the native event of the same record
    ratio_same_size: float  # to the native event as large as the envelope


@dataclass(frozen=True)
class DecodeCost:
    """The measured forms, native first, and what they were measured on."""

    rows: list[Row]
    events: int
    repeats: int
    webhooks: int
    columns: int


class _Loaded(TwentyCatalog):
    """The catalog as the daemon has it once a workspace's layout is loaded; no Postgres behind it.

    Only `cached` is its own, a dict lookup as the real one is; the rest of what the reader asks (whether the layout
    is outdated for a change) is the real catalog's code, so that it is measured too.
    """

    def __init__(self, layout: WorkspaceLayout) -> None:  # no pool: nothing is ever loaded
        self._loaded = {layout.schema: layout}

    def cached(self, schema: str) -> WorkspaceLayout | NotTwenty | None:
        return self._loaded.get(schema)


def person_layout() -> WorkspaceLayout:
    """The workspace's layout as `TwentyCatalog` builds it from Twenty's metadata and Postgres' catalog."""
    return build_layout(
        WORKSPACE,
        SCHEMA,
        [ObjectRow(PERSON_OBJECT, "person", False)],
        [FieldRow(PERSON_OBJECT, name, kind) for name, kind in FIELDS],
        [ColumnRow("person", name, kind, None) for name, kind in COLUMNS],
    )


def _uuid(i: int, kind: int) -> str:
    """A distinct UUID for each `i` of each `kind` (person, avatar, company, ...), so no two records are alike."""
    return str(uuid.UUID(int=(kind << 96) | (i * 2_654_435_761 % (1 << 64)) | (4 << 76) | (1 << 63)))


def _micros(amount: int) -> dict[str, Any]:
    """A VariableScaleDecimal: the unscaled two's complement bytes in base64, and the scale."""
    raw = amount.to_bytes((amount.bit_length() + 8) // 8, "big", signed=True)
    return {"scale": 0, "value": base64.b64encode(raw).decode()}


def _zoned(day: int, second: int, micros: int) -> str:
    """A ZonedTimestamp as Debezium writes a timestamptz: UTC, microseconds kept."""
    clock = f"{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}.{micros:06d}"
    return f"2025-{1 + day % 12:02d}-{1 + day % 28:02d}T{clock}Z"


def person_row(i: int) -> dict[str, Any]:
    """Row `i` of the person table, as Debezium's Postgres connector writes its columns (unwrapped)."""
    first, last = _FIRST_NAMES[i % len(_FIRST_NAMES)], _LAST_NAMES[i // 7 % len(_LAST_NAMES)]
    handle = f"{first.lower()}.{last.lower()}{i}"
    return {
        "id": _uuid(i, 1),
        "nameFirstName": first,
        "nameLastName": last,
        "emailsPrimaryEmail": f"{handle}@example.com",
        "emailsAdditionalEmails": orjson.dumps([f"{handle}@gmail.com"]).decode() if i % 3 else None,
        "linkedinLinkPrimaryLinkUrl": f"https://www.linkedin.com/in/{handle.replace('.', '-')}",
        "linkedinLinkPrimaryLinkLabel": "",
        "linkedinLinkSecondaryLinks": (
            orjson.dumps([{"url": f"https://blog.example.com/{handle}", "label": "Blog"}]).decode() if i % 4 else None
        ),
        "jobTitle": _TITLES[i % len(_TITLES)],
        "city": _CITIES[i % len(_CITIES)],
        "avatarUrl": f"https://files.example.com/person/{_uuid(i, 2)}.png" if i % 2 else "",
        "position": float(i),
        "createdAt": _zoned(i, i * 37, i * 7919 % 1_000_000),
        "updatedAt": _zoned(i, i * 37 + 5, i * 104_729 % 1_000_000),
        "deletedAt": None,
        "companyId": _uuid(i % 500, 3),
        "createdBySource": "MANUAL" if i % 5 else "IMPORT",
        "createdByWorkspaceMemberId": _uuid(i % 20, 4),
        "createdByName": "Tim Apple",
        "createdByContext": "{}",
        "salaryAmountMicros": _micros(60_000_000_000 + i * 1_000_000),
        "salaryCurrencyCode": _CURRENCIES[i % len(_CURRENCIES)],
    }


def _updated(row: dict[str, Any], i: int) -> dict[str, Any]:
    """The row after a user changed its job title in Twenty's UI; Twenty bumps `updatedAt` with every write."""
    return {**row, "jobTitle": f"Senior {row['jobTitle'] or 'Engineer'}", "updatedAt": _zoned(i + 1, i * 41, 1)}


def _source(i: int) -> dict[str, Any]:
    """The `source` block of Debezium's Postgres connector (3.x, the version `make test-kafka` runs)."""
    lsn = 28_283_296 + i * 512
    return {
        "version": "3.6.1.Final",
        "connector": "postgresql",
        "name": "twenty",
        "ts_ms": COMMIT_MS + i,
        "snapshot": "false",
        "db": "default",
        "sequence": orjson.dumps([str(lsn - 256), str(lsn)]).decode(),
        "ts_us": (COMMIT_MS + i) * 1000,
        "ts_ns": (COMMIT_MS + i) * 1_000_000,
        "schema": SCHEMA,
        "table": "person",
        "txId": 1_200 + i,
        "lsn": lsn,
        "xmin": None,
    }


def envelope(i: int) -> dict[str, Any]:
    before = person_row(i)
    ts_ms = COMMIT_MS + i + 35  # Debezium's own processing time, a little after the commit
    return {
        "before": before,
        "after": _updated(before, i),
        "source": _source(i),
        "transaction": None,
        "op": "u",
        "ts_ms": ts_ms,
        "ts_us": ts_ms * 1000,
        "ts_ns": ts_ms * 1_000_000,
    }


def flattened(i: int) -> dict[str, Any]:
    source = _source(i)
    return {
        **_updated(person_row(i), i),
        "__op": "u",
        "__table": "person",
        "__schema": SCHEMA,
        "__lsn": source["lsn"],
        "__source_ts_ms": source["ts_ms"],
        "__deleted": "false",
    }


def _column_schema(name: str, pg_type: str) -> dict[str, Any]:
    return {**_CONNECT_TYPES[pg_type], "optional": name not in _REQUIRED_COLUMNS, "field": name}


def _field(field: str, kind: str, optional: bool = False, **more: Any) -> dict[str, Any]:
    return {"type": kind, "optional": optional, **more, "field": field}


def envelope_schema() -> dict[str, Any]:
    """The value schema Debezium's Postgres connector writes for the person table's change events."""
    row = {
        "type": "struct",
        "fields": [_column_schema(name, kind) for name, kind in COLUMNS],
        "optional": True,
        "name": f"{DEBEZIUM_TOPIC}.Value",
    }
    snapshot_kinds = "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"
    source = {
        "type": "struct",
        "fields": [
            _field("version", "string"),
            _field("connector", "string"),
            _field("name", "string"),
            _field("ts_ms", "int64"),
            _field(
                "snapshot",
                "string",
                True,
                name="io.debezium.data.Enum",
                version=1,
                parameters={"allowed": snapshot_kinds},
                default="false",
            ),
            _field("db", "string"),
            _field("sequence", "string", True),
            _field("ts_us", "int64", True),
            _field("ts_ns", "int64", True),
            _field("schema", "string"),
            _field("table", "string"),
            _field("txId", "int64", True),
            _field("lsn", "int64", True),
            _field("xmin", "int64", True),
        ],
        "optional": False,
        "name": "io.debezium.connector.postgresql.Source",
    }
    transaction = {
        "type": "struct",
        "fields": [
            _field("id", "string"),
            _field("total_order", "int64"),
            _field("data_collection_order", "int64"),
        ],
        "optional": True,
        "name": "event.block",
        "version": 1,
    }
    return {
        "type": "struct",
        "fields": [
            {**row, "field": "before"},
            {**row, "field": "after"},
            {**source, "field": "source"},
            {**transaction, "field": "transaction"},
            _field("op", "string"),
            _field("ts_ms", "int64", True),
            _field("ts_us", "int64", True),
            _field("ts_ns", "int64", True),
        ],
        "optional": False,
        "name": f"{DEBEZIUM_TOPIC}.Envelope",
        "version": 2,
    }


def _value(doc: Any) -> bytes:
    """A record's value as a consumer gets it: JSON in a bytes object of its own size.

    orjson's result sits in a larger buffer shrunk in place; kept by the thousand, those leave the heap full of
    holes (three times the values' size in RSS).
    """
    return bytes(memoryview(orjson.dumps(doc)))


def _native(event: Event) -> bytes:
    """The native event of what the mapping made of a change: its record, re-read, in Twenty's API shape."""
    return _value(
        {
            "event": event.name,
            "workspaceId": event.workspace_id,
            "data": orjson.loads(event.data),
            "updatedFields": None if event.updated_fields is None else list(event.updated_fields),
        }
    )


def _native_of_envelope_size(event: Event, i: int) -> bytes:
    """A native event as large as the update's envelope: its data the record, the record before the change and
    where the change came from, which is what the envelope carries besides the record."""
    before = person_row(i)
    previous = {"jobTitle": before["jobTitle"], "updatedAt": before["updatedAt"]}
    data = {**orjson.loads(event.data), "previous": {**orjson.loads(event.data), **previous}, "source": _source(i)}
    return _value({"event": event.name, "workspaceId": event.workspace_id, "data": data, "updatedFields": ["jobTitle"]})


def _webhooks() -> SubscriptionIndex:
    """A few webhooks of the workspace that want `person.updated`, beside some that do not, and other workspaces'."""
    index = SubscriptionIndex()
    operations = (["person.updated"], ["*.updated"], ["*.*"], ["person.created"], ["company.*"])
    for n, ops in enumerate(operations):
        index.put(Webhook(f"wh-{n}", WORKSPACE, f"https://hooks.example.com/{n}", tuple(ops), b"secret"))
    for n in range(50):
        index.put(Webhook(f"other-{n}", _uuid(n, 5), "https://hooks.example.com/x", ("*.*",), b"secret"))
    return index


def forms(events: int) -> list[Form]:
    """The same `events` updates in each form, native first; every form checked to give the native event's body."""
    layout = person_layout()
    debezium = DebeziumReader(MAX_BYTES, _Loaded(layout), MappingSettings()).read
    native = NativeReader(MAX_BYTES).read
    plain = [_value(envelope(i)) for i in range(events)]
    schema = envelope_schema()
    built = [
        Form("native event (Twenty's API shape)", [], NATIVE_TOPIC, native),
        Form("native event as large as the envelope", [], NATIVE_TOPIC, native, same_event=False),
        Form("Debezium envelope (`schemas.enable=false`)", plain, DEBEZIUM_TOPIC, debezium),
        Form(
            "Debezium, flattened (ExtractNewRecordState)",
            [_value(flattened(i)) for i in range(events)],
            DEBEZIUM_TOPIC,
            debezium,
        ),
        Form(
            'Debezium, wrapped `{"schema","payload"}`',
            [_value({"schema": schema, "payload": envelope(i)}) for i in range(events)],
            DEBEZIUM_TOPIC,
            debezium,
        ),
    ]
    for offset, value in enumerate(plain):
        event = _read(built[2], offset, value)
        built[0].values.append(_native(event))
        built[1].values.append(_native_of_envelope_size(event, offset))
    _check(built)
    return built


def _read(form: Form, offset: int, value: bytes) -> Event:
    event = form.read(value, form.topic, 0, offset, COMMIT_MS + offset)
    if not isinstance(event, Event):
        raise RuntimeError(f"{form.label}, record {offset}: read as {event!r}, not an event")
    return event


def _check(built: list[Form]) -> None:
    """Every form is the same change: the same event, body and workspace; `updatedFields` wherever it is known."""
    for offset, native_value in enumerate(built[0].values):
        native = _read(built[0], offset, native_value)
        if native.updated_fields != ("jobTitle",):
            raise RuntimeError(f"record {offset}: updatedFields {native.updated_fields}, not the one field changed")
        for form in built[1:]:
            event = _read(form, offset, form.values[offset])
            if not form.same_event:
                continue
            # Only the envelope carries the row before the change; the flattened form cannot tell what changed.
            listed = event.updated_fields is None or event.updated_fields == native.updated_fields
            if not listed or event.workspace_id != native.workspace_id or docs_body(event) != docs_body(native):
                raise RuntimeError(f"{form.label}, record {offset}: not the same event as the native one")


def _run(form: Form, index: SubscriptionIndex) -> Run:
    """One pass over the form's records through read, match and body, as the consume loop makes it."""
    read, topic, match, bodies = form.read, form.topic, index.match, DocsBody().bodies
    delivered = 0
    gc.collect()  # garbage left by the previous run is not this one's to collect
    started, cpu = time.perf_counter(), time.process_time()
    for offset, value in enumerate(form.values):
        event = read(value, topic, 0, offset, COMMIT_MS + offset)
        if type(event) is not Event:
            raise RuntimeError(f"{form.label}, record {offset}: {event!r}")
        obj, action = event.object_and_action
        delivered += len(bodies(event, match(event.workspace_id, obj, action)))
    cpu, seconds = time.process_time() - cpu, time.perf_counter() - started
    # Keeps the bodies honest: a run that matched nothing measured no body writing.
    if delivered != 3 * len(form.values):
        raise RuntimeError(f"{form.label}: {delivered} bodies for {len(form.values)} events, not 3 each")
    return Run.of(len(form.values), seconds, cpu)


def decode_cost(events: int, repeats: int) -> DecodeCost:
    """Each form's median events a second and CPU per event over `repeats` alternated runs."""
    built = forms(events)  # its check reads every record of every form: the warm-up too
    index = _webhooks()
    runs: list[list[Run]] = [[] for _ in built]
    for _ in range(repeats):
        for i, form in enumerate(built):
            runs[i].append(_run(form, index))
    print(f"  .. CPU µs per event {[[round(r.cpu_us, 1) for r in rs] for rs in runs]}", file=sys.stderr, flush=True)
    medians = [Run(statistics.median(r.rate for r in rs), statistics.median(r.cpu_us for r in rs)) for rs in runs]
    native, same_size = medians[0].cpu_us, medians[1].cpu_us
    rows = [
        Row(form.label, form.bytes_per_record, run.rate, run.cpu_us, run.cpu_us / native, run.cpu_us / same_size)
        for form, run in zip(built, medians, strict=True)
    ]
    webhooks = len(index.match(WORKSPACE, "person", "updated"))
    return DecodeCost(rows, events, repeats, webhooks, len(COLUMNS))
