"""The per-webhook filter language: its text form parsed, checked against its limits and compiled.

A webhook's filter has two optional parts; an event reaches the webhook only if it passes both.

`updated_fields`: a list of field names (at most 100, each `[A-Za-z_][A-Za-z0-9_]*`). An `updated` event passes
only if its `updatedFields` names at least one of them. An update whose changed fields are unknown (a Debezium
change from a table without `REPLICA IDENTITY FULL` carries none) passes: webhookd never drops what may be wanted.
Events of every other action (created, deleted, restored, destroyed, ...) pass this part.

`where`: a list of predicates (at most 20, each at most 500 characters) on the event's record, its `data`; all of
them must hold, whatever the action. Each predicate is one of

    PATH = VALUE
    PATH in [VALUE, VALUE, ...]        (1 to 100 values; holds if the field equals any of them)
    PATH is null
    PATH is not null

Keywords are case-insensitive and spaces are free. PATH is a key of the record, or dot-separated keys into nested
objects (`stage`, `name.firstName`, `amount.amountMicros`; at most 8 keys, each `[A-Za-z_][A-Za-z0-9_]*`). A missing
key, or a path through something that is not an object, reads as null. VALUE is a JSON string (`"Closed won"`),
number, `true`, `false` or `null`, or a bare word (`[A-Za-z_][A-Za-z0-9_.-]*`) taken as a string, so that
`stage in [WON, LOST]` means `stage in ["WON", "LOST"]`; bare `true`, `false` and `null` (in any case) are the JSON
literals, quote them to mean the strings. Equality is JSON's and strict about types: `true` equals only `true` (never
`1`), `"1"` never equals `1`, `1` equals `1.0`, and an object or array in the record equals no VALUE. `PATH = null`
is `PATH is null`.

Examples: `stage in [WON, LOST]`, `amount.currencyCode = USD`, `amount.amountMicros = 0`, `deletedAt is null`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import orjson

from webhookd.routing.filters import Op, Predicate, Scalar, WebhookFilter

MAX_UPDATED_FIELDS: Final = 100
MAX_PREDICATES: Final = 20
MAX_PREDICATE_CHARS: Final = 500
MAX_IN_VALUES: Final = 100
MAX_PATH_SEGMENTS: Final = 8

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# A path ends where an operator, a bracket, a quote or a space begins; what it holds is checked segment by segment,
# so that a bad key is reported as such rather than as a missing operator.
_PATH_TOKEN: Final = re.compile(r"[^\s=\[\],\"]+")
_KEYWORD: Final = re.compile(r"[A-Za-z]+")
_SPACE: Final = re.compile(r"[ \t\r\n]*")
_LITERALS: Final[dict[str, Scalar]] = {"true": True, "false": False, "null": None}
_OPERATOR_EXPECTED: Final = "expected =, in [...], is null or is not null after the path"
_SHOWN_CHARS: Final = 80


class FilterError(ValueError):
    """A filter that cannot be used; the message names the predicate or field and what is wrong with it."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def _json(value: Scalar) -> str:
    # str() for integers: orjson refuses those beyond 64 bits, which a filter may still name.
    if type(value) is int:
        return str(value)
    return orjson.dumps(value).decode()


class _Parser:
    """One predicate's text, read left to right; every error names the predicate."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, problem: str) -> FilterError:
        return FilterError(f"where {_shown(self.text)}: {problem}")

    def space(self) -> None:
        match = _SPACE.match(self.text, self.pos)
        assert match is not None  # `*` matches the empty string
        self.pos = match.end()

    def rest(self) -> str:
        rest = self.text[self.pos :]
        return repr(rest if len(rest) <= 20 else rest[:20] + "...")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def keyword(self) -> str | None:
        match = _KEYWORD.match(self.text, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        return match.group().lower()

    def path(self) -> tuple[str, ...]:
        self.space()
        match = _PATH_TOKEN.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a path (a key, or keys joined by dots) first")
        self.pos = match.end()
        segments = tuple(match.group().split("."))
        for segment in segments:
            if not segment:
                raise self.fail(f"empty key in the path {match.group()!r}")
            if not _NAME.fullmatch(segment):
                raise self.fail(f"bad key {segment!r} in the path (a key is [A-Za-z_][A-Za-z0-9_]*)")
        if len(segments) > MAX_PATH_SEGMENTS:
            raise self.fail(f"the path has {len(segments)} keys, more than {MAX_PATH_SEGMENTS}")
        return segments

    def value(self) -> Scalar:
        self.space()
        char = self.peek()
        if char == '"':
            return self.string()
        if char == "-" or char.isdigit():
            number = _NUMBER.match(self.text, self.pos)
            if number is None:
                raise self.fail(f"bad number at {self.rest()}")
            self.pos = number.end()
            try:
                # orjson, as the record is read, so that both sides hold the same value (a huge integer is a float).
                parsed: int | float = orjson.loads(number.group())
            except orjson.JSONDecodeError:
                raise self.fail(f"number {number.group()} is out of range") from None
            return parsed
        word = _BARE_WORD.match(self.text, self.pos)
        if word is None:
            found = "the end" if self.at_end() else self.rest()
            raise self.fail(
                f"expected a value (a JSON string, number, true, false, null or a bare word), found {found}"
            )
        self.pos = word.end()
        lowered = word.group().lower()
        return _LITERALS[lowered] if lowered in _LITERALS else word.group()

    def string(self) -> str:
        start, text = self.pos, self.text
        end = start + 1
        while end < len(text):
            char = text[end]
            if char == "\\":
                end += 2
                continue
            if char == '"':
                break
            end += 1
        else:
            raise self.fail(f"unterminated string {text[start:]!r}")
        literal = text[start : end + 1]
        try:
            parsed: str = orjson.loads(literal)
        except orjson.JSONDecodeError as e:
            raise self.fail(f"bad JSON string {literal!r} ({e.msg})") from None
        self.pos = end + 1
        return parsed

    def values(self) -> tuple[Scalar, ...]:
        self.space()
        if self.peek() != "[":
            raise self.fail("expected [ after in")
        self.pos += 1
        self.space()
        if self.peek() == "]":
            raise self.fail("the in list is empty; it needs 1 to 100 values")
        values = [self.value()]
        while True:
            self.space()
            char = self.peek()
            if char == "]":
                self.pos += 1
                break
            if char != ",":
                found = "the end (unclosed [)" if self.at_end() else self.rest()
                raise self.fail(f"expected , or ] in the in list, found {found}")
            self.pos += 1
            values.append(self.value())
            if len(values) > MAX_IN_VALUES:
                raise self.fail(f"the in list has more than {MAX_IN_VALUES} values")
        return tuple(values)

    def operator(self) -> tuple[Op, tuple[Scalar, ...]]:
        self.space()
        if self.peek() == "=":
            self.pos += 1
            value = self.value()
            return ("is null", ()) if value is None else ("=", (value,))
        word = self.keyword()
        if word == "in":
            return "in", self.values()
        if word == "is":
            self.space()
            word = self.keyword()
            if word == "null":
                return "is null", ()
            if word == "not":
                self.space()
                if self.keyword() == "null":
                    return "is not null", ()
            raise self.fail("expected null or not null after is")
        raise self.fail(_OPERATOR_EXPECTED)

    def end(self) -> None:
        self.space()
        if not self.at_end():
            raise self.fail(f"unexpected {self.rest()} after the predicate")


def parse_predicate(text: str) -> Predicate:
    """The predicate `text` describes, compiled; FilterError names it and what is wrong."""
    if not isinstance(text, str):
        raise FilterError(f"where {text!r}: a predicate is text, not {type(text).__name__}")
    if len(text) > MAX_PREDICATE_CHARS:
        raise FilterError(f"where {_shown(text)}: {len(text)} characters, more than {MAX_PREDICATE_CHARS}")
    parser = _Parser(text)
    path = parser.path()
    op, values = parser.operator()
    parser.end()
    dotted = ".".join(path)
    if op == "=":
        canonical = f"{dotted} = {_json(values[0])}"
    elif op == "in":
        canonical = f"{dotted} in [{', '.join(_json(v) for v in values)}]"
    else:
        canonical = f"{dotted} {op}"
    # Bare words gain quotes: the canonical text must itself be a valid predicate, so it is held to the same limit.
    if len(canonical) > MAX_PREDICATE_CHARS:
        raise parser.fail(f"{len(canonical)} characters once written out with quotes, more than {MAX_PREDICATE_CHARS}")
    return Predicate(
        text=canonical,
        path=path,
        op=op,
        values=values,
        strings=frozenset(v for v in values if type(v) is str),
        numbers=frozenset(v for v in values if type(v) is int or type(v) is float),
        booleans=frozenset(v for v in values if type(v) is bool),
        null=op in ("is null", "is not null") or any(v is None for v in values),
        negated=op == "is not null",
    )


def _updated_fields(names: Sequence[str] | None) -> frozenset[str] | None:
    if names is None:
        return None
    if isinstance(names, str | bytes):
        raise FilterError(f"updated_fields {names!r}: expected a list of field names, not one string")
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise FilterError(f"updated_fields {name!r}: not a field name ([A-Za-z_][A-Za-z0-9_]*)")
    fields = frozenset(names)
    if len(fields) > MAX_UPDATED_FIELDS:
        raise FilterError(f"updated_fields: {len(fields)} field names, more than {MAX_UPDATED_FIELDS}")
    # No names is no condition: a set nothing can meet would silently drop every update.
    return fields or None


def build_filter(updated_fields: Sequence[str] | None, where: Sequence[str]) -> WebhookFilter:
    """A webhook's filter from its stored parts, every part checked; FilterError names the first bad one.

    No field names and no predicates make a filter that rejects nothing.
    """
    fields = _updated_fields(updated_fields)
    if isinstance(where, str | bytes):
        raise FilterError(f"where {_shown(str(where))}: expected a list of predicates, not one string")
    if len(where) > MAX_PREDICATES:
        raise FilterError(f"where: {len(where)} predicates, more than {MAX_PREDICATES}")
    return WebhookFilter(fields, tuple(parse_predicate(text) for text in where))
