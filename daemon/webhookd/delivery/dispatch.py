"""Fan-out under limits: every delivery of an event is attempted as soon as the scheduler gives its endpoint a slot.

Each attempt ends in exactly one settled state: delivered, durably scheduled for a retry, or dead-lettered. The
first attempt of a record's deliveries is tracked per record, and the record is done (its offset committable) only
when all of its deliveries are settled. Live tasks sit in registries, so shutdown can hand unfinished ones to the
durable retry path and an unexpected error in any of them reaches the service instead of vanishing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import structlog

from webhookd.delivery.ordering import PendingCheck, RecordLines
from webhookd.delivery.scheduler import Scheduler
from webhookd.delivery.sender import Sender
from webhookd.delivery.settling import RecordJob, RetryPolicy, Settlement, settle
from webhookd.durable.attempts import AttemptLog
from webhookd.durable.outcomes import OutcomeWriter
from webhookd.endpoints.state import EndpointHealth
from webhookd.model import AttemptResult, Delivery, Hold, Settled
from webhookd.runtime.metrics import Metrics

log = structlog.get_logger("webhookd.delivery.dispatch")

_BUSY = "deferred: the endpoint has answered nothing for a while"
_BEHIND = "waiting for an earlier delivery of the same record"


class Dispatcher:
    """Runs attempts within the concurrency limits and settles each one."""

    def __init__(
        self,
        sender: Sender,
        outcomes: OutcomeWriter,
        metrics: Metrics,
        policy: RetryPolicy,
        scheduler: Scheduler,
        busy_retry_seconds: float,
        health: EndpointHealth,
        attempts: AttemptLog,
        on_fatal: Callable[[BaseException], None],
        pending_check: PendingCheck,
    ) -> None:
        self._sender = sender
        self._pending_check = pending_check
        self._lines = RecordLines()
        self._behind = metrics.deliveries_deferred.labels("record_order")
        self._health = health
        self._attempts = attempts
        self._outcomes = outcomes
        self._metrics = metrics
        self._policy = policy
        self._scheduler = scheduler
        # Read at scrape time: counting in the gauge itself would take its lock twice per attempt.
        metrics.inflight.set_function(lambda: scheduler.in_flight)
        self._busy_retry_seconds = busy_retry_seconds
        self._busy_until: dict[str, float] = {}  # webhook id -> until when its endpoint was found stalled
        self._first: dict[asyncio.Task[None], tuple[Delivery, RecordJob]] = {}
        # Deliveries to endpoints found stalled, on their way to the retry table together, one task per record.
        self._held_back: dict[asyncio.Task[None], tuple[list[Delivery], RecordJob]] = {}
        self._held_back_count = 0
        self._busy_deferrals = metrics.deliveries_deferred.labels("endpoint_busy")
        self._retries: dict[asyncio.Task[None], Delivery] = {}
        self._ordered_retries = 0  # of them, those of ordered webhooks: the retry poller asks on every poll
        # Set whenever a retried delivery is settled: the retry poller claims again as soon as room frees.
        self.retry_settled = asyncio.Event()
        self._interrupted: list[tuple[Delivery, RecordJob]] = []
        self._on_fatal = on_fatal
        # Checked once: a debug line per success is affordable only when someone asked for it.
        self._log_successes = logging.getLogger("webhookd.delivery.dispatch").isEnabledFor(logging.DEBUG)

    @property
    def pending(self) -> int:
        """First attempts not yet settled: what the consumer's backpressure counts."""
        return len(self._first) + self._held_back_count

    @property
    def retries_in_flight(self) -> int:
        return len(self._retries)

    def ordered_retries_in_flight(self) -> bool:
        """Whether an ordered webhook's retry is under way: its record's next may fall due when it settles."""
        return self._ordered_retries > 0

    def busy_webhooks(self) -> list[str]:
        """Webhooks whose endpoint was stalled a moment ago: claiming their retries now would only defer them again."""
        now = time.monotonic()
        for webhook_id in [w for w, until in self._busy_until.items() if until <= now]:
            del self._busy_until[webhook_id]
        return list(self._busy_until)

    def retry_rows(self) -> list[int]:
        """Rows of the retried deliveries under way, which a new claim must not take again."""
        return [d.row_id for d in self._retries.values() if d.row_id is not None]

    def submit(self, deliveries: list[Delivery], on_done: Callable[[], None]) -> None:
        """Start the first attempt of each of a record's deliveries; `on_done` runs once all are settled."""
        job = RecordJob(len(deliveries), on_done)
        held: list[Delivery] | None = None
        for delivery in deliveries:
            webhook = delivery.webhook
            if (
                delivery.order_key is None
                and self._scheduler.stalled(webhook.target_url)
                and self._health.disabled_reason(webhook.id) is None
            ):
                # Its endpoint answers nothing: to the retry table without a task each, CPU the healthy ones need.
                held = held or []
                held.append(delivery)
                continue
            task = asyncio.create_task(self._first_attempt(delivery))
            self._first[task] = (delivery, job)
            task.add_done_callback(self._first_finished)
        if held:
            task = asyncio.create_task(self._hold_back(held))
            self._held_back[task] = (held, job)
            self._held_back_count += len(held)
            task.add_done_callback(self._held_back_finished)

    def submit_retry(self, delivery: Delivery) -> None:
        """Attempt a delivery claimed from the durable retry queue."""
        task = asyncio.create_task(self._retry(delivery))
        self._retries[task] = delivery
        if delivery.order_key is not None:
            self._ordered_retries += 1
        task.add_done_callback(self._retry_finished)

    def _first_finished(self, task: asyncio.Task[None]) -> None:
        delivery, job = self._first.pop(task)
        if task.cancelled():
            self._interrupted.append((delivery, job))
        elif (exc := task.exception()) is not None:
            self._on_fatal(exc)
        else:
            job.one_done()

    def _held_back_finished(self, task: asyncio.Task[None]) -> None:
        deliveries, job = self._held_back.pop(task)
        self._held_back_count -= len(deliveries)
        if task.cancelled():
            self._interrupted.extend((delivery, job) for delivery in deliveries)
        elif (exc := task.exception()) is not None:
            self._on_fatal(exc)
        else:
            for _ in deliveries:
                job.one_done()

    async def _hold_back(self, deliveries: list[Delivery]) -> None:
        retry_in = self._busy_retry_seconds
        until = time.monotonic() + retry_in
        for delivery in deliveries:
            self._busy_until[delivery.webhook.id] = until
        self._busy_deferrals.inc(len(deliveries))
        await self._outcomes.hold_back(deliveries, retry_in=retry_in, error=_BUSY)

    def _retry_finished(self, task: asyncio.Task[None]) -> None:
        delivery = self._retries.pop(task, None)
        if delivery is not None and delivery.order_key is not None:
            self._ordered_retries -= 1
        self.retry_settled.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._on_fatal(exc)

    async def _send(self, delivery: Delivery) -> AttemptResult | Hold:
        """One attempt within the limits, or why it cannot be made now."""
        verdict = self._health.admit(delivery)
        if isinstance(verdict, Hold):
            return verdict
        if verdict.paced:
            # The cluster's pace for an endpoint with a rate limit: a slot now (perhaps after a short sleep), or later.
            verdict = await self._health.pace(delivery, verdict)
            if isinstance(verdict, Hold):
                return verdict
        elif verdict.wait > 0:
            await asyncio.sleep(verdict.wait)  # a slot reserved within the rate limit, a short way off
        webhook = delivery.webhook
        # A delivery waits for its endpoint's turn however long the budget stays busy: only an endpoint (or a host)
        # that answers nothing sends its deliveries to the durable retry path, so that they do not hold their
        # records' offsets (and, through backpressure, every other receiver's events) until its timeout.
        lane = await self._scheduler.acquire(webhook.target_url, webhook.host_key)
        if lane is None:
            self._health.give_back(delivery, verdict)
            retry_in = self._busy_retry_seconds
            self._busy_until[webhook.id] = time.monotonic() + retry_in
            return Hold("endpoint_busy", retry_in, _BUSY)
        result: AttemptResult | None = None
        try:
            result = await self._sender.attempt(delivery)
        finally:
            outcome = result.result if result is not None and result.result != "blocked" else None
            self._scheduler.release(lane, outcome)
        self._metrics.attempts_by_result[result.result].inc()
        self._attempts.add(delivery, delivery.attempts + 1, result)
        if result.result != "blocked":
            self._metrics.delivery_duration.observe(result.duration)
            self._health.observe(delivery, verdict, result)
        return result

    def _settle(self, delivery: Delivery, outcome: AttemptResult | Hold) -> Settlement:
        """The one place a pass ends: its settlement, counted and logged."""
        # Only a failure asks whether the endpoint is disabled now: the one outcome that the answer changes.
        failed = not isinstance(outcome, Hold) and not outcome.ok
        disabled = failed and self._health.disabled_reason(delivery.webhook.id) is not None
        settled = settle(outcome, delivery.attempts, self._policy, disabled=disabled)
        dead = settled.status == "dead"
        if dead:
            self._metrics.deliveries_by_outcome["dead_lettered"].inc()
        if isinstance(outcome, Hold):
            if dead:
                log.info(
                    "delivery_dead_lettered",
                    event_id=delivery.event_id,
                    webhook_id=delivery.webhook.id,
                    workspace_id=delivery.workspace_id,
                    reason=outcome.error,
                )
            else:
                self._metrics.deliveries_deferred.labels(outcome.reason).inc()
        elif settled.status == "delivered":
            self._delivered(delivery, outcome)
        else:
            log.info(
                "delivery_dead_lettered" if dead else "delivery_attempt_failed",
                event_id=delivery.event_id,
                webhook_id=delivery.webhook.id,
                workspace_id=delivery.workspace_id,
                attempt=delivery.attempts,
                result=outcome.result,
                status=outcome.status,
                error=outcome.error,
                duration=round(outcome.duration, 4),
                retry_in=None if dead else round(settled.retry_in, 3),
            )
        return settled

    async def _first_attempt(self, delivery: Delivery) -> None:
        if delivery.order_key is None:
            await self._attempt_first(delivery)
            return
        ahead, mine = self._lines.join(delivery)
        # Until it is known to have reached its end, a delivery holds back the ones behind it: they wait in the table.
        holds_back = True
        try:
            if ahead is not None:
                must_wait = await ahead
            else:
                must_wait = await self._pending_check.pending(delivery.webhook.id, delivery.order_key)
            if must_wait:
                self._behind.inc()
                await self._outcomes.behind(delivery, error=_BEHIND)
            else:
                holds_back = await self._attempt_first(delivery) == "pending"
        finally:
            self._lines.leave(delivery, mine, holds_back=holds_back)

    async def _attempt_first(self, delivery: Delivery) -> Settled:
        """The first attempt and its settling; returns the status it settled in: delivered, pending or dead."""
        result = await self._send(delivery)
        if not isinstance(result, Hold):
            delivery.attempts = 1
        settled = self._settle(delivery, result)
        if settled.status != "delivered":
            # A hold is not an attempt: the receiver never saw it, so it keeps its whole retry schedule.
            await self._outcomes.schedule(
                delivery,
                status=settled.status,
                retry_in=settled.retry_in,
                last_status=settled.last_status,
                error=settled.error,
            )
        return settled.status

    async def _retry(self, delivery: Delivery) -> None:
        assert delivery.row_id is not None, "a retried delivery always has its durable row"
        result = await self._send(delivery)
        if not isinstance(result, Hold):
            delivery.attempts += 1
        settled = self._settle(delivery, result)
        if not settled.attempted and settled.status == "pending":
            await self._outcomes.defer(delivery.row_id, retry_in=settled.retry_in)
            return
        await self._outcomes.update(
            delivery.row_id,
            status=settled.status,
            attempts=delivery.attempts,
            retry_in=settled.retry_in,
            last_status=settled.last_status,
            error=settled.error,
        )

    def _delivered(self, delivery: Delivery, result: AttemptResult) -> None:
        self._metrics.deliveries_by_outcome["delivered"].inc()
        if delivery.kafka_timestamp_ms is not None:
            latency = time.time() - delivery.kafka_timestamp_ms / 1000
            self._metrics.event_delivery_latency.observe(max(latency, 0.0))
        if self._log_successes or delivery.attempts > 1:
            log.log(
                logging.INFO if delivery.attempts > 1 else logging.DEBUG,
                "delivered",
                event_id=delivery.event_id,
                webhook_id=delivery.webhook.id,
                workspace_id=delivery.workspace_id,
                attempt=delivery.attempts,
                status=result.status,
                duration=round(result.duration, 4),
            )

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` for every first attempt to settle; True if they all did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._first or self._held_back) and loop.time() < deadline:
            await asyncio.wait([*self._first, *self._held_back], timeout=deadline - loop.time())
        return not (self._first or self._held_back)

    async def hand_off(self) -> int:
        """Move every unsettled first attempt to the durable retry path, then settle it; returns how many."""
        tasks = [*self._first, *self._held_back]
        # Submission order, which is Kafka order: the deliveries of a record kept in order are written in it.
        submitted = {id(d): n for n, (d, _) in enumerate(self._first.values())}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        interrupted, self._interrupted = self._interrupted, []
        interrupted.sort(key=lambda pair: submitted.get(id(pair[0]), len(submitted)))

        async def persist(delivery: Delivery, job: RecordJob) -> None:
            # Not counted as an attempt: the receiver may never have seen it, and it deserves its full schedule.
            delivery.attempts = 0
            await self._outcomes.schedule(
                delivery, status="pending", retry_in=0.0, last_status=None, error="interrupted"
            )
            job.one_done()

        await asyncio.gather(*(persist(d, j) for d, j in interrupted))
        return len(interrupted)

    async def cancel_retries(self) -> list[int]:
        """Stop retried attempts under way; returns their rows, whose claims the caller releases."""
        claimed = dict(self._retries)
        for task in claimed:
            task.cancel()
        await asyncio.gather(*claimed, return_exceptions=True)
        return [d.row_id for d in claimed.values() if d.row_id is not None]
