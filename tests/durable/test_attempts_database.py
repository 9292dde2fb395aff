"""`postgres.attempts_dsn`: the attempt log in a database of its own. `webhookd migrate` makes its tables there, the
daemon writes every attempt there and none in the main database, and the operator commands read it there, the
delivery rows they need still from the main database; a daemon whose attempt-log database was never migrated is
refused with a message naming the key, and one whose attempt-log database is away delivers all the same."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiohttp import web

from tests.support import (
    Receiver,
    add_webhook,
    config_for,
    event,
    fetch,
    new_workspace,
    produce,
    running,
    until,
    webhookd_cli,
    webhookd_command,
    write_config,
)
from webhookd.embedded import create_database
from webhookd.runtime.children import free_port
from webhookd.runtime.config import Settings
from webhookd.runtime.service import Service, StartupError


@pytest.fixture
async def log_dsn(postgres_admin: str) -> AsyncIterator[str]:
    name = f"attempts_{uuid.uuid4().hex[:12]}"
    yield await create_database(postgres_admin, name)
    admin = await asyncpg.connect(postgres_admin)
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _count(dsn: str, table: str) -> int:
    return int((await fetch(dsn, f"SELECT count(*) AS n FROM webhookd.{table}"))[0]["n"])


async def test_the_attempt_log_lives_in_the_attempts_database_and_the_commands_read_it_there(
    kafka: str, dsn: str, log_dsn: str, topic: str, receiver: Receiver
) -> None:
    async def down(_request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=503, text="down for maintenance")

    receiver.behaviours["/down"] = down
    ws = new_workspace()
    good = await add_webhook(dsn, ws, receiver.url("/good"), ["*.*"])
    bad = await add_webhook(dsn, ws, receiver.url("/down"), ["*.*"])
    config = config_for(kafka, dsn, topic, postgres={"dsn": dsn, "attempts_dsn": log_dsn})
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_config(Path(tmp) / "webhookd.yaml", config))
        status, out = await webhookd_cli("migrate", "--config", path)
        assert status == 0, out
        assert "attempt_log/0001_by_day.sql" in out
        async with running(Settings.model_validate(config)):
            await produce(kafka, topic, [event("person.created", ws, id="e1")])
            await until(lambda: _dead(dsn), 20, "the failing delivery to be dead-lettered")

            async def logged() -> bool:
                return await _count(log_dsn, "first_tries") == 1 and await _count(log_dsn, "attempt_log") == 3

            await until(logged, 10, "the attempts in the attempt-log database")
        status, out = await webhookd_command("deliveries", "show", "--event", "e1", "--json", "--config", path)
    assert status == 0, out
    shown = {d["webhook_id"]: d for d in orjson.loads(out)}
    assert shown[good]["status"] == "delivered"
    assert shown[good]["workspace_id"] == ws, "a compact row's workspace is its webhook's"
    assert [a["result"] for a in shown[good]["attempt_log"]] == ["2xx"]
    assert shown[bad]["status"] == "dead"
    assert [a["status"] for a in shown[bad]["attempt_log"]] == [503, 503, 503]
    for table in ("attempt_log", "first_tries", "attempt_counts"):
        assert await _count(dsn, table) == 0, f"nothing in the main database's {table}"


async def _dead(dsn: str) -> bool:
    return bool(await fetch(dsn, "SELECT 1 FROM webhookd.deliveries WHERE status = 'dead'"))


async def test_a_daemon_whose_attempts_database_is_not_migrated_is_refused_naming_the_key(
    kafka: str, dsn: str, log_dsn: str, topic: str
) -> None:
    service = Service(Settings.model_validate(config_for(kafka, dsn, topic, postgres={"attempts_dsn": log_dsn})))
    try:
        with pytest.raises(StartupError, match=r"webhookd schema \(postgres\.attempts_dsn\) is missing or out of date"):
            await service.startup()
    finally:
        await service._close_partial()


async def test_an_attempts_database_that_is_away_holds_up_no_delivery(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/good"), ["*.*"])
    away = f"postgresql://webhookd@127.0.0.1:{free_port()}/attempts"
    async with running(Settings.model_validate(config_for(kafka, dsn, topic, postgres={"attempts_dsn": away}))):
        await produce(kafka, topic, [event("person.created", ws, id="e1")])
        await receiver.wait_for(lambda: len(receiver.at("/good")) == 1, 20, "the delivery")
