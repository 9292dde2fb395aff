"""The main walk on the real broker and Postgres: every (event, matching webhook) pair arrives, signed, with the
contract's body and headers, and nothing reaches a webhook that did not ask for it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time

from tests.support import Receiver, add_webhook, event, new_workspace, produce, running, settings_for
from webhookd import __version__


async def test_every_matching_pair_is_delivered_signed_and_nothing_else(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws, other_ws = new_workspace(), new_workspace()
    hooks = {
        "/exact": await add_webhook(dsn, ws, receiver.url("/exact"), ["person.created"], secret="exact-secret"),
        "/any-object": await add_webhook(dsn, ws, receiver.url("/any-object"), ["*.created"]),
        "/any-action": await add_webhook(dsn, ws, receiver.url("/any-action"), ["person.*"]),
        "/all": await add_webhook(dsn, ws, receiver.url("/all"), ["*.*"], secret="ünïcode-sécret"),
        "/other-op": await add_webhook(dsn, ws, receiver.url("/other-op"), ["company.updated"]),
        "/other-ws": await add_webhook(dsn, other_ws, receiver.url("/other-ws"), ["*.*"]),
        "/deleted": await add_webhook(dsn, ws, receiver.url("/deleted"), ["*.*"], deleted=True),
    }
    secrets = {"/exact": "exact-secret", "/all": "ünïcode-sécret"}
    records = [
        event(
            "person.created",
            ws,
            {"id": "p1", "name": "Ada", "score": 1.0, "nested": {"b": 1, "2": "x", "1": "y"}},
            id="evt-1",
            timestamp="2025-02-10T15:30:50Z",
        ),
        event("person.updated", ws, {"id": "p1"}, id="evt-2"),
        event("company.created", ws, {"id": "c1"}, id="evt-3"),
    ]
    settings = settings_for(kafka, dsn, topic)
    async with running(settings):
        before = int(time.time() * 1000)
        await produce(kafka, topic, records)
        expected = {
            ("evt-1", "/exact"),
            ("evt-1", "/any-object"),
            ("evt-1", "/any-action"),
            ("evt-1", "/all"),
            ("evt-2", "/any-action"),
            ("evt-2", "/all"),
            ("evt-3", "/any-object"),
            ("evt-3", "/all"),
        }
        await receiver.wait_for(lambda: expected <= set(receiver.pairs()), 30, "every matching pair")
        # A delivery that should not happen would come with the others; give it time to show up.
        await asyncio.sleep(0.5)

    assert set(receiver.pairs()) == expected, "a webhook got an event it did not subscribe to"
    first = next(r for r in receiver.requests if r.event_id == "evt-1" and r.path == "/exact")
    assert first.body == (
        b'{"event":"person.created","data":{"id":"p1","name":"Ada","score":1,"nested":{"1":"y","2":"x","b":1}},'
        b'"timestamp":"2025-02-10T15:30:50Z"}'
    )
    for r in receiver.requests:
        h = r.headers
        assert h["Content-Type"] == "application/json"
        assert h["User-Agent"] == f"webhookd/{__version__}"
        assert re.fullmatch(r"[0-9a-f]{32}", h["X-Twenty-Webhook-Nonce"])
        assert before - 1000 <= int(h["X-Twenty-Webhook-Timestamp"]) <= int(time.time() * 1000)
        secret = secrets.get(r.path, "s3cr3t").encode()
        message = h["X-Twenty-Webhook-Timestamp"].encode() + b":" + r.body
        assert h["X-Twenty-Webhook-Signature"] == hmac.new(secret, message, hashlib.sha256).hexdigest()
    nonces = [r.headers["X-Twenty-Webhook-Nonce"] for r in receiver.requests]
    assert len(set(nonces)) == len(nonces)
    assert hooks  # every webhook above was created through the real table


async def test_default_id_and_timestamp_come_from_the_kafka_record(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/h"), ["*.*"])
    async with running(settings_for(kafka, dsn, topic)):
        await produce(kafka, topic, [event("note.deleted", ws)], partition=2)
        await receiver.wait_for(lambda: len(receiver.requests) == 1, 30, "the delivery")
    r = receiver.requests[0]
    assert r.event_id == f"{topic}:2:0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r.json()["timestamp"])
