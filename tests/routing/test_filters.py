"""The per-webhook filter language: parsing, canonical text, evaluation and every way a filter can be refused."""

from __future__ import annotations

import re
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhookd.routing import filters
from webhookd.routing.filter_parsing import FilterError, build_filter, parse_predicate
from webhookd.routing.filters import FILTER_REASONS, LazyRecord, Predicate, WebhookFilter

OPPORTUNITY = {
    "id": "7f1c0e9a-3b1d-4c3e-9a51-1a2b3c4d5e6f",
    "name": "Acme renewal",
    "stage": "WON",
    "amount": {"amountMicros": 1_500_000_000, "currencyCode": "USD"},
    "closeDate": None,
    "isPriority": True,
    "probability": 1,
    "tags": ["a", "b"],
    "position": 3.0,
}


def record(data: object = OPPORTUNITY) -> LazyRecord:
    return LazyRecord(orjson.dumps(data))


def holds(text: str, data: object = OPPORTUNITY) -> bool:
    return parse_predicate(text).holds(record(data).value)


def where(*predicates: str) -> WebhookFilter:
    return build_filter(None, predicates)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every record the filters module parses, in order (predicate text is parsed from str, and not counted)."""
    seen: list[bytes] = []

    def loads(data: bytes | str) -> object:
        if isinstance(data, bytes):
            seen.append(data)
        return orjson.loads(data)

    counting = SimpleNamespace(loads=loads, dumps=orjson.dumps, JSONDecodeError=orjson.JSONDecodeError)
    monkeypatch.setattr(filters, "orjson", counting)
    return seen


# Parsing and canonical text


@pytest.mark.parametrize(
    ("text", "canonical", "path", "op", "values"),
    [
        ("stage = WON", 'stage = "WON"', ("stage",), "=", ("WON",)),
        ('stage="Closed won"', 'stage = "Closed won"', ("stage",), "=", ("Closed won",)),
        ("amount.amountMicros = -1.5e3", "amount.amountMicros = -1500.0", ("amount", "amountMicros"), "=", (-1500.0,)),
        ("probability = 1", "probability = 1", ("probability",), "=", (1,)),
        ("isPriority = TRUE", "isPriority = true", ("isPriority",), "=", (True,)),
        ('stage = "true"', 'stage = "true"', ("stage",), "=", ("true",)),
        ("stage in [WON, LOST]", 'stage in ["WON", "LOST"]', ("stage",), "in", ("WON", "LOST")),
        (
            "  stage   IN[ WON ,\t1,null , false ]  ",
            'stage in ["WON", 1, null, false]',
            ("stage",),
            "in",
            ("WON", 1, None, False),
        ),
        ("closeDate is null", "closeDate is null", ("closeDate",), "is null", ()),
        ("closeDate = null", "closeDate is null", ("closeDate",), "is null", ()),
        ("name.firstName Is  Not\nNull", "name.firstName is not null", ("name", "firstName"), "is not null", ()),
        ("a.b.c.d.e.f.g.h = x-1.v2", 'a.b.c.d.e.f.g.h = "x-1.v2"', tuple("abcdefgh"), "=", ("x-1.v2",)),
        ('city = "Z\\u00fcrich \\"old\\""', 'city = "Zürich \\"old\\""', ("city",), "=", ('Zürich "old"',)),
    ],
)
def test_each_form_parses_to_its_canonical_text(
    text: str, canonical: str, path: tuple[str, ...], op: str, values: tuple[object, ...]
) -> None:
    predicate = parse_predicate(text)
    assert (predicate.text, predicate.path, predicate.op, predicate.values) == (canonical, path, op, values)
    assert parse_predicate(predicate.text) == predicate


def test_an_integer_beyond_64_bits_is_read_as_the_record_reads_it() -> None:
    # orjson reads such a number in a record as a float; the filter's value must be the same float to ever match.
    predicate = parse_predicate("n = 123456789012345678901234567890")
    assert predicate.holds(LazyRecord(b'{"n": 123456789012345678901234567890}').value)
    assert parse_predicate(predicate.text) == predicate


# Evaluation


def test_equality_and_membership_on_top_level_fields() -> None:
    assert holds("stage = WON")
    assert not holds("stage = LOST")
    assert holds("stage in [LOST, WON]")
    assert not holds("stage in [LOST, OPEN]")
    assert holds("stage is not null")
    assert not holds("stage is null")


def test_strings_compare_exactly() -> None:
    assert not holds("stage = won")
    assert not holds('stage = "WON "')


def test_true_never_equals_one_nor_one_true() -> None:
    assert holds("isPriority = true")
    assert not holds("isPriority = 1")
    assert not holds("isPriority in [1, 2]")
    assert holds("probability = 1")
    assert not holds("probability = true")
    assert not holds("probability in [true]")
    assert not holds("isPriority = 1.0")


def test_false_never_equals_zero() -> None:
    assert not holds("flag = 0", {"flag": False})
    assert not holds("count = false", {"count": 0})
    assert holds("flag = false", {"flag": False})


def test_a_string_never_equals_a_number() -> None:
    assert not holds('probability = "1"')
    assert not holds("code = 1", {"code": "1"})
    assert holds('code = "1"', {"code": "1"})


def test_numbers_compare_numerically() -> None:
    assert holds("probability = 1.0")
    assert holds("position = 3")
    assert holds("position in [1, 3]")
    assert holds("amount.amountMicros = 1.5e9")


def test_quoted_null_is_a_string_and_bare_null_is_null() -> None:
    assert not holds('closeDate = "null"')
    assert holds('word = "null"', {"word": "null"})
    assert not holds("word = null", {"word": "null"})


def test_nested_paths_read_into_objects() -> None:
    assert holds("amount.currencyCode = USD")
    assert holds("amount.amountMicros in [1500000000, 0]")
    assert not holds("amount.currencyCode = EUR")


def test_missing_keys_and_paths_through_non_objects_read_as_null() -> None:
    assert holds("missing is null")
    assert holds("amount.missing is null")
    assert holds("stage.inner is null")  # through a string
    assert holds("tags.first is null")  # through an array
    assert holds("closeDate.day is null")  # through null
    assert not holds("missing is not null")
    assert not holds("missing = x")
    assert holds("missing in [x, null]")


def test_objects_and_arrays_equal_no_value_but_are_not_null() -> None:
    assert not holds("amount = null")
    assert not holds("tags in [a, b]")
    assert holds("amount is not null")
    assert holds("tags is not null")


def test_a_record_that_is_not_an_object_reads_every_path_as_null() -> None:
    assert holds("stage is null", [1, 2])
    assert not holds("stage = WON", "WON")


# Rejection


def test_a_filter_without_conditions_rejects_nothing() -> None:
    empty = build_filter(None, [])
    assert empty == WebhookFilter()
    assert not empty.needs_record
    assert empty.rejects("updated", (), record()) is None
    assert empty.describe() == []


def test_an_update_of_none_of_the_fields_is_rejected_for_updated_fields() -> None:
    webhook = build_filter(["stage", "amount"], [])
    assert webhook.rejects("updated", ("name", "updatedAt"), record()) == "updated_fields"
    assert webhook.rejects("updated", (), record()) == "updated_fields"
    assert webhook.rejects("updated", ("updatedAt", "stage"), record()) is None


def test_an_update_whose_fields_are_unknown_passes_updated_fields() -> None:
    assert build_filter(["stage"], []).rejects("updated", None, record()) is None


@pytest.mark.parametrize("action", ["created", "deleted", "restored", "destroyed", "upserted", "custom_action"])
def test_actions_other_than_updated_pass_updated_fields(action: str) -> None:
    assert build_filter(["stage"], []).rejects(action, ("name",), record()) is None


def test_a_record_failing_any_predicate_is_rejected_for_record() -> None:
    webhook = where("stage in [WON, LOST]", "amount.currencyCode = EUR")
    assert webhook.needs_record
    assert webhook.rejects("created", None, record()) == "record"
    assert where("stage in [WON, LOST]", "amount.currencyCode = USD").rejects("created", None, record()) is None


def test_predicates_apply_to_every_action() -> None:
    webhook = where("stage = LOST")
    for action in ("created", "updated", "deleted", "destroyed"):
        assert webhook.rejects(action, ("stage",), record()) == "record"


def test_updated_fields_is_checked_before_the_record_is_parsed(parses: list[bytes]) -> None:
    webhook = build_filter(["stage"], ["stage = LOST"])
    lazy = record()
    assert webhook.rejects("updated", ("name",), lazy) == "updated_fields"
    assert parses == []
    assert webhook.rejects("updated", ("stage",), lazy) == "record"
    assert len(parses) == 1


def test_rejection_reasons_are_the_closed_set() -> None:
    assert FILTER_REASONS == ("updated_fields", "record")


def test_describe_lists_fields_sorted_and_canonical_predicates() -> None:
    webhook = build_filter(["stage", "amount", "stage"], ["stage in [WON,LOST]", "deletedAt = NULL"])
    assert webhook.describe() == [
        "updatedFields has any of: amount, stage",
        'where stage in ["WON", "LOST"]',
        "where deletedAt is null",
    ]


def test_no_updated_fields_is_no_condition() -> None:
    assert build_filter([], []).updated_fields is None
    # Built directly with an empty set, a filter still never drops every update.
    assert WebhookFilter(frozenset()).rejects("updated", ("stage",), record()) is None


# LazyRecord


def test_lazy_record_parses_once_for_every_filter_of_the_event(parses: list[bytes]) -> None:
    lazy = record()
    webhooks = [where("stage = WON"), where("amount.currencyCode = USD"), where("stage in [WON]", "id is not null")]
    assert all(webhook.rejects("updated", None, lazy) is None for webhook in webhooks)
    assert where("stage = LOST").rejects("updated", None, lazy) == "record"
    assert parses == [orjson.dumps(OPPORTUNITY)]
    assert lazy.value is lazy.value
    assert len(parses) == 1


def test_lazy_record_is_not_parsed_when_no_predicate_needs_it(parses: list[bytes]) -> None:
    lazy = LazyRecord(b"{not json at all")
    assert build_filter(["stage"], []).rejects("updated", ("stage",), lazy) is None
    assert build_filter(["stage"], []).rejects("updated", ("name",), lazy) == "updated_fields"
    assert WebhookFilter().rejects("created", None, lazy) is None
    assert parses == []


def test_lazy_record_reads_bad_json_as_an_empty_object() -> None:
    lazy = LazyRecord(b"{not json")
    assert lazy.value == {}
    assert where("stage is null").rejects("created", None, lazy) is None
    assert where("stage = WON").rejects("created", None, lazy) == "record"


# Refusals: every message names what it refuses


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("stage inn [WON]", "expected =, in [...], is null or is not null after the path"),
        ("stage != WON", "expected =, in [...], is null or is not null after the path"),
        ("stage", "expected =, in [...], is null or is not null after the path"),
        ("stage is nul", "expected null or not null after is"),
        ("stage is not", "expected null or not null after is"),
        ("stage in []", "the in list is empty"),
        ("stage in [ ]", "the in list is empty"),
        ("stage in WON", "expected [ after in"),
        ("stage in [WON, LOST", "expected , or ] in the in list, found the end (unclosed [)"),
        ("stage in [WON LOST]", "expected , or ] in the in list, found 'LOST]'"),
        ("stage in [WON,]", "expected a value"),
        ("stage in [" + ", ".join(["x"] * 101) + "]", "the in list has more than 100 values"),
        ("stage.1st = x", "bad key '1st' in the path"),
        ("stage-name = x", "bad key 'stage-name' in the path"),
        ("stage..name = x", "empty key in the path 'stage..name'"),
        (".stage = x", "empty key in the path '.stage'"),
        ("a.b.c.d.e.f.g.h.i = x", "the path has 9 keys, more than 8"),
        ("= WON", "expected a path"),
        ("", "expected a path"),
        ('stage = "WON', "unterminated string"),
        ('stage = "WON\\"', "unterminated string"),
        ('stage = "\\x"', "bad JSON string"),
        ("stage = WON LOST", "unexpected 'LOST' after the predicate"),
        ("stage = WON]", "unexpected ']' after the predicate"),
        ("stage is null now", "unexpected 'now' after the predicate"),
        ("amount = 01", "unexpected '1' after the predicate"),
        ("stage =", "expected a value (a JSON string, number, true, false, null or a bare word), found the end"),
        ("stage = [WON]", "expected a value"),
        ("stage = {}", "expected a value"),
        ("amount = -", "bad number"),
        ("amount = 1e999", "number 1e999 is out of range"),
    ],
)
def test_a_bad_predicate_is_refused_naming_it(text: str, problem: str) -> None:
    with pytest.raises(FilterError) as refused:
        parse_predicate(text)
    assert str(refused.value).startswith(f"where {text!r}"[:80])
    assert problem in str(refused.value)


def test_the_example_message_reads_as_documented() -> None:
    with pytest.raises(FilterError) as refused:
        build_filter(None, ["stage = WON", "stage inn [WON]"])
    assert str(refused.value) == (
        "where 'stage inn [WON]': expected =, in [...], is null or is not null after the path"
    )


def test_a_predicate_longer_than_500_characters_is_refused() -> None:
    longest = 'stage = "' + "x" * 490 + '"'
    assert len(longest) == 500
    assert parse_predicate(longest).text == longest
    with pytest.raises(FilterError, match=r"^where 'stage = \"xxx.*: 501 characters, more than 500$"):
        parse_predicate(longest.replace("x", "xx", 1))


def test_a_predicate_whose_canonical_text_exceeds_500_characters_is_refused() -> None:
    # Every bare word gains two quotes and a space: the stored form would not parse again.
    text = "s in [" + ",".join(["ab"] * 100) + "]"
    assert len(text) <= 500
    with pytest.raises(FilterError, match="once written out with quotes, more than 500"):
        parse_predicate(text)


def test_more_than_20_predicates_are_refused() -> None:
    build_filter(None, ["stage = WON"] * 20)
    with pytest.raises(FilterError, match=r"^where: 21 predicates, more than 20$"):
        build_filter(None, ["stage = WON"] * 21)


@pytest.mark.parametrize("name", ["first-name", "1st", "", "name.first", "stage ", 42])
def test_a_bad_field_name_is_refused_naming_it(name: object) -> None:
    with pytest.raises(FilterError, match=rf"^updated_fields {re.escape(repr(name))}: not a field name"):
        build_filter(["stage", name], [])  # type: ignore[list-item]  # a stored row may hold anything


def test_more_than_100_updated_fields_are_refused() -> None:
    build_filter([f"f{i}" for i in range(100)], [])
    with pytest.raises(FilterError, match=r"^updated_fields: 101 field names, more than 100$"):
        build_filter([f"f{i}" for i in range(101)], [])


def test_a_single_string_is_refused_where_a_list_is_expected() -> None:
    with pytest.raises(FilterError, match=r"^updated_fields 'stage': expected a list"):
        build_filter("stage", [])
    with pytest.raises(FilterError, match=r"^where 'stage = WON': expected a list"):
        build_filter(None, "stage = WON")


def test_a_predicate_that_is_not_text_is_refused() -> None:
    with pytest.raises(FilterError, match=r"^where 7: a predicate is text"):
        build_filter(None, [7])  # type: ignore[list-item]  # a stored row may hold anything


# Properties

_LITERALS = ("true", "false", "null")
_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
_PATHS = st.lists(_KEYS, min_size=1, max_size=8).map(tuple)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
)
_BARE: st.SearchStrategy[str] = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,6}", fullmatch=True).filter(
    lambda word: word.lower() not in _LITERALS
)
_SPACE = st.sampled_from(["", " ", "  ", "\t", "\n "])


def _literal(value: object) -> str:
    return orjson.dumps(value).decode()


@st.composite
def _written(draw: st.DrawFn) -> tuple[str, tuple[str, ...], str, list[object]]:
    """A predicate as a person might write it, with the path, operator and values it means."""
    path = draw(_PATHS)
    op = draw(st.sampled_from(["=", "in", "is null", "is not null"]))
    values: list[object] = draw(st.lists(st.one_of(_SCALARS, _BARE), min_size=1, max_size=5)) if op == "in" else []
    if op == "=":
        values = [draw(st.one_of(_SCALARS, _BARE))]
    written: list[str] = []
    for value in values:
        if isinstance(value, str) and _is_bare_word(value) and value.lower() not in _LITERALS and draw(st.booleans()):
            written.append(value)
        else:
            written.append(_literal(value))
    head = f"{draw(_SPACE)}{'.'.join(path)}"
    if op == "=":
        text = f"{head}{draw(_SPACE)}={draw(_SPACE)}{written[0]}"
    else:
        # A keyword needs a space before it, or it would read as part of the path.
        keyword = draw(st.sampled_from([op, op.upper(), op.title()]))
        listed = f"{draw(_SPACE)}[{','.join(written)}]" if op == "in" else ""
        text = f"{head} {draw(_SPACE)}{keyword}{listed}"
    return text + draw(_SPACE), path, op, values


def _is_bare_word(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value) is not None


@given(_written())
def test_canonical_text_parses_to_an_equal_predicate(case: tuple[str, tuple[str, ...], str, list[object]]) -> None:
    text, path, op, _ = case
    predicate = parse_predicate(text)
    assert predicate.path == path
    assert predicate.op == op or (op == "=" and predicate.op == "is null")
    again = parse_predicate(predicate.text)
    assert again == predicate
    assert again.text == predicate.text


def _json_equal(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is str and type(b) is str and a == b


@given(_written(), st.one_of(_SCALARS, st.just([1]), st.just({"k": 1})))
def test_a_predicate_holds_exactly_when_json_equality_says_so(
    case: tuple[str, tuple[str, ...], str, list[object]], found: object
) -> None:
    text, path, _, _ = case
    predicate = parse_predicate(text)
    data: object = found
    for key in reversed(path):
        data = {key: data}
    value = record(data).value
    if predicate.op == "is null":  # `= null` among them
        expected = found is None
    elif predicate.op == "is not null":
        expected = found is not None
    else:
        expected = any(_json_equal(found, v) for v in predicate.values)
    assert predicate.holds(value) is expected


def test_predicate_is_hashable_and_frozen() -> None:
    predicate = parse_predicate("stage = WON")
    assert {predicate: 1}[parse_predicate('stage="WON"')] == 1
    assert isinstance(predicate, Predicate)
    with pytest.raises(AttributeError):
        predicate.text = "x"  # type: ignore[misc]  # proving that assignment fails
