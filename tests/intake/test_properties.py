"""Properties of the two functions that read untrusted text: a webhook URL's host (egress) and a Kafka record (events).

Both face whatever customers and producers send, so they are fed arbitrary input by Hypothesis: they must never
raise, must read an address exactly as the system's own parsers do, must block every address of the internal ranges
in every spelling, and must turn any valid event into a body that parses back to the same data, as JavaScript has it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from webhookd.delivery.body_formats import docs_body
from webhookd.delivery.egress import EgressPolicy, IPAddress, literal_address
from webhookd.intake.native import decode
from webhookd.model import BadEvent, Event

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------------------
# Egress: literal hosts


def system_reading(host: str) -> IPAddress | None:
    """What Python's own parsers read out of a host as the resolver would see it: ipaddress first, then the
    looser inet_aton forms (decimal, hex, octal, short), which getaddrinfo accepts without any lookup."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]  # a trailing dot makes a name absolute; the resolver then reads the same address
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except (OSError, ValueError):
        return None


_PART = r"(0[xX][0-9a-fA-F]{0,9}|0[0-7]{0,12}|[1-9][0-9]{0,10})"
dotted_numbers = st.from_regex(rf"\A{_PART}(\.{_PART}){{0,3}}\.?\Z")
ipv6_forms = st.from_regex(
    r"\A\[?(::ffff:|::|64:ff9b::|2002:|fe80::|[0-9a-f]{1,4}:){0,3}"
    r"([0-9a-f]{1,4}:){0,4}([0-9a-f]{1,4}|[0-9]{1,3}(\.[0-9]{1,3}){3})?(%[a-z0-9]{1,5})?\]?\Z"
)
hosts = st.text() | dotted_numbers | ipv6_forms | st.ip_addresses().map(str)


@FAST
@given(hosts)
def test_literal_address_never_raises_and_reads_what_the_system_reads(host: str) -> None:
    found = literal_address(host)
    expected = system_reading(host)
    if expected is not None:
        assert found == expected


@pytest.mark.parametrize("host", ["::1%.", "fe80::1%]", "[::1%eth0.]"])
def test_literal_address_reads_ipv6_hosts_whose_zone_ends_in_a_dot_or_bracket(host: str) -> None:
    expected = system_reading(host)
    assert expected is not None
    assert literal_address(host) == expected


BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "0.0.0.0/8",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
BLOCKED_V6 = tuple(ipaddress.IPv6Network(n) for n in ("::1/128", "fc00::/7", "fe80::/10"))
blocked_v4 = st.one_of(*(st.ip_addresses(network=n) for n in BLOCKED_V4))
blocked_v6 = st.one_of(*(st.ip_addresses(network=n) for n in BLOCKED_V6))


def mapped(address: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address((0xFFFF << 32) | int(address))


@FAST
@given(st.one_of(blocked_v4, blocked_v6, blocked_v4.map(mapped)))
def test_every_address_of_an_internal_range_is_refused(address: IPAddress) -> None:
    assert EgressPolicy().allows(address) is False


@FAST
@given(blocked_v4, st.data())
def test_every_spelling_of_an_internal_ipv4_address_is_read_and_refused(
    address: ipaddress.IPv4Address, data: st.DataObject
) -> None:
    n = int(address)
    a, b, c, d = address.packed
    spellings = [
        str(n),  # 2130706433
        hex(n),  # 0x7f000001
        "0" + oct(n)[2:],  # 017700000001
        f"{a}.{(b << 16) | (c << 8) | d}",  # 127.1
        f"{a}.{b}.{(c << 8) | d}",  # 127.0.1
        ".".join(data.draw(st.sampled_from([str(p), hex(p), f"0{p:o}"])) for p in (a, b, c, d)),
        f"{address}.",
        f"[::ffff:{address}]",
        f"[::ffff:{(a << 8) | b:x}:{(c << 8) | d:x}]",
        f"[64:ff9b::{address}]",
        f"[2002:{(a << 8) | b:x}:{(c << 8) | d:x}::1]",
    ]
    for spelling in spellings:
        read = literal_address(spelling)
        assert read is not None, spelling
        assert EgressPolicy().allows(read) is False, (spelling, read)


# ---------------------------------------------------------------------------------------------------------------
# Events: decode


def decode_record(value: bytes, max_bytes: int = 10 * 2**20) -> Event | BadEvent:
    return decode(value, topic="t", partition=0, offset=7, timestamp_ms=1739201450123, max_bytes=max_bytes)


WORKSPACE = str(uuid.UUID(int=0x20202020_1C25_4D02_BF25_6AECCF7EA419))


STAMP = b"2025-02-10T15:30:50.123Z"  # the Kafka timestamp below, as JavaScript's toISOString writes it


def envelope(data_json: bytes) -> bytes:
    return b'{"event":"person.created","workspaceId":"%s","data":%s}' % (WORKSPACE.encode(), data_json)


@FAST
@given(st.binary(max_size=4096))
@example(b"\xff\xfe")
@example(b'{"event":"a.b","workspaceId":"%s","data":{"s":"\xed\xa0\x80"}}' % WORKSPACE.encode())  # CESU surrogate
def test_decode_never_raises_on_arbitrary_bytes(value: bytes) -> None:
    assert isinstance(decode_record(value), Event | BadEvent)


def nesting(opener: bytes, depth: int) -> bytes:
    closer = b"]" if opener == b"[" else b"}"
    return opener * depth + b"1" + closer * depth


OPENERS = (b"[", b'{"k":')


@FAST
@given(depth=st.integers(min_value=1, max_value=3000), opener=st.sampled_from(OPENERS))
def test_decode_never_raises_on_a_deeply_nested_document(depth: int, opener: bytes) -> None:
    result = decode_record(nesting(opener, depth))
    assert isinstance(result, BadEvent)  # an array is no event, nor an object without the required fields


# Data nested deeper than payload.MAX_DEPTH is a bad event; shallower data is tried here, and a child process (with
# the allocator's debug checks on) covers every depth up to past the parsers' limits. (Hypothesis also raises the
# recursion limit, which lets the json module parse deeper documents here than in the daemon.)
@FAST
@given(depth=st.integers(1, 100), opener=st.sampled_from(OPENERS))
def test_nested_data_comes_out_byte_for_byte(depth: int, opener: bytes) -> None:
    nested = nesting(opener, depth)
    result = decode_record(envelope(b'{"n":' + nested + b"}"))
    # Already in JavaScript's form, so the data comes out unchanged; bytes are compared because comparing Python
    # objects this deep could itself exceed the recursion limit.
    assert isinstance(result, Event), result
    assert docs_body(result) == b'{"event":"person.created","data":{"n":%s},"timestamp":"%s"}' % (nested, STAMP)


# A child process with Python's debug allocator, which catches a write past the end of a buffer at the next
# free; it decodes one event per depth and checks each body, or stops at the first wrong one.
DEEP_CHILD = """
import sys
from webhookd.delivery.body_formats import docs_body
from webhookd.delivery.payload import MAX_DEPTH
from webhookd.intake.native import decode
from webhookd.model import Event
stamp, envelope = sys.argv[1].encode(), sys.argv[2].encode()
for opener, closer in ((b"[", b"]"), (b'{"k":', b"}")):
    for depth in range(1, 1101):
        nested = opener * depth + b"1" + closer * depth
        result = decode(envelope.replace(b"DATA", b'{"n":' + nested + b"}"), topic="t", partition=0, offset=7,
                        timestamp_ms=1739201450123, max_bytes=10**7)
        if isinstance(result, Event):
            expected = b'{"event":"person.created","data":{"n":%s},"timestamp":"%s"}' % (nested, stamp)
            if docs_body(result) != expected:
                sys.exit(f"depth {depth} {opener!r}: wrong body")
        elif result.reason == "too_deep" and depth + 1 > MAX_DEPTH:
            continue  # {"n": ...} adds a level; deeper than MAX_DEPTH is a bad event by design
        elif depth < 1000 or result.reason != "invalid_json":
            sys.exit(f"depth {depth} {opener!r}: refused: {result}")
print("every depth decoded")
"""


def test_deeply_nested_data_at_every_depth_decodes_without_corrupting_memory() -> None:
    child = subprocess.run(
        [sys.executable, "-c", DEEP_CHILD, STAMP.decode(), envelope(b"DATA").decode()],
        env={**os.environ, "PYTHONMALLOC": "debug"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-2000:] or child.stdout[-2000:]
    assert "every depth decoded" in child.stdout


@FAST
@given(
    st.one_of(
        st.integers(min_value=-(10**300), max_value=10**300),
        st.from_regex(r"\A-?[1-9][0-9]{0,400}(\.[0-9]{1,50})?([eE][+-]?[0-9]{1,4})?\Z"),
    )
)
def test_decode_never_raises_on_huge_numbers_and_writes_them_as_javascript_reads_them(number: int | str) -> None:
    text = str(number)
    result = decode_record(envelope(b'{"n":%s}' % text.encode()))
    assert isinstance(result, Event), result
    written = orjson.loads(docs_body(result))["data"]["n"]
    as_double = float(text)  # what JSON.parse gives: the nearest double, or Infinity (written as null)
    if as_double in (float("inf"), float("-inf")):
        assert written is None
    else:
        assert float(written) == as_double


def test_an_integer_literal_of_more_than_4300_digits_is_delivered_as_null() -> None:
    result = decode_record(envelope(b'{"n":1' + b"0" * 4400 + b"}"))
    assert isinstance(result, Event), result
    assert orjson.loads(docs_body(result))["data"] == {"n": None}


@FAST
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "workspaceId", "0", "1"]), st.integers(-999, 999)), min_size=1))
def test_duplicate_keys_keep_the_last_value_as_javascript_does(pairs: list[tuple[str, int]]) -> None:
    data = b"{" + b",".join(b'"%s":%d' % (k.encode(), v) for k, v in pairs) + b"}"
    result = decode_record(envelope(data))
    assert isinstance(result, Event), result
    assert orjson.loads(docs_body(result))["data"] == dict(pairs)


@FAST
@given(st.binary(min_size=1, max_size=4).filter(lambda b: not _is_utf8(b)), st.integers(0, 40))
def test_invalid_utf8_anywhere_is_a_bad_event_never_an_exception(junk: bytes, at: int) -> None:
    valid = envelope(b'{"name":"' + b"x" * 40 + b'"}')
    position = valid.index(b"x") + at
    result = decode_record(valid[:position] + junk + valid[position:])
    assert isinstance(result, BadEvent)
    assert result.reason == "invalid_json"


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=40,
)


def as_javascript(value: Any) -> Any:
    """`value` as JSON.parse would hold it: every number a double (None past the double range), -0 as 0."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        try:
            return float(value) + 0.0
        except OverflowError:
            return None
    if isinstance(value, list):
        return [as_javascript(v) for v in value]
    return {k: as_javascript(v) for k, v in value.items()}


@FAST
@given(
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
    name=st.from_regex(r"\A[A-Za-z0-9_]{1,12}\.[A-Za-z0-9_]{1,12}\Z"),
    workspace=st.uuids(),
    timestamp=st.none() | st.text(max_size=30),
    event_id=st.none() | st.from_regex(r"\A[\x21-\x7e]([\x20-\x7e]{0,40}[\x21-\x7e])?\Z"),
    ascii_only=st.booleans(),
)
def test_a_valid_event_body_round_trips_to_its_data_as_javascript_reads_it(
    data: dict[str, Any], name: str, workspace: uuid.UUID, timestamp: str | None, event_id: str | None,
    ascii_only: bool,
) -> None:  # fmt: skip
    record: dict[str, Any] = {"event": name, "workspaceId": str(workspace), "data": data}
    if timestamp is not None:
        record["timestamp"] = timestamp
    if event_id is not None:
        record["id"] = event_id
    result = decode_record(json.dumps(record, ensure_ascii=ascii_only).encode())
    assert isinstance(result, Event), result
    body = orjson.loads(docs_body(result))
    assert list(body) == ["event", "data", "timestamp"]
    assert body["event"] == name
    assert as_javascript(body["data"]) == as_javascript(data)
    assert body["timestamp"] == (timestamp if timestamp is not None else STAMP.decode())
    assert result.id == (event_id if event_id is not None else "t:0:7")
    assert result.workspace_id == str(workspace)
