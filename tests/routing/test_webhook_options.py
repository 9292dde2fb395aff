"""Per-webhook options on a real run: filters on updatedFields and on the record, per-record ordering through a
failure and a SIGKILL, custom headers that arrive and are never logged, a hand-broken row that is ignored, and a
change picked up by the running daemon within 2 seconds.

One scenario serves every test of the module, as an operator would see it: a `webhookd run` process (logging every
delivery, at debug level), killed with SIGKILL while a record is held back and started again.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.daemon_tools import get_text, metric, wait_ready
from tests.support import (
    DaemonProcess,
    Receiver,
    add_webhook,
    config_for,
    fetch,
    new_workspace,
    produce,
    until,
    webhookd_command,
    write_config,
)

SECRET_HEADER = "Bearer tok-9f2c61d0a7e4"


def _update(event_id: str, record: str, stage: str, currency: str, fields: list[str] | None) -> dict[str, Any]:
    data = {
        "id": record,
        "name": f"deal {record}",
        "stage": stage,
        "amount": {"amountMicros": 1, "currencyCode": currency},
    }
    base: dict[str, Any] = {"event": "opportunity.updated", "workspaceId": "", "data": data, "id": event_id}
    if fields is not None:
        base["updatedFields"] = fields
    return base


# Record A's and record B's changes, interleaved on one partition (Kafka order = this order).
PHASE_ONE = [
    _update("A1", "A", "NEGOTIATION", "USD", ["stage"]),
    _update("B1", "B", "WON", "USD", ["name"]),
    _update("A2", "A", "WON", "USD", ["stage", "amount"]),
    _update("B2", "B", "LOST", "EUR", ["stage"]),
    _update("A3", "A", "WON", "USD", ["name"]),
    {**_update("B3", "B", "NEW", "USD", None), "event": "opportunity.created"},
    _update("A4", "A", "LOST", "USD", None),  # updatedFields unknown
]
STAGE_GETS = ["A1", "A2", "B2", "B3", "A4"]  # updatedFields has stage, or not an update, or unknown
WON_GETS = ["B1", "A2", "A3", "A4"]  # stage in [WON, LOST] and amount.currencyCode = USD
HELD = ["C1", "C2", "C3"]  # record C, whose first delivery fails until after the SIGKILL


@dataclass
class Scene:
    receiver: Receiver
    dsn: str
    config: str
    log: str
    ids: dict[str, str]
    answered: list[tuple[str, int]] = field(default_factory=list)  # /ordered: event id, status answered
    metrics_text: str = ""
    late_change_applied_in: float = 0.0

    def ids_at(self, path: str) -> list[str]:
        return [r.event_id for r in self.receiver.at(path)]

    def delivered_in_order(self, prefix: str) -> list[str]:
        """The /ordered deliveries of one record that got a 2xx, in arrival order, repeats of the last collapsed."""
        seen: list[str] = []
        for event_id, status in self.answered:
            if event_id.startswith(prefix) and status == 200 and (not seen or seen[-1] != event_id):
                seen.append(event_id)
        return seen


async def _set_options(dsn: str, webhook_id: str, options: dict[str, Any] | str) -> None:
    text = options if isinstance(options, str) else orjson.dumps(options).decode()
    await fetch(
        dsn,
        "INSERT INTO webhookd.webhook_options (webhook_id, options) VALUES ($1::uuid, $2::jsonb) "
        "ON CONFLICT (webhook_id) DO UPDATE SET options = EXCLUDED.options",
        webhook_id,
        text,
    )


async def _rows_of(dsn: str, order_key: str) -> int:
    rows = await fetch(
        dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE order_key = $1 AND status = 'pending'", order_key
    )
    return int(rows[0]["n"])


@pytest.fixture(scope="module")
async def scene(kafka: str, postgres_admin: str) -> AsyncIterator[Scene]:
    from tests.daemon_tools import fresh_database, fresh_topic

    dsn = await fresh_database(postgres_admin)
    topic = await fresh_topic(kafka, 1)
    ws = new_workspace()
    receiver = Receiver()
    await receiver.start()
    failing = {"A1": 1, "C1": 10**6}  # failures left to answer for these events at /ordered
    answered: list[tuple[str, int]] = []

    async def ordered(request: web.Request, _body: bytes) -> web.StreamResponse:
        event_id = request.headers["X-Twenty-Webhook-Event-Id"]
        status = 200
        if failing.get(event_id, 0) > 0:
            failing[event_id] -= 1
            status = 500
        answered.append((event_id, status))
        return web.Response(status=status)

    receiver.behaviours["/ordered"] = ordered
    ids = {
        path: await add_webhook(dsn, ws, receiver.url(f"/{path}"), ["opportunity.*"])
        for path in ("stage", "won", "all", "headers", "ordered", "broken", "late")
    }
    config = config_for(
        kafka,
        dsn,
        topic,
        kafka={"group_instance_id": f"options-{topic}"},
        delivery={"retry_schedule": ["1s"] * 30, "retry_poll_interval_seconds": 0.1},
        logging={"level": "debug", "format": "json"},
    )
    listen = config["http"]["listen"]
    events = [{**e, "workspaceId": ws} for e in PHASE_ONE]
    with tempfile.TemporaryDirectory(prefix="webhookd-options-") as tmp:
        path = write_config(Path(tmp) / "c.yaml", config)
        # Set as an operator sets them, with the command line.
        for webhook, *options in (
            ("stage", "--updated-fields", "stage"),
            ("won", "--where", "stage in [WON, LOST]", "--where", "amount.currencyCode = USD"),
            ("headers", "--header", f"Authorization: {SECRET_HEADER}", "--header", "X-Tenant: acme"),
            ("ordered", "--ordered"),
        ):
            status, out = await webhookd_command("webhooks", "set", ids[webhook], *options, "--config", str(path))
            assert status == 0, out
            assert SECRET_HEADER not in out
        # Edited by hand into something no daemon can apply: ignored with a warning, the webhook gets everything.
        await _set_options(dsn, ids["broken"], '{"filter": {"where": ["stage inn WON"]}}')
        log = Path(tmp) / "daemon.log"
        daemon = DaemonProcess(path, {}, log)
        scene = Scene(receiver, dsn, str(path), "", ids, answered)
        try:
            daemon.start()
            await wait_ready(daemon, listen)
            await produce(kafka, topic, events + [_held(e, ws) for e in HELD])
            await receiver.wait_for(lambda: scene.delivered_in_order("A") == ["A1", "A2", "A3", "A4"], 30, "A in order")
            await until(lambda: _held_back(dsn), 20, "record C's later deliveries held in the retry table")
            daemon.kill()
            await produce(kafka, topic, [_held("C4", ws)])
            daemon.start()
            await wait_ready(daemon, listen)
            failing["C1"] = 0
            await receiver.wait_for(lambda: "C4" in scene.delivered_in_order("C"), 30, "C4 after the restart")
            # A change made now is in effect 2 s later: L1 is filtered out, L2 (after it) delivered.
            await _set_options(dsn, ids["late"], {"filter": {"updated_fields": ["stage"]}})
            changed = time.monotonic()
            await asyncio.sleep(2.0)
            late = [_update("L1", "L", "NEW", "USD", ["name"]), _update("L2", "L", "NEW", "USD", ["stage"])]
            await produce(kafka, topic, [{**e, "workspaceId": ws} for e in late])
            await receiver.wait_for(lambda: "L2" in scene.ids_at("/late"), 20, "L2")
            scene.late_change_applied_in = time.monotonic() - changed
            _, scene.metrics_text = await get_text(f"http://{listen}/metrics")
            assert await asyncio.to_thread(daemon.terminate) == 0
        finally:
            daemon.kill()
            await receiver.stop()
        scene.log = log.read_text()
        yield scene


def _held(event_id: str, ws: str) -> dict[str, Any]:
    return {**_update(event_id, "C", "NEW", "USD", ["stage"]), "workspaceId": ws}


async def _held_back(dsn: str) -> bool:
    return await _rows_of(dsn, "opportunity:C") == len(HELD)


async def test_an_updated_fields_filter_lets_only_updates_of_those_fields_through(scene: Scene) -> None:
    phase_one = [i for i in scene.ids_at("/stage") if i[0] in "AB"]
    assert sorted(phase_one) == sorted(STAGE_GETS)
    assert sorted(i for i in scene.ids_at("/all") if i[0] in "AB") == sorted(e["id"] for e in PHASE_ONE)


async def test_a_record_predicate_filter_lets_only_matching_records_through(scene: Scene) -> None:
    assert sorted(i for i in scene.ids_at("/won") if i[0] in "AB") == sorted(WON_GETS)


async def test_filtered_pairs_are_counted_by_reason_and_shown_by_deliveries_show(scene: Scene) -> None:
    # After the restart: L1 was kept from /late (updated_fields); C's updates are kept from /won (stage NEW).
    assert metric(scene.metrics_text, "webhookd_deliveries_filtered_total", reason="updated_fields") >= 1
    assert metric(scene.metrics_text, "webhookd_deliveries_filtered_total", reason="record") >= 1
    assert metric(scene.metrics_text, "webhookd_delivery_attempts_total", result="4xx") == 0
    # L1 (an update of `name`, stage NEW), after the restart, which a clean stop flushed to the attempt log.
    status, out = await webhookd_command("deliveries", "show", "--event", "L1", "--json", "--config", scene.config)
    assert status == 0, out
    shown = {d["webhook_id"]: d for d in orjson.loads(out)}
    assert shown[scene.ids["stage"]]["status"] == "filtered"
    assert "updatedFields" in str(shown[scene.ids["stage"]])
    assert shown[scene.ids["won"]]["status"] == "filtered"
    assert "stage in" in str(shown[scene.ids["won"]])
    assert shown[scene.ids["all"]]["status"] == "delivered"


async def test_an_ordered_webhook_sends_a_records_updates_in_order_while_other_records_flow_on(scene: Scene) -> None:
    assert scene.delivered_in_order("A") == ["A1", "A2", "A3", "A4"]
    assert scene.delivered_in_order("B") == ["B1", "B2", "B3"]
    first_failure = scene.answered.index(("A1", 500))
    a1_delivered = scene.answered.index(("A1", 200))
    b_done = max(scene.answered.index((b, 200)) for b in ("B1", "B2", "B3"))
    # B's updates did not wait for A's retry; A2 never went out before A1 arrived.
    assert b_done < a1_delivered, scene.answered
    assert ("A2", 200) not in scene.answered[first_failure:a1_delivered]


async def test_ordering_holds_through_a_sigkill(scene: Scene) -> None:
    assert scene.delivered_in_order("C") == ["C1", "C2", "C3", "C4"], scene.answered
    assert await _rows_of(scene.dsn, "opportunity:C") == 0


async def test_custom_headers_arrive_and_never_appear_in_the_logs(scene: Scene) -> None:
    received = scene.receiver.at("/headers")
    assert received
    assert all(r.headers["Authorization"] == SECRET_HEADER and r.headers["X-Tenant"] == "acme" for r in received)
    assert '"delivered"' in scene.log  # debug logging was on: every success was logged
    assert SECRET_HEADER not in scene.log
    assert "tok-9f2c61d0a7e4" not in scene.log


async def test_a_hand_broken_options_row_is_ignored_with_a_warning_naming_the_webhook(scene: Scene) -> None:
    assert sorted(i for i in scene.ids_at("/broken") if i[0] in "AB") == sorted(e["id"] for e in PHASE_ONE)
    warnings = [orjson.loads(line) for line in scene.log.splitlines() if "webhook_options_ignored" in line]
    assert warnings
    assert all(w["webhook_id"] == scene.ids["broken"] for w in warnings)
    assert "stage inn WON" in warnings[0]["reason"]


async def test_an_options_change_is_picked_up_by_the_running_daemon_within_two_seconds(scene: Scene) -> None:
    late = scene.ids_at("/late")
    assert "L2" in late
    assert "L1" not in late
