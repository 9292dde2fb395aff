"""The demo's sample webhooks and its receiver, which verifies each delivery's signature exactly as Twenty's
documentation tells receivers to (`signature_matches`, which `webhookd dev --cdc` shares) and prints it; one sample
endpoint answers every first attempt with 503, to show retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson
from aiohttp import web


@dataclass(frozen=True)
class SampleWebhook:
    """A demo subscription: where it points, what it wants, and its secret (the demo prints none of it)."""

    name: str
    workspace: str
    operations: tuple[str, ...]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    secret: str = field(default_factory=lambda: os.urandom(16).hex(), repr=False)

    def wants(self, workspace: str, event: str) -> bool:
        obj, _, action = event.partition(".")
        return workspace == self.workspace and bool({event, f"*.{action}", f"{obj}.*", "*.*"} & set(self.operations))


class DemoReceiver:
    """Receives deliveries, verifies each like the Node.js snippet of Twenty's docs, and prints it."""

    def __init__(self, samples: tuple[SampleWebhook, ...]) -> None:
        self._by_name = {s.name: s for s in samples}
        self.seen: set[tuple[str, str]] = set()
        self.expected: set[tuple[str, str]] = set()
        self.all_seen = asyncio.Event()
        self.failures = 0
        self._failed_once: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        sample = self._by_name[request.match_info["name"]]
        body = await request.read()
        event_id = request.headers.get("X-Twenty-Webhook-Event-Id", "?")
        if sample.name == "flaky-deals" and event_id not in self._failed_once:
            self._failed_once.add(event_id)
            print(f"  receiver  {sample.name:<13} answers 503 to {event_id} (first try fails on purpose)")
            return web.Response(status=503, headers={"Retry-After": "1"})
        verified = signature_matches(sample.secret, request.headers, body)
        doc = orjson.loads(body)
        mark = "verified" if verified else "SIGNATURE MISMATCH"
        if not verified:
            self.failures += 1
        print(f"  receiver  {sample.name:<13} got {doc['event']:<20} {event_id:<18} signature {mark}")
        self.seen.add((event_id, sample.id))
        if self.expected <= self.seen:
            self.all_seen.set()
        return web.Response(status=200 if verified else 401)


def signature_matches(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Twenty's documented check of X-Twenty-Webhook-Signature."""
    timestamp = headers.get("X-Twenty-Webhook-Timestamp", "")
    # The raw body is what was signed; it is also byte for byte what Node's JSON.stringify(req.body) gives back.
    expected = hmac.new(secret.encode(), f"{timestamp}:".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("X-Twenty-Webhook-Signature", ""))
