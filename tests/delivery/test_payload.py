"""Tests for webhookd.payload, cross-checked against real Node.js where JavaScript is the spec."""

from __future__ import annotations

import base64
import subprocess
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.node import NODE as NODE  # where the other Node.js checks have always found it
from tests.node import needs_node, require_node
from webhookd.delivery.payload import MAX_DEPTH, TooDeep, build_body, js_iso_timestamp
from webhookd.delivery.signing import sign

# Reads newline-delimited base64 bodies and answers, per line, with the base64 of what
# JSON.stringify(JSON.parse(body)) encodes to, or "!" and the error JSON.parse raised.
RESERIALIZE_JS = r"""
const out = [];
for (const line of require("fs").readFileSync(0, "utf8").split("\n")) {
  if (!line) continue;
  try {
    const text = Buffer.from(line, "base64").toString("utf8");
    out.push(Buffer.from(JSON.stringify(JSON.parse(text))).toString("base64"));
  } catch (error) {
    out.push("!" + error.message);
  }
}
process.stdout.write(out.join("\n") + "\n");
"""

# The validation from Twenty's webhooks.mdx, fed "<secret b64> <timestamp> <body b64> <signature>".
VERIFY_SIGNATURE_JS = r"""
const crypto = require("crypto");
const out = [];
for (const line of require("fs").readFileSync(0, "utf8").split("\n")) {
  if (!line) continue;
  const [secretB64, timestamp, bodyB64, receivedSignature] = line.split(" ");
  const secret = Buffer.from(secretB64, "base64").toString("utf8");
  const payload = JSON.stringify(JSON.parse(Buffer.from(bodyB64, "base64").toString("utf8")));
  const stringToSign = `${timestamp}:${payload}`;
  const expectedSignature = crypto.createHmac("sha256", secret).update(stringToSign).digest("hex");
  const isValid = crypto.timingSafeEqual(
    Buffer.from(expectedSignature, "hex"),
    Buffer.from(receivedSignature, "hex"),
  );
  out.push(isValid ? "valid" : "invalid");
}
process.stdout.write(out.join("\n") + "\n");
"""

ISO_STRING_JS = r"""
const out = [];
for (const line of require("fs").readFileSync(0, "utf8").split("\n")) {
  if (line) out.push(new Date(Number(line)).toISOString());
}
process.stdout.write(out.join("\n") + "\n");
"""


def run_node(script: str, lines: list[str]) -> list[str]:
    completed = subprocess.run(
        [require_node(), "-e", script],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    answers = completed.stdout.splitlines()
    assert len(answers) == len(lines), completed.stderr
    return answers


def assert_javascript_reserializes_identically(bodies: list[bytes]) -> None:
    answers = run_node(RESERIALIZE_JS, [base64.b64encode(body).decode() for body in bodies])
    for body, answer in zip(bodies, answers, strict=True):
        assert not answer.startswith("!"), f"JSON.parse rejected {body!r}: {answer}"
        assert base64.b64decode(answer) == body


def envelope(data_json: bytes) -> bytes:
    return b'{"event":"e","data":' + data_json + b',"timestamp":"t"}'


# --- strategies for JSON-like data -------------------------------------------------------

SPECIAL_CHARACTERS = (
    "\x00\x01\x07\x08\t\n\x0b\x0c\r\x1b\x1f \"\\/'<>&\x7f\x80\x9f\xa0\xe9\u0300\u2028\u2029"
    "\ufeff\ufffd\uffff\U0001f600\U0010ffff"
)
texts = st.text(
    st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(SPECIAL_CHARACTERS)),
    max_size=12,
)
INDEX_LIKE_KEYS = [
    "0", "1", "2", "9", "10", "01", "00", "-0", "-1", "+1", "1.0", "1e3", " 1", "1 ",
    "4294967294", "4294967295", "4294967296", "99999999999", "\u0663", "\uff11",
    "__proto__", "constructor", "length",
]  # fmt: skip
keys = st.one_of(texts, st.sampled_from(INDEX_LIKE_KEYS), st.integers(0, 2**33).map(str))
TRICKY_FLOATS = [
    0.0, -0.0, 1.0, -1.0, 0.5, 100.0, 1e15, 1e16, 1e20, 1e21, 1e22, 2.0**53, 2.0**53 + 2,
    1.2345e16, 4503599627370495.5, 0.1, 1e-4, 1e-5, 9.99e-6, 1e-6, 9.99e-7, 1e-7, 1.5e-7,
    123e-20, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, float("inf"),
]  # fmt: skip
floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(TRICKY_FLOATS),
    st.integers(-(2**70), 2**70).map(float),
)
HUGE_INTEGERS = [
    2**53 - 1, 2**53, 2**53 + 1, -(2**53) - 1, 2**63, -(2**63), 2**64 - 1, 2**64,
    12345678901234567890, 10**21, 10**30, -(10**40), 10**400, -(10**400),
]  # fmt: skip
integers = st.one_of(st.integers(), st.sampled_from(HUGE_INTEGERS), st.integers(-(2**70), 2**70))
scalars = st.one_of(st.none(), st.booleans(), integers, floats, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=15,
)
records = st.dictionaries(keys, json_values, max_size=6)


# --- build_body against Node.js ----------------------------------------------------------


def test_without_node_the_node_checks_fail_under_ci_and_skip_elsewhere() -> None:
    def missing(_name: str) -> str | None:
        return None

    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_node(missing, {"CI": "true"})
    for environ in ({}, {"CI": ""}, {"CI": "false"}):
        with pytest.raises(pytest.skip.Exception):
            require_node(missing, environ)
    with pytest.raises(pytest.fail.Exception, match="apt-get install nodejs"):
        require_node(missing, {}, optional=False)  # what the suites on Apache Kafka get
    assert require_node(lambda _name: "/usr/bin/node", {"CI": "1"}) == "/usr/bin/node"


@needs_node
def test_body_bytes_survive_javascript_parse_and_stringify_for_arbitrary_data() -> None:
    bodies: list[bytes] = []

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(event=texts, data=records, timestamp=texts)
    def collect(event: str, data: dict[str, Any], timestamp: str) -> None:
        before = repr(data)
        body = build_body(event, data, timestamp)
        assert repr(data) == before, "build_body modified its input"
        parsed = orjson.loads(body)
        assert list(parsed) == ["event", "data", "timestamp"]
        assert (parsed["event"], parsed["timestamp"]) == (event, timestamp)
        bodies.append(body)

    collect()
    assert_javascript_reserializes_identically(bodies)


@needs_node
def test_every_non_surrogate_code_point_is_escaped_as_json_stringify_escapes_it() -> None:
    code_points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    chunks = ["".join(code_points[i : i + 4096]) for i in range(0, len(code_points), 4096)]
    bodies = [build_body(chunk[:64], {chunk: chunk}, chunk[-64:]) for chunk in chunks]
    assert_javascript_reserializes_identically(bodies)


@needs_node
def test_records_as_orjson_loads_them_from_raw_events_reserialize_identically() -> None:
    raw_records = [
        b'{"data":{"a":1.0,"b":-0.0,"c":1E300,"d":12345678901234567890,"e":-9223372036854775809}}',
        b'{"data":{"b":1,"2":2,"a":3,"1":4,"b":5,"01":6,"4294967295":7,"4294967294":8}}',
        b'{"data":{"s":"\\u0000\\u001f\\u007f\\u2028\\ud83d\\ude00\\/","n":[1e-7,1e-6,1e21,1e20]}}',
        b'{"data":{"deep":' + b"[" * 120 + b'{"1":0.5,"0":1e2}' + b"]" * 120 + b"}}",
    ]
    bodies = [build_body("person.updated", orjson.loads(raw)["data"], "t") for raw in raw_records]
    assert_javascript_reserializes_identically(bodies)


# --- build_body literal expectations -----------------------------------------------------


def test_body_is_compact_with_event_data_timestamp_in_that_order() -> None:
    body = build_body("person.created", {"id": "abc", "name": {"firstName": "Alice"}}, "2025-02-10T15:30:50.123Z")
    assert body == (
        b'{"event":"person.created","data":{"id":"abc","name":{"firstName":"Alice"}},'
        b'"timestamp":"2025-02-10T15:30:50.123Z"}'
    )


def test_integral_and_negative_zero_floats_print_like_javascript_integers() -> None:
    data = {"a": 1.0, "b": -0.0, "c": 0.0, "d": -250.0, "e": 1e15, "f": 1.2345e16, "g": 1e20}
    assert build_body("e", data, "t") == envelope(
        b'{"a":1,"b":0,"c":0,"d":-250,"e":1000000000000000,"f":12345000000000000,"g":100000000000000000000}'
    )


def test_floats_use_exponent_form_only_from_1e21_and_below_1e_minus_6() -> None:
    data = [1e21, 1.5e300, 1e-6, 0.0000015, 9.99e-7, 1.5e-7, 5e-324, 0.00001, 0.5, -1.25e-8]
    assert build_body("e", {"x": data}, "t") == envelope(
        b'{"x":[1e+21,1.5e+300,0.000001,0.0000015,9.99e-7,1.5e-7,5e-324,0.00001,0.5,-1.25e-8]}'
    )


def test_non_finite_floats_become_null_as_in_json_stringify() -> None:
    data = {"a": float("inf"), "b": float("-inf"), "c": float("nan")}
    assert build_body("e", data, "t") == envelope(b'{"a":null,"b":null,"c":null}')


def test_integers_beyond_2_to_the_53_arrive_as_the_double_javascript_reads() -> None:
    data = {
        "safe": 2**53 - 1,
        "unsafe": 2**53 + 1,
        "u64": 12345678901234567890,
        "i64": -(2**63),
        "huge": 10**30,
        "overflow": 10**400,
        "flag": True,
    }
    assert build_body("e", data, "t") == envelope(
        b'{"safe":9007199254740991,"unsafe":9007199254740992,"u64":12345678901234567000,'
        b'"i64":-9223372036854776000,"huge":1e+30,"overflow":null,"flag":true}'
    )


def test_array_index_keys_come_first_in_ascending_numeric_order() -> None:
    data = {"b": 1, "10": 2, "2": 3, "01": 4, "4294967295": 5, "4294967294": 6, "-0": 7, "0": 8, "a": 9}
    assert build_body("e", data, "t") == envelope(
        b'{"0":8,"2":3,"10":2,"4294967294":6,"b":1,"01":4,"4294967295":5,"-0":7,"a":9}'
    )


def test_nested_objects_are_reordered_and_lists_keep_their_order() -> None:
    data = {"list": [{"z": 1, "1": 2}, 3, {"0": 4}], "obj": {"k": {"5": 0, "4": 1}}}
    assert build_body("e", data, "t") == envelope(b'{"list":[{"1":2,"z":1},3,{"0":4}],"obj":{"k":{"4":1,"5":0}}}')


def test_non_ascii_decimal_keys_are_not_array_indices() -> None:
    data = {"b": 1, "\u0663": 2, "\uff11": 3, "7": 4}
    assert build_body("e", data, "t") == envelope('{"7":4,"b":1,"\u0663":2,"\uff11":3}'.encode())


def test_strings_are_escaped_exactly_as_json_stringify_escapes_them() -> None:
    text = '\x00\x08\t\n\x0b\x0c\r\x1f"\\/\x7f\u2028\u2029é😀'
    assert (
        build_body(text, {"k": text}, "t")
        == (
            '{"event":"\\u0000\\b\\t\\n\\u000b\\f\\r\\u001f\\"\\\\/\x7f\u2028\u2029é😀",'
            '"data":{"k":"\\u0000\\b\\t\\n\\u000b\\f\\r\\u001f\\"\\\\/\x7f\u2028\u2029é😀"},'
            '"timestamp":"t"}'
        ).encode()
    )


def test_lone_surrogates_are_rejected_rather_than_sent() -> None:
    with pytest.raises(orjson.JSONEncodeError):
        build_body("e", {"s": "\ud800"}, "t")


def test_nesting_up_to_the_limit_is_serialized_and_deeper_is_refused() -> None:
    deepest = b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"1.0" + b"]" * (MAX_DEPTH - 1) + b"}"
    assert build_body("e", orjson.loads(deepest), "t") == envelope(deepest.replace(b"1.0", b"1"))
    too_deep = b'{"a":' + b"[" * MAX_DEPTH + b"1" + b"]" * MAX_DEPTH + b"}"
    with pytest.raises(TooDeep):
        build_body("e", orjson.loads(too_deep), "t")


def test_nesting_beyond_pythons_recursion_limit_is_refused_without_recursion() -> None:
    data: dict[str, Any] = {"1": 2.0, "0": "bottom"}
    for _ in range(5000):
        data = {"z": data, "3": 1}
    with pytest.raises(TooDeep):
        build_body("e", data, "t")


def test_input_data_is_left_untouched_when_rewritten() -> None:
    inner = {"2": 1.0, "1": 2**60}
    data: dict[str, Any] = {"x": [inner, 1.0], "y": inner}
    build_body("e", data, "t")
    assert data == {"x": [{"2": 1.0, "1": 2**60}, 1.0], "y": {"2": 1.0, "1": 2**60}}
    assert list(inner) == ["2", "1"]
    assert type(data["x"][1]) is float


# --- sign ---------------------------------------------------------------------------------


def test_sign_matches_a_node_computed_hmac_for_a_unicode_secret() -> None:
    body = b'{"event":"person.created","data":{"id":"1"},"timestamp":"2025-02-10T15:30:50.123Z"}'
    assert sign("sécret-🔑".encode(), 1739201450123, body) == (
        "21541dc62db17575e1463df66678fe4f241132c4b77dc566e839b4ed22dfd57b"
    )


@needs_node
def test_documented_node_validation_accepts_our_signatures() -> None:
    secrets = ["your-webhook-secret", "", "sécret-🔑", "密钥\u2028with\ttab", "x" * 200]
    datas: list[dict[str, Any]] = [
        {"id": "abc12345", "firstName": "Alice", "email": "alice@example.com"},
        {"amount": 1.0, "big": 12345678901234567890, "2": "two", "1": "one", "tiny": 1e-7},
        {"text": '\x00\u2028\U0001f600"\\', "nested": {"list": [None, True, -0.0, 0.5]}},
        {},
    ]
    lines: list[str] = []
    for number, secret in enumerate(secrets):
        for data in datas:
            timestamp_ms = 1739201450123 + number
            body = build_body("person.updated", data, js_iso_timestamp(timestamp_ms))
            signature = sign(secret.encode(), timestamp_ms, body)
            lines.append(
                f"{base64.b64encode(secret.encode()).decode()} {timestamp_ms} "
                f"{base64.b64encode(body).decode()} {signature}"
            )
    assert run_node(VERIFY_SIGNATURE_JS, lines) == ["valid"] * len(lines)


# --- js_iso_timestamp ---------------------------------------------------------------------


ISO_CASES_MS = [
    0, 1, 999, 1000, -1, -999, -1000, -1001, 1739201450123, 1739201450999, 1739201451000,
    951782400000, 951868799999, 4107542400000, -2208988800001, -62135596800000,
    -62135596800001, -62167219200000, -62198755200000, 253402300799999, 253402300800000,
    8_640_000_000_000_000, -8_640_000_000_000_000,
]  # fmt: skip


@needs_node
def test_js_iso_timestamp_matches_node_date_to_iso_string() -> None:
    expected = run_node(ISO_STRING_JS, [str(ms) for ms in ISO_CASES_MS])
    assert [js_iso_timestamp(ms) for ms in ISO_CASES_MS] == expected


def test_js_iso_timestamp_formats_milliseconds_and_the_pre_epoch_floor() -> None:
    assert js_iso_timestamp(1739201450123) == "2025-02-10T15:30:50.123Z"
    assert js_iso_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert js_iso_timestamp(-1) == "1969-12-31T23:59:59.999Z"
    assert js_iso_timestamp(253402300800000) == "+010000-01-01T00:00:00.000Z"
    assert js_iso_timestamp(-62198755200000) == "-000001-01-01T00:00:00.000Z"


def test_js_iso_timestamp_rejects_times_outside_javascripts_date_range() -> None:
    with pytest.raises(ValueError, match="outside JavaScript's Date range"):
        js_iso_timestamp(8_640_000_000_000_001)
    with pytest.raises(ValueError, match="outside JavaScript's Date range"):
        js_iso_timestamp(-8_640_000_000_000_001)
