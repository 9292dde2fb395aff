"""Endpoint health in memory: whether a delivery may go now, and what each attempt teaches about its receiver.

An endpoint is one target URL; the webhooks that share it share its circuit breaker and its pace, since they reach
the same receiver. Disabling and rate-limit overrides are set per webhook (that is what operators name) and come
from Postgres through `webhookd.endpoints`, which also receives what is learned here, in batches.

A receiver's `Retry-After` pauses its endpoint for the whole cluster: a pause that starts here sets `urgent`, on
which the endpoint book writes and announces it at once, and pauses announced by other processes come back through
`apply_pause`. The rate limit is paced either here alone (`admit`, without a pacer) or for the whole cluster by a
`Pacer` (`admit` says so, `pace` waits for the slot).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import structlog

from webhookd.endpoints.breaker import Breaker, BreakerSettings, State
from webhookd.endpoints.changes import Changes, merge
from webhookd.endpoints.pacing import Pacer
from webhookd.endpoints.throttle import Throttle
from webhookd.model import SEND_NOW, AttemptResult, Delivery, Go, Hold
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.endpoints.state")

# What says the receiver is sick rather than refusing this one request: these open the circuit.
_SICK = frozenset({"timeout", "connection_error", "5xx"})
_SLOW_DOWN = frozenset({429, 503})
_UNREACHABLE = frozenset({"timeout", "connection_error"})
# A pause that starts, or grows by at least this much, is written to Postgres and announced at once rather than at
# the next sync: the other processes must stop sending within moments. Smaller growth (429s of requests that were in
# flight together) waits for the sync.
_URGENT_PAUSE_SECONDS = 1.0


class _Endpoint:
    __slots__ = ("breaker", "last_used", "throttle", "webhooks")

    def __init__(self, breaker: Breaker, throttle: Throttle) -> None:
        self.breaker = breaker
        self.throttle = throttle
        self.webhooks: set[str] = set()
        self.last_used = 0.0


class EndpointHealth:
    """Admits deliveries past each endpoint's breaker, pace and disabled flag, and learns from each attempt."""

    def __init__(
        self,
        breaker: BreakerSettings,
        default_rate: float | None,
        max_wait: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        pacer: Pacer | None = None,
    ) -> None:
        self._breaker_settings = breaker
        self._default_rate = default_rate
        self._max_wait = max_wait
        self._metrics = metrics
        self._clock = clock
        self._pacer = pacer
        self._endpoints: dict[str, _Endpoint] = {}
        self._url_of: dict[str, str] = {}  # webhook id -> the endpoint it was last sent to
        self._open: set[str] = set()  # urls whose circuit is not closed
        # An endpoint unused this long (and not paused) is forgotten: a breaker nobody consults holds nothing back.
        self._idle_after = 2 * max(breaker.max_cooldown_seconds, breaker.window_seconds)
        self._disabled: dict[str, str] = {}  # webhook id -> reason
        self._rates: dict[str, float] = {}  # webhook id -> its own limit
        self._enabled_at: dict[str, float] = {}  # webhook id -> when an operator last enabled it (epoch)
        # Pauses announced for webhooks whose endpoint is not known here yet: webhook id -> until (health's clock).
        self._pending_pauses: dict[str, float] = {}
        self._changes = Changes()
        # Set when a change must reach Postgres (and the other processes) before the next periodic sync.
        self.urgent = asyncio.Event()

    # --- the delivery path -------------------------------------------------------------------------------------

    def admit(self, delivery: Delivery) -> Go | Hold:
        """May the delivery go: not disabled, past the breaker, not paused; within the rate as paced here, or (with
        a pacer) a Go that says the cluster's pace must be asked (`pace`). Synchronous, so that the many deliveries
        to endpoints without a limit cost no coroutine."""
        return self._admit(delivery, pace_here=self._pacer is None)

    async def pace(self, delivery: Delivery, go: Go) -> Go | Hold:
        """Wait (at most `max_wait`) for the endpoint's slot in the cluster's pace: `go` means send now."""
        assert self._pacer is not None, "only a pacer's admit asks for pacing"
        url = delivery.webhook.target_url
        endpoint = self._endpoint(delivery.webhook.id, url)
        come_back = await self._pacer.reserve(url, endpoint.throttle.rate, self._max_wait)
        now = self._clock()
        if come_back is None and endpoint.throttle.paused_until <= now:
            return go
        self.abandon(delivery, go)
        if come_back is None:  # the receiver asked to wait while this delivery waited for its slot
            return self._paused(endpoint.throttle.paused_until - now)
        return Hold("rate_limited", come_back, "deferred: over the endpoint's rate limit")

    def _admit(self, delivery: Delivery, pace_here: bool) -> Go | Hold:
        webhook = delivery.webhook
        reason = self._disabled.get(webhook.id)
        if reason is not None:
            return Hold("disabled", 0.0, f"endpoint disabled: {reason}")
        endpoint = self._endpoint(webhook.id, webhook.target_url)
        now = self._clock()
        allowed, wait = endpoint.breaker.admit(now)
        if not allowed:
            # Spread what was held together, so that a reopening endpoint is not handed the whole backlog at once.
            return Hold("circuit_open", wait * random.uniform(1.0, 1.5), "deferred: the endpoint's circuit is open")
        probe = endpoint.breaker.probing
        if pace_here:
            allowed, wait = endpoint.throttle.reserve(now, self._max_wait)
        else:
            wait = max(endpoint.throttle.paused_until - now, 0.0)
            allowed = wait == 0.0
        if not allowed:
            if probe:
                endpoint.breaker.abandon_probe(now)
            if endpoint.throttle.paused_until > now:
                return self._paused(wait)
            return Hold("rate_limited", wait, "deferred: over the endpoint's rate limit")
        if not pace_here and endpoint.throttle.rate is not None:
            return Go(probe, paced=True)
        return Go(probe, wait) if probe or wait > 0 else SEND_NOW

    @staticmethod
    def _paused(seconds: float) -> Hold:
        # Spread what was held together, so that the receiver is not handed the whole backlog the moment it asked for.
        return Hold("rate_limited", seconds * random.uniform(1.0, 1.5), "deferred: the receiver asked to wait")

    def abandon(self, delivery: Delivery, go: Go) -> None:
        """An admitted delivery was not sent: it got no slot in the pace, so only its probe is given up."""
        if go.probe:
            self._endpoint(delivery.webhook.id, delivery.webhook.target_url).breaker.abandon_probe(self._clock())

    def give_back(self, delivery: Delivery, go: Go) -> None:
        """An admitted delivery that had its slot in the rate limit was not sent (its endpoint stalled): the slot and
        the probe go to the next delivery, so that a stall never costs the endpoint part of its rate."""
        self.abandon(delivery, go)
        url = delivery.webhook.target_url
        if go.paced:
            assert self._pacer is not None, "only a pacer's admit asks for pacing"
            self._pacer.give_back(url)
        else:
            self._endpoint(delivery.webhook.id, url).throttle.give_back()

    def observe(self, delivery: Delivery, go: Go, result: AttemptResult) -> None:
        """Learn from one attempt's outcome (never called for attempts the egress policy blocked)."""
        webhook = delivery.webhook
        endpoint = self._endpoint(webhook.id, webhook.target_url)
        now, wall = self._clock(), time.time()
        sick = result.result in _SICK or result.status == 429
        was_open = endpoint.breaker.state is not State.CLOSED
        endpoint.breaker.record(now, sick, probe=go.probe, unreachable=result.result in _UNREACHABLE)
        if was_open or endpoint.breaker.state is not State.CLOSED:
            self._circuit_moved(webhook.target_url, endpoint, now)
        if result.status in _SLOW_DOWN and result.retry_after:
            before = max(endpoint.throttle.paused_until, now)
            if endpoint.throttle.pause(now, result.retry_after):
                log.info("endpoint_paused", webhook_id=webhook.id, status=result.status, seconds=result.retry_after)
                self._publish(endpoint, now)
                if endpoint.throttle.paused_until - before >= _URGENT_PAUSE_SECONDS:
                    self.urgent.set()
        self._changes.learn(webhook.id, webhook.target_url, result, wall)
        if result.status == 410:
            self.disable(webhook.id, "the receiver answered 410 Gone")

    def _circuit_moved(self, url: str, endpoint: _Endpoint, now: float) -> None:
        opened = endpoint.breaker.state is not State.CLOSED
        if opened and url not in self._open:
            self._open.add(url)
            log.warning(
                "circuit_opened",
                webhooks=sorted(endpoint.webhooks),
                seconds=round(endpoint.breaker.open_until - now, 1),
            )
        elif not opened and url in self._open:
            self._open.discard(url)
            log.info("circuit_closed", webhooks=sorted(endpoint.webhooks))
        self._metrics.endpoint_circuit_open.set(len(self._open))
        self._publish(endpoint, now)

    def _publish(self, endpoint: _Endpoint, now: float) -> None:
        breaker, throttle = endpoint.breaker, endpoint.throttle
        open_until = max(breaker.open_until, now) if breaker.state is not State.CLOSED else None
        paused_until = throttle.paused_until if throttle.paused_until > now else None
        for webhook_id in endpoint.webhooks:
            self._changes.states[webhook_id] = (open_until, paused_until)

    def _endpoint(self, webhook_id: str, url: str) -> _Endpoint:
        endpoint = self._endpoints.get(url)
        if endpoint is None:
            endpoint = self._endpoints[url] = _Endpoint(Breaker(self._breaker_settings), Throttle(self._default_rate))
        if webhook_id not in endpoint.webhooks:
            previous = self._url_of.get(webhook_id)
            if previous is not None and previous in self._endpoints:
                # The webhook's URL changed: it leaves the old receiver's circuit and pace.
                old = self._endpoints[previous]
                old.webhooks.discard(webhook_id)
                old.throttle.rate = self._rate_of(old)
            self._url_of[webhook_id] = url
            endpoint.webhooks.add(webhook_id)
            endpoint.throttle.rate = self._rate_of(endpoint)
            paused_until = self._pending_pauses.pop(webhook_id, None)
            if paused_until is not None:
                now = self._clock()
                endpoint.throttle.pause(now, paused_until - now)
        endpoint.last_used = self._clock()
        return endpoint

    def _rate_of(self, endpoint: _Endpoint) -> float | None:
        # Webhooks sharing a receiver share its pace: the strictest of their limits holds.
        own = [self._rates[w] for w in endpoint.webhooks if w in self._rates]
        return min(own) if own else self._default_rate

    # --- what the endpoint book reads and sets -----------------------------------------------------------------

    def disable(self, webhook_id: str, reason: str) -> None:
        """Disable at once here; the book writes it to Postgres (and dead-letters what is pending) at its next sync."""
        if webhook_id in self._disabled:
            return
        self._disabled[webhook_id] = reason
        self._changes.disables[webhook_id] = (reason, time.time())
        self._metrics.endpoints_disabled.set(len(self._disabled))
        self._release_circuits(webhook_id)
        log.warning("endpoint_disabled", webhook_id=webhook_id, reason=reason)

    def apply_disabled(self, webhook_id: str, reason: str | None, enabled_at: float | None = None) -> None:
        """Take a webhook's state as Postgres holds it: disabled (with its reason) or not, and when it was last
        enabled by an operator (an operator or another replica may have changed either)."""
        if reason is not None:
            if webhook_id not in self._disabled:
                self._disabled[webhook_id] = reason
                self._release_circuits(webhook_id)
                log.warning("endpoint_disabled", webhook_id=webhook_id, reason=reason)
        elif webhook_id not in self._changes.disables:
            if self._disabled.pop(webhook_id, None) is not None:
                log.info("endpoint_enabled", webhook_id=webhook_id)
            if enabled_at is not None and enabled_at != self._enabled_at.get(webhook_id):
                # Enabled by an operator, who looked at the receiver: give it a clean start.
                self._enabled_at[webhook_id] = enabled_at
                self._release_circuits(webhook_id, always=True)
        self._metrics.endpoints_disabled.set(len(self._disabled))

    def _release_circuits(self, webhook_id: str, always: bool = False) -> None:
        """Close the circuits this webhook's receiver has, if it is re-enabled or none of its webhooks may send."""
        for url, endpoint in self._endpoints.items():
            if webhook_id in endpoint.webhooks and (always or endpoint.webhooks <= self._disabled.keys()):
                endpoint.breaker.reset()
                self._open.discard(url)
        self._metrics.endpoint_circuit_open.set(len(self._open))

    def apply_rate(self, webhook_id: str, rate: float | None) -> None:
        """Take a webhook's own rate limit (None: the configured default)."""
        if self._rates.get(webhook_id) == rate:
            return
        if rate is None:
            del self._rates[webhook_id]
        else:
            self._rates[webhook_id] = rate
        for endpoint in self._endpoints.values():
            if webhook_id in endpoint.webhooks:
                endpoint.throttle.rate = self._rate_of(endpoint)

    def apply_pause(self, webhook_id: str, seconds: float, target_url: str | None = None) -> None:
        """Take a pause Postgres holds (announced by another process, or read at a sync): the webhook's endpoint
        sends nothing for `seconds`. `target_url` is the webhook's URL where the caller knows it; a webhook this
        process has not used and whose URL is not given keeps the pause until its first delivery. Not published
        again: Postgres has it already.
        """
        if seconds <= 0:
            return
        now = self._clock()
        url = target_url or self._url_of.get(webhook_id)
        if url is None:
            self._pending_pauses[webhook_id] = max(self._pending_pauses.get(webhook_id, now), now + seconds)
            return
        throttle = self._endpoint(webhook_id, url).throttle
        was_paused = throttle.paused_until > now
        if throttle.pause(now, seconds) and not was_paused:
            log.info("endpoint_paused", webhook_id=webhook_id, seconds=round(seconds, 1), by="another process")

    def disabled_reason(self, webhook_id: str) -> str | None:
        return self._disabled.get(webhook_id)

    def retry_holds(self) -> tuple[list[str], list[str]]:
        """What retry claims must leave alone: (held, probing).

        Held: webhooks whose endpoint takes nothing now (circuit open, probe out, paused). Probing: webhooks whose
        endpoint would take one delivery now, as its circuit's probe, and hold every other one; claims take one row
        of each, since a whole batch would be claimed only to be put back, again at every cool-down, at a cost that
        grows with the endpoint's backlog.
        """
        now = self._clock()
        held: list[str] = []
        probing: list[str] = []
        for url in self._open:  # circuits not closed: open, or half-open
            endpoint = self._endpoints[url]
            (held if endpoint.breaker.holds(now) else probing).extend(endpoint.webhooks)
        for endpoint in self._endpoints.values():
            if endpoint.throttle.paused_until > now:
                held.extend(endpoint.webhooks)
        return held, probing

    def take_changes(self) -> Changes:
        """What the next sync must write; also the moment to forget endpoints nobody has used for a while."""
        self._forget_idle()
        changes, self._changes = self._changes, Changes()
        changes.at = self._clock()
        return changes

    def _forget_idle(self) -> None:
        now = self._clock()
        idle = [
            url
            for url, e in self._endpoints.items()
            if now - e.last_used > self._idle_after and e.throttle.paused_until <= now
        ]
        for url in idle:
            for webhook_id in self._endpoints.pop(url).webhooks:
                if self._url_of.get(webhook_id) == url:
                    del self._url_of[webhook_id]
            self._open.discard(url)
        if idle:
            self._metrics.endpoint_circuit_open.set(len(self._open))
        for webhook_id in [w for w, until in self._pending_pauses.items() if until <= now]:
            del self._pending_pauses[webhook_id]

    def restore(self, changes: Changes) -> None:
        """Put back changes a sync could not write, under anything learned since."""
        newer = self._changes
        self._changes = changes
        for webhook_id, delta in newer.deltas.items():
            self._changes.deltas[webhook_id] = merge(changes.deltas.get(webhook_id), delta)
        self._changes.disables.update(newer.disables)
        self._changes.states.update(newer.states)
