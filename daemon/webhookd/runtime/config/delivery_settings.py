"""The sections for how webhooks go out: sending, retrying and bounding deliveries, treating sick receivers, and
which destination addresses are allowed.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BeforeValidator, model_validator

from webhookd.model import ATTEMPT_LOG_FORMS, AttemptLogForm
from webhookd.runtime.config.section_rules import _combination_error, _Section
from webhookd.runtime.config.values import (
    _choice,
    _Count,
    _Delay,
    _File,
    _Flag,
    _fraction,
    _integer,
    _Network,
    _optional,
    _rate,
    _Size,
    _Timeout,
)

_BODY_FORMATS = ("docs", "twenty")
_SCHEMES = ("twenty", "standard-webhooks", "both")


class DeliverySettings(_Section):
    """How webhooks are sent, retried and bounded."""

    concurrency: _Count = 256
    per_host_concurrency: _Count = 32
    timeout_seconds: _Timeout = 10.0
    retry_schedule: tuple[_Delay, ...] = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    retry_jitter: Annotated[float, BeforeValidator(_fraction)] = 0.2
    max_retry_after_seconds: _Timeout = 86400.0
    max_event_bytes: _Count = 1048576
    max_pending_deliveries: Annotated[int | None, BeforeValidator(_optional(_integer(1)))] = None
    response_body_limit_bytes: _Size = 4096
    retry_poll_interval_seconds: _Timeout = 1.0
    drain_timeout_seconds: _Delay = 20.0
    # An endpoint that answers nothing this long while it has requests in flight has its queue deferred (scheduler).
    host_wait_seconds: _Delay = 1.0
    host_busy_retry_seconds: _Timeout = 10.0
    signature_scheme: Annotated[Literal["twenty", "standard-webhooks", "both"], BeforeValidator(_choice(*_SCHEMES))] = (
        "twenty"
    )
    secret_rotation_overlap_seconds: _Delay = 86400.0
    # docs: {"event","data","timestamp"} as Twenty's documentation gives it; twenty: the body Twenty's server sends.
    body_format: Annotated[Literal["docs", "twenty"], BeforeValidator(_choice(*_BODY_FORMATS))] = "docs"
    # Receivers are always verified; this bundle is trusted in addition to the system's CAs (webhookd.tls).
    ca_file: _File = None

    @property
    def effective_max_pending_deliveries(self) -> int:
        """The configured bound, or four times `concurrency` when none is set."""
        return self.max_pending_deliveries or 4 * self.concurrency


class EndpointSettings(_Section):
    """How sick receivers are treated: the circuit breaker, rate limits, auto-disable and the attempt log."""

    # The breaker opens when, within the window, at least `circuit_min_requests` attempts were made and this
    # fraction of them failed (timeout, connection error, 5xx, 429).
    circuit_failure_ratio: Annotated[float, BeforeValidator(_fraction)] = 0.7
    circuit_min_requests: _Count = 20
    circuit_window_seconds: _Timeout = 60.0
    # This many timeouts or connection errors in a row open it too: a hanging receiver answers too rarely to fill a
    # window.
    circuit_consecutive_failures: _Count = 5
    # Open for this long, then one probe; each failed probe doubles it, up to the maximum.
    circuit_cooldown_seconds: _Timeout = 30.0
    circuit_max_cooldown_seconds: _Timeout = 600.0
    # Deliveries a second to one endpoint from the whole cluster (webhookd.pacing); unset is unlimited.
    # `webhookd endpoints limit` overrides it per webhook.
    rate_limit_per_second: Annotated[float | None, BeforeValidator(_optional(_rate))] = None
    # Disabled after failing this long without one success (410 Gone disables at once); 0 never disables.
    disable_after_seconds: _Delay = 432000.0
    # What the attempt log keeps of a first-try success: 'full' (every column), 'compact' (what `deliveries show`
    # and `deliveries replay` need) or 'aggregate' (counts per webhook and minute); failures are always in full.
    attempt_log: Annotated[AttemptLogForm, BeforeValidator(_choice(*ATTEMPT_LOG_FORMS))] = "compact"
    # Kept by whole days (UTC): a day's partition goes once all of it is older than this. The retry table's delivered
    # rows go after it too (dead letters stay).
    attempt_log_retention_seconds: _Timeout = 1209600.0
    # How often health is shared with Postgres (and so with replicas and `webhookd endpoints list`).
    sync_interval_seconds: _Timeout = 2.0

    @model_validator(mode="after")
    def _check_cooldowns(self) -> Self:
        if self.circuit_max_cooldown_seconds < self.circuit_cooldown_seconds:
            raise _combination_error(
                type(self).__name__,
                [("circuit_max_cooldown_seconds", "must be at least endpoints.circuit_cooldown_seconds")],
            )
        return self


class EgressSettings(_Section):
    """Which destination addresses deliveries may reach."""

    allow_private: _Flag = False
    allowed_cidrs: tuple[_Network, ...] = ()
    https_only: _Flag = False
