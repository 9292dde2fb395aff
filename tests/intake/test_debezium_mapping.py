"""Debezium change records of Twenty's tables read as Twenty's events: envelopes, actions, fields, values, skips and
bad records, on a workspace layout built as the catalog builds it (no broker, no Postgres)."""

from __future__ import annotations

import base64
import copy
import uuid
from typing import Any

import orjson
import pytest

from webhookd.delivery.body_formats import DocsBody, TwentyBody
from webhookd.intake.debezium import Change, WrappedSchemas, read_change
from webhookd.intake.twenty_events import MappingSettings, Position, to_event
from webhookd.intake.twenty_layout import (
    ColumnRow,
    FieldRow,
    ObjectRow,
    WorkspaceLayout,
    build_layout,
    schema_for_workspace,
    workspace_id_from_schema,
)
from webhookd.model import BadEvent, Event, Skip, SkipReason, Webhook

WS = "3b8e6458-5fc1-4e63-8563-008ccddaa6db"
SCHEMA = schema_for_workspace(WS)
PERSON_OBJECT = "0d6b5c4a-0000-4000-8000-000000000001"
PET_OBJECT = "0d6b5c4a-0000-4000-8000-000000000002"
TIMELINE_OBJECT = "0d6b5c4a-0000-4000-8000-000000000003"
PERSON = "20202020-1c25-4d02-bf25-6aeccf7ea419"
TOPIC = f"twenty.{SCHEMA}.person"
AT = Position(TOPIC, 0, 42, 1_739_201_450_999)
PLACEHOLDER = "__debezium_unavailable_value"

TEXT, TSTZ, NUMERIC, JSONB, UUID = "text", "timestamp with time zone", "numeric", "jsonb", "uuid"
PERSON_COLUMNS = [
    ("id", UUID),
    ("nameFirstName", TEXT),
    ("nameLastName", TEXT),
    ("emailsPrimaryEmail", TEXT),
    ("emailsAdditionalEmails", JSONB),
    ("salaryAmountMicros", NUMERIC),
    ("salaryCurrencyCode", TEXT),
    ("city", TEXT),
    ("birthday", "date"),
    ("score", "numeric(10,2)"),
    ("tags", "text[]"),
    ("companyId", UUID),
    ("position", "double precision"),
    ("createdAt", TSTZ),
    ("updatedAt", TSTZ),
    ("deletedAt", TSTZ),
]
PERSON_FIELDS = [
    ("name", "FULL_NAME"),
    ("emails", "EMAILS"),
    ("salary", "CURRENCY"),
    ("city", "TEXT"),
    ("birthday", "DATE"),
    ("score", "NUMERIC"),
    ("tags", "ARRAY"),
    ("company", "RELATION"),
    ("position", "POSITION"),
    ("createdAt", "DATE_TIME"),
    ("updatedAt", "DATE_TIME"),
    ("deletedAt", "DATE_TIME"),
]


def layout() -> WorkspaceLayout:
    columns = [ColumnRow("person", name, kind, "text" if kind == "text[]" else None) for name, kind in PERSON_COLUMNS]
    columns += [ColumnRow("_pet", "id", UUID, None), ColumnRow("_pet", "name", TEXT, None)]
    columns += [ColumnRow("timelineActivity", "id", UUID, None)]
    return build_layout(
        WS,
        SCHEMA,
        [
            ObjectRow(PERSON_OBJECT, "person", False),
            ObjectRow(PET_OBJECT, "pet", True),
            ObjectRow(TIMELINE_OBJECT, "timelineActivity", False),
        ],
        [FieldRow(PERSON_OBJECT, name, kind) for name, kind in PERSON_FIELDS] + [FieldRow(PET_OBJECT, "name", "TEXT")],
        columns,
    )


def decimal_bytes(unscaled: int) -> str:
    return base64.b64encode(unscaled.to_bytes((unscaled.bit_length() + 8) // 8, "big", signed=True)).decode()


def row(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": PERSON,
        "nameFirstName": "Ada",
        "nameLastName": "Lovelace",
        "emailsPrimaryEmail": "ada@example.com",
        "emailsAdditionalEmails": '["a@example.com"]',
        "salaryAmountMicros": {"scale": 0, "value": decimal_bytes(1_500_000_000)},
        "salaryCurrencyCode": "EUR",
        "city": None,
        "birthday": -56270,
        "score": decimal_bytes(123450),
        "tags": ["vip", "a,b"],
        "companyId": None,
        "position": 1.0,
        "createdAt": "2025-02-10T15:30:50.123456Z",
        "updatedAt": "2025-02-10T15:30:50.123456Z",
        "deletedAt": None,
    }
    values.update(changes)
    return values


def envelope(op: str, before: dict[str, Any] | None, after: dict[str, Any] | None, **source: Any) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "source": {"schema": SCHEMA, "table": "person", "ts_ms": 1_739_201_450_123, "lsn": 28_283_296, **source},
        "op": op,
        "ts_ms": 1_739_201_450_200,
    }


def read(doc: Any, settings: MappingSettings | None = None) -> Event | Skip | BadEvent:
    value = None if doc is None else doc.encode() if isinstance(doc, str) else orjson.dumps(doc)
    change = read_change(value, TOPIC)
    if not isinstance(change, Change):
        return change
    return to_event(change, layout(), settings or MappingSettings(), AT)


def event_of(doc: Any, settings: MappingSettings | None = None) -> Event:
    event = read(doc, settings)
    assert isinstance(event, Event), event
    return event


def record_of(doc: Any) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(event_of(doc).data)
    return data


# The workspace.


@pytest.mark.parametrize("workspace", [WS, "00000000-0000-4000-8000-000000000000", str(uuid.UUID(int=2**128 - 1))])
def test_a_workspace_schema_name_is_the_base36_of_its_id_both_ways(workspace: str) -> None:
    assert workspace_id_from_schema(schema_for_workspace(workspace)) == workspace


def test_twentys_own_schema_name_reads_as_its_workspace() -> None:
    # What Node gives for Twenty's uuidToBase36: BigInt("0x" + hex).toString(36).
    assert schema_for_workspace(WS) == "workspace_3ixj3i1a5avy16ptijtb3lae3"


@pytest.mark.parametrize("schema", ["public", "workspace_", "workspace_ZZ!", "workspace_" + "z" * 26, "core"])
def test_a_schema_that_names_no_workspace_reads_as_none(schema: str) -> None:
    assert workspace_id_from_schema(schema) is None


# Envelopes.


def test_the_plain_the_wrapped_and_the_flattened_forms_give_the_same_record() -> None:
    plain = envelope("c", None, row())
    wrapped = {"schema": {"type": "struct", "fields": []}, "payload": plain}
    flattened = {**row(), "__op": "c", "__table": "person", "__schema": SCHEMA, "__source_ts_ms": 1_739_201_450_123}

    records = [record_of(doc) for doc in (plain, wrapped, flattened)]

    assert records[0] == records[1] == records[2]
    assert event_of(plain).timestamp == event_of(flattened).timestamp == "2025-02-10T15:30:50.123Z"


def test_a_flattened_record_without_schema_fields_takes_schema_and_table_from_the_topic() -> None:
    event = event_of({**row(), "__op": "c"})

    assert event.name == "person.created"
    assert event.workspace_id == WS


def test_a_flattened_delete_rewritten_by_the_transform_is_destroyed() -> None:
    event = event_of({**row(), "__op": "d", "__deleted": "true", "__table": "person", "__schema": SCHEMA})

    assert event.name == "person.destroyed"
    assert orjson.loads(event.data)["id"] == PERSON


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (None, "tombstone"),
        ({"schema": {"type": "struct"}, "payload": None}, "tombstone"),
        ("null", "tombstone"),
        ({**envelope("t", None, None)}, "truncate"),
        ({**envelope("m", None, None)}, "message"),
        (envelope("r", None, row()), "snapshot"),
        (envelope("u", row(), row(updatedAt="2025-02-11T00:00:00Z")), "unchanged"),
        (envelope("c", None, {"id": PERSON}, table="timelineActivity"), "not_sent_by_twenty"),
    ],
)
def test_records_nobody_asked_for_are_skipped_by_reason(doc: Any, reason: SkipReason) -> None:
    assert read(doc) == Skip(reason)


def test_snapshot_reads_are_created_events_when_configured() -> None:
    assert event_of(envelope("r", None, row()), MappingSettings(snapshot_events="created")).name == "person.created"


# Actions.


@pytest.mark.parametrize(
    ("op", "before", "after", "action", "record_from"),
    [
        ("c", None, row(), "created", "after"),
        ("u", row(), row(city="Paris"), "updated", "after"),
        ("u", row(), row(deletedAt="2025-02-11T09:00:00Z"), "deleted", "after"),
        ("u", row(deletedAt="2025-02-11T09:00:00Z"), row(), "restored", "after"),
        ("d", row(city="Paris"), None, "destroyed", "before"),
    ],
)
def test_each_row_change_becomes_the_action_twenty_emits(
    op: str, before: dict[str, Any] | None, after: dict[str, Any] | None, action: str, record_from: str
) -> None:
    event = event_of(envelope(op, before, after))

    assert event.name == f"person.{action}"
    assert event.object_id == PERSON_OBJECT
    source = after if record_from == "after" else before
    assert source is not None
    assert orjson.loads(event.data)["city"] == (source["city"] or "")


def test_a_custom_objects_table_gives_its_singular_name() -> None:
    doc = envelope("c", None, {"id": PERSON, "name": "Rex"}, table="_pet")

    event = event_of(doc)

    assert (event.name, event.object_id) == ("pet.created", PET_OBJECT)


# updatedFields.


def test_updated_fields_name_fields_not_columns_and_leave_out_updated_at() -> None:
    before = row()
    after = row(nameLastName="Byron", salaryCurrencyCode="USD", updatedAt="2025-02-11T00:00:00Z")

    assert event_of(envelope("u", before, after)).updated_fields == ("name", "salary")


def test_a_changed_relation_names_the_relation_and_its_join_column() -> None:
    after = row(companyId="a3b4c5d6-0000-4000-8000-000000000009")

    assert event_of(envelope("u", row(), after)).updated_fields == ("company", "companyId")


def test_moving_to_the_trash_lists_deleted_at() -> None:
    assert event_of(envelope("u", row(), row(deletedAt="2025-02-11T09:00:00Z"))).updated_fields == ("deletedAt",)


def test_without_the_row_before_updated_fields_are_left_out_not_guessed() -> None:
    event = event_of(envelope("u", None, row(city="Paris")))

    assert (event.name, event.updated_fields) == ("person.updated", None)


def test_with_only_the_key_before_updated_fields_are_left_out() -> None:
    assert event_of(envelope("u", {"id": PERSON}, row(city="Paris"))).updated_fields is None


# Values.


def test_the_record_is_in_twentys_api_shape() -> None:
    record = record_of(envelope("c", None, row()))

    assert record == {
        "id": PERSON,
        "name": {"firstName": "Ada", "lastName": "Lovelace"},
        "emails": {"primaryEmail": "ada@example.com", "additionalEmails": ["a@example.com"]},
        "salary": {"amountMicros": 1_500_000_000, "currencyCode": "EUR"},
        "city": "",
        "birthday": "1815-12-10",
        "score": "1234.50",
        "tags": ["vip", "a,b"],
        "companyId": None,
        "position": 1,
        "createdAt": "2025-02-10T15:30:50.123Z",
        "updatedAt": "2025-02-10T15:30:50.123Z",
        "deletedAt": None,
    }


@pytest.mark.parametrize(
    ("micros", "score"),
    [
        ({"scale": 0, "value": decimal_bytes(1_500_000_000)}, decimal_bytes(123450)),  # precise, unwrapped
        ("1500000000", "1234.50"),  # decimal.handling.mode=string
        (1500000000.0, 1234.5),  # decimal.handling.mode=double
    ],
)
def test_numerics_read_the_same_from_each_decimal_handling_mode(micros: Any, score: Any) -> None:
    record = record_of(envelope("c", None, row(salaryAmountMicros=micros, score=score)))

    assert record["salary"]["amountMicros"] == 1_500_000_000
    assert record["score"] in ("1234.50", "1234.5")  # a double has no scale left to show


def test_precise_bytes_take_their_scale_from_the_wrapped_schema() -> None:
    schema = {
        "type": "struct",
        "fields": [
            {
                "field": "after",
                "type": "struct",
                "fields": [
                    {
                        "field": "score",
                        "type": "bytes",
                        "name": "org.apache.kafka.connect.data.Decimal",
                        "parameters": {"scale": "3"},
                    }
                ],
            }
        ],
    }
    doc = {"schema": schema, "payload": envelope("c", None, row(score=decimal_bytes(123450)))}

    assert record_of(doc)["score"] == "123.450"


def test_numerics_beyond_a_double_stay_exact_as_text_and_micros_read_as_javascript_reads_them() -> None:
    huge = "123456789012345678901234567890.123456789"
    record = record_of(envelope("c", None, row(score=huge, salaryAmountMicros="12345678901234567890")))

    assert record["score"] == huge
    assert orjson.dumps(record["salary"]["amountMicros"]) == b"12345678901234567000"


def test_a_value_the_connector_left_out_is_never_delivered() -> None:
    before = row(emailsAdditionalEmails='["kept@example.com"]')
    after = row(emailsAdditionalEmails=PLACEHOLDER, city="Paris")

    event = event_of(envelope("u", before, after))

    assert orjson.loads(event.data)["emails"]["additionalEmails"] == ["kept@example.com"]
    assert event.updated_fields == ("city",)
    assert PLACEHOLDER.encode() not in event.data


def test_a_left_out_value_without_a_row_before_is_omitted() -> None:
    event = event_of(envelope("u", None, row(emailsAdditionalEmails=PLACEHOLDER, tags=[PLACEHOLDER])))

    record = orjson.loads(event.data)
    assert "additionalEmails" not in record["emails"]
    assert "tags" not in record


# Bad records.


@pytest.mark.parametrize(
    ("doc", "reason", "names"),
    [
        (envelope("c", None, row(), table="invoice"), "unknown_table", f"{SCHEMA}.invoice"),
        (envelope("c", None, row(birthday="not a date")), "undecodable", f"{SCHEMA}.person.birthday"),
        (envelope("c", None, row(emailsAdditionalEmails="{oops")), "undecodable", "person.emailsAdditionalEmails"),
        (envelope("c", None, row(score="@@")), "undecodable", "person.score"),
        (envelope("c", None, None), "missing_field", f"{SCHEMA}.person"),
        (envelope("x", None, row()), "invalid_field", "`op`"),
        ({**envelope("c", None, row()), "op": []}, "invalid_field", "`op`"),
        ({**row(), "__op": {"c": 1}}, "invalid_field", "`__op`"),
        ({"hello": "world"}, "not_debezium", "neither"),
        ([1, 2], "not_an_object", "array"),
    ],
)
def test_a_record_that_cannot_be_mapped_is_bad_and_says_where(doc: Any, reason: str, names: str) -> None:
    bad = read(doc)

    assert isinstance(bad, BadEvent)
    assert bad.reason == reason
    assert names in bad.detail


# Ids.


def test_the_same_change_sent_again_has_the_same_id_and_another_change_another() -> None:
    first = event_of(envelope("u", row(), row(city="Paris")))
    again = event_of(copy.deepcopy(envelope("u", row(), row(city="Paris"))))
    later = event_of(envelope("u", row(), row(city="Lyon"), lsn=28_283_999))

    assert first.id == again.id != later.id
    assert first.id.isascii()
    assert " " not in first.id


# Body formats.


def webhook(webhook_id: str, saved_url: str | None = None) -> Webhook:
    return Webhook(
        id=webhook_id,
        workspace_id=WS,
        target_url="https://receiver.example/hook",
        operations=("*.*",),
        secret=b"s",
        saved_url=saved_url,
    )


def test_the_twenty_body_has_twentys_keys_in_twentys_order_per_webhook() -> None:
    event = event_of(envelope("u", row(), row(city="Paris")))
    hooks = [webhook("w1"), webhook("w2", saved_url="receiver.example/hook")]

    first, second = TwentyBody().bodies(event, hooks)

    body = orjson.loads(first)
    assert list(body) == [
        "targetUrl",
        "eventName",
        "objectMetadata",
        "workspaceId",
        "webhookId",
        "eventDate",
        "record",
        "updatedFields",
    ]
    assert body["objectMetadata"] == {"id": PERSON_OBJECT, "nameSingular": "person"}
    assert (body["eventName"], body["webhookId"], body["eventDate"]) == (
        "person.updated",
        "w1",
        "2025-02-10T15:30:50.123Z",
    )
    assert body["updatedFields"] == ["city"]
    assert orjson.loads(second)["targetUrl"] == "receiver.example/hook"  # as saved, as Twenty sends it


def test_the_twenty_body_has_no_updated_fields_for_a_creation() -> None:
    (body,) = TwentyBody().bodies(event_of(envelope("c", None, row())), [webhook("w1")])

    assert "updatedFields" not in orjson.loads(body)


def test_the_docs_body_is_the_same_for_every_webhook() -> None:
    event = event_of(envelope("c", None, row()))

    first, second = DocsBody().bodies(event, [webhook("w1"), webhook("w2")])

    assert first is second
    assert list(orjson.loads(first)) == ["event", "data", "timestamp"]


def test_a_wrapped_records_schema_is_read_once_and_never_stands_in_for_another() -> None:
    def wrapped(scale: str, score: str) -> bytes:
        column = {"field": "score", "type": "bytes", "name": "org.apache.kafka.connect.data.Decimal"}
        schema = {"type": "struct", "fields": [{"field": "after", "type": "struct", "fields": [
            {**column, "parameters": {"scale": scale}},
        ]}]}  # fmt: skip
        return orjson.dumps({"schema": schema, "payload": envelope("c", None, row(score=score))})

    schemas = WrappedSchemas()
    records = [wrapped("2", decimal_bytes(123450)), wrapped("2", decimal_bytes(99)), wrapped("3", decimal_bytes(99))]
    scores = []
    for value in records:
        change = read_change(value, TOPIC, schemas)
        assert isinstance(change, Change)
        event = to_event(change, layout(), MappingSettings(), AT)
        assert isinstance(event, Event)
        scores.append(orjson.loads(event.data)["score"])

    # The second record's schema is the first's, taken from what was read; the third's differs in one parameter.
    assert scores == ["1234.50", "0.99", "0.099"]
    assert schemas.known(records[1]) is not None


@pytest.mark.parametrize(
    "micros",
    [
        {"scale": 10**9, "value": "AQ=="},  # beyond any scale: decimal's InvalidOperation, once raised out
        {"scale": -(10**6), "value": "AQ=="},  # decimal's Overflow
        "1E+200000",  # an exponent no numeric holds, whose integral part would take seconds to compute
    ],
)
def test_a_numeric_beyond_what_postgres_holds_is_a_bad_record_at_once(micros: Any) -> None:
    bad = read(envelope("c", None, row(salaryAmountMicros=micros)))

    assert isinstance(bad, BadEvent)
    assert (bad.reason, "person.salaryAmountMicros" in bad.detail) == ("undecodable", True)


def test_a_negative_scale_numeric_in_string_mode_is_its_text() -> None:
    columns = [ColumnRow("person", "id", UUID, None), ColumnRow("person", "hundreds", "numeric(5,-2)", None)]
    workspace = build_layout(WS, SCHEMA, [ObjectRow(PERSON_OBJECT, "person", False)], [], columns)
    change = read_change(orjson.dumps(envelope("c", None, {"id": PERSON, "hundreds": "1200"})), TOPIC)
    assert isinstance(change, Change)

    event = to_event(change, workspace, MappingSettings(), AT)

    assert isinstance(event, Event)
    assert orjson.loads(event.data)["hundreds"] == "1200"


@pytest.mark.parametrize("kafka_ms", [-1, 2**62])
def test_a_kafka_timestamp_no_calendar_holds_is_not_the_events_time(kafka_ms: int) -> None:
    change = read_change(orjson.dumps(envelope("c", None, row())), TOPIC)
    flat = read_change(orjson.dumps({**row(), "__op": "c"}), TOPIC)
    assert isinstance(change, Change)
    assert isinstance(flat, Change)
    at = Position(TOPIC, 0, 7, kafka_ms)

    event = to_event(change, layout(), MappingSettings(), at)
    undated = to_event(flat, layout(), MappingSettings(), at)

    assert isinstance(event, Event)
    assert event.kafka_timestamp_ms is None  # the commit time dates it; the Kafka one is dropped, not kept raw
    assert isinstance(undated, BadEvent)
    assert undated.reason == "missing_field"


def test_a_null_text_that_became_empty_is_no_change_to_twenty() -> None:
    assert read(envelope("u", row(city=None), row(city="", updatedAt="2025-02-11T00:00:00Z"))) == Skip("unchanged")
    changed = event_of(envelope("u", row(emailsAdditionalEmails=None), row(emailsAdditionalEmails='["x@y.z"]')))
    assert changed.updated_fields == ("emails",)
