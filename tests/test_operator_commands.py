"""Every operator command against a real run: `deliveries list | show | retry` and `endpoints list | enable |
disable | limit`, as tables and as --json, with filters, clear errors, and a replay that sends the same event id."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from webhookd.config import Settings


@dataclass
class Scene:
    """A run that left three first-try successes (webhook `good`) and three dead letters (webhook `bad`)."""

    config: str
    workspace: str
    good: str
    bad: str
    receiver: Receiver
    fail: dict[str, bool]

    async def cli(self, *args: str) -> tuple[int, str]:
        return await webhookd_command(*args, "--config", self.config)

    async def json(self, *args: str) -> Any:
        status, out = await self.cli(*args, "--json")
        assert status == 0, out
        return orjson.loads(out)


@pytest.fixture
async def scene(kafka: str, dsn: str, topic: str, receiver: Receiver) -> AsyncIterator[Scene]:
    ws = new_workspace()
    fail = {"bad": True}

    async def bad(_request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=500, text="database is down") if fail["bad"] else web.Response(text="ok")

    receiver.behaviours["/bad"] = bad
    good = await add_webhook(dsn, ws, receiver.url("/good"), ["*.*"])
    bad_id = await add_webhook(dsn, ws, receiver.url("/bad"), ["*.*"])
    config = config_for(
        kafka, dsn, topic, delivery={"retry_schedule": ["100ms"]}, endpoints={"sync_interval_seconds": 0.2}
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_config(Path(tmp) / "webhookd.yaml", config))
        async with running(Settings.model_validate(config)):
            await produce(kafka, topic, [event("person.created", ws, id=f"e{i}") for i in range(3)])
            await until(lambda: _dead(dsn, 3), 20, "three dead letters")
            await until(lambda: _logged_attempts(dsn, 9), 10, "every attempt in the attempt log")
            yield Scene(path, ws, good, bad_id, receiver, fail)


async def _logged_attempts(dsn: str, n: int) -> bool:
    return int((await fetch(dsn, "SELECT count(*) AS n FROM webhookd.attempts"))[0]["n"]) == n


async def _dead(dsn: str, n: int) -> bool:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'dead'")
    return int(rows[0]["n"]) == n


async def test_deliveries_list_shows_dead_letters_and_first_try_successes_with_filters(scene: Scene) -> None:
    status, table = await scene.cli("deliveries", "list")
    assert status == 0, table
    assert table.splitlines()[0].split()[:3] == ["ID", "STATUS", "ATTEMPTS"]
    assert table.count("dead") == 3
    assert "HTTP 500: database is down" in table

    dead = await scene.json("deliveries", "list", "--status", "dead")
    assert {d["event_id"] for d in dead} == {"e0", "e1", "e2"}
    assert {d["webhook_id"] for d in dead} == {scene.bad}
    assert all(d["attempts"] == 2 and d["last_status"] == 500 for d in dead)

    delivered = await scene.json("deliveries", "list", "--status", "delivered", "--webhook", scene.good)
    assert sorted(d["event_id"] for d in delivered) == ["e0", "e1", "e2"]
    assert all(d["id"] is None for d in delivered), "a first-try success has no row of its own"

    one_event = await scene.json("deliveries", "list", "--event", "e1")
    assert {(d["webhook_id"], d["status"]) for d in one_event} == {(scene.good, "delivered"), (scene.bad, "dead")}
    assert len(await scene.json("deliveries", "list", "--workspace", scene.workspace, "--since", "1h")) == 6
    assert await scene.json("deliveries", "list", "--workspace", new_workspace()) == []
    assert len(await scene.json("deliveries", "list", "--limit", "2")) == 2
    assert await scene.json("deliveries", "list", "--status", "pending") == []


async def test_deliveries_show_lists_every_attempt_of_a_delivery_or_of_an_event(scene: Scene) -> None:
    dead = await scene.json("deliveries", "list", "--status", "dead", "--event", "e0")
    delivery_id = str(dead[0]["id"])
    status, text = await scene.cli("deliveries", "show", delivery_id)
    assert status == 0, text
    assert "status:           dead" in text
    assert text.count("HTTP 500: database is down") >= 2  # the last error, and each attempt

    shown = await scene.json("deliveries", "show", delivery_id)
    attempts = shown["attempt_log"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert all(a["result"] == "5xx" and a["status"] == 500 and a["duration_ms"] >= 0 for a in attempts)

    both = await scene.json("deliveries", "show", "--event", "e0")
    by_webhook = {d["webhook_id"]: d for d in both}
    assert [a["result"] for a in by_webhook[scene.good]["attempt_log"]] == ["2xx"]
    assert len(by_webhook[scene.bad]["attempt_log"]) == 2

    status, out = await scene.cli("deliveries", "show", "999999")
    assert status == 1
    assert "no delivery with id 999999" in out


async def test_deliveries_retry_replays_dead_letters_with_the_same_event_id(scene: Scene) -> None:
    status, out = await scene.cli("deliveries", "retry")
    assert status == 2
    assert "--dead" in out
    status, out = await scene.cli("deliveries", "retry", "--dead", "--webhook", "nope")
    assert status == 2
    assert "'nope' is not a webhook id" in out

    scene.fail["bad"] = False
    before = len(scene.receiver.at("/bad"))
    replay = await scene.json("deliveries", "retry", "--dead", "--webhook", scene.bad, "--since", "1h")
    assert len(replay["replayed"]) == 3
    assert replay["not_found"] == []
    await scene.receiver.wait_for(lambda: len(scene.receiver.at("/bad")) == before + 3, 15, "the replays")
    replayed = scene.receiver.at("/bad")[before:]
    assert sorted(r.event_id for r in replayed) == ["e0", "e1", "e2"]

    # Replaying one delivered row by id sends it once more, under the same event id again.
    delivery_id = replay["replayed"][0]
    await until(lambda: _status_is(scene, delivery_id, "delivered"), 10, "the replay recorded as delivered")
    status, out = await scene.cli("deliveries", "retry", str(delivery_id), "424242")
    assert status == 1, "a missing id is an error"
    assert "replayed 1 deliveries" in out
    assert "no such delivery: 424242" in out
    await scene.receiver.wait_for(lambda: len(scene.receiver.at("/bad")) == before + 4, 15, "the second replay")
    assert scene.receiver.at("/bad")[-1].event_id in {"e0", "e1", "e2"}


async def _status_is(scene: Scene, delivery_id: int, status: str) -> bool:
    shown = await scene.json("deliveries", "show", str(delivery_id))
    return bool(shown["status"] == status)


async def test_endpoints_list_disable_limit_and_enable_by_command(scene: Scene) -> None:
    listed = {e["webhook_id"]: e for e in await scene.json("endpoints", "list")}
    assert listed[scene.good]["state"] == "healthy"
    assert listed[scene.good]["attempts_total"] == 3
    assert listed[scene.bad]["state"] == "failing"
    assert listed[scene.bad]["dead"] == 3
    assert listed[scene.bad]["last_status"] == 500
    assert listed[scene.bad]["url"] == f"http://127.0.0.1:{scene.receiver.port}/…", "the path may hold a token"

    status, table = await scene.cli("endpoints", "list")
    assert status == 0, table
    assert "STATE" in table.splitlines()[0]
    assert "failing" in table
    assert "healthy" in table

    status, out = await scene.cli("endpoints", "disable", scene.good, "--reason", "receiver migrating")
    assert status == 0, out
    disabled = await scene.json("endpoints", "list", "--state", "disabled")
    assert [e["webhook_id"] for e in disabled] == [scene.good]
    assert disabled[0]["disabled_reason"] == "receiver migrating"

    status, out = await scene.cli("endpoints", "limit", scene.bad, "2.5")
    assert status == 0, out
    assert (await scene.json("endpoints", "list", "--webhook", scene.bad))[0]["rate_limit_per_second"] == 2.5
    status, out = await scene.cli("endpoints", "limit", scene.bad, "default")
    assert status == 0, out
    assert (await scene.json("endpoints", "list", "--webhook", scene.bad))[0]["rate_limit_per_second"] is None

    status, out = await scene.cli("endpoints", "enable", scene.good)
    assert status == 0, out
    assert (await scene.json("endpoints", "list", "--webhook", scene.good))[0]["state"] == "healthy"


async def test_endpoint_commands_refuse_bad_ids_and_rates_naming_the_argument(scene: Scene) -> None:
    status, out = await scene.cli("endpoints", "enable", "not-a-uuid")
    assert status == 2
    assert "WEBHOOK_ID: 'not-a-uuid' is not a webhook id" in out
    unknown = "00000000-0000-4000-8000-000000000000"
    status, out = await scene.cli("endpoints", "disable", unknown)
    assert status == 1
    assert f"no webhook with id {unknown}" in out
    status, out = await scene.cli("endpoints", "limit", scene.bad, "fast")
    assert status == 2
    assert "RATE: 'fast' is not a number" in out
    status, out = await scene.cli("deliveries", "list", "--since", "yesterday")
    assert status == 2
    assert "--since: 'yesterday'" in out


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (("deliveries", "list"), "--status {pending,dead,delivered}"),
        (("deliveries", "show"), "every delivery of this event"),
        (("deliveries", "retry"), "same event id"),
        (("endpoints", "list"), "--state"),
        (("endpoints", "enable"), "failure streak and circuit start afresh"),
        (("endpoints", "disable"), "pending and new deliveries become dead letters"),
        (("endpoints", "limit"), "deliveries a second"),
    ],
)
async def test_each_operator_command_explains_itself_in_help(command: tuple[str, ...], says: str) -> None:
    status, out = await webhookd_cli(*command, "--help")
    assert status == 0
    assert says in " ".join(out.split())
