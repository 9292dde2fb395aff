"""One Kafka record becomes an Event, or a BadEvent that says what is wrong with it.

A record is parsed exactly once, here; the body sent to receivers is built from this parse (see `payload`).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import orjson

from webhookd.delivery.payload import TooDeep, javascript_json, js_iso_timestamp
from webhookd.model import BadEvent, Event

_EVENT_NAME = re.compile(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
_MAX_ID = 256
# Printable ASCII; inner spaces are fine, but a header value loses leading and trailing ones on the way.
_EVENT_ID = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
# Kafka allows any int64 timestamp; latency and the retry table need one a calendar can hold (up to year 9999).
_LATEST_USABLE_MS = 253_402_300_799_999


def decode(
    value: bytes | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    max_bytes: int,
) -> Event | BadEvent:
    """Validate one record's value against the input contract."""
    if value is None:
        return BadEvent("empty", "the record has no value (a tombstone?)")
    if len(value) > max_bytes:
        return BadEvent("too_large", f"the record is {len(value)} bytes; delivery.max_event_bytes is {max_bytes}")
    doc = parse_json(value)
    if isinstance(doc, BadEvent):
        return doc
    if not isinstance(doc, dict):
        return BadEvent("not_an_object", f"the value is a JSON {type(doc).__name__}, not an object")
    problem = _check_fields(doc)
    if problem is not None:
        return problem

    event_id = doc.get("id")
    if event_id is None:
        event_id = f"{topic}:{partition}:{offset}"
    timestamp = doc.get("timestamp")
    try:
        if timestamp is None:
            if timestamp_ms is None or timestamp_ms < 0:
                return BadEvent("missing_field", "no `timestamp` field and the Kafka record carries no timestamp")
            timestamp = js_iso_timestamp(timestamp_ms)
        data = javascript_json(doc["data"])
    except TooDeep as exc:
        return BadEvent("too_deep", str(exc))
    except (ValueError, TypeError) as exc:  # a lone surrogate, or a Kafka timestamp outside JavaScript's Date range
        return BadEvent("unserializable", f"the event cannot be written as JSON: {exc}")
    return Event(
        id=event_id,
        name=doc["event"],
        workspace_id=str(uuid.UUID(doc["workspaceId"])),
        timestamp=timestamp,
        data=data,
        kafka_timestamp_ms=usable_timestamp(timestamp_ms),
        updated_fields=tuple(doc["updatedFields"]) if doc.get("updatedFields") is not None else None,
    )


def usable_timestamp(timestamp_ms: int | None) -> int | None:
    """The Kafka timestamp where a calendar can hold it (latency and the retry table need that), else None."""
    return timestamp_ms if timestamp_ms is not None and 0 <= timestamp_ms <= _LATEST_USABLE_MS else None


def parse_json(value: bytes) -> Any:
    """The record's value parsed as JSON, or a BadEvent saying why it is not JSON."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        doc = _parse_leniently(value)
        if doc is None:
            return BadEvent("invalid_json", f"not valid UTF-8 JSON: {exc}")
        return doc


def _parse_leniently(value: bytes) -> Any:
    """Parse valid JSON that orjson refuses: numbers beyond a double (JavaScript reads them as Infinity and
    writes null) and lone surrogate escapes. None when it is not JSON at all."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def javascript_int(text: str) -> int | float:
        # Python refuses to read integers of more than 4300 digits; JavaScript reads them as Infinity (null).
        return int(text) if len(text) <= 4300 else float(text)

    try:
        return json.loads(value.decode("utf-8"), parse_constant=refuse_constant, parse_int=javascript_int)
    except (ValueError, RecursionError):
        return None


def _check_fields(doc: dict[str, Any]) -> BadEvent | None:
    for field in ("event", "workspaceId", "data"):
        if field not in doc:
            return BadEvent("missing_field", f"required field `{field}` is missing")
    name = doc["event"]
    if not isinstance(name, str):
        return _wrong_type("event", "a string", name)
    if not _EVENT_NAME.fullmatch(name):
        return BadEvent("invalid_field", f"`event` must look like object.action with [A-Za-z0-9_], got {name[:80]!r}")
    workspace = doc["workspaceId"]
    if not isinstance(workspace, str):
        return _wrong_type("workspaceId", "a string", workspace)
    try:
        uuid.UUID(workspace)
    except ValueError:
        # Workspaces are UUIDs in the subscriptions table: any other value can never match, so say so loudly.
        return BadEvent("invalid_field", f"`workspaceId` is not a UUID: {workspace[:80]!r}")
    if not isinstance(doc["data"], dict):
        return _wrong_type("data", "an object", doc["data"])
    for field in ("timestamp", "id"):
        value = doc.get(field)
        if value is not None and not isinstance(value, str):
            return _wrong_type(field, "a string", value)
    updated = doc.get("updatedFields")
    if updated is not None and (not isinstance(updated, list) or not all(isinstance(f, str) for f in updated)):
        return _wrong_type("updatedFields", "an array of strings", updated)
    event_id = doc.get("id")
    if event_id is not None and (len(event_id) > _MAX_ID or not _EVENT_ID.fullmatch(event_id)):
        # It travels in the X-Twenty-Webhook-Event-Id header, where only visible ASCII is safe everywhere.
        return BadEvent(
            "invalid_field",
            f"`id` must be 1-{_MAX_ID} printable ASCII characters without a space at either end, got {event_id[:80]!r}",
        )
    return None


def _wrong_type(field: str, expected: str, value: object) -> BadEvent:
    return BadEvent("wrong_type", f"`{field}` must be {expected}, got {json_kind(value)}")


def json_kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
