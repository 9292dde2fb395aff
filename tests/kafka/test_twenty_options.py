"""Per-webhook options on Twenty's real change stream: writes to a Twenty-shaped database, read by Debezium (the
shipped connector) into Apache Kafka, delivered by the daemon. A webhook filtered on `updatedFields` gets a deal's
updates only when its stage moves; one filtered on the record only deals at the proposal or customer stage; an
ordered one whose receiver fails the deal's first update gets every update of that deal in the order they were
written, while another deal's flow on."""

from __future__ import annotations

import asyncio
import decimal
import tempfile
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from tests.kafka.debezium import Debezium
from tests.kafka.test_twenty_cdc import deal, debezium_topics, start_shipped_connector, twenty_database
from tests.support import Receiver, add_webhook, config_for, running, settings_for, webhookd_command, write_config


async def test_debezium_updates_are_filtered_by_updated_fields_and_record_and_kept_in_order_per_record(
    kafka: str, dsn: str, debezium: Debezium, receiver: Receiver
) -> None:
    acme, _ = await twenty_database(dsn)
    prefix = f"opts{uuid.uuid4().hex[:6]}"
    delivery = {"retry_schedule": ["2s"] * 10, "retry_poll_interval_seconds": 0.1}
    settings = settings_for(
        kafka, dsn, prefix, kafka=debezium_topics(prefix, group_id=f"{prefix}-g"), delivery=delivery
    )
    failures = {"left": 1}  # deal A's first update (the rename) fails once at /ordered
    answered: list[tuple[str, str, int]] = []  # /ordered: deal id, stage (the rename marked *), status answered

    async def ordered(_request: web.Request, body: bytes) -> web.StreamResponse:
        data = orjson.loads(body)["data"]
        renamed = data["name"] == RENAMED
        status = 200
        if data["id"] == ids["a"] and renamed and failures["left"] > 0:
            failures["left"] -= 1
            status = 500
        answered.append((data["id"], data["stage"] + ("*" if renamed and data["stage"] == "MEETING" else ""), status))
        return web.Response(status=status)

    receiver.behaviours["/ordered"] = ordered
    ws = acme.workspace_id
    webhooks = {path: await add_webhook(dsn, ws, receiver.url(f"/{path}"), ["opportunity.*"]) for path in PATHS}
    conn = await asyncpg.connect(dsn)
    ids: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="webhookd-options-") as tmp:
            config = str(write_config(Path(tmp) / "c.yaml", config_for(kafka, dsn, prefix)))
            for path, *options in (
                ("stage", "--updated-fields", "stage"),
                ("won", "--where", "stage in [PROPOSAL, CUSTOMER]"),
                ("ordered", "--ordered"),
            ):
                status, out = await webhookd_command("webhooks", "set", webhooks[path], *options, "--config", config)
                assert status == 0, out
        company = await acme.insert(conn, "company", {"name": "Acme", "employees": 12})
        contact = await acme.insert(conn, "person", {"nameFirstName": "Ada", "companyId": company})
        await start_shipped_connector(debezium, dsn, prefix)
        async with running(settings):
            ids["a"] = await acme.insert(conn, "opportunity", deal(company, contact))
            ids["b"] = await acme.insert(conn, "opportunity", deal(company, contact))
            # Each creation arrives before the updates are written.
            await receiver.wait_for(lambda: _created(answered, ids), 60, "both deals' creation")
            for values in WRITES:
                for record in ("a", "b"):
                    await acme.update(conn, "opportunity", ids[record], values)
            await receiver.wait_for(lambda: (ids["a"], "SCREENING", 200) in answered, 60, "deal A's last update")
            await receiver.wait_for(lambda: len(receiver.at("/all")) == 2 * (1 + len(WRITES)), 30, "every event")
            await asyncio.sleep(1.0)  # room for anything that should not come
    finally:
        await conn.close()

    def stages(path: str, record: str) -> list[str]:
        got = [orjson.loads(r.body)["data"] for r in receiver.at(path)]
        # Unordered webhooks: what arrived, not in which order.
        return sorted(d["stage"] for d in got if d["id"] == ids[record])

    # /stage: the creation (not an update) and the updates that moved the stage; not the rename or the amount.
    assert stages("/stage", "a") == sorted(["MEETING", "PROPOSAL", "CUSTOMER", "SCREENING"])
    # /won: only while the deal is at the proposal or customer stage, whatever changed.
    assert stages("/won", "a") == ["CUSTOMER", "CUSTOMER", "PROPOSAL"]
    assert stages("/all", "a") == sorted(["MEETING", "MEETING", "PROPOSAL", "CUSTOMER", "CUSTOMER", "SCREENING"])
    # /ordered: deal A's deliveries in the order written, the failed rename first delivered by its retry.
    delivered_a = [stage for record, stage, status in answered if record == ids["a"] and status == 200]
    assert delivered_a == ["MEETING", "MEETING*", "PROPOSAL", "CUSTOMER", "CUSTOMER", "SCREENING"], answered
    # Deal B did not wait for deal A's retry: all of B was delivered before A's rename was.
    b_done = answered.index((ids["b"], "SCREENING", 200))
    assert b_done < answered.index((ids["a"], "MEETING*", 200)), answered


PATHS = ("stage", "won", "ordered", "all")
RENAMED = "Big deal, renamed"
# The updates written to both deals, in this order: a rename (stage unchanged), three stage moves and an amount.
WRITES: list[dict[str, Any]] = [
    {"name": RENAMED, "stage": "MEETING"},
    {"stage": "PROPOSAL"},
    {"stage": "CUSTOMER"},
    {"amountAmountMicros": decimal.Decimal("2500000000"), "stage": "CUSTOMER"},
    {"stage": "SCREENING"},
]


def _created(answered: list[tuple[str, str, int]], ids: dict[str, str]) -> bool:
    return all((ids[record], "MEETING", 200) in answered for record in ("a", "b"))
