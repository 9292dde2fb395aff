"""Isolation: fifty healthy endpoints' rate alone, and beside five that hang from the first event of the run.

The healthy endpoints answer after 20 ms; the hung ones hold every request until the daemon's 10 s timeout, and
are new for every run beside them (hung from its first event, never answered before), healed once that run is
measured so that nothing they hold weighs on the runs after. The daemon may put its whole budget on one host
(`delivery.concurrency` and `delivery.per_host_concurrency` 128), and deferred deliveries come back only after the
runs. Two layouts: every endpoint a path of one host:port, as on Zapier, Make or n8n, or a host:port each.

The runs alternate (alone, beside, alone, ...) on one daemon: 400 events each, to a workspace whose 50 webhooks are
the healthy endpoints or to one with the same 50 and five hung ones; the rate is the healthy deliveries over the
time from producing the events to the last healthy answer. A healthy delivery that a hung endpoint pushed into the
retry table is a failure of isolation whatever the rates say, so those are counted too (they must be none).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass

from bench.receivers import ScriptedReceiver
from bench.stack import DaemonRun, Stack, event_doc, produce
from bench.throughput import Run

HEALTHY = 50
HUNG = 5
BUDGET = 128
HUNG_TIMEOUT = 10
ANSWER_AFTER = 0.02
EVENTS = 400
_TIMEOUT = 300.0


@dataclass(frozen=True)
class Isolation:
    """The healthy endpoints' deliveries a second in each run alone and beside hung ones, and how many of their
    deliveries went to the retry table."""

    layout: str
    alone: list[Run]
    beside: list[Run]
    deferred: int

    @staticmethod
    def median(runs: list[Run]) -> Run:
        """The median rate and the median CPU of `runs`."""
        return Run(statistics.median(r.rate for r in runs), statistics.median(r.cpu_us for r in runs))


async def _healthy_rate(daemon: DaemonRun, receiver: ScriptedReceiver, topic: str, workspace: str, run: str) -> Run:
    """Healthy deliveries a second, from producing EVENTS events for `workspace` to the last healthy answer, and the
    daemon's CPU per healthy delivery meanwhile (the hung endpoints' share of it included)."""
    target = (await receiver.state()).answered + HEALTHY * EVENTS
    started, cpu = time.monotonic(), daemon.cpu_seconds()
    await produce(
        daemon.stack.broker.bootstrap, topic, (event_doc(f"{run}-{i}", workspace, {"i": i}) for i in range(EVENTS))
    )
    while (state := await receiver.state()).answered < target:
        if time.monotonic() - started > _TIMEOUT:
            raise TimeoutError(f"{run}: {target - state.answered} healthy deliveries missing after {_TIMEOUT:.0f} s")
        await asyncio.sleep(0.02)
    return Run.of(HEALTHY * EVENTS, state.last_answer - started, daemon.cpu_seconds() - cpu)


async def isolation(stack: Stack, one_host: bool, repeats: int) -> Isolation:
    """`repeats` alternated runs alone and beside hung endpoints, in one layout, on one daemon."""
    async with ScriptedReceiver(1 if one_host else HEALTHY + HUNG, ANSWER_AFTER) as receiver:
        # A token in every path: endpoint state in Postgres is kept by URL, and ports come round again.
        token = uuid.uuid4().hex[:8]

        def url(index: int, path: str) -> str:
            return receiver.url(0 if one_host else index, f"{path}/{token}/{index}")

        healthy = [url(i, "/ok") for i in range(HEALTHY)]
        calm, stormy = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(repeats)]
        await stack.add_webhooks(healthy, calm)
        for run, workspace in enumerate(stormy):
            await stack.add_webhooks([*healthy, *(url(HEALTHY + j, f"/hung/{run}") for j in range(HUNG))], workspace)
        topic = await stack.new_topic()
        delivery = {
            "concurrency": BUDGET, "per_host_concurrency": BUDGET, "timeout_seconds": HUNG_TIMEOUT,
            # What is deferred comes back after the runs, not during them.
            "retry_schedule": ["5m"], "host_busy_retry_seconds": 300,
        }  # fmt: skip
        alone: list[Run] = []
        beside: list[Run] = []
        async with DaemonRun(stack, topic, delivery=delivery) as daemon:
            await _healthy_rate(daemon, receiver, topic, calm, f"warm-{token}")  # connections and caches warm
            for run, workspace in enumerate(stormy):
                alone.append(await _healthy_rate(daemon, receiver, topic, calm, f"alone{run}-{token}"))
                beside.append(await _healthy_rate(daemon, receiver, topic, workspace, f"beside{run}-{token}"))
                await receiver.heal(str(run))
            deferred = await _healthy_deferred(stack, [calm, *stormy], healthy)
        await stack.forget_deliveries([calm, *stormy])
    return Isolation("one host, a path each" if one_host else "a host:port each", alone, beside, deferred)


async def _healthy_deferred(stack: Stack, workspaces: list[str], healthy: list[str]) -> int:
    query = (
        "SELECT count(*) FROM webhookd.deliveries WHERE webhook_id IN (SELECT id FROM core.webhook "
        'WHERE "workspaceId" = ANY($1::uuid[]) AND "targetUrl" = ANY($2::text[]))'
    )
    return int(await stack.fetchval(query, [uuid.UUID(w) for w in workspaces], healthy))
