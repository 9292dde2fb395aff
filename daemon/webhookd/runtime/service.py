"""The daemon's lifecycle, in three acts: startup builds every resource, the main loop consumes, shutdown drains.

Signal handlers only set state. The first SIGTERM or SIGINT starts a bounded graceful shutdown: fetching stops,
in-flight deliveries get `delivery.drain_timeout_seconds` to settle, whatever has not settled by then moves to the
durable retry path, offsets are committed and the process exits 0 (1 if that last commit fails). A second signal
exits at once; what was in flight is delivered again later (its offsets were never committed), never lost. A
shutdown the daemon began by itself (a fatal error) is not a signal: the first signal after it still drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from typing import Any

import asyncpg
import structlog

from webhookd.durable.transient import TRANSIENT
from webhookd.runtime.config import Settings
from webhookd.runtime.databases import DatabaseUnusable, open_pools
from webhookd.runtime.metrics import Metrics
from webhookd.runtime.policy import STALL_SECONDS, ShutdownClock
from webhookd.runtime.probes import Probes, build_app, start_server
from webhookd.runtime.tls import TLSError, transport
from webhookd.runtime.wiring import Parts, build

log = structlog.get_logger("webhookd.runtime.service")


class StartupError(Exception):
    """Something the daemon needs is missing or unreachable; the message says what and how to fix it."""


class Service:
    """One daemon process: `await Service(settings).serve()` returns the exit status."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, *, owns_process: bool = False) -> None:
        self.settings = settings
        # `webhookd run`: the process is this daemon's alone, so its heap may be arranged for it (gc.freeze below).
        self._owns_process = owns_process
        self.metrics = metrics if metrics is not None else Metrics(timeout_seconds=settings.delivery.timeout_seconds)
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self._fatal: BaseException | None = None
        self._final_commit_failed = False
        self._stop_requests = 0
        self._res: Parts | None = None
        self._clock: ShutdownClock | None = None

    def request_stop(self) -> None:
        """Signal-handler entry: first call drains, second forces an immediate exit."""
        # Requests are counted rather than read off `stopping`: the daemon sets that itself when it fails, and the
        # first signal after such a stop must let its shutdown finish, not cut it short.
        self._stop_requests += 1
        if self._stop_requests > 1:
            log.warning("forced_exit", reason="second signal")
            os._exit(1)
        log.info("shutdown_requested")
        self.stopping.set()

    def _on_fatal(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
            log.error("fatal_error", exc_info=exc)
        self.stopping.set()

    async def serve(self, install_signal_handlers: bool = True) -> int:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if install_signal_handlers else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            return await self._serve()
        finally:
            # Whatever the way out: a handler left behind would make the caller's next signal a call into a dead
            # service instead of the signal's own effect.
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _serve(self) -> int:
        try:
            await self.startup()
        except StartupError as exc:
            log.error("startup_failed", error=str(exc))
            await self._close_partial()
            return 1
        except BaseException:
            await self._close_partial()
            raise
        try:
            await self._main_loop()
        finally:
            await self.shutdown()
        return self._exit_status()

    def _exit_status(self) -> int:
        return 1 if self._fatal is not None or self._final_commit_failed else 0

    async def startup(self) -> None:
        s = self.settings
        try:
            links = transport(s)
        except TLSError as exc:
            raise StartupError(str(exc)) from exc
        try:
            pool, attempts_pool = await open_pools(links, s.postgres.pool_size, s.postgres.attempts_dsn is not None)
        except DatabaseUnusable as exc:
            raise StartupError(str(exc)) from exc
        try:
            self._res = await build(self.settings, self.metrics, pool, attempts_pool, links, self._on_fatal)
        except BaseException:
            # Until _build returns, the pools are nowhere _close_partial can find them.
            await pool.close()
            if attempts_pool is not None:
                await attempts_pool.close()
            raise
        res = self._res
        res.tasks["outcomes"] = res.outcomes.start()
        res.tasks["order_check"] = res.pending_check.start()
        try:
            await res.book.load()
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise StartupError(f"cannot read endpoint health (webhookd.endpoints): {exc}") from exc
        try:
            # Before the first delivery, so that this process takes its share of the cluster's caps from the start.
            await res.membership.beat()
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise StartupError(f"cannot join the cluster's members (webhookd.members): {exc}") from exc
        res.tasks["endpoints"] = asyncio.create_task(res.book.run(), name="endpoints")
        res.tasks["endpoint_pauses"] = asyncio.create_task(res.book.follow_pauses(), name="endpoint_pauses")
        res.tasks["members"] = asyncio.create_task(res.membership.run(), name="members")
        res.tasks["pacing"] = asyncio.create_task(res.pacer.run(), name="pacing")
        res.tasks["attempts"] = asyncio.create_task(res.attempts.run(), name="attempts")
        res.tasks["subscriptions"] = asyncio.create_task(res.store.run(), name="subscriptions")
        if s.kafka.input_format == "debezium" or s.delivery.body_format == "twenty":
            try:
                missing = await res.catalog.check()
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                raise StartupError(f"cannot read Twenty's metadata tables: {exc}") from exc
            if missing:
                raise StartupError(
                    "this role cannot read Twenty's metadata, which the Debezium input and the twenty body need; "
                    "as the tables' owner: " + " ".join(missing)
                )
        res.tasks["twenty_metadata"] = asyncio.create_task(res.catalog.run(), name="twenty_metadata")
        table = f"{s.postgres.subscriptions_table} (postgres.subscriptions_table)"
        try:
            await self._wait_or_fail(res.store.loaded.wait(), res.tasks["subscriptions"], f"loading {table}")
        except asyncpg.PostgresError as exc:
            # Postgres' own words name what is missing: the table, one of its columns, or one of ours it is joined to.
            raise StartupError(f"cannot load the subscriptions from {table}: {exc}") from exc
        try:
            await res.consumer.start()
        except Exception as exc:
            raise StartupError(f"cannot reach Kafka at {','.join(s.kafka.bootstrap_servers)}: {exc}") from exc
        res.tasks["retries"] = asyncio.create_task(res.poller.run(), name="retries")
        try:
            res.web = await start_server(
                build_app(self.metrics, Probes(alive=self._alive, ready=self._ready)), s.http.host, s.http.port
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {s.http.listen} (http.listen): {exc}") from exc
        if self._owns_process:
            # What startup built (modules, settings, clients, the subscription index) lives as long as the process.
            # Frozen out of the collector's view, it is no longer walked by every full collection, each of which
            # stopped the loop for 20 to 25 ms about once a second under load. Collected first, so that only what is
            # alive is frozen (a frozen cycle is never freed).
            gc.collect()
            gc.freeze()
        self.started.set()
        log.info(
            "started",
            topics=list(s.kafka.topics),
            topic_pattern=s.kafka.topic_pattern,
            input_format=s.kafka.input_format,
            body_format=s.delivery.body_format,
            group_id=s.kafka.group_id,
            subscriptions=len(res.store.index),
            listen=s.http.listen,
        )

    async def _wait_or_fail(self, aw: Any, task: asyncio.Task[None], what: str) -> None:
        """Until `aw` is done; raises what ended `task` first, if it did, or StartupError after 30 s."""
        waiter = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return
        waiter.cancel()
        if task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                raise exc
            raise StartupError(f"{what}: {task.get_name()} stopped unexpectedly")
        raise StartupError(f"timed out {what}")

    async def _main_loop(self) -> None:
        res = self._res
        assert res is not None
        consume = asyncio.create_task(res.consumer.run(self.stopping), name="consume")
        watched = {consume, *res.tasks.values()}
        stop_wait = asyncio.create_task(self.stopping.wait())
        try:
            done, _ = await asyncio.wait({*watched, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            for task in done & watched:
                # Every watched task runs until shutdown: an error, or ending before a stop was asked for, is a
                # failure. The consume loop ends by itself once stopping is set, possibly in the same wake-up.
                exc = None if task.cancelled() else task.exception()
                if exc is not None or not self.stopping.is_set():
                    self._on_fatal(exc or RuntimeError(f"{task.get_name()} stopped unexpectedly"))
            self.stopping.set()
            # The shutdown's time starts now: the consume loop's own end is part of it.
            self._clock = ShutdownClock(self.settings)
            await asyncio.wait({consume}, timeout=self._clock.step(5))
        finally:
            stop_wait.cancel()
            consume.cancel()

    async def shutdown(self) -> None:
        res = self._res
        if res is None:
            return
        clock = self._clock if self._clock is not None else ShutdownClock(self.settings)
        log.debug("shutdown_draining", pending=res.dispatcher.pending)
        if not await res.dispatcher.drain(clock.drain()):
            try:
                moved = await asyncio.wait_for(asyncio.shield(res.dispatcher.hand_off()), clock.step(10))
                log.info("handed_off_to_retry", deliveries=moved)
            except Exception as exc:
                # Postgres is away (or the writer died): those offsets stay uncommitted and are read again later.
                log.warning("hand_off_incomplete", error=str(exc) or type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(res.consumer.wait_bad_writes(), clock.step(10))
        # Retries stop before the outcome writer so that their last outcomes are written, and their claims released.
        poller = res.tasks.pop("retries", None)
        if poller is not None:
            poller.cancel()
        claimed = await res.dispatcher.cancel_retries()
        with contextlib.suppress(Exception):  # expired leases free these rows anyway
            await asyncio.wait_for(res.poller.release(claimed), clock.step(5))
        await res.outcomes.close(timeout=clock.step(5))
        # What the last attempts showed is worth keeping, but never worth a stuck shutdown.
        await res.attempts.close(timeout=clock.step(5))
        if res.attempts_pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(res.attempts_pool.close(), clock.step(2))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(res.book.sync(), clock.step(3))
        # Heartbeats stop first, so that none puts the row back; without the row the others take this process's
        # share back at their next heartbeat, not a few missed ones later.
        heartbeat = res.tasks.pop("members", None)
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(res.membership.leave(), clock.step(2))
        commit_seconds = clock.commit(10)
        try:
            failure = await asyncio.wait_for(res.consumer.commit(), commit_seconds)
        except TimeoutError:
            failure = f"no answer from Kafka within {commit_seconds:.1f} s"
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
        if failure is not None:
            # Nothing is lost (the records are read again from the last commit and delivered twice), but the stop
            # did not finish its work, and whoever runs the process must be able to tell.
            self._final_commit_failed = True
            log.error("final_commit_failed", error=failure)
        for task in res.tasks.values():
            task.cancel()
        await asyncio.gather(*res.tasks.values(), *([poller] if poller else []), return_exceptions=True)
        log.debug("shutdown_leaving_group")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(res.consumer.stop(), clock.last(10))
        log.debug("shutdown_closing")
        if res.web is not None:
            await res.web.cleanup()
        await res.sender.close()
        # The pool's close waits for connections in use; terminate() is the way out when that is all that is left.
        try:
            await asyncio.wait_for(res.pool.close(), clock.last(5))
        except TimeoutError:
            res.pool.terminate()
        log.info("stopped", exit_status=self._exit_status())

    async def _close_partial(self) -> None:
        res, self._res = self._res, None
        if res is not None:
            for task in res.tasks.values():
                task.cancel()
            await asyncio.gather(*res.tasks.values(), return_exceptions=True)
            with contextlib.suppress(Exception):
                await res.consumer.stop()
            if res.web is not None:
                await res.web.cleanup()
            await res.sender.close()
            await res.pool.close()
            if res.attempts_pool is not None:
                await res.attempts_pool.close()

    def _alive(self) -> bool:
        res = self._res
        if res is None:
            return False
        return asyncio.get_running_loop().time() - res.consumer.last_poll < STALL_SECONDS

    async def _ready(self) -> bool:
        res = self._res
        if res is None or not res.consumer.consuming or self.stopping.is_set():
            return False
        try:
            async with asyncio.timeout(2):  # covers waiting for a pool connection, not only the query
                await res.pool.fetchval("SELECT 1")
        except (*TRANSIENT, asyncpg.PostgresError):
            return False
        return True
