"""The webhook request body, byte-compatible with JavaScript (its signatures are in `signing`).

Receivers verify a delivery with Twenty's documented Node.js check, which signs
``JSON.stringify(JSON.parse(body))`` rather than the bytes it received.  A signature only
verifies if our body is already in the exact form JavaScript re-serializes it to, so
:func:`build_body` emits that form.  orjson does the serialization; Python only touches
the values where orjson and ``JSON.stringify`` disagree:

* numbers: JavaScript prints a double with ``Number.prototype.toString`` (``1.0`` is
  ``1``, ``1e20`` is ``100000000000000000000``, ``-0.0`` is ``0``, ``0.000001`` stays
  decimal), and reads integers beyond 2**53 - 1 as the nearest double;
* object keys that are array indices, which JavaScript enumerates before all other keys,
  in ascending numeric order;
* nesting deeper than orjson's serializer allows (orjson.loads accepts more levels than
  orjson.dumps does).

Strings need no work: orjson escapes exactly the characters ``JSON.stringify`` escapes,
with the same escape sequences (the tests hold both to it for every code point).  The one
exception, a lone surrogate, which JavaScript escapes and orjson refuses to encode, never
comes out of ``orjson.loads``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any, Final

import orjson

__all__ = [
    "MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "TooDeep",
    "build_body",
    "javascript_compatible",
    "javascript_json",
    "javascript_number",
    "js_iso_timestamp",
]

MAX_SAFE_INTEGER: Final = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER
_MAX_ARRAY_INDEX: Final = 2**32 - 2

# orjson.dumps refuses more than 254 nested containers, while orjson.loads accepts 1024.
# Deeper data is refused outright: embedding pre-serialized subtrees as orjson Fragments
# would lift the limit, but orjson 3.13 writes past its buffer for large fragments.  No
# CRM record nests anywhere near this deep.
MAX_DEPTH: Final = 128

# orjson writes a non-integral double of at least this magnitude in plain decimal
# notation with its shortest round-trip digits, exactly as JavaScript does; below it
# orjson switches to exponent notation, which JavaScript only does below 1e-6.
# Non-integral doubles never reach the large-magnitude cases (they are all below 2**52).
_MIN_PLAIN_FLOAT: Final = 1e-5


def build_body(event: str, data: dict[str, Any], timestamp: str) -> bytes:
    """Serialize the webhook body ``{"event":E,"data":D,"timestamp":T}``.

    The result is compact UTF-8 JSON whose bytes equal JavaScript's
    ``JSON.stringify(JSON.parse(body))``, so the documented Node.js signature check
    accepts every delivery.  ``data`` is what ``orjson.loads`` produced from the event
    record; it is never modified.

    Numbers are written as JavaScript would see them: an integer beyond +/-(2**53 - 1)
    arrives as the nearest double (``12345678901234567890`` becomes
    ``12345678901234567000``), one beyond the double range as ``null``, and integral
    floats lose their fraction (``1.0`` becomes ``1``).  Receivers therefore get the
    value JavaScript would have given them, not the digits of the original record.

    Strings containing lone surrogates cannot be encoded as UTF-8 and raise
    ``orjson.JSONEncodeError``; ``orjson.loads`` never produces them.  Data nested deeper
    than ``MAX_DEPTH`` raises ``TooDeep``.
    """
    if _needs_rewrite(data):
        data = _javascript_compatible(data)
    return orjson.dumps({"event": event, "data": data, "timestamp": timestamp})


def javascript_json(value: Any) -> bytes:
    """``value`` as compact JSON in the form ``JSON.stringify(JSON.parse(...))`` gives back (see `build_body`)."""
    return orjson.dumps(javascript_compatible(value))


def javascript_compatible(value: Any) -> Any:
    """``value`` as orjson must see it to write what JavaScript would: ``value`` itself when nothing differs."""
    if _needs_rewrite(value):
        return _javascript_compatible(value)
    return value


_EPOCH: Final = datetime.date(1970, 1, 1)
_MS_PER_DAY: Final = 86_400_000
# The proleptic Gregorian calendar repeats every 400 years, which are exactly this many
# days; shifting by whole cycles keeps every date inside what datetime.date can hold.
_DAYS_PER_400_YEARS: Final = 146_097
# ECMAScript's time value range: +/-100,000,000 days around the epoch.
_MAX_TIME_VALUE_MS: Final = 8_640_000_000_000_000


def js_iso_timestamp(epoch_ms: int) -> str:
    """Return what JavaScript's ``new Date(epoch_ms).toISOString()`` returns.

    For example ``2025-02-10T15:30:50.123Z``.  Years outside 0..9999 use JavaScript's
    signed six-digit form (``+010000-01-01T00:00:00.000Z``); where JavaScript throws a
    ``RangeError`` (beyond +/-8.64e15 ms), this raises ``ValueError``.
    """
    if not -_MAX_TIME_VALUE_MS <= epoch_ms <= _MAX_TIME_VALUE_MS:
        raise ValueError(f"{epoch_ms} ms is outside JavaScript's Date range")
    days, ms_of_day = divmod(epoch_ms, _MS_PER_DAY)
    cycles, day_in_cycle = divmod(days, _DAYS_PER_400_YEARS)
    date = _EPOCH + datetime.timedelta(days=day_in_cycle)
    year = date.year + 400 * cycles
    seconds, millis = divmod(ms_of_day, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    year_text = f"{year:04d}" if 0 <= year <= 9999 else f"{year:+07d}"
    return f"{year_text}-{date.month:02d}-{date.day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{millis:03d}Z"


class TooDeep(ValueError):
    """The data nests deeper than a body can be written."""


def _needs_rewrite(data: Any) -> bool:
    """Tell whether orjson's serialization of ``data`` could differ from JavaScript's.

    This runs for every event, so it only inspects and never allocates per value.  It
    may answer True for data that turns out fine (any key made of decimal digits, say);
    the rewrite then simply returns the data unchanged.  It walks level by level with an
    explicit work list, so no nesting depth can exhaust Python's recursion limit.
    """
    level: list[Any] = [data]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise TooDeep(f"`data` nests deeper than {MAX_DEPTH} levels")
        below: list[Any] = []
        for node in level:
            if type(node) is dict:
                for key in node:
                    if key.isdecimal():
                        return True
                values: Any = node.values()
            elif type(node) is list:
                values = node
            else:
                values = (node,)
            for value in values:
                kind = type(value)
                if kind is str:
                    continue
                if kind is dict or kind is list:
                    below.append(value)
                elif kind is int:
                    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
                        return True
                elif kind is float and not _orjson_float_is_javascript(value):
                    return True
        level = below
    return False


def _orjson_float_is_javascript(value: float) -> bool:
    # The upper bound, redundant for finite non-integral doubles, turns infinity away and
    # NaN fails every comparison: both write null either way, but the rewrite then decides
    # that instead of orjson.
    return not value.is_integer() and _MIN_PLAIN_FLOAT <= abs(value) < 2.0**53


class _Container:
    """One dict or list being rebuilt by :func:`_javascript_compatible`."""

    __slots__ = ("changed", "depth", "key", "keys", "pending", "source", "values")

    def __init__(self, source: dict[str, Any] | list[Any], key: Any, depth: int) -> None:
        self.source = source
        # The key under which the rebuilt container goes into its parent dict.
        self.key = key
        self.depth = depth
        self.pending: Iterator[tuple[Any, Any]] = iter(source.items() if type(source) is dict else enumerate(source))
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.changed = False

    def add(self, key: Any, value: Any, original: Any) -> None:
        self.keys.append(key)
        self.values.append(value)
        if value is not original:
            self.changed = True

    def finish(self) -> Any:
        result: Any = self.source
        if type(self.source) is dict:
            order = _javascript_key_order(self.keys)
            if order is not None:
                result = {self.keys[i]: self.values[i] for i in order}
            elif self.changed:
                result = dict(zip(self.keys, self.values, strict=True))
        elif self.changed:
            result = self.values
        return result


def _javascript_compatible(data: Any) -> Any:
    """Return ``data`` rebuilt so that orjson writes what JavaScript would, or ``data`` itself.

    Containers are copied only where something inside them changed; the input is never
    modified.  The walk keeps its own stack instead of recursing, because orjson.loads
    accepts 1024 levels and Python's default recursion limit is 1000.
    """
    if type(data) is not dict and type(data) is not list:
        return _javascript_scalar(data)
    stack = [_Container(data, "", 1)]
    while True:
        top = stack[-1]
        child = None
        keys, values = top.keys, top.values
        # Inlined rather than calling top.add: this loop sees every scalar of the record.
        for key, value in top.pending:
            kind = type(value)
            if kind is dict or kind is list:
                if top.depth >= MAX_DEPTH:
                    raise TooDeep(f"`data` nests deeper than {MAX_DEPTH} levels")
                child = _Container(value, key, top.depth + 1)
                break
            if kind is float or kind is int:
                fixed = _javascript_scalar(value)
                if fixed is not value:
                    top.changed = True
                    value = fixed
            keys.append(key)
            values.append(value)
        if child is not None:
            stack.append(child)
            continue
        stack.pop()
        result = top.finish()
        if not stack:
            return result
        stack[-1].add(top.key, result, top.source)


def _javascript_scalar(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        if _orjson_float_is_javascript(value):
            return value
        return orjson.Fragment(javascript_number(value).encode())
    if kind is int and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        try:
            as_double = float(value)
        except OverflowError:
            # JSON.parse reads such a literal as +/-Infinity, which JSON.stringify writes as null.
            return orjson.Fragment(b"null")
        # int-to-float conversion rounds to nearest, ties to even, as JSON.parse does.
        return orjson.Fragment(javascript_number(as_double).encode())
    return value


def javascript_number(value: float) -> str:
    """Format a double as ECMAScript's Number::toString does, or ``null`` if not finite."""
    if value != value or value in (float("inf"), float("-inf")):
        return "null"
    if value == 0:
        return "0"  # covers -0.0, which JavaScript prints without its sign
    # repr yields the shortest digit string that round-trips, the same digits
    # Number::toString starts from; only their layout differs.
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    # point: how many digits stand before the decimal point, as in value = 0.DIGITS * 10**point.
    point = len(whole) + (int(exponent) if exponent else 0)
    significant = digits.lstrip("0")
    point -= len(digits) - len(significant)
    digits = significant.rstrip("0")
    count = len(digits)
    if count <= point <= 21:
        text = digits + "0" * (point - count)
    elif 0 < point <= 21:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        fraction_digits = f".{digits[1:]}" if count > 1 else ""
        text = f"{digits[0]}{fraction_digits}e{point - 1:+d}"
    return "-" + text if value < 0 else text


def _javascript_key_order(keys: list[str]) -> list[int] | None:
    """Return the positions of ``keys`` in JavaScript's enumeration order, or None if unchanged."""
    indices = [
        (int(key), position)
        for position, key in enumerate(keys)
        if key.isdecimal() and _is_array_index(key)  # isdecimal first: cheap, and rarely true
    ]
    if not indices:
        return None
    indices.sort()
    first = {position for _, position in indices}
    order = [position for _, position in indices]
    order.extend(position for position in range(len(keys)) if position not in first)
    if order == list(range(len(keys))):
        return None
    return order


def _is_array_index(key: str) -> bool:
    # An array index is the canonical decimal form of an integer in 0 .. 2**32 - 2: ASCII
    # digits only, no leading zero, no sign; the length test keeps int() off long strings.
    return (
        key.isdecimal()
        and key.isascii()
        and len(key) <= 10
        and (key[0] != "0" or key == "0")
        and int(key) <= _MAX_ARRAY_INDEX
    )
