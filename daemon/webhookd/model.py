"""The value types every part shares: the event, the webhook, a delivery and how its attempts end.

Results, outcomes, deferrals, skips and hold reasons are closed `Literal` types; the metric label sets in
`runtime.metrics` are derived from them, so a label that the code can produce is always a label the metrics know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from webhookd.routing.webhook_options import NO_OPTIONS, WebhookOptions

# How one HTTP attempt ended: the `result` label of `webhookd_delivery_attempts_total`.
AttemptResultLabel = Literal["2xx", "3xx", "4xx", "5xx", "timeout", "connection_error", "blocked"]
# How a delivery ended: the `outcome` label of `webhookd_deliveries_total`.
Outcome = Literal["delivered", "dead_lettered"]
# Where one pass of a delivery left it: sent (2xx), waiting in the retry table, or dead-lettered.
Settled = Literal["delivered", "pending", "dead"]
# Why a delivery may not go now: the endpoint is disabled (dead-lettered), or it waits (a deferral).
HoldReason = Literal["circuit_open", "rate_limited", "endpoint_busy", "disabled"]
# Why a delivery went to the retry table without an attempt. record_order: an ordered webhook's delivery written
# behind an earlier one of its record.
Deferral = Literal["circuit_open", "rate_limited", "endpoint_busy", "record_order"]
# Records read and passed over on purpose: Debezium's tombstones, truncates, logical messages and snapshot reads,
# updates that changed nothing a receiver sees, changes of schemas that are no Twenty workspace, and changes of
# objects Twenty never sends to webhooks (timelineActivity).
SkipReason = Literal["tombstone", "truncate", "message", "snapshot", "unchanged", "not_twenty", "not_sent_by_twenty"]
# What the attempt log keeps of a first-try success (`endpoints.attempt_log`), and so the form of its rows: the
# `form` label of the attempt-log metrics. Failures, retries and filtered pairs are kept in full in every mode.
AttemptLogForm = Literal["full", "compact", "aggregate"]

ATTEMPT_RESULTS: Final[tuple[AttemptResultLabel, ...]] = get_args(AttemptResultLabel)
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)
DEFERRALS: Final[tuple[Deferral, ...]] = get_args(Deferral)
SKIPS: Final[tuple[SkipReason, ...]] = get_args(SkipReason)
ATTEMPT_LOG_FORMS: Final[tuple[AttemptLogForm, ...]] = get_args(AttemptLogForm)


@dataclass(frozen=True, slots=True)
class Event:
    """A valid change event; the bodies receivers get are written from it (`delivery.body_formats`)."""

    id: str
    name: str  # "<object>.<action>"
    workspace_id: str  # canonical lowercase UUID text, as asyncpg returns the column
    timestamp: str  # as JavaScript's toISOString writes it, or as the producer gave it
    data: bytes = field(repr=False)  # the record as JSON, in the form JavaScript re-serializes it to
    kafka_timestamp_ms: int | None
    updated_fields: tuple[str, ...] | None = None  # for updates, where known
    object_id: str | None = None  # Twenty's object metadata id, where known

    @property
    def object_and_action(self) -> tuple[str, str]:
        obj, _, action = self.name.partition(".")
        return obj, action


@dataclass(frozen=True, slots=True)
class Skip:
    """A record that is read and passed over on purpose (a tombstone, a snapshot read, an unchanged update).

    Counted by reason in `webhookd_events_skipped_total`, never logged one by one, never kept.
    """

    reason: SkipReason


@dataclass(frozen=True, slots=True)
class BadEvent:
    """A record that can never be delivered: kept for an operator, never retried, never blocking."""

    reason: str  # a short, bounded label, also used as the metric label
    detail: str  # what exactly is wrong, for the operator


@dataclass(frozen=True, slots=True)
class Webhook:
    """One live subscription row, as delivery needs it."""

    id: str
    workspace_id: str
    target_url: str = field(repr=False)  # absolute, where requests go; may carry credentials or a token in its path
    operations: tuple[str, ...]
    secret: bytes = field(repr=False)
    host_key: str = ""  # host:port, the unit of per-host concurrency
    # The secret before the last rotation, valid until `previous_until` (epoch seconds) for receivers that have
    # not switched yet.
    previous_secret: bytes | None = field(default=None, repr=False)
    previous_until: float = 0.0

    # The `targetUrl` as saved, where it lacks the scheme that `target_url` adds; Twenty's body carries it as saved.
    saved_url: str | None = field(default=None, repr=False)
    # webhookd's own options for it (`webhookd webhooks set`): filter, per-record order, headers.
    options: WebhookOptions = NO_OPTIONS

    @property
    def saved_target_url(self) -> str:
        return self.target_url if self.saved_url is None else self.saved_url

    def previous_secret_at(self, now: float) -> bytes | None:
        return self.previous_secret if now < self.previous_until else None


@dataclass(slots=True)
class Delivery:
    """One (event, webhook) pair on its way; `attempts` counts the attempts already made."""

    event_id: str
    event_name: str
    workspace_id: str
    webhook: Webhook
    body: bytes = field(repr=False)
    kafka_timestamp_ms: int | None
    source: str  # topic:partition:offset, for operators
    attempts: int = 0
    row_id: int | None = None  # the durable row, once the delivery is on the retry path
    # For a webhook that keeps each record's order: "<object>:<record id>", and the event's offset in Kafka;
    # deliveries with the same key to the same webhook leave one after the other, in offset order.
    order_key: str | None = None
    order_pos: int | None = None


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """How one attempt ended; `result` is the metric label."""

    result: AttemptResultLabel
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result == "2xx"

    @property
    def retryable(self) -> bool:
        # A blocked destination stays blocked: retrying would only knock on the same closed door.
        return self.result != "blocked"

    def describe(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status}" + (f": {self.error}" if self.error else "")
        return f"{self.result}: {self.error}" if self.error else self.result


@dataclass(frozen=True, slots=True)
class Go:
    """Send, after `wait` seconds; `probe` when this attempt tests an open circuit; `paced` when the endpoint has a
    rate limit that the cluster keeps together: `EndpointHealth.pace` must give it a slot first."""

    probe: bool = False
    wait: float = 0.0
    paced: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    """Do not send now: defer for `retry_in` seconds (reason is the deferral metric label) or, if disabled, dead."""

    reason: HoldReason
    retry_in: float
    error: str


SEND_NOW: Final = Go()
