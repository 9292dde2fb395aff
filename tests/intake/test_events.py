"""decode: one Kafka record becomes an Event ready to sign, or a BadEvent naming what is wrong with it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhookd.delivery.body_formats import docs_body
from webhookd.intake.native import decode
from webhookd.model import BadEvent, Event

WORKSPACE = "6f1c1b1e-3a2d-4c5b-9e8f-0a1b2c3d4e5f"
KAFKA_MS = 1739201450123  # 2025-02-10T15:30:50.123Z
MAX_BYTES = 4096


def record(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"event": "person.created", "workspaceId": WORKSPACE, "data": {"name": "Ada"}}
    doc.update(fields)
    return doc


def decoded(
    value: bytes | dict[str, Any] | None,
    *,
    timestamp_ms: int | None = KAFKA_MS,
    max_bytes: int = MAX_BYTES,
    offset: int = 42,
) -> Event | BadEvent:
    raw = orjson.dumps(value) if isinstance(value, dict) else value
    return decode(raw, topic="crm.events", partition=3, offset=offset, timestamp_ms=timestamp_ms, max_bytes=max_bytes)


def event_of(value: bytes | dict[str, Any], **kwargs: Any) -> Event:
    result = decoded(value, **kwargs)
    assert isinstance(result, Event), result
    return result


def bad_of(value: bytes | dict[str, Any] | None, **kwargs: Any) -> BadEvent:
    result = decoded(value, **kwargs)
    assert isinstance(result, BadEvent), result
    return result


def without(field: str) -> dict[str, Any]:
    doc = record()
    del doc[field]
    return doc


# Bad events, one per reason.


def test_a_record_without_a_value_is_an_empty_bad_event() -> None:
    assert bad_of(None).reason == "empty"


def test_a_zero_length_value_is_a_bad_event() -> None:
    assert bad_of(b"").reason in ("empty", "invalid_json")


def test_a_value_over_the_size_limit_is_too_large_and_one_at_the_limit_is_not() -> None:
    raw = orjson.dumps(record())

    assert isinstance(decoded(raw, max_bytes=len(raw)), Event)
    bad = bad_of(raw, max_bytes=len(raw) - 1)
    assert bad.reason == "too_large"
    assert str(len(raw)) in bad.detail


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b'{"event": "person.created",}', b"{'event': 'person.created'}", b"\x00", b"NaN"],
)
def test_a_value_that_is_not_json_is_invalid_json(raw: bytes) -> None:
    assert bad_of(raw).reason == "invalid_json"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event":"person.created","workspaceId":"' + WORKSPACE.encode() + b'","data":{"name":"\xff"}}',
        b'{"event":"person.created","workspaceId":"' + WORKSPACE.encode() + b'","data":{"name":"\xc3"}}',
        b'{"event":"person.created","workspaceId":"' + WORKSPACE.encode() + b'","data":{"n":"\xed\xa0\x80"}}',
    ],
    ids=["stray-byte", "truncated-sequence", "encoded-surrogate"],
)
def test_a_value_that_is_not_utf8_is_invalid_json(raw: bytes) -> None:
    assert bad_of(raw).reason == "invalid_json"


@pytest.mark.parametrize("raw", [b"[]", b'["person.created"]', b'"person.created"', b"42", b"true", b"null"])
def test_a_json_value_other_than_an_object_is_not_an_object(raw: bytes) -> None:
    assert bad_of(raw).reason == "not_an_object"


@pytest.mark.parametrize("field", ["event", "workspaceId", "data"])
def test_each_missing_required_field_is_named(field: str) -> None:
    bad = bad_of(without(field))

    assert bad.reason == "missing_field"
    assert f"`{field}`" in bad.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event", None),
        ("event", 1),
        ("event", ["person.created"]),
        ("event", {"name": "person.created"}),
        ("workspaceId", None),
        ("workspaceId", 12345),
        ("workspaceId", True),
        ("workspaceId", [WORKSPACE]),
        ("data", None),
        ("data", []),
        ("data", "name=Ada"),
        ("data", 7),
        ("timestamp", 1739201450123),
        ("timestamp", ["2025-02-10T15:30:50.123Z"]),
        ("timestamp", False),
        ("id", 17),
        ("id", {"id": "x"}),
        ("id", True),
    ],
)
def test_a_field_of_the_wrong_type_is_named(field: str, value: object) -> None:
    bad = bad_of(record(**{field: value}))

    assert bad.reason == "wrong_type"
    assert f"`{field}`" in bad.detail


@pytest.mark.parametrize(
    "name",
    [
        "",
        "person",
        "person.",
        ".created",
        "person.created.extra",
        "per son.created",
        "person-x.created",
        "p\u00e9rson.created",
        "*.created",
        "person.*",
        "person.created\n",
    ],
)
def test_an_event_name_not_of_the_form_object_action_is_invalid(name: str) -> None:
    bad = bad_of(record(event=name))

    assert bad.reason == "invalid_field"
    assert "`event`" in bad.detail


@pytest.mark.parametrize("workspace", ["", "workspace-1", "1234", WORKSPACE[:-1], WORKSPACE + "0", "not-a-uuid-at-all"])
def test_a_workspace_id_that_is_not_a_uuid_is_invalid(workspace: str) -> None:
    bad = bad_of(record(workspaceId=workspace))

    assert bad.reason == "invalid_field"
    assert "`workspaceId`" in bad.detail


@pytest.mark.parametrize("event_id", ["", " leading", "trailing ", "line\nbreak", "nul\x00", "caf\u00e9", "x" * 257])
def test_an_event_id_that_cannot_travel_in_a_header_is_invalid(event_id: str) -> None:
    bad = bad_of(record(id=event_id))

    assert bad.reason == "invalid_field"
    assert "`id`" in bad.detail


def test_a_kafka_timestamp_past_year_9999_gives_no_latency_reference() -> None:
    event = event_of(record(timestamp="2025-02-10T15:30:50Z"), timestamp_ms=300_000_000_000_000)

    assert event.kafka_timestamp_ms is None


def test_without_a_timestamp_field_or_a_kafka_timestamp_the_record_is_bad() -> None:
    assert bad_of(record(), timestamp_ms=None).reason == "missing_field"
    assert bad_of(record(), timestamp_ms=-1).reason == "missing_field"


# Defaults and pass-through.


def test_the_default_id_is_topic_partition_offset() -> None:
    assert event_of(record(), offset=42).id == "crm.events:3:42"


def test_a_null_id_gets_the_default_id() -> None:
    assert event_of(record(id=None), offset=7).id == "crm.events:3:7"


def test_a_given_id_is_passed_through_unchanged() -> None:
    assert event_of(record(id='Evt/42:"x"~')).id == 'Evt/42:"x"~'


@pytest.mark.parametrize(
    ("kafka_ms", "iso"),
    [
        (KAFKA_MS, "2025-02-10T15:30:50.123Z"),
        (0, "1970-01-01T00:00:00.000Z"),
        (1739201450000, "2025-02-10T15:30:50.000Z"),
        (253402300800000, "+010000-01-01T00:00:00.000Z"),
    ],
)
def test_the_default_timestamp_is_the_kafka_timestamp_as_javascript_writes_it(kafka_ms: int, iso: str) -> None:
    event = event_of(record(), timestamp_ms=kafka_ms)

    assert orjson.loads(docs_body(event))["timestamp"] == iso
    # Past year 9999 the body still says what JavaScript says, but no calendar holds it for latency and retries.
    assert event.kafka_timestamp_ms == (kafka_ms if kafka_ms < 253_402_300_800_000 else None)


@pytest.mark.parametrize("given_timestamp", ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00.000000+00:00", "yesterday"])
def test_a_given_timestamp_is_passed_through_unchanged(given_timestamp: str) -> None:
    event = event_of(record(timestamp=given_timestamp))

    assert orjson.loads(docs_body(event))["timestamp"] == given_timestamp
    assert event.kafka_timestamp_ms == KAFKA_MS


def test_a_given_timestamp_needs_no_kafka_timestamp() -> None:
    event = event_of(record(timestamp="2024-01-01T00:00:00.000Z"), timestamp_ms=None)

    assert orjson.loads(docs_body(event))["timestamp"] == "2024-01-01T00:00:00.000Z"
    assert event.kafka_timestamp_ms is None


@pytest.mark.parametrize("workspace", [WORKSPACE.upper(), WORKSPACE.replace("-", ""), "{" + WORKSPACE + "}"])
def test_the_workspace_id_is_normalised_to_the_lowercase_canonical_uuid(workspace: str) -> None:
    assert event_of(record(workspaceId=workspace)).workspace_id == WORKSPACE


def test_an_event_carries_its_name_and_splits_into_object_and_action() -> None:
    event = event_of(record(event="Company_2.updated_v2"))

    assert event.name == "Company_2.updated_v2"
    assert event.object_and_action == ("Company_2", "updated_v2")


def test_the_body_is_compact_json_with_event_data_timestamp_in_that_order() -> None:
    event = event_of(record(data={"name": "Ada", "emails": ["ada@example.com"], "age": 36}))

    assert docs_body(event) == (
        b'{"event":"person.created","data":{"name":"Ada","emails":["ada@example.com"],"age":36},'
        b'"timestamp":"2025-02-10T15:30:50.123Z"}'
    )


def test_the_body_leaves_out_workspace_id_and_other_fields_of_the_record() -> None:
    event = event_of(record(id="e-1", timestamp="2024-01-01T00:00:00.000Z", extra={"x": 1}))

    assert list(orjson.loads(docs_body(event))) == ["event", "data", "timestamp"]
    assert docs_body(event).startswith(b'{"event":"person.created","data":{"name":"Ada"},"timestamp":')


def test_a_kafka_timestamp_beyond_javascripts_date_range_does_not_raise() -> None:
    result = decoded(record(), timestamp_ms=8_640_000_000_000_001)

    assert isinstance(result, Event | BadEvent)


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400"], ids=["huge", "huge-negative"])
def test_valid_json_with_a_number_beyond_the_double_range_is_delivered(literal: bytes) -> None:
    raw = b'{"event":"person.created","workspaceId":"' + WORKSPACE.encode() + b'","data":{"n":' + literal + b"}}"

    event = decoded(raw)

    assert isinstance(event, Event)
    assert b'"data":{"n":null}' in docs_body(event)


# decode never raises.

KAFKA_TIMESTAMPS = st.none() | st.integers(min_value=-(2**63), max_value=8_640_000_000_000_000)
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)
FIELD_VALUES = JSONISH | st.sampled_from(["person.created", "*.*", WORKSPACE, WORKSPACE.upper(), ""])
RECORDS = st.dictionaries(
    st.sampled_from(["event", "workspaceId", "data", "timestamp", "id"]) | TEXT, FIELD_VALUES, max_size=7
) | st.builds(
    record,
    data=st.dictionaries(TEXT, JSONISH, max_size=4) | JSONISH,
)


@given(st.binary(max_size=300), KAFKA_TIMESTAMPS, st.integers(min_value=1, max_value=400))
def test_decode_never_raises_on_arbitrary_bytes(raw: bytes, kafka_ms: int | None, max_bytes: int) -> None:
    result = decode(raw, topic="t", partition=0, offset=0, timestamp_ms=kafka_ms, max_bytes=max_bytes)

    assert isinstance(result, Event | BadEvent)


@given(JSONISH | RECORDS, KAFKA_TIMESTAMPS)
def test_decode_never_raises_on_arbitrary_json(doc: object, kafka_ms: int | None) -> None:
    raw = orjson.dumps(doc)
    result = decode(raw, topic="t", partition=0, offset=0, timestamp_ms=kafka_ms, max_bytes=MAX_BYTES)

    assert isinstance(result, Event | BadEvent)
    if isinstance(result, Event):
        assert list(orjson.loads(docs_body(result))) == ["event", "data", "timestamp"]
