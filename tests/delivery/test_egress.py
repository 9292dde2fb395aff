"""No delivery reaches an internal address unless the operator allows it: every spelling of loopback is refused,
the refusal is a dead letter with a reason (never retried), and `egress.allowed_cidrs` opens exactly its range."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.support import Receiver, add_webhook, event, fetch, new_workspace, produce, running, settings_for
from webhookd.delivery.egress import EgressPolicy, literal_address

SPELLINGS = (
    "127.0.0.1",
    "2130706433",  # decimal
    "0x7f.0.0.1",  # hex
    "0177.0.0.1",  # octal
    "127.1",  # short form
    "127.0.0.1.",  # trailing dot
    "localhost",  # a name that resolves to loopback
    "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
    "[::ffff:127.0.0.1%25]",  # an empty zone id, which getaddrinfo reads and ipaddress does not
    "[::ffff:7f00:1%25eth0]",  # a zone id on a mapped address
)


async def test_no_spelling_of_loopback_reaches_a_receiver_when_private_is_blocked(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    for host in SPELLINGS:
        await add_webhook(dsn, ws, f"http://{host}:{receiver.port}/hook", ["*.*"])
    settings = settings_for(kafka, dsn, topic, egress={"allow_private": False}, delivery={"retry_schedule": ["50ms"]})
    async with running(settings):
        await produce(kafka, topic, [event("person.created", ws, id="probe")])
        for _ in range(100):
            rows = await fetch(dsn, "SELECT status, attempts, last_error FROM webhookd.deliveries")
            if len(rows) == len(SPELLINGS):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
    assert receiver.requests == []
    assert len(rows) == len(SPELLINGS)
    assert {(r["status"], r["attempts"]) for r in rows} == {("dead", 1)}, "a blocked delivery is never retried"
    assert all("forbid" in r["last_error"] for r in rows), [r["last_error"] for r in rows]


async def test_allowed_cidrs_open_exactly_their_range(kafka: str, dsn: str, topic: str, receiver: Receiver) -> None:
    ws = new_workspace()
    for host in ("127.0.0.1", "localhost"):
        await add_webhook(dsn, ws, f"http://{host}:{receiver.port}/in-range", ["*.*"])
    await add_webhook(dsn, ws, f"http://[::1]:{receiver.port}/out-of-range", ["*.*"])
    settings = settings_for(
        kafka, dsn, topic, egress={"allow_private": False, "allowed_cidrs": ["127.0.0.0/8"]},
        delivery={"retry_schedule": []},
    )  # fmt: skip
    async with running(settings):
        await produce(kafka, topic, [event("person.created", ws, id="probe")])
        await receiver.wait_for(lambda: len(receiver.requests) == 2, 20, "the allowed deliveries")
        await asyncio.sleep(0.5)
    assert {r.path for r in receiver.requests} == {"/in-range"}
    rows = await fetch(dsn, "SELECT last_error FROM webhookd.deliveries WHERE status = 'dead'")
    assert len(rows) == 1
    assert "forbid" in rows[0]["last_error"]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("169.254.169.254", False),  # cloud metadata
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # CGNAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast
        ("192.0.2.1", False),  # documentation
        ("192.0.0.192", False),  # IETF protocol assignments, global in older 3.11 releases' tables
        ("fec0::1", False),  # site-local, which ipaddress calls global
        ("fc00::1", False),  # ULA
        ("fe80::1", False),  # link-local
        ("::ffff:10.0.0.1", False),  # IPv4-mapped
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:a00:1::", False),  # 6to4 of 10.0.0.1
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_internal_ranges_are_blocked_and_public_ones_allowed(host: str, allowed: bool) -> None:
    address = literal_address(host)
    assert address is not None
    assert EgressPolicy().allows(address) is allowed


async def test_a_redirect_with_an_undecodable_location_is_a_recorded_failure(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/moved"), ["*.*"])

    async def moved(_request: web.Request, _body: bytes) -> web.StreamResponse:
        # Latin-1 0xff on the wire: aiohttp's client decodes it to a lone surrogate, which Postgres text refuses.
        return web.Response(status=302, headers={"Location": "http://169.254.169.254/\xff?token=t0ps3cret"})

    receiver.behaviours["/moved"] = moved
    async with running(settings_for(kafka, dsn, topic, delivery={"retry_schedule": []})):
        await produce(kafka, topic, [event("person.created", ws, id="redirected")])
        for _ in range(100):
            rows = await fetch(dsn, "SELECT status, last_status, last_error FROM webhookd.deliveries")
            if rows:
                break
            await asyncio.sleep(0.1)
    assert [(r["status"], r["last_status"]) for r in rows] == [("dead", 302)]
    assert rows[0]["last_error"].startswith("HTTP 302: redirect to http://169.254.169.254/")
    assert "t0ps3cret" not in rows[0]["last_error"]
    assert [r.path for r in receiver.requests] == ["/moved"], "the redirect must not be followed"
