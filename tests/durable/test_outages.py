"""Postgres going away mid-stream loses nothing: failed deliveries wait to be written, their offsets wait to be
committed, readiness says so, and once Postgres is back everything lands."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from aiohttp import web
from aiokafka import TopicPartition

from tests.support import (
    Receiver,
    add_webhook,
    committed_offset,
    event,
    fetch,
    get_text,
    migrated_database,
    new_workspace,
    produce,
    running,
    settings_for,
)
from webhookd.embedded import EmbeddedPostgres

EVENTS = 20


async def broken_gateway(_request: web.Request, _body: bytes) -> web.StreamResponse:
    # A NUL byte in the error body: Postgres text cannot hold it, and the daemon must still record the failure.
    return web.Response(status=502, body=b"bad\x00gateway")


async def test_a_postgres_restart_mid_stream_loses_no_failed_delivery(
    kafka: str, topic: str, receiver: Receiver
) -> None:
    with tempfile.TemporaryDirectory(prefix="webhookd-outage-") as tmp:
        server = await asyncio.to_thread(EmbeddedPostgres.start, Path(tmp) / "data")
        try:
            dsn = await migrated_database(server.dsn)
            ws = new_workspace()
            await add_webhook(dsn, ws, receiver.url("/ok"), ["*.*"])
            await add_webhook(dsn, ws, receiver.url("/broken"), ["*.*"])
            receiver.behaviours["/broken"] = broken_gateway
            settings = settings_for(kafka, dsn, topic, delivery={"retry_schedule": ["1h"]})
            readyz = f"http://{settings.http.listen}/readyz"
            async with running(settings):
                assert (await get_text(readyz))[0] == 200
                await asyncio.to_thread(server.stop_server)
                await produce(kafka, topic, [event("person.created", ws, id=f"e{i}") for i in range(EVENTS)], 0)
                await receiver.wait_for(lambda: len(receiver.at("/broken")) == EVENTS, 30, "the failing attempts")
                assert len(receiver.at("/ok")) == EVENTS
                assert (await get_text(readyz))[0] == 503
                await asyncio.sleep(1.0)  # the failures wait for Postgres; their offsets must not be committed
                await asyncio.to_thread(server.start_server)
                for _ in range(100):
                    rows = await fetch(dsn, "SELECT last_status, last_error FROM webhookd.deliveries")
                    if len(rows) == EVENTS:
                        break
                    await asyncio.sleep(0.1)
                assert (await get_text(readyz))[0] == 200
            committed = await committed_offset(kafka, f"g-{topic}", TopicPartition(topic, 0))
        finally:
            await asyncio.to_thread(server.stop)
    assert len(rows) == EVENTS
    assert {r["last_status"] for r in rows} == {502}
    assert all(r["last_error"].startswith("HTTP 502: bad") for r in rows)
    assert committed == EVENTS
    assert len(receiver.at("/broken")) == EVENTS, "a failure was retried although its retry is an hour away"
