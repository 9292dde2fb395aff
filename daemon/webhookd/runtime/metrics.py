"""Every Prometheus metric webhookd exports, in one place; names and labels are part of the contract.

Labels stay bounded: results, outcomes, reasons, topics and partitions; never a URL, a webhook or a workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from webhookd.model import ATTEMPT_LOG_FORMS, ATTEMPT_RESULTS, DEFERRALS, OUTCOMES, SKIPS
from webhookd.routing.filters import FILTER_REASONS

# Receivers answer in milliseconds to seconds; buckets above the delivery timeout would always be empty.
_DURATION_STEPS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# End-to-end latency includes retries, so it spans from milliseconds to the retry schedule's hours.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0, 36000.0)


@dataclass
class Metrics:
    """The daemon's metrics, registered on their own registry so that several daemons can share a process."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    timeout_seconds: float = 10.0  # the delivery timeout: the top of the attempt-duration buckets

    def __post_init__(self) -> None:
        r = self.registry
        self.events_consumed = Counter("webhookd_events_consumed", "Records read from Kafka.", ["topic"], registry=r)
        self.events_invalid = Counter(
            "webhookd_events_invalid", "Records kept as bad events, by reason.", ["reason"], registry=r
        )
        self.events_skipped = Counter(
            "webhookd_events_skipped", "Records read and passed over on purpose, by reason.", ["reason"], registry=r
        )
        self.delivery_attempts = Counter(
            "webhookd_delivery_attempts", "HTTP delivery attempts, by result.", ["result"], registry=r
        )
        self.deliveries = Counter(
            "webhookd_deliveries", "Deliveries that reached an end, by outcome.", ["outcome"], registry=r
        )
        self.delivery_duration = Histogram(
            "webhookd_delivery_duration_seconds",
            "Time of one HTTP attempt, from sending to the response headers.",
            buckets=duration_buckets(self.timeout_seconds),
            registry=r,
        )
        self.event_delivery_latency = Histogram(
            "webhookd_event_delivery_latency_seconds",
            "From the event's Kafka timestamp to its 2xx answer.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("webhookd_inflight_deliveries", "HTTP attempts under way.", registry=r)
        self.retry_queue_depth = Gauge(
            "webhookd_retry_queue_depth", "Deliveries waiting in Postgres for another attempt.", registry=r
        )
        self.retry_table_bytes = Gauge(
            "webhookd_retry_table_bytes",
            "Size on disk of the retry table webhookd.deliveries, with its TOAST and indexes.",
            registry=r,
        )
        self.retry_table_dead_rows = Gauge(
            "webhookd_retry_table_dead_rows",
            "Row versions of the retry table left dead by updates and deletes, not yet vacuumed (Postgres's estimate).",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "webhookd_consumer_lag",
            "Records between the committed position and the partition's high watermark.",
            ["topic", "partition"],
            registry=r,
        )
        self.subscriptions = Gauge("webhookd_subscriptions", "Live webhooks in the in-memory index.", registry=r)
        self.deliveries_deferred = Counter(
            "webhookd_deliveries_deferred",
            "Deliveries put back for later without an attempt, by reason.",
            ["reason"],
            registry=r,
        )
        self.deliveries_filtered = Counter(
            "webhookd_deliveries_filtered",
            "Pairs of an event and a matching webhook that the webhook's filter kept from being sent, by reason.",
            ["reason"],
            registry=r,
        )
        self.endpoint_circuit_open = Gauge(
            "webhookd_endpoint_circuit_open", "Endpoints whose circuit breaker is open or probing.", registry=r
        )
        self.endpoints_disabled = Gauge(
            "webhookd_endpoints_disabled", "Webhooks disabled, automatically or by an operator.", registry=r
        )
        self.attempt_log_rows = Counter(
            "webhookd_attempt_log_rows_written",
            "Rows this process wrote to the attempt log, by form (full, compact, aggregate).",
            ["form"],
            registry=r,
        )
        self.attempt_log_bytes = Gauge(
            "webhookd_attempt_log_bytes",
            "Size of the attempt log's tables on disk (rows, TOAST and indexes), by form.",
            ["form"],
            registry=r,
        )
        self.attempt_log_partitions = Gauge(
            "webhookd_attempt_log_partitions",
            "Day partitions of the attempt log's tables, by form.",
            ["form"],
            registry=r,
        )
        self.attempt_log_oldest_partition_age = Gauge(
            "webhookd_attempt_log_oldest_partition_age_seconds",
            "Time since the start of the oldest day kept, by form: above the retention plus a day, drops fall behind.",
            ["form"],
            registry=r,
        )
        self.attempt_log_retention = Gauge(
            "webhookd_attempt_log_retention_seconds",
            "endpoints.attempt_log_retention_seconds, for alerts on the oldest partition's age.",
            registry=r,
        )
        self.attempt_log_write_duration = Histogram(
            "webhookd_attempt_log_write_seconds",
            "Time of one batch written to the attempt log, all forms in one transaction.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.attempt_log_dropped = Counter(
            "webhookd_attempt_log_dropped_rows",
            "Attempt-log rows let go: the buffer overflowed while Postgres was away, or Postgres refused them.",
            registry=r,
        )
        # The bounded label values, created up front so that dashboards see zeros, not missing series, and kept
        # so that the per-delivery path skips labels()' lock and lookup.
        self.attempts_by_result = {result: self.delivery_attempts.labels(result) for result in ATTEMPT_RESULTS}
        self.deliveries_by_outcome = {outcome: self.deliveries.labels(outcome) for outcome in OUTCOMES}
        for reason in DEFERRALS:
            self.deliveries_deferred.labels(reason)
        self.skips_by_reason = {reason: self.events_skipped.labels(reason) for reason in SKIPS}
        self.filtered_by_reason = {reason: self.deliveries_filtered.labels(reason) for reason in FILTER_REASONS}
        self.attempt_log_rows_by_form = {form: self.attempt_log_rows.labels(form) for form in ATTEMPT_LOG_FORMS}


def duration_buckets(timeout: float) -> tuple[float, ...]:
    """Bucket bounds for one attempt: the usual steps below the timeout, then the timeout itself."""
    return (*(step for step in _DURATION_STEPS if step < timeout), timeout)
