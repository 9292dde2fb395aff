"""Every operator command against a real run: `deliveries list | show | retry | replay` and `endpoints list | enable |
disable | limit`, as tables and as --json, with filters, clear errors, and replays that send the same event id."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
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
from webhookd.operate.output import UsageError, since
from webhookd.runtime.children import free_port
from webhookd.runtime.config import Settings


@dataclass
class Scene:
    """A run that left three first-try successes (webhook `good`) and three dead letters (webhook `bad`)."""

    config: str
    workspace: str
    good: str
    bad: str
    receiver: Receiver
    fail: dict[str, bool]
    dsn: str
    topic: str

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
            yield Scene(path, ws, good, bad_id, receiver, fail, dsn, topic)


async def _logged_attempts(dsn: str, n: int) -> bool:
    rows = await fetch(
        dsn,
        "SELECT (SELECT count(*) FROM webhookd.attempt_log) + (SELECT count(*) FROM webhookd.first_tries) AS n",
    )
    return int(rows[0]["n"]) == n


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


async def test_deliveries_show_lists_every_attempt_of_a_delivery_or_of_an_event_and_what_filters_kept_back(
    scene: Scene,
) -> None:
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

    # A pair that a webhook's filter kept back is only in the attempt log (attempt 0, result `filtered`).
    picky = await add_webhook(scene.dsn, scene.workspace, scene.receiver.url("/picky"), ["*.*"])
    why = "filter: stage is not in [WON, LOST]"
    await _log_attempt(scene, "e0", picky, attempt=0, result="filtered", error=why, source=f"{scene.topic}:0:0")
    shown_all = {d["webhook_id"]: d for d in await scene.json("deliveries", "show", "--event", "e0")}
    assert shown_all.keys() == {scene.good, scene.bad, picky}
    assert shown_all[picky]["status"] == "filtered"
    assert shown_all[picky]["reason"] == why
    assert shown_all[picky]["id"] is None
    status, text = await scene.cli("deliveries", "show", "--event", "e0")
    assert status == 0, text
    assert "status:           filtered" in text
    assert f"filtered out by:  {why}" in text


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


async def _log_attempt(
    scene: Scene,
    event_id: str,
    webhook: str,
    *,
    attempt: int = 1,
    result: str = "2xx",
    error: str | None = None,
    source: str | None,
    table: str = "attempt_log",
) -> None:
    """An attempt-log row as the daemon writes one, for the cases a single run does not leave behind; `table`
    'attempts' is the attempt log of earlier releases, which the migrations still make and the daemons only ever
    empty."""
    await fetch(
        scene.dsn,
        f"INSERT INTO webhookd.{table} (event_id, webhook_id, workspace_id, event_name, attempt, at, duration_ms, "
        "result, status, error, source) VALUES ($1, $2::uuid, $3::uuid, 'person.created', $4, now(), 1, $5, "
        "CASE WHEN $5 = '2xx' THEN 200 END, $6, $7)",
        event_id,
        webhook,
        scene.workspace,
        attempt,
        result,
        error,
        source,
    )


async def test_replay_resends_a_window_including_first_try_successes_with_the_same_event_ids(scene: Scene) -> None:
    originals = {r.event_id: r.body for r in scene.receiver.at("/good")}
    assert sorted(originals) == ["e0", "e1", "e2"]
    rows = await fetch(scene.dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE webhook_id = $1", scene.good)
    assert rows[0]["n"] == 0, "first-try successes have no row: only the attempt log and Kafka know them"

    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "1h")
    assert status == 0, out
    assert f"replayed 3 deliveries of webhook {scene.good} (0 reset, 3 read again from Kafka)" in out
    await scene.receiver.wait_for(lambda: len(scene.receiver.at("/good")) == 6, 15, "the first-try successes again")
    again = scene.receiver.at("/good")[3:]
    assert sorted(r.event_id for r in again) == ["e0", "e1", "e2"]
    assert all(r.body == originals[r.event_id] for r in again), "the same body, read again from its record"

    # Dead letters of the window are reset; the webhook's pairs now all have rows, and each is replayed once.
    scene.fail["bad"] = False
    bad = await scene.json("deliveries", "replay", "--webhook", scene.bad, "--since", "1h")
    assert len(bad["reset"]) == 3
    assert bad["from_kafka"] == []
    await scene.receiver.wait_for(lambda: len(scene.receiver.at("/bad")) == 9, 15, "the dead letters, delivered")
    assert sorted(r.event_id for r in scene.receiver.at("/bad")[6:]) == ["e0", "e1", "e2"]
    await until(lambda: _delivered(scene, scene.good, 3), 10, "the replays of `good` recorded as delivered")
    good = await scene.json(
        "deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--event-name", "person.created"
    )
    assert (len(good["reset"]), good["from_kafka"]) == (3, []), "delivered rows are reset, not read from Kafka again"
    await scene.receiver.wait_for(lambda: len(scene.receiver.at("/good")) == 9, 15, "the second replay")
    assert sorted(r.event_id for r in scene.receiver.at("/good")[6:]) == ["e0", "e1", "e2"]


async def _delivered(scene: Scene, webhook: str, n: int) -> bool:
    rows = await fetch(
        scene.dsn,
        "SELECT count(*) AS n FROM webhookd.deliveries WHERE webhook_id = $1 AND status = 'delivered'",
        webhook,
    )
    return int(rows[0]["n"]) == n


async def test_replay_dry_run_prints_the_count_and_first_rows_and_changes_nothing(scene: Scene) -> None:
    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--dry-run")
    assert status == 0, out
    assert "dry run, nothing changed: 3 deliveries" in out
    assert "3 would be replayed (0 reset, 3 read again from Kafka)" in out
    table = out.splitlines()[1:5]
    assert table[0].split() == ["EVENT", "NAME", "WHEN", "HOW"]
    assert sorted(line.split()[0] for line in table[1:]) == ["e0", "e1", "e2"]
    assert all(f"from Kafka {scene.topic}:" in line for line in table[1:])

    dry = await scene.json("deliveries", "replay", "--webhook", scene.bad, "--since", "1h", "--dry-run")
    assert dry["count"] == 3
    assert {p["how"] for p in dry["pairs"]} == {f"reset row {i}" for i in await _dead_ids(scene)}
    assert dry["reset"] == [], "a dry run resets nothing"

    rows = await fetch(scene.dsn, "SELECT webhook_id::text AS w, status FROM webhookd.deliveries")
    assert sorted((r["w"], r["status"]) for r in rows) == [(scene.bad, "dead")] * 3
    assert len(scene.receiver.at("/good")) == 3

    status, out = await scene.cli(
        "deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--event-name", "person.deleted"
    )
    assert status == 0, out
    assert "nothing to replay" in out


async def _dead_ids(scene: Scene) -> list[int]:
    return [r["id"] for r in await fetch(scene.dsn, "SELECT id FROM webhookd.deliveries WHERE status = 'dead'")]


async def test_replay_refuses_until_before_since_and_an_unknown_webhook_and_skips_a_disabled_endpoint(
    scene: Scene,
) -> None:
    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--until", "2h")
    assert status == 2
    assert "--until (" in out
    assert "is before --since" in out
    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--until", "soon")
    assert status == 2
    assert "--until: 'soon'" in out
    unknown = "00000000-0000-4000-8000-000000000000"
    status, out = await scene.cli("deliveries", "replay", "--webhook", unknown, "--since", "1h")
    assert status == 1
    assert f"no live webhook with id {unknown}" in out
    deleted = await add_webhook(scene.dsn, scene.workspace, scene.receiver.url("/gone"), ["*.*"], deleted=True)
    status, out = await scene.cli("deliveries", "replay", "--webhook", deleted, "--since", "1h")
    assert status == 1
    assert f"no live webhook with id {deleted}" in out
    status, out = await scene.cli("deliveries", "replay", "--webhook", "nope", "--since", "1h")
    assert status == 2
    assert "--webhook: 'nope' is not a webhook id" in out

    # The daemons would dead-letter them again at once: nothing is replayed, and the way out is named.
    status, out = await scene.cli("endpoints", "disable", scene.good)
    assert status == 0, out
    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "1h")
    assert status == 1
    assert f"replayed 0 deliveries of webhook {scene.good}" in out
    assert f"skipped 3 of webhook {scene.good}: its endpoint is disabled; run `webhookd endpoints enable" in out
    rows = await fetch(scene.dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE webhook_id = $1", scene.good)
    assert rows[0]["n"] == 0


async def test_replay_reports_records_gone_from_kafka_and_replays_the_rest(scene: Scene) -> None:
    await _log_attempt(scene, "past-the-end", scene.good, source=f"{scene.topic}:0:999999")
    await _log_attempt(scene, "no-partition", scene.good, source=f"{scene.topic}:99:0")
    await _log_attempt(scene, "no-topic", scene.good, source="no-such-topic-for-replay:0:5")
    await _log_attempt(scene, "before-sources", scene.good, source=None)
    # Where e0 came from now holds another event as far as this row knows: a recreated topic reuses positions.
    e0 = await fetch(
        scene.dsn, "SELECT source FROM webhookd.first_tries WHERE event_id = 'e0' AND webhook_id = $1", scene.good
    )
    await _log_attempt(scene, "imposter", scene.good, source=e0[0]["source"])

    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--json")
    assert status == 1, "some pairs could not be replayed"
    report = orjson.loads(out)
    assert sorted(r["event_id"] for r in report["from_kafka"]) == ["e0", "e1", "e2"]
    gone = {g["event_id"]: g["why"] for g in report["gone_from_kafka"]}
    assert gone.keys() == {"past-the-end", "no-partition", "no-topic"}
    assert "the partition ends before it" in gone["past-the-end"]
    assert "has no partition 99" in gone["no-partition"]
    assert "topic no-such-topic-for-replay does not exist" in gone["no-topic"]
    assert [m["event_id"] for m in report["no_source"]] == ["before-sources"]
    assert [m["event_id"] for m in report["changed_in_kafka"]] == ["imposter"]
    assert "is now event 'e0', not 'imposter'" in report["changed_in_kafka"][0]["why"]
    await scene.receiver.wait_for(lambda: len(scene.receiver.at("/good")) == 6, 15, "the rest, replayed")
    assert sorted(r.event_id for r in scene.receiver.at("/good")[3:]) == ["e0", "e1", "e2"]

    status, text = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--dry-run")
    assert status == 0, text
    assert "gone from Kafka, would not be replayed: 3" in text
    assert "no source recorded, would not be replayed: 1" in text

    # A broker that cannot be reached costs the pairs it holds, reported, never a traceback.
    nowhere = f"127.0.0.1:{free_port()}"
    dry_run = ("deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--dry-run")
    status, text = await webhookd_cli(
        *dry_run, "--config", scene.config, env={"WEBHOOKD_KAFKA__BOOTSTRAP_SERVERS": nowhere}
    )
    assert status == 0, text
    assert "not read from Kafka, would not be replayed: 4" in text
    assert f"Kafka at {nowhere} failed" in text
    assert "Traceback" not in text


async def test_retry_dead_without_a_filter_refuses_and_all_replays_every_dead_letter(scene: Scene) -> None:
    status, out = await scene.cli("deliveries", "retry", "--dead")
    assert status == 2
    assert "this would replay every dead letter; add --all if you mean it" in out
    status, out = await scene.cli("deliveries", "retry", "--all")
    assert status == 2
    assert "--dead" in out
    scene.fail["bad"] = False
    dead = await _dead_ids(scene)
    assert len(dead) == 3
    replay = await scene.json("deliveries", "retry", "--dead", "--all")
    assert replay["replayed"] == sorted(dead)
    await scene.receiver.wait_for(lambda: len(scene.receiver.at("/bad")) == 9, 15, "every dead letter, replayed")


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
        (("deliveries", "replay"), "first-try successes included"),
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


async def test_replay_warns_that_first_try_successes_older_than_the_attempt_log_cannot_be_found(scene: Scene) -> None:
    # The default retention is 14 days: a window from 30 days ago reaches before it.
    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "30d", "--dry-run")
    assert status == 0, out
    assert "warning: first-try successes before " in out
    assert "may be gone from the attempt log and then cannot be found" in out
    assert "it keeps whole days, 14 days at least: endpoints.attempt_log_retention_seconds" in out
    assert "3 would be replayed (0 reset, 3 read again from Kafka)" in out, "the recent ones are still found"
    dry = await scene.json("deliveries", "replay", "--webhook", scene.good, "--since", "30d", "--dry-run")
    assert len(dry["warnings"]) == 1
    assert "cannot be found" in dry["warnings"][0]
    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "30d", "--until", "20d")
    assert status == 0, out
    assert "nothing to replay" in out
    assert "warning: first-try successes before " in out
    assert (await scene.json("deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--dry-run"))[
        "warnings"
    ] == []

    # The setting decides: with 10 minutes kept, an hour's window warns and five minutes' does not.
    env = {"WEBHOOKD_ENDPOINTS__ATTEMPT_LOG_RETENTION_SECONDS": "600"}
    replay = ("deliveries", "replay", "--webhook", scene.good, "--dry-run", "--config", scene.config)
    status, out = await webhookd_cli(*replay, "--since", "1h", env=env)
    assert status == 0, out
    assert "(it keeps whole days, 600 seconds at least: endpoints.attempt_log_retention_seconds)" in out
    status, out = await webhookd_cli(*replay, "--since", "5m", env=env)
    assert status == 0, out
    assert "warning" not in out

    status, out = await scene.cli("deliveries", "replay", "--webhook", scene.good, "--since", "30d", "--json")
    assert status == 0, out
    done = orjson.loads(out)
    assert len(done["warnings"]) == 1
    assert len(done["from_kafka"]) == 3


async def test_replay_keeps_both_pairs_of_a_reused_event_id_and_prefers_the_row_with_a_source(scene: Scene) -> None:
    # A recreated topic reuses default event ids: two first-try successes of "reused", from two places.
    await _log_attempt(scene, "reused", scene.good, source=f"{scene.topic}:0:999990")
    await _log_attempt(scene, "reused", scene.good, source=f"{scene.topic}:1:999990")
    # Logged by a webhookd without sources, then again (after a restart) by one with: one pair, with its source.
    await _log_attempt(scene, "upgraded", scene.good, source=None, table="attempts")
    await _log_attempt(scene, "upgraded", scene.good, source=f"{scene.topic}:2:999990")
    await _log_attempt(scene, "old", scene.good, source=None, table="attempts")
    # A pair with a row of its own hides only its own first try, not another pair's under the same id.
    await fetch(
        scene.dsn,
        "INSERT INTO webhookd.deliveries (event_id, webhook_id, workspace_id, event_name, body, source, status, "
        "attempts) VALUES ('twin', $1::uuid, $2::uuid, 'person.created', '{}', $3, 'dead', 2)",
        scene.good,
        scene.workspace,
        f"{scene.topic}:3:999990",
    )
    await _log_attempt(scene, "twin", scene.good, attempt=2, result="5xx", source=f"{scene.topic}:3:999990")
    await _log_attempt(scene, "twin", scene.good, source=f"{scene.topic}:3:999991")

    dry = await scene.json("deliveries", "replay", "--webhook", scene.good, "--since", "1h", "--dry-run")
    assert dry["count"] == 3 + 2 + 1 + 1 + 2
    gone = sorted((g["event_id"], g["source"]) for g in dry["gone_from_kafka"])
    assert gone == [
        ("reused", f"{scene.topic}:0:999990"),
        ("reused", f"{scene.topic}:1:999990"),
        ("twin", f"{scene.topic}:3:999991"),
        ("upgraded", f"{scene.topic}:2:999990"),
    ]
    assert [m["event_id"] for m in dry["no_source"]] == ["old"]
    twin = await fetch(scene.dsn, "SELECT id FROM webhookd.deliveries WHERE event_id = 'twin'")
    twins = sorted(p["how"] for p in dry["pairs"] if p["event_id"] == "twin")
    assert twins == ["gone from Kafka", f"reset row {twin[0]['id']}"]


def test_since_refuses_a_time_out_of_range_naming_the_option_and_the_value() -> None:
    for text, says in (
        ("9999999d", "'9999999d' reaches back before year 1"),
        ("1" + "0" * 400 + "s", "reaches back before year 1"),
        ("0001-01-01T00:00:00+05:00", "'0001-01-01T00:00:00+05:00' is out of range"),
        ("9999-12-31T23:00:00-05:00", "is out of range"),
        ("soon", "'soon' is neither an age"),
    ):
        with pytest.raises(UsageError) as refused:
            since(text, "--until")
        assert str(refused.value).startswith("--until: ")
        assert says in str(refused.value)
    assert since("2026-11-28T12:00:00+02:00") == datetime(2026, 11, 28, 10, tzinfo=UTC)


async def test_since_or_until_beyond_the_calendar_is_a_usage_error_not_a_traceback(dsn: str, tmp_path: Path) -> None:
    config = str(write_config(tmp_path / "webhookd.yaml", config_for("127.0.0.1:9", dsn, "unused")))
    webhook = "00000000-0000-4000-8000-000000000000"
    for args, says in (
        (("deliveries", "list", "--since", "9999999d"), "--since: '9999999d'"),
        (("deliveries", "retry", "--dead", "--since", "9999999d"), "--since: '9999999d'"),
        (("deliveries", "replay", "--webhook", webhook, "--since", "9999999d"), "--since: '9999999d'"),
        (("deliveries", "replay", "--webhook", webhook, "--since", "1h", "--until", "9999999d"), "--until: '9999999d'"),
    ):
        status, out = await webhookd_command(*args, "--config", config)
        assert status == 2, out
        assert says in out
        assert "Traceback" not in out
