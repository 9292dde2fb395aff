"""Builds every part of one daemon process from the settings and connects them; the Service runs them.

This is the one place where parts meet: each takes what it needs as arguments (no part reaches for another), and
the numbers derived from the configuration come from `runtime.policy`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer

from webhookd.delivery.body_formats import body_format
from webhookd.delivery.dispatch import Dispatcher
from webhookd.delivery.egress import EgressPolicy
from webhookd.delivery.http_client import ClientLimits, HttpClient
from webhookd.delivery.ordering import PendingCheck
from webhookd.delivery.scheduler import Scheduler, SchedulerLimits
from webhookd.delivery.sender import Sender
from webhookd.delivery.settling import RetryPolicy
from webhookd.delivery.signing import Signer
from webhookd.durable.attempts import AttemptLog
from webhookd.durable.outcomes import OutcomeWriter
from webhookd.durable.retries import RetryPoller, RetrySettings
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
from webhookd.runtime.policy import (
    MAX_TRACKED_RECORDS,
    lease_seconds,
    probe_seconds,
    rebalance_timeout_ms,
    retries_in_flight,
)
from webhookd.runtime.tls import Transport

OnFatal = Callable[[BaseException], None]


@dataclass
class Parts:
    """The parts of one daemon process, built from the settings; the Service starts, watches and stops them."""

    pool: asyncpg.Pool
    attempts_pool: asyncpg.Pool | None  # the attempt log's own database (postgres.attempts_dsn), if it has one
    sender: Sender
    outcomes: OutcomeWriter
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


async def build(
    settings: Settings,
    metrics: Metrics,
    pool: asyncpg.Pool,
    attempts_pool: asyncpg.Pool | None,
    links: Transport,
    on_fatal: OnFatal,
) -> Parts:
    """Every part of one daemon process, connected; nothing started yet."""
    s = settings
    policy = EgressPolicy(s.egress.allow_private, tuple(s.egress.allowed_cidrs))
    client = HttpClient(
        policy,
        links.delivery,  # always verifying: system CAs plus delivery.ca_file
        ClientLimits(
            body_limit=s.delivery.response_body_limit_bytes,
            idle_per_origin=s.delivery.per_host_concurrency,
            idle_total=s.delivery.concurrency,
        ),
    )
    sender = Sender(
        client,
        policy,
        timeout_seconds=s.delivery.timeout_seconds,
        max_retry_after=s.delivery.max_retry_after_seconds,
        signer=Signer(s.delivery.signature_scheme),
        https_only=s.egress.https_only,
    )
    outcomes = OutcomeWriter(pool)
    e = s.endpoints
    membership = Membership(pool, e.sync_interval_seconds, attempt_log=e.attempt_log)
    pacer = Pacer(PostgresLedger(pool), members=lambda: membership.live)
    health = EndpointHealth(
        BreakerSettings(
            failure_ratio=e.circuit_failure_ratio,
            min_requests=e.circuit_min_requests,
            consecutive_failures=e.circuit_consecutive_failures,
            window_seconds=e.circuit_window_seconds,
            cooldown_seconds=e.circuit_cooldown_seconds,
            max_cooldown_seconds=e.circuit_max_cooldown_seconds,
            probe_seconds=probe_seconds(s),
        ),
        default_rate=e.rate_limit_per_second,
        max_wait=s.delivery.host_wait_seconds,
        metrics=metrics,
        pacer=pacer,
    )
    attempts = AttemptLog(
        attempts_pool or pool, e.attempt_log_retention_seconds, e.attempt_log, metrics=metrics, main_pool=pool
    )
    store = SubscriptionStore(
        links.postgres,
        pool,
        s.postgres.subscriptions_table_sql,
        s.postgres.subscriptions_refresh_seconds,
        rotation_overlap=s.delivery.secret_rotation_overlap_seconds,
        on_count=metrics.subscriptions.set,
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
        outcomes,
        metrics,
        RetryPolicy(tuple(s.delivery.retry_schedule), s.delivery.retry_jitter),
        scheduler,
        busy_retry_seconds=s.delivery.host_busy_retry_seconds,
        health=health,
        attempts=attempts,
        on_fatal=on_fatal,
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
        rebalance_timeout_ms=rebalance_timeout_ms(s),
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
        Router(store.index, attempts, metrics),
        outcomes,
        metrics,
        ConsumeSettings(
            max_pending=s.delivery.effective_max_pending_deliveries,
            max_tracked=MAX_TRACKED_RECORDS,
            max_poll_records=s.kafka.max_poll_records,
            commit_interval=s.kafka.commit_interval_ms / 1000,
            revoke_timeout=s.delivery.drain_timeout_seconds,
        ),
        on_fatal=on_fatal,
    )
    poller = RetryPoller(
        pool,
        dispatcher,
        store.index,
        health,
        outcomes,
        metrics,
        RetrySettings(
            poll_interval=s.delivery.retry_poll_interval_seconds,
            max_in_flight=retries_in_flight(s),
            lease_seconds=lease_seconds(s),
            delivered_retention_seconds=e.attempt_log_retention_seconds,
        ),
    )
    return Parts(
        pool,
        attempts_pool,
        sender,
        outcomes,
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
