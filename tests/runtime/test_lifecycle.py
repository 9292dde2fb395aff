"""The daemon's lifecycle at its edges: signals after it stopped by itself, a start that fails (fast, naming why,
leaving nothing behind), /healthz while the consume loop starts, and failures of the work that runs beside the loop
or after it (a bad event's write, the final commit), which must show in the exit status."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import NoReturn

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiokafka import TopicPartition
from bench.proxy import TcpProxy
from structlog.testing import capture_logs

from tests.support import (
    Receiver,
    add_webhook,
    committed_offset,
    event,
    new_workspace,
    produce,
    settings_for,
)
from webhookd.durable.outcomes import BadRecord, OutcomeWriter
from webhookd.embedded import KafkaBroker, create_database, create_topic
from webhookd.runtime import policy
from webhookd.runtime.children import free_port
from webhookd.runtime.service import Service


@contextlib.asynccontextmanager
async def serving(service: Service, *, install_signal_handlers: bool = False) -> AsyncIterator[asyncio.Task[int]]:
    """`service.serve()` as a task; after the block, asked to stop (unless it is stopping already) and awaited."""
    task = asyncio.create_task(service.serve(install_signal_handlers=install_signal_handlers))
    try:
        yield task
    finally:
        if not task.done() and not service.stopping.is_set():
            service.request_stop()
        with contextlib.suppress(Exception):  # the test has its verdict; this only makes sure nothing is left
            await asyncio.wait_for(task, 60)


async def until_consuming(service: Service, task: asyncio.Task[int]) -> None:
    deadline = time.monotonic() + 30
    while not (service._res is not None and service._res.consumer.consuming):
        assert not task.done(), f"the daemon stopped during startup with status {task.result()}"
        assert time.monotonic() < deadline, "the daemon got no partitions within 30 s"
        await asyncio.sleep(0.05)


async def connections_to(admin_dsn: str, database: str) -> int:
    """Backends connected to `database` once those closing have gone (a closed pool's backends exit a moment later)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        for _ in range(40):
            n: int = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database)
            if n == 0:
                break
            await asyncio.sleep(0.05)
        return n
    finally:
        await conn.close()


async def database_name(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        name: str = await conn.fetchval("SELECT current_database()")
        return name
    finally:
        await conn.close()


class _ForcedExit(Exception):
    pass


def test_a_signal_after_the_daemon_stopped_by_itself_drains_and_only_a_second_one_forces_the_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forced_exit(status: int) -> NoReturn:
        raise _ForcedExit(status)

    monkeypatch.setattr(os, "_exit", forced_exit)
    service = Service(settings_for("127.0.0.1:9", "postgresql://127.0.0.1/none", "t"))
    service._on_fatal(RuntimeError("the consume loop died"))
    service.request_stop()  # the first signal: the shutdown under way goes on
    assert service.stopping.is_set()
    with pytest.raises(_ForcedExit):
        service.request_stop()


async def test_a_missing_subscriptions_table_fails_the_start_at_once_naming_the_setting(
    kafka: str, dsn: str, topic: str
) -> None:
    settings = settings_for(kafka, dsn, topic, postgres={"subscriptions_table": "core.nope"})
    began = time.monotonic()
    with capture_logs() as logs:
        status = await asyncio.wait_for(Service(settings).serve(install_signal_handlers=False), 45)
    took = time.monotonic() - began
    (failed,) = [entry for entry in logs if entry["event"] == "startup_failed"]
    print(f"\nstart with a missing subscriptions table: status {status} after {took:.2f}s: {failed['error']}")
    assert status == 1
    assert "postgres.subscriptions_table" in failed["error"]
    assert "core.nope" in failed["error"]
    assert took < 5


@pytest.mark.parametrize("breakage", ["no_schema", "http_port_taken"])
async def test_a_failed_start_removes_its_signal_handlers_and_closes_every_connection(
    kafka: str, postgres_admin: str, dsn: str, topic: str, breakage: str
) -> None:
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        if breakage == "no_schema":
            dsn = await create_database(postgres_admin, f"t_{uuid.uuid4().hex[:12]}")  # without webhookd's schema
            settings = settings_for(kafka, dsn, topic)
        else:  # fails last of all, after every other resource is in place
            settings = settings_for(kafka, dsn, topic, http={"listen": f"127.0.0.1:{taken.getsockname()[1]}"})
        try:
            with capture_logs() as logs:
                status = await asyncio.wait_for(Service(settings).serve(), 45)
        finally:
            left = [sig.name for sig in (signal.SIGTERM, signal.SIGINT) if loop.remove_signal_handler(sig)]
    assert status == 1
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["startup_failed"]
    assert left == [], "signal handlers left installed after the failed start"
    assert await connections_to(postgres_admin, await database_name(dsn)) == 0


async def test_healthz_answers_200_from_the_moment_the_port_answers(kafka: str, dsn: str, topic: str) -> None:
    settings = settings_for(kafka, dsn, topic)
    service = Service(settings)
    statuses: list[int] = []
    since_assigned = 0.0
    async with serving(service) as task, aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 30
        # From before the port opens until the loop has had time to poll after its first assignment.
        while not since_assigned or time.monotonic() - since_assigned < 0.5:
            assert not task.done(), f"the daemon stopped during startup with status {task.result()}"
            assert time.monotonic() < deadline, "the daemon did not start within 30 s"
            try:
                async with http.get(f"http://{settings.http.listen}/healthz") as response:
                    statuses.append(response.status)
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            await asyncio.sleep(0.005)  # far shorter than the window in which the loop has not polled yet
            if not since_assigned and service._res is not None and service._res.consumer.consuming:
                since_assigned = time.monotonic()
    print(f"\n/healthz during startup: {len(statuses)} answers, statuses {sorted(set(statuses))}")
    assert set(statuses) == {200}


async def test_a_failed_bad_event_write_stops_the_daemon_with_status_1(
    kafka: str, dsn: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = asyncpg.UndefinedTableError('relation "webhookd.bad_events" does not exist')

    async def refuse(_self: OutcomeWriter, _bad: BadRecord) -> None:
        raise refused

    monkeypatch.setattr(OutcomeWriter, "bad_event", refuse)
    service = Service(settings_for(kafka, dsn, topic))
    with capture_logs() as logs:
        async with serving(service) as task:
            await until_consuming(service, task)
            await produce(kafka, topic, [b"not json"])
            status = await asyncio.wait_for(asyncio.shield(task), 15)
    assert status == 1
    assert [entry.get("exc_info") for entry in logs if entry["event"] == "fatal_error"] == [refused]


async def _held(release: asyncio.Event) -> web.StreamResponse:
    await release.wait()
    return web.Response(text="ok")


@pytest.mark.parametrize("broker_gone", [False, True], ids=["broker_up", "broker_gone"])
async def test_a_final_commit_that_fails_makes_the_exit_status_1_and_is_logged(
    dsn: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, broker_gone: bool
) -> None:
    # A smaller budget after the drain than the 10 s that the commit and the group's leaving may each take on their
    # own: a broker that is gone must make the whole shutdown end within the budget, not within the steps' sum.
    monkeypatch.setattr(policy, "SHUTDOWN_AFTER_DRAIN_SECONDS", 8.0)
    proxy_port = free_port()
    # Clients connect where the broker advertises: through the proxy, which can cut them all.
    broker = await asyncio.to_thread(KafkaBroker.start, advertised_port=proxy_port)
    proxy = TcpProxy(proxy_port, broker.port)
    cut: asyncio.Task[None] | None = None
    try:
        await proxy.start()
        topic = f"events-{uuid.uuid4().hex[:10]}"
        await create_topic(broker.bootstrap, topic, 1)
        ws = new_workspace()
        await add_webhook(dsn, ws, receiver.url("/held"), ["*.*"])
        release = asyncio.Event()
        receiver.behaviours["/held"] = lambda _request, _body: _held(release)
        # No periodic commit: the delivery settles during the drain, so the final commit is the one that has it.
        settings = settings_for(broker.bootstrap, dsn, topic, kafka={"commit_interval_ms": 3_600_000})
        service = Service(settings)
        with capture_logs() as logs:
            async with serving(service) as task:
                await until_consuming(service, task)
                await produce(broker.bootstrap, topic, [event("person.created", ws)])
                await receiver.wait_for(lambda: receiver.open_requests == 1, 15, "the delivery in flight")
                if broker_gone:
                    cut = asyncio.create_task(proxy.cut(60))
                    await asyncio.sleep(0)  # the cut severs every connection before the stop begins
                service.request_stop()
                stop_asked = time.monotonic()
                release.set()
                status = await asyncio.wait_for(asyncio.shield(task), 20)
                took = time.monotonic() - stop_asked
        failures = [entry for entry in logs if entry["event"] == "final_commit_failed"]
        if broker_gone:
            assert status == 1
            (failure,) = failures
            print(f"\nfinal commit with the broker gone: status {status} after {took:.1f} s, {failure['error']}")
        else:
            assert status == 0
            assert failures == []
            assert await committed_offset(broker.bootstrap, f"g-{topic}", TopicPartition(topic, 0)) == 1
        # The clock starts when the main loop sees the stop, a moment after it was asked for.
        assert took < policy.shutdown_seconds(settings) + 1.0
    finally:
        if cut is not None:
            cut.cancel()
        await proxy.stop()
        await asyncio.to_thread(broker.stop)


async def test_a_daemon_that_owns_its_process_freezes_what_startup_built_and_one_in_a_shared_process_does_not(
    kafka: str, dsn: str, topic: str
) -> None:
    # The test process is shared: whatever this test freezes is given back to the collector at the end.
    gc.unfreeze()
    try:
        shared = Service(settings_for(kafka, dsn, topic))
        async with serving(shared) as task:
            await asyncio.wait_for(shared.started.wait(), 30)
            assert not task.done()
            assert gc.get_freeze_count() == 0, "a daemon sharing its process froze the process's heap"
        owner = Service(settings_for(kafka, dsn, topic), owns_process=True)
        async with serving(owner) as task:
            await asyncio.wait_for(owner.started.wait(), 30)
            assert not task.done()
            # Modules, settings, clients and the subscription index: far more than a few thousand objects.
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
