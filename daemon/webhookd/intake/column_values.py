"""Debezium's encodings of Postgres values -> the values Twenty's API shows for them.

A decoder is chosen once per column from its Postgres type (read from the catalog, so records without the
`{"schema","payload"}` wrapper decode as well as wrapped ones) and Debezium's schema of the column where the record
carries one. Most columns (text, uuid, enums, booleans, small integers) need none and pass as they are.

| Postgres type | Debezium sends | delivered as |
| --- | --- | --- |
| timestamptz | ZonedTimestamp string, any fraction | `2025-02-10T15:30:50.123Z` |
| timestamp | micro-, nano- or milliseconds (time.precision.mode) | the same form, read as UTC |
| date | days since the epoch | `2025-02-10` |
| numeric | string, precise bytes, variable-scale struct, double | Postgres' exact text, or a number (`NumericAs`) |
| json, jsonb | the document as a string | the document |
| arrays | arrays of the element's encoding | arrays |

Precise bytes take their scale from the record's schema or, unwrapped, from the column's type.
A value a decoder cannot read raises `Undecodable`; the caller names the table and column.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import decimal
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import orjson

from webhookd.delivery.payload import (
    MAX_SAFE_INTEGER,
    TooDeep,
    javascript_compatible,
    javascript_number,
    js_iso_timestamp,
)
from webhookd.intake.native import json_kind

Decoder = Callable[[Any], Any]
# How a numeric column reaches the record: Postgres' exact text (Twenty passes `numeric` through as node-postgres
# reads it), or a number where Twenty's formatting makes one: parseInt for a currency's amountMicros, parseFloat
# for an address's latitude and longitude.
NumericAs = Literal["text", "integer", "float"]

DEFAULT_PLACEHOLDER: Final = "__debezium_unavailable_value"

_EPOCH_DATE: Final = datetime.date(1970, 1, 1)
# Debezium's names for the logical types whose unit is not the column's Postgres type alone.
_MICROS = ("io.debezium.time.MicroTimestamp",)
_NANOS = ("io.debezium.time.NanoTimestamp",)
_MILLIS = ("io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp")
_DECIMAL_BYTES = "org.apache.kafka.connect.data.Decimal"
# Postgres' numeric: up to 131072 digits before the point and 16383 after it.
_MAX_SCALE: Final = 16383
_MAX_DIGITS: Final = 131072
# Debezium's ZonedTimestamp of a timestamptz is always UTC: `2025-02-10T15:30:50.123456Z`, 0 to 9 fraction digits.
# A day past the 28th goes the long way, where the calendar says whether it exists.
_ZONED_UTC: Final = re.compile(
    r"(?!0000)[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{1,9})?Z"
)


class Undecodable(ValueError):
    """A value that is not in any encoding Debezium uses for its column's type."""


def decoder_for(
    pg_type: str, element_type: str | None, column_schema: Mapping[str, Any] | None, numeric_as: NumericAs = "text"
) -> Decoder | None:
    """The decoder of a column, or None when its values pass unchanged.

    `pg_type` is Postgres' `format_type` text (`numeric(10,2)`, `timestamp with time zone`, `text[]`); for an
    array, `element_type` is that of its elements.
    """
    if element_type is not None:
        element = decoder_for(element_type, None, _element_schema(column_schema), numeric_as)
        return None if element is None else _array_of(element)
    base, _, modifier = pg_type.partition("(")
    base = base.strip()
    name = column_schema.get("name") if column_schema else None
    if base == "timestamp with time zone":
        return _timestamptz
    if base == "timestamp without time zone":
        return _timestamp_in(_timestamp_unit(name))
    if base == "date":
        return _date
    if base in ("numeric", "money"):
        return _numeric_decoder(_scale(modifier, base, column_schema), name, _NUMERIC_SHAPES[numeric_as])
    if base in ("json", "jsonb"):
        return _json_document
    if base in ("double precision", "real"):
        return _double
    if base == "bigint":
        return _javascript_value  # beyond 2**53, JavaScript reads the nearest double
    return None


def _element_schema(column_schema: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    items = column_schema.get("items") if column_schema else None
    return items if isinstance(items, dict) else None


def _array_of(element: Decoder) -> Decoder:
    def decode(value: Any) -> Any:
        if not isinstance(value, list):
            raise Undecodable(f"expected an array, got {json_kind(value)}")
        return [None if item is None else element(item) for item in value]

    return decode


def _timestamptz(value: Any) -> Any:
    if type(value) is str:
        if _ZONED_UTC.fullmatch(value):
            # Already JavaScript's form but for the fraction, which a Date truncates to milliseconds.
            return f"{value[:19]}.{(value[20:-1] + '000')[:3]}Z"
        return _iso_timestamp(value)
    if type(value) is int:  # time.precision.mode=connect on a type Debezium otherwise sends as a string
        return js_iso_timestamp(value)
    raise Undecodable(f"expected an ISO-8601 timestamp, got {json_kind(value)}")


def _iso_timestamp(text: str) -> str:
    """`2025-02-10T15:30:50.123456Z` (any fraction, any offset) -> `2025-02-10T15:30:50.123Z`."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        if text in ("infinity", "-infinity"):
            raise Undecodable(f"{text} has no JavaScript Date") from None
        raise Undecodable(f"{text[:40]!r} is not an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    delta = moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    # Whole milliseconds, truncated as JavaScript's Date keeps them (a Date has no microseconds).
    return js_iso_timestamp((delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000)


def _timestamp_unit(schema_name: object) -> int:
    """Debezium's units per millisecond for `timestamp` columns; adaptive mode's microseconds when unknown."""
    if schema_name in _MILLIS:
        return 1
    if schema_name in _NANOS:
        return 1_000_000
    return 1000


def _timestamp_in(per_ms: int) -> Decoder:
    def decode(value: Any) -> Any:
        if type(value) is int:
            return js_iso_timestamp(value // per_ms)
        if isinstance(value, str):
            return _iso_timestamp(value)
        raise Undecodable(f"expected a number of {_UNIT_NAMES[per_ms]} since the epoch, got {json_kind(value)}")

    return decode


_UNIT_NAMES: Final = {1: "milliseconds", 1000: "microseconds", 1_000_000: "nanoseconds"}


def _date(value: Any) -> Any:
    if type(value) is int:
        try:
            return (_EPOCH_DATE + datetime.timedelta(days=value)).isoformat()
        except OverflowError:
            raise Undecodable(f"{value} days from 1970-01-01 is outside the calendar") from None
    if isinstance(value, str) and len(value) >= 10:
        try:
            return datetime.date.fromisoformat(value[:10]).isoformat()
        except ValueError:
            pass
    raise Undecodable(f"expected a number of days since the epoch, got {json_kind(value)}")


def _scale(modifier: str, base: str, column_schema: Mapping[str, Any] | None) -> int | None:
    """The column's fixed scale: from Debezium's schema where the record has one, else from the type."""
    params = column_schema.get("parameters") if column_schema else None
    if isinstance(params, dict) and "scale" in params:
        try:
            return int(params["scale"])
        except (TypeError, ValueError):
            pass
    if base == "money":
        return 2
    _, comma, scale = modifier.rstrip(")").partition(",")
    if comma:
        return int(scale)
    return 0 if modifier else None  # numeric(p) has scale 0; plain numeric has none


def _numeric_decoder(scale: int | None, schema_name: object, shape: Callable[[decimal.Decimal], Any]) -> Decoder:
    def decode(value: Any) -> Any:
        try:
            return read(value)
        except ArithmeticError as exc:  # decimal's InvalidOperation and Overflow: no number Postgres could hold
            raise Undecodable(f"not a decimal Postgres can hold ({type(exc).__name__})") from None

    def read(value: Any) -> Any:
        kind = type(value)
        if kind is int or kind is float:
            # decimal.handling.mode=double: the exact value is already lost; the double is what there is.
            return shape(decimal.Decimal(value)) if kind is int else _from_double(value, shape)
        if kind is dict:
            given = value.get("scale")
            if type(given) is int and given == 0 and shape is not _as_float:
                # An integer (a currency's micros, mostly): its digits, without a Decimal in between.
                whole = _unscaled_integer(value.get("value"))
                if shape is _as_text:
                    return str(whole)
                return whole if -MAX_SAFE_INTEGER <= whole <= MAX_SAFE_INTEGER else shape(decimal.Decimal(whole))
            return shape(_variable_scale(value))
        if kind is str:
            if schema_name != _DECIMAL_BYTES:
                exact = _decimal_text(value)
                # Debezium's string mode writes a positive scale's point; precise bytes' base64 never has one.
                if exact is not None and (scale is None or scale <= 0 or "." in value):
                    return shape(exact)
            if scale is None:
                raise Undecodable(f"{value[:40]!r} is neither a decimal nor bytes with a known scale")
            return shape(_unscaled(value, scale))
        raise Undecodable(f"expected a decimal, got {json_kind(value)}")

    return decode


def _from_double(value: float, shape: Callable[[decimal.Decimal], Any]) -> Any:
    if value != value or value in (float("inf"), float("-inf")):
        return None
    # The digits JavaScript shows for the double, not the double's full binary expansion.
    return shape(decimal.Decimal(javascript_number(value)))


def _as_text(exact: decimal.Decimal) -> str:
    """Postgres' own text for a numeric: plain digits, the value's scale kept (`1234.50`, never `1.2345E+3`)."""
    return format(exact, "f")


def _as_integer(exact: decimal.Decimal) -> Any:
    """parseInt of Postgres' text: the integral part, as the JSON number JavaScript writes for it."""
    return _number(decimal.Decimal(int(exact)))


def _as_float(exact: decimal.Decimal) -> Any:
    """parseFloat of Postgres' text: the nearest double, as JavaScript writes it."""
    return _number(exact)


_NUMERIC_SHAPES: Final[dict[str, Callable[[decimal.Decimal], Any]]] = {
    "text": _as_text,
    "integer": _as_integer,
    "float": _as_float,
}


def _decimal_text(text: str) -> decimal.Decimal | None:
    try:
        exact = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None
    return exact if exact.is_finite() and _holdable(exact) else None


def _variable_scale(struct: dict[str, Any]) -> decimal.Decimal:
    """io.debezium.data.VariableScaleDecimal: `{"scale": s, "value": base64 of the unscaled two's complement}`."""
    scale, value = struct.get("scale"), struct.get("value")
    if type(scale) is not int or not isinstance(value, str):
        raise Undecodable("expected a variable-scale decimal {scale, value}")
    return _unscaled(value, scale)


def _unscaled(text: str, scale: int) -> decimal.Decimal:
    if not -_MAX_SCALE <= scale <= _MAX_SCALE:
        raise Undecodable(f"a scale of {scale} is beyond what a Postgres numeric has")
    return decimal.Decimal(_unscaled_integer(text)).scaleb(-scale)


def _holdable(exact: decimal.Decimal) -> bool:
    """Within what a Postgres numeric holds, so that no arithmetic on it can take long."""
    return -_MAX_SCALE <= exact.as_tuple().exponent <= _MAX_DIGITS  # type: ignore[operator]  # finite: an int


def _unscaled_integer(text: Any) -> int:
    if not isinstance(text, str):
        raise Undecodable("expected a variable-scale decimal {scale, value}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Undecodable(f"{text[:40]!r} is not the base64 bytes of a decimal") from None
    return int.from_bytes(raw, "big", signed=True)


def _number(exact: decimal.Decimal) -> Any:
    """A decimal as the JSON number a JavaScript receiver reads: exact where a double holds it."""
    if exact == exact.to_integral_value():
        whole = int(exact)
        if -MAX_SAFE_INTEGER <= whole <= MAX_SAFE_INTEGER:
            return whole
    return orjson.Fragment(javascript_number(float(exact)).encode())


def _json_document(value: Any) -> Any:
    if not isinstance(value, str):
        return _javascript_value(value)  # a converter that already parsed it
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise Undecodable(f"{value[:40]!r} is not a JSON document") from None
    return _javascript_value(document)


def _double(value: Any) -> Any:
    if type(value) is float:
        if value.is_integer():
            if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
                return int(value)  # what JavaScript writes for an integral double, -0 included
        elif 1e-5 <= abs(value) < 2.0**53:
            return value  # orjson writes these digits as JavaScript does
    return _javascript_value(value)


def _javascript_value(value: Any) -> Any:
    try:
        return javascript_compatible(value)
    except TooDeep as exc:
        raise Undecodable(str(exc)) from None


def is_unavailable(value: Any, placeholder: str, placeholder_b64: str) -> bool:
    """Whether Debezium left the value out (TOAST unchanged, or replica identity) and put its placeholder there."""
    kind = type(value)
    if kind is str:
        return value in (placeholder, placeholder_b64)
    if kind is list:
        return len(value) == 1 and value[0] in (placeholder, placeholder_b64)
    if kind is dict:
        return bool(value.get("value") == placeholder_b64)
    return False


def placeholder_base64(placeholder: str) -> str:
    """How the placeholder reads in a bytes column (and in precise decimals)."""
    return base64.b64encode(placeholder.encode()).decode()
