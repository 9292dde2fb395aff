"""Sick receivers get backed-off traffic, not a flood, and nothing meant for them is lost: the circuit breaker opens,
probes and closes; a rate limit and a receiver's Retry-After defer deliveries; 410 Gone and a long failing streak
disable an endpoint, and an operator's command brings it back."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.support import (
    Receiver,
    add_webhook,
    config_for,
    event,
    fetch,
    get_text,
    metric,
    new_workspace,
    produce,
    running,
    settings_for,
    until,
    webhookd_command,
    write_config,
)
from webhookd.runtime.config import Settings


class Answers:
    """A receiver path whose answer can change during the test; records which events it answered 2xx."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = headers or {}
        self.accepted: set[str] = set()

    async def __call__(self, request: web.Request, _body: bytes) -> web.StreamResponse:
        if self.status < 300:
            self.accepted.add(request.headers["X-Twenty-Webhook-Event-Id"])
        return web.Response(status=self.status, headers=self.headers, text="nope" if self.status >= 300 else "ok")


# Retries every 0.3 s, thirty of them: a held delivery is back soon, and none runs out of its schedule in a test.
RETRY_OFTEN: dict[str, Any] = {"retry_schedule": ["300ms"] * 30, "retry_jitter": 0}


def quick_circuit(cooldown: float, max_cooldown: float) -> dict[str, Any]:
    """A breaker that opens after five failures and probes after `cooldown`; endpoint state synced every 0.2 s."""
    return {
        "circuit_min_requests": 5, "circuit_consecutive_failures": 5,
        "circuit_cooldown_seconds": cooldown, "circuit_max_cooldown_seconds": max_cooldown,
        "sync_interval_seconds": 0.2,
    }  # fmt: skip


async def _metric(settings: Settings, name: str, **labels: str) -> float:
    _, text = await get_text(f"http://{settings.http.listen}/metrics")
    return metric(text, name, **labels)


async def _endpoint(dsn: str, webhook_id: str) -> dict[str, Any]:
    rows = await fetch(dsn, "SELECT * FROM webhookd.endpoints WHERE webhook_id = $1::uuid", webhook_id)
    return dict(rows[0]) if rows else {}


async def test_a_failing_endpoint_trips_its_circuit_gets_only_probes_then_everything_once_it_recovers(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    answers = receiver.behaviours["/flaky"] = Answers(500)
    await add_webhook(dsn, ws, receiver.url("/flaky"), ["*.*"])
    settings = settings_for(kafka, dsn, topic, delivery=RETRY_OFTEN, endpoints=quick_circuit(1, 2))
    ids = {f"c{i}" for i in range(30)}
    async with running(settings):
        await produce(kafka, topic, [event("person.created", ws, id=i) for i in sorted(ids)])
        await until(lambda: _metric_is(settings, "webhookd_endpoint_circuit_open", 1), 10, "the circuit to open")
        at_open = len(receiver.requests)
        await asyncio.sleep(3.5)  # two cool-downs and more: only probes may reach the receiver
        probes = len(receiver.requests) - at_open
        print(f"\nrequests while the circuit was open for 3.5 s: {probes} (30 events, retries every 0.3 s)")
        assert probes <= 3, f"{probes} requests reached an endpoint whose circuit was open"
        # Held, not dropped: every event waits in the retry table, none used up its schedule.
        waiting = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'pending'")
        assert waiting[0]["n"] == len(ids)
        row = await _endpoint(dsn, (await fetch(dsn, "SELECT id::text FROM core.webhook"))[0]["id"])
        assert row["circuit_open_until"] is not None, "the open circuit was not published for operators"
        answers.status = 200
        await receiver.wait_for(lambda: answers.accepted >= ids, 30, "every event after the receiver recovered")
        await until(lambda: _metric_is(settings, "webhookd_endpoint_circuit_open", 0), 10, "the circuit to close")
    dead = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'dead'")
    assert dead[0]["n"] == 0


async def test_an_operators_enable_closes_an_open_circuit_without_waiting_for_its_cooldown(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    answers = receiver.behaviours["/mended"] = Answers(500)
    webhook = await add_webhook(dsn, ws, receiver.url("/mended"), ["*.*"])
    config = config_for(kafka, dsn, topic, delivery=RETRY_OFTEN, endpoints=quick_circuit(120, 120))
    settings = Settings.model_validate(config)
    failed, held = {f"m{i}" for i in range(10)}, {f"h{i}" for i in range(10)}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_config(Path(tmp) / "webhookd.yaml", config))
        async with running(settings):
            await produce(kafka, topic, [event("person.created", ws, id=i) for i in sorted(failed)])
            await until(lambda: _metric_is(settings, "webhookd_endpoint_circuit_open", 1), 10, "the circuit to open")
            answers.status = 200  # mended, but the circuit would keep it waiting for two minutes
            # Events that arrive while the circuit is open are deferred by it, without an attempt, for its cool-down.
            await produce(kafka, topic, [event("person.created", ws, id=i) for i in sorted(held)])
            deferred = "SELECT count(*) AS n FROM webhookd.deliveries WHERE event_id LIKE 'h%' AND attempts = 0"
            await until(lambda: _count_is(dsn, deferred, len(held)), 10, "the circuit to defer the new events")
            assert answers.accepted == set(), "an open circuit let deliveries through before its cool-down"
            status, out = await webhookd_command("endpoints", "enable", webhook, "--config", path)
            assert status == 0, out
            enabled_at = time.monotonic()
            await receiver.wait_for(lambda: answers.accepted >= failed | held, 10, "every delivery after the enable")
            print(f"\nafter the enable, every held delivery arrived within {time.monotonic() - enabled_at:.1f} s")
            await until(lambda: _metric_is(settings, "webhookd_endpoint_circuit_open", 0), 5, "the circuit to close")


async def _count_is(dsn: str, sql: str, n: int) -> bool:
    return bool((await fetch(dsn, sql))[0]["n"] == n)


async def _metric_is(settings: Settings, name: str, value: float) -> bool:
    return await _metric(settings, name) == value


async def test_a_rate_limit_set_by_command_paces_deliveries_and_defers_the_rest_without_loss(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    webhook = await add_webhook(dsn, ws, receiver.url("/paced"), ["*.*"])
    config = config_for(
        kafka, dsn, topic, delivery={"host_wait_seconds": 0.2}, endpoints={"sync_interval_seconds": 0.2}
    )
    ids = {f"r{i}" for i in range(30)}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_config(Path(tmp) / "webhookd.yaml", config))
        status, out = await webhookd_command("endpoints", "limit", webhook, "5", "--config", path)
        assert status == 0, out
        assert "at most 5 deliveries a second" in out
        settings = Settings.model_validate(config)
        async with running(settings):
            await produce(kafka, topic, [event("person.created", ws, id=i) for i in sorted(ids)])
            await receiver.wait_for(lambda: {r.event_id for r in receiver.requests} >= ids, 30, "every delivery")
            deferred = await _metric(settings, "webhookd_deliveries_deferred_total", reason="rate_limited")

            async def listed() -> list[dict[str, Any]]:
                status, out = await webhookd_command(
                    "deliveries", "list", "--webhook", webhook, "--json", "--config", path
                )
                assert status == 0, out
                return list(orjson.loads(out))

            # Those deferred before their first attempt have rows, the others only attempts in the log; each
            # delivery is listed once all the same.
            await until(lambda: _has_all(listed, ids), 10, "every delivery listed as delivered")
            assert sorted(d["event_id"] for d in await listed()) == sorted(ids)
    times = sorted(r.at for r in receiver.requests)
    span = times[-1] - times[0]
    # A second's burst (5), then one every 0.2 s: 30 deliveries take at least (30 - 5 - 5) / 5 = 4 s.
    print(f"\n30 deliveries at 5/s took {span:.1f} s; {deferred:.0f} deferred")
    assert span >= 4.0, f"30 deliveries limited to 5/s arrived within {span:.1f} s"
    assert deferred > 0
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 10, f"{busiest} deliveries arrived within one second at a limit of 5/s"


async def _has_all(listed: Callable[[], Awaitable[list[dict[str, Any]]]], ids: set[str]) -> bool:
    rows = await listed()
    return {d["event_id"] for d in rows if d["status"] == "delivered"} >= ids


async def test_retry_after_on_429_holds_the_whole_endpoint_not_only_that_delivery(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    answers = receiver.behaviours["/busy"] = Answers(429, {"Retry-After": "2"})
    await add_webhook(dsn, ws, receiver.url("/busy"), ["*.*"])
    settings = settings_for(kafka, dsn, topic, delivery={"host_wait_seconds": 0.2, "retry_schedule": ["100ms"] * 5})
    async with running(settings):
        await produce(kafka, topic, [event("person.created", ws, id="first")])
        await receiver.wait_for(lambda: len(receiver.requests) == 1, 15, "the first delivery")
        told_to_wait = time.monotonic()
        answers.status = 200
        later = {f"later{i}" for i in range(10)}
        await produce(kafka, topic, [event("person.created", ws, id=i) for i in sorted(later)])
        await receiver.wait_for(lambda: answers.accepted >= later | {"first"}, 30, "every delivery after the pause")
        deferred = await _metric(settings, "webhookd_deliveries_deferred_total", reason="rate_limited")
    second = min(r.at for r in receiver.requests[1:])
    print(f"\nfirst request after 429 Retry-After: 2 came {second - told_to_wait:.2f} s later; {deferred:.0f} deferred")
    assert second - told_to_wait >= 1.8, "the endpoint was sent to before its Retry-After ran out"
    assert deferred >= 10


async def test_410_gone_disables_at_once_and_an_operator_enables_and_replays_the_same_events(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    answers = receiver.behaviours["/gone"] = Answers(410)
    webhook = await add_webhook(dsn, ws, receiver.url("/gone"), ["*.*"])
    config = config_for(kafka, dsn, topic, endpoints={"sync_interval_seconds": 0.2})
    settings = Settings.model_validate(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_config(Path(tmp) / "webhookd.yaml", config))
        async with running(settings):
            await produce(kafka, topic, [event("person.created", ws, id="g0")])
            await receiver.wait_for(lambda: len(receiver.requests) == 1, 15, "the 410 answer")
            await until(lambda: _metric_is(settings, "webhookd_endpoints_disabled", 1), 10, "the endpoint disabled")
            await produce(kafka, topic, [event("person.created", ws, id=f"g{i}") for i in range(1, 6)])
            await until(lambda: _dead_count(dsn, 6), 15, "all six deliveries dead-lettered")
            assert len(receiver.requests) == 1, "a disabled endpoint was sent to"

            async def published() -> bool:  # the state reaches the table at the next sync
                return (await _endpoint(dsn, webhook)).get("disabled_reason") is not None

            await until(published, 5, "the disabled state in webhookd.endpoints")
            row = await _endpoint(dsn, webhook)
            assert row["disabled_reason"] == "the receiver answered 410 Gone"
            status, out = await webhookd_command("endpoints", "list", "--config", path)
            assert status == 0, out
            assert "disabled" in out
            assert "410 Gone" in out

            answers.status = 200
            await _enable(webhook, path, settings)
            status, out = await webhookd_command(
                "deliveries", "retry", "--dead", "--webhook", webhook, "--config", path
            )
            assert status == 0, out
            assert "replayed 6 deliveries" in out
            ids = {f"g{i}" for i in range(6)}
            await receiver.wait_for(lambda: answers.accepted >= ids, 20, "the replayed deliveries")
    # The replay is the same event: the receiver sees the id it saw with the 410.
    assert [r.event_id for r in receiver.requests].count("g0") == 2


async def _enable(webhook: str, config_path: str, settings: Settings) -> None:
    """Enable by command, as an operator would, and wait until the running daemon has taken it."""
    status, out = await webhookd_command("endpoints", "enable", webhook, "--config", config_path)
    assert status == 0, out
    assert "enabled 1 endpoint(s)" in out
    await until(lambda: _metric_is(settings, "webhookd_endpoints_disabled", 0), 10, "the endpoint enabled")


async def _dead_count(dsn: str, n: int) -> bool:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'dead'")
    return int(rows[0]["n"]) == n


async def test_an_endpoint_failing_without_success_for_the_configured_time_is_disabled_until_enabled(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    answers = receiver.behaviours["/down"] = Answers(503)
    webhook = await add_webhook(dsn, ws, receiver.url("/down"), ["*.*"])
    config = config_for(
        kafka, dsn, topic,
        delivery={"retry_schedule": ["300ms"] * 50, "retry_jitter": 0},
        endpoints={"disable_after_seconds": 2, "sync_interval_seconds": 0.2, "circuit_min_requests": 1000,
                   "circuit_consecutive_failures": 1000},
    )  # fmt: skip
    settings = Settings.model_validate(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_config(Path(tmp) / "webhookd.yaml", config))
        async with running(settings):
            started = time.monotonic()
            await produce(kafka, topic, [event("person.created", ws, id=f"d{i}") for i in range(3)])
            await until(lambda: _disabled(dsn, webhook), 15, "the endpoint auto-disabled")
            took = time.monotonic() - started
            print(f"\ndisabled {took:.1f} s after its first event (disable_after_seconds: 2)")
            assert took >= 2.0
            row = await _endpoint(dsn, webhook)
            assert row["disabled_reason"].startswith("no successful delivery since ")
            assert row["consecutive_failures"] >= 3
            await until(lambda: _dead_count(dsn, 3), 10, "its pending deliveries dead-lettered")
            status, out = await webhookd_command("endpoints", "list", "--state", "disabled", "--json", "--config", path)
            assert status == 0, out
            assert webhook in out

            answers.status = 200
            await _enable(webhook, path, settings)
            await produce(kafka, topic, [event("person.created", ws, id="after")])
            await receiver.wait_for(lambda: "after" in answers.accepted, 15, "a delivery after re-enabling")
    row = await _endpoint(dsn, webhook)
    assert row["disabled_at"] is None
    assert row["last_success_at"] is not None
    assert row["failing_since"] is None


async def _disabled(dsn: str, webhook: str) -> bool:
    return bool((await _endpoint(dsn, webhook)).get("disabled_at"))
