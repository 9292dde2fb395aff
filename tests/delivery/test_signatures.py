"""Receivers verify deliveries with their own tools in every signature scheme, and through a secret rotation:
Twenty's documented Node.js check before, during and after it, and the `standardwebhooks` package from PyPI."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

import asyncpg
from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks import WebhookVerificationError

from tests.delivery.test_payload import VERIFY_SIGNATURE_JS, run_node
from tests.node import needs_node
from tests.support import Received, Receiver, add_webhook, event, new_workspace, produce, running, settings_for


def node_verifies(secret: str, request: Received, header: str = "X-Twenty-Webhook-Signature") -> bool:
    """Twenty's documented check, run by node on this request with this secret."""
    line = " ".join(
        (
            base64.b64encode(secret.encode()).decode(),
            request.headers["X-Twenty-Webhook-Timestamp"],
            base64.b64encode(request.body).decode(),
            request.headers[header],
        )
    )
    return run_node(VERIFY_SIGNATURE_JS, [line]) == ["valid"]


def standard_verifies(receiver_secret: str, request: Received) -> bool:
    try:
        StandardWebhook(receiver_secret).verify(request.body, request.headers)
    except WebhookVerificationError:
        return False
    return True


async def test_standard_webhooks_deliveries_verify_with_the_standardwebhooks_package(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    plain, whsec = "plain-sécret", "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    await add_webhook(dsn, ws, receiver.url("/plain"), ["*.*"], secret=plain)
    await add_webhook(dsn, ws, receiver.url("/whsec"), ["*.*"], secret=whsec)
    async with running(settings_for(kafka, dsn, topic, delivery={"signature_scheme": "standard-webhooks"})):
        await produce(kafka, topic, [event("person.created", ws, {"n": 1.0}, id="evt-std")])
        await receiver.wait_for(lambda: len(receiver.requests) == 2, 20, "both deliveries")
    plain_request, whsec_request = receiver.at("/plain")[0], receiver.at("/whsec")[0]
    # A plain secret is used as raw bytes; a receiver hands the library its base64.
    assert standard_verifies(base64.b64encode(plain.encode()).decode(), plain_request)
    assert standard_verifies(whsec, whsec_request)
    assert not standard_verifies(whsec, plain_request)
    assert plain_request.headers["webhook-id"] == "evt-std"
    assert abs(int(plain_request.headers["webhook-timestamp"]) - time.time()) < 30
    assert "X-Twenty-Webhook-Signature" not in plain_request.headers


@needs_node
async def test_a_secret_rotation_keeps_both_secrets_valid_for_the_overlap_then_only_the_new(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    old, new = "old-secret-Ω", "new-secret-Ж"
    webhook_id = await add_webhook(dsn, ws, receiver.url("/h"), ["*.*"], secret=old)
    overlap = 4.0
    settings = settings_for(
        kafka, dsn, topic, delivery={"signature_scheme": "both", "secret_rotation_overlap_seconds": overlap}
    )
    async with running(settings):
        await produce(kafka, topic, [event("person.created", ws, id="before")])
        await receiver.wait_for(lambda: len(receiver.requests) == 1, 20, "the delivery before")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE core.webhook SET secret = $2 WHERE id = $1", uuid.UUID(webhook_id), new)
        finally:
            await conn.close()
        rotated = time.monotonic()
        await asyncio.sleep(0.5)  # the change reaches the daemon through NOTIFY
        await produce(kafka, topic, [event("person.created", ws, id="during")])
        await receiver.wait_for(lambda: len(receiver.requests) == 2, 20, "the delivery during")
        await asyncio.sleep(max(0.0, overlap + 0.5 - (time.monotonic() - rotated)))
        await produce(kafka, topic, [event("person.created", ws, id="after")])
        await receiver.wait_for(lambda: len(receiver.requests) == 3, 20, "the delivery after")
    before, during, after = (
        next(r for r in receiver.requests if r.event_id == e) for e in ("before", "during", "after")
    )
    b64 = {s: base64.b64encode(s.encode()).decode() for s in (old, new)}

    assert node_verifies(old, before)
    assert "X-Twenty-Webhook-Signature-Previous" not in before.headers
    assert standard_verifies(b64[old], before)

    # During the overlap the current secret signs the main header, the old one its own header; both verify with
    # the documented check, and the Standard Webhooks header carries both signatures.
    assert node_verifies(new, during)
    assert node_verifies(old, during, "X-Twenty-Webhook-Signature-Previous")
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert standard_verifies(b64[old], during)
    assert standard_verifies(b64[new], during)

    assert node_verifies(new, after)
    assert "X-Twenty-Webhook-Signature-Previous" not in after.headers
    assert standard_verifies(b64[new], after)
    assert not standard_verifies(b64[old], after)
