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
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer

from webhookd.delivery.body_formats import body_format
from webhookd.delivery.dispatch import Dispatcher
from webhookd.delivery.egress import EgressPolicy, GuardedResolver
from webhookd.delivery.ordering import PendingCheck
from webhookd.delivery.scheduler import Scheduler, SchedulerLimits
from webhookd.delivery.sender import Sender, close_session
from webhookd.delivery.settling import RetryPolicy
from webhookd.delivery.signing import Signer
from webhookd.durable.attempts import AttemptLog
from webhookd.durable.outcomes import Recorder
from webhookd.durable.retries import RetryPoller, RetrySettings
from webhookd.durable.transient import TRANSIENT
from webhookd.endpoints.breaker import BreakerSettings
from webhookd.endpoints.pacing import Pacer, PostgresLedger
from webhookd.endpoints.state import EndpointHealth
from webhookd.endpoints.sync import EndpointBook
from webhookd.intake.consumer import Consumer, ConsumeSettings
from webhookd.intake.readers import reader_for
from webhookd.intake.topics import TopicSelection
from webhookd.intake.twenty_catalog import TwentyCatalog
from webhookd.routing.router import Router
from webhookd.routing.subscriptions import SubscriptionStore
from webhookd.runtime.config import Settings
from webhookd.runtime.members import Membership
from webhookd.runtime.metrics import Metrics
from webhookd.runtime.probes import Probes, build_app, start_server
from webhookd.runtime.tls import TLSError, Transport, transport

log = structlog.get_logger("webhookd.runtime.service")

# Liveness fails only if the consume loop has not polled for this long: far beyond any healthy pause.
_STALL_SECONDS = 60.0
# Records read past an unfinished one; a few bytes each, so this caps memory, not throughput.
_MAX_TRACKED_RECORDS = 100_000
# Bounds on the shutdown steps that wait for Postgres or Kafka, which may be the very thing that is down.
_HANDOFF_SECONDS = 10.0
_FINAL_COMMIT_SECONDS = 10.0
# The newest migration's tables: present, the schema is current.
_SCHEMA_CURRENT = (
    "SELECT to_regclass('webhookd.deliveries') IS NOT NULL AND to_regclass('webhookd.endpoints') IS NOT NULL "
    "AND to_regclass('webhookd.attempts') IS NOT NULL AND to_regclass('webhookd.pacing') IS NOT NULL "
    "AND to_regclass('webhookd.members') IS NOT NULL AND to_regclass('webhookd.webhook_options') IS NOT NULL"
)


class StartupError(Exception):
    """Something the daemon needs is missing or unreachable; the message says what and how to fix it."""


@dataclass
class _Resources:
    pool: asyncpg.Pool
    session: aiohttp.ClientSession
    recorder: Recorder
    store: SubscriptionStore
    dispatcher: Dispatcher
    consumer: Consumer
    poller: RetryPoller
    health: EndpointHealth
    book: EndpointBook
    attempts: AttemptLog
    catalog: TwentyCatalog
    membership: Membership
    pacer: Pacer
    pending_check: PendingCheck
    web: Any  # aiohttp.web.AppRunner
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)


class Service:
    """One daemon process: `await Service(settings).serve()` returns the exit status."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics(timeout_seconds=settings.delivery.timeout_seconds)
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self._fatal: BaseException | None = None
        self._final_commit_failed = False
        self._stop_requests = 0
        self._res: _Resources | None = None

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
            pool = await asyncpg.create_pool(
                links.postgres.dsn, ssl=links.postgres.ssl, min_size=1, max_size=s.postgres.pool_size, timeout=10
            )
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise StartupError(f"cannot connect to Postgres (postgres.dsn): {exc}") from exc
        assert pool is not None
        try:
            try:
                current = await pool.fetchval(_SCHEMA_CURRENT)
            except (*TRANSIENT, asyncpg.PostgresError) as exc:
                raise StartupError(f"cannot check the webhookd schema: {exc}") from exc
            if not current:
                raise StartupError(
                    "the webhookd schema is missing or out of date: run `webhookd migrate --config FILE`"
                )
            self._res = await self._build(pool, links)
        except BaseException:
            # Until _build returns, the pool is nowhere _close_partial can find it.
            await pool.close()
            raise
        res = self._res
        res.tasks["recorder"] = res.recorder.start()
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

    async def _build(self, pool: asyncpg.Pool, links: Transport) -> _Resources:
        s = self.settings
        policy = EgressPolicy(s.egress.allow_private, tuple(s.egress.allowed_cidrs))
        connector = aiohttp.TCPConnector(
            limit=s.delivery.concurrency,
            limit_per_host=s.delivery.per_host_concurrency,
            resolver=GuardedResolver(policy),
            ttl_dns_cache=30,
            enable_cleanup_closed=True,
            ssl=links.delivery,  # always verifying: system CAs plus delivery.ca_file
        )
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("Accept",))
        sender = Sender(
            session,
            policy,
            timeout_seconds=s.delivery.timeout_seconds,
            body_limit=s.delivery.response_body_limit_bytes,
            max_retry_after=s.delivery.max_retry_after_seconds,
            signer=Signer(s.delivery.signature_scheme),
            https_only=s.egress.https_only,
        )
        recorder = Recorder(pool)
        e = s.endpoints
        membership = Membership(pool, e.sync_interval_seconds)
        pacer = Pacer(PostgresLedger(pool), members=lambda: membership.live)
        health = EndpointHealth(
            BreakerSettings(
                failure_ratio=e.circuit_failure_ratio,
                min_requests=e.circuit_min_requests,
                consecutive_failures=e.circuit_consecutive_failures,
                window_seconds=e.circuit_window_seconds,
                cooldown_seconds=e.circuit_cooldown_seconds,
                max_cooldown_seconds=e.circuit_max_cooldown_seconds,
                # The probe may wait for its host and the global budget before its request even starts.
                probe_seconds=s.delivery.timeout_seconds + s.delivery.host_wait_seconds + 5,
            ),
            default_rate=e.rate_limit_per_second,
            max_wait=s.delivery.host_wait_seconds,
            metrics=self.metrics,
            pacer=pacer,
        )
        attempts = AttemptLog(pool, e.attempt_log_retention_seconds)
        store = SubscriptionStore(
            links.postgres,
            pool,
            s.postgres.subscriptions_table_sql,
            s.postgres.subscriptions_refresh_seconds,
            rotation_overlap=s.delivery.secret_rotation_overlap_seconds,
            on_count=self.metrics.subscriptions.set,
        )
        book = EndpointBook(pool, health, e.sync_interval_seconds, e.disable_after_seconds, links.postgres, store.index)
        scheduler = Scheduler(
            SchedulerLimits(
                concurrency=s.delivery.concurrency,
                host_concurrency=s.delivery.per_host_concurrency,
                wait_seconds=s.delivery.host_wait_seconds,
            )
        )
        # per_host_concurrency holds for the cluster: each process takes its share of it, again whenever the number
        # of processes changes.
        cap = s.delivery.per_host_concurrency
        membership.follow(lambda _live: scheduler.set_host_concurrency(membership.share(cap)))
        pending_check = PendingCheck(pool)
        dispatcher = Dispatcher(
            sender,
            recorder,
            self.metrics,
            RetryPolicy(tuple(s.delivery.retry_schedule), s.delivery.retry_jitter),
            scheduler,
            busy_retry_seconds=s.delivery.host_busy_retry_seconds,
            health=health,
            attempts=attempts,
            on_fatal=self._on_fatal,
            pending_check=pending_check,
        )
        kafka = AIOKafkaConsumer(
            bootstrap_servers=list(s.kafka.bootstrap_servers),
            group_id=s.kafka.group_id,
            group_instance_id=s.kafka.group_instance_id,
            client_id=s.kafka.client_id,
            enable_auto_commit=False,
            auto_offset_reset=s.kafka.auto_offset_reset,
            session_timeout_ms=s.kafka.session_timeout_ms,
            # A revocation waits up to the drain timeout for deliveries; the group must wait at least as long.
            rebalance_timeout_ms=int((s.delivery.drain_timeout_seconds + 10) * 1000),
            heartbeat_interval_ms=max(s.kafka.session_timeout_ms // 3, 100),
            max_poll_records=s.kafka.max_poll_records,
            fetch_max_wait_ms=s.kafka.fetch_max_wait_ms,
            # How soon a topic created since (one per table, for Debezium) is found by kafka.topic_pattern.
            metadata_max_age_ms=s.kafka.metadata_max_age_ms,
            **links.kafka,
        )
        catalog = TwentyCatalog(pool, s.twenty.metadata_refresh_seconds)
        consumer = Consumer(
            kafka,
            TopicSelection(tuple(s.kafka.topics), s.kafka.topic_pattern),
            reader_for(s, catalog),
            body_format(s.delivery.body_format),
            dispatcher,
            Router(store.index, attempts, self.metrics),
            recorder,
            self.metrics,
            ConsumeSettings(
                max_pending=s.delivery.effective_max_pending_deliveries,
                max_tracked=_MAX_TRACKED_RECORDS,
                max_poll_records=s.kafka.max_poll_records,
                commit_interval=s.kafka.commit_interval_ms / 1000,
                revoke_timeout=s.delivery.drain_timeout_seconds,
            ),
            on_fatal=self._on_fatal,
        )
        poller = RetryPoller(
            pool,
            dispatcher,
            store.index,
            health,
            recorder,
            self.metrics,
            RetrySettings(
                poll_interval=s.delivery.retry_poll_interval_seconds,
                # Twice what may be sent at once: while as many retries as that are sent, as many again are being
                # claimed or are writing their outcomes, so that a backlog keeps every slot busy.
                max_in_flight=2 * s.delivery.concurrency,
                # Long enough to cover waiting for a slot, the attempt and writing its outcome; expiry only risks a
                # duplicate, while a killed replica's claims wait this long before another replica takes them.
                lease_seconds=3 * s.delivery.timeout_seconds + s.delivery.host_wait_seconds + 5,
            ),
        )
        return _Resources(
            pool,
            session,
            recorder,
            store,
            dispatcher,
            consumer,
            poller,
            health,
            book,
            attempts,
            catalog,
            membership=membership,
            pacer=pacer,
            pending_check=pending_check,
            web=None,
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
            await asyncio.wait({consume}, timeout=5)
        finally:
            stop_wait.cancel()
            consume.cancel()

    async def shutdown(self) -> None:
        res = self._res
        if res is None:
            return
        s = self.settings
        log.debug("shutdown_draining", pending=res.dispatcher.pending)
        if not await res.dispatcher.drain(s.delivery.drain_timeout_seconds):
            try:
                moved = await asyncio.wait_for(asyncio.shield(res.dispatcher.hand_off()), _HANDOFF_SECONDS)
                log.info("handed_off_to_retry", deliveries=moved)
            except Exception as exc:
                # Postgres is away (or the recorder died): those offsets stay uncommitted and are read again later.
                log.warning("hand_off_incomplete", error=str(exc) or type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(res.consumer.wait_bad_writes(), _HANDOFF_SECONDS)
        # Retries stop before the recorder so that their last outcomes are written, and their claims released.
        poller = res.tasks.pop("retries", None)
        if poller is not None:
            poller.cancel()
        claimed = await res.dispatcher.cancel_retries()
        with contextlib.suppress(Exception):  # expired leases free these rows anyway
            await asyncio.wait_for(res.poller.release(claimed), 5)
        await res.recorder.close(timeout=5)
        # What the last attempts showed is worth keeping, but never worth a stuck shutdown.
        await res.attempts.close(timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(res.book.sync(), 5)
        # Heartbeats stop first, so that none puts the row back; without the row the others take this process's
        # share back at their next heartbeat, not a few missed ones later.
        heartbeat = res.tasks.pop("members", None)
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(res.membership.leave(), 5)
        try:
            failure = await asyncio.wait_for(res.consumer.commit(), _FINAL_COMMIT_SECONDS)
        except TimeoutError:
            failure = f"no answer from Kafka within {_FINAL_COMMIT_SECONDS:g} s"
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
            await asyncio.wait_for(res.consumer.stop(), _FINAL_COMMIT_SECONDS)
        log.debug("shutdown_closing")
        if res.web is not None:
            await res.web.cleanup()
        await close_session(res.session)
        await res.pool.close()
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
            await close_session(res.session)
            await res.pool.close()

    def _alive(self) -> bool:
        res = self._res
        if res is None:
            return False
        return asyncio.get_running_loop().time() - res.consumer.last_poll < _STALL_SECONDS

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
