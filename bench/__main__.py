"""`make bench`: one table, measured in one run on one machine, of what webhookd costs and sustains.

    python -m bench [--deliveries N] [--repeats 3] [--only SECTION,...]

Sections: throughput, naive, latency, backlog, rows, workers, decode, filters, ordering, retries, isolation,
cluster, attempt_log.

Runs that are compared are alternated (ceiling, daemon, ceiling, daemon, ...) and their medians reported, because
a shared machine is noisy. See BENCHMARKS.md for the latest table and what it says.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from bench import cluster, isolation
from bench.decode import TARGET, decode_cost
from bench.filters import filter_cost
from bench.latency import WARM_UP, latency_at
from bench.memory import backlog_peak_rss, table_cost
from bench.ordering import RECORDS, ordered_rate
from bench.receivers import Receiver, capacity, receiver_for, running
from bench.retry_drain import drain_rate
from bench.stack import Stack, process_tree
from bench.throughput import CONCURRENCY, Run, bodies_for, ceiling, daemon_rate, lean_ceiling, naive_rate
from webhookd.runtime.logs import setup_logging

SECTIONS = (
    "throughput",
    "naive",
    "latency",
    "backlog",
    "rows",
    "workers",
    "decode",
    "filters",
    "ordering",
    "retries",
    "isolation",
    "cluster",
    "attempt_log",
    "claims",
)
# The sections that need neither the shared broker nor its Postgres: decode and filters are measured in this process
# alone, on CPU; attempt_log starts a Postgres of its own, whose checkpoints and vacuum only it decides.
IN_PROCESS = frozenset({"decode", "filters", "attempt_log"})
DELAYS = (0.0, 0.05)
# The throughput table's rows: the receiver's delay, the concurrency on every side, and the ratio to the aiohttp
# ceiling that webhookd must reach there.
REGIMES = ((0.0, 64, 0.9), (0.0, 256, 0.9), (0.05, 256, 0.95))
# CPU per delivery, at most this many times the aiohttp ceiling's.
CPU_TARGET = 1.15
LATENCY_P99_MS = 50
BACKLOG_RSS_MB = 150
# Two workers on two cores against one, the broker and receiver included in the machine's load.
WORKERS_TARGET = 1.7
WORKERS_CONCURRENCY = 256
_CORES = ("webhookd", "broker", "postgres", "receiver", "bench", "machine", "steal")
# The daemon's default `delivery.concurrency`, which the latency runs use: their rate is half of this row's.
LATENCY_CONCURRENCY = 256
# Deliveries a run when `--deliveries` is not given: the retry drain's target is set for a backlog of 100,000.
DELIVERIES = 20_000
RETRY_BACKLOG = 100_000


def _regime(delay: float) -> str:
    return "answers at once" if not delay else f"answers after {delay * 1000:.0f} ms"


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {system}"


class Bench:
    """The sections of the table, each printed as it is measured."""

    def __init__(self, stack: Stack | None, args: argparse.Namespace) -> None:
        self._stack = stack
        self.args = args
        self.lines: list[str] = []
        self.capacity: dict[float, float] = {}  # webhookd's measured rate, 1 webhook, per regime
        self.deliveries: int = args.deliveries or DELIVERIES

    @property
    def stack(self) -> Stack:
        assert self._stack is not None, "the stack is started for every section outside IN_PROCESS"
        return self._stack

    def out(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def receiver(self, delay: float) -> contextlib.AbstractContextManager[Receiver]:
        """The receiver that answers after `delay`, running until the block ends."""
        return running(receiver_for(delay, not self.args.no_nginx))

    async def side_by_side(self, *runs: Callable[[], Awaitable[Run]]) -> list[Run]:
        """Each of `runs` `--repeats` times, taking turns; the median rate and CPU of each."""
        results: list[list[Run]] = [[] for _ in runs]
        for _ in range(self.args.repeats):
            for i, run in enumerate(runs):
                results[i].append(await run())
        print(f"  .. rates {[[round(r.rate) for r in rs] for rs in results]}", file=sys.stderr, flush=True)
        return [
            Run(
                statistics.median(r.rate for r in rs),
                statistics.median(r.cpu_us for r in rs),
                {name: statistics.median(r.cores[name] for r in rs) for name in rs[0].cores},
            )
            for rs in results
        ]

    async def throughput(self) -> None:
        self.out("## Deliveries a second, end to end, against the raw aiohttp ceiling")
        self.out()
        self.out(f"The same concurrency on every side; {self.deliveries} deliveries a run; medians of "
                 f"{self.args.repeats} alternated runs. The lean ceiling is webhookd's own sender and HTTP client in "
                 "the same bare loop as the aiohttp one; the targets are against the aiohttp ceiling.")  # fmt: skip
        self.out()
        self.out("| receiver | concurrency | webhooks per event | receiver's own capacity (/s) | aiohttp ceiling (/s) "
                 "| lean ceiling (/s) | webhookd (/s) | ratio | target | CPU per delivery, aiohttp / lean / "
                 "webhookd (µs) | CPU ratio | target |")  # fmt: skip
        self.out("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for delay in DELAYS:
            with self.receiver(delay) as receiver:
                for regime_delay, concurrency, target in REGIMES:
                    if regime_delay != delay:
                        continue
                    own = await asyncio.to_thread(capacity, receiver, bodies_for(1, 1)[0], concurrency)
                    for webhooks in (1, 5):
                        await self._throughput_row(receiver, delay, concurrency, webhooks, target, own)
        self.out()

    async def _throughput_row(
        self, receiver: Receiver, delay: float, concurrency: int, webhooks: int, target: float, own: float
    ) -> None:
        events = self.deliveries // webhooks
        bodies = bodies_for(events, webhooks)
        url = f"http://127.0.0.1:{receiver.port}/ceiling"
        raw, lean, daemon = await self.side_by_side(
            functools.partial(ceiling, url, bodies, concurrency),
            functools.partial(lean_ceiling, url, bodies, concurrency),
            functools.partial(daemon_rate, self.stack, receiver, events, webhooks, concurrency=concurrency),
        )
        ratio, cpu_ratio = daemon.rate / raw.rate, daemon.cpu_us / raw.cpu_us
        if webhooks == 1 and concurrency == LATENCY_CONCURRENCY:
            self.capacity[delay] = daemon.rate
        verdict = "met" if ratio >= target else "missed"
        cpu_verdict = "met" if cpu_ratio <= CPU_TARGET else "missed"
        self.out(f"| {receiver.name}, {_regime(delay)} | {concurrency} | {webhooks} | {own:,.0f} | {raw.rate:,.0f} | "
                 f"{lean.rate:,.0f} | {daemon.rate:,.0f} | {ratio:.2f} | ≥ {target} {verdict} | "
                 f"{raw.cpu_us:.0f} / {lean.cpu_us:.0f} / {daemon.cpu_us:.0f} | {cpu_ratio:.2f} | "
                 f"≤ {CPU_TARGET} {cpu_verdict} |")  # fmt: skip

    async def naive(self) -> None:
        delay = 0.05
        with self.receiver(delay) as receiver:
            bodies = bodies_for(self.deliveries // 4, 1)
            url = f"http://127.0.0.1:{receiver.port}/ceiling"
            raw, naive = await self.side_by_side(
                functools.partial(ceiling, url, bodies),
                functools.partial(naive_rate, self.stack, receiver, self.args.naive_events),
            )
        self.out(f"## A naive consumer ({_regime(delay)}, 1 webhook)")
        self.out()
        self.out("One event at a time: look its webhooks up, POST, await, commit.")
        self.out()
        self.out("| naive consumer (/s) | raw ceiling (/s) | ratio |")
        self.out("| --- | --- | --- |")
        self.out(f"| {naive.rate:,.1f} | {raw.rate:,.0f} | {naive.rate / raw.rate:.3f} |")
        self.out()

    async def latency(self) -> None:
        self.out("## Latency from the event's Kafka timestamp to the receiver, at half of webhookd's capacity")
        self.out()
        self.out(f"After a warm-up of {WARM_UP:.0f} s at the same rate (its largest latency in the last column: a "
                 "fresh endpoint starts with one slot and earns the rest one round trip at a time).")  # fmt: skip
        self.out()
        self.out("| receiver | events a second | events | p50 (ms) | p99 (ms) | max (ms) | target | warm-up max (ms) |")
        self.out("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for delay in DELAYS:
            rate = self.capacity.get(delay, self.args.latency_rate) / 2
            result = await latency_at(
                self.stack, delay, rate, self.args.latency_seconds, LATENCY_CONCURRENCY, not self.args.no_nginx
            )
            verdict = "met" if result.p99 < LATENCY_P99_MS else "missed"
            self.out(f"| {result.receiver}, {_regime(delay)} | {result.rate:,.0f} | {result.count} | "
                     f"{result.p50:.1f} | {result.p99:.1f} | {result.max:.1f} | "
                     f"p99 < {LATENCY_P99_MS} ms {verdict} | {result.warm_up_max:.0f} |")  # fmt: skip
        self.out()

    async def backlog(self) -> None:
        result = await backlog_peak_rss(self.stack, self.args.backlog_events, self.args.backlog_seconds)
        verdict = "met" if result.peak_rss_mib < BACKLOG_RSS_MB else "missed"
        self.out("## Memory with a backlog, against a receiver that never answers")
        self.out()
        self.out("| events waiting | watched for (s) | events read meanwhile | peak RSS (MiB, VmHWM) | target |")
        self.out("| --- | --- | --- | --- | --- |")
        self.out(f"| {result.events:,} | {result.seconds:.0f} | {result.consumed:,.0f} | {result.peak_rss_mib:.0f} | "
                 f"< {BACKLOG_RSS_MB} MB {verdict} |")  # fmt: skip
        self.out()

    async def rows(self) -> None:
        self.out("## Webhook rows: start-up, memory, reload and match")
        self.out()
        self.out("One webhook per workspace. Start to ready and RSS are the daemon's; the index, reload and match are "
                 "measured in the bench's own process on the same code.")  # fmt: skip
        self.out()
        self.out("| rows | start to ready (s) | daemon RSS when ready (MiB) | index (MiB) | full reload (ms) | "
                 "longest loop pause in a reload (ms) | periodic check, table unchanged (ms) | "
                 "match per event, any workspace / 100 busy ones (µs) |")  # fmt: skip
        self.out("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for rows in (100, 10_000, 100_000):
            cost = await table_cost(self.stack, rows)
            self.out(f"| {rows:,} | {cost.ready_seconds:.2f} | {cost.rss_mib:.0f} | {cost.index_mib:.1f} | "
                     f"{cost.reload_ms:,.0f} | {cost.pause_ms:.0f} | {cost.check_ms:,.1f} | "
                     f"{cost.match_us:.2f} / {cost.hot_match_us:.2f} |")  # fmt: skip
        self.out()

    async def workers(self) -> None:
        delay = 0.0
        with self.receiver(delay) as receiver:
            # Everything else that runs meanwhile on the same cores, so that the ratio can be read against it.
            watch: dict[str, Callable[[], list[int]]] = {
                "broker": lambda: process_tree(self.stack.broker.pid),
                "postgres": lambda: process_tree(self.stack.postgres.pid),
                "receiver": receiver.pids,
                "bench": lambda: [os.getpid()],
            }
            # Five times a throughput run's deliveries: two workers deliver a throughput run's in about a second,
            # which the second worker's first fetches and the group's first commits would decide.
            n = 5 * self.deliveries
            one, two = await self.side_by_side(
                functools.partial(daemon_rate, self.stack, receiver, n, 1, 1, WORKERS_CONCURRENCY, watch),
                functools.partial(daemon_rate, self.stack, receiver, n, 1, 2, WORKERS_CONCURRENCY, watch),
            )
        verdict = "met" if two.rate / one.rate >= WORKERS_TARGET else "missed"
        self.out(f"## `--workers N` ({_regime(delay)}, 1 webhook, 4 partitions, {5 * self.deliveries:,} deliveries a "
                 f"run, concurrency {WORKERS_CONCURRENCY} a worker)")  # fmt: skip
        self.out()
        self.out(f"Cores busy during the runs ({os.cpu_count()} in all), medians: the daemon (all its workers), the "
                 "broker, Postgres (the attempt log's COPY), the receiver, the bench's own process, the whole "
                 "machine, and the time the hypervisor gave the machine's cores to others (steal).")  # fmt: skip
        self.out()
        self.out("| workers | webhookd (/s) | ratio to 1 worker | target | CPU per delivery, all workers (µs) | cores: "
                 "webhookd / broker / Postgres / receiver / bench / machine / stolen |")  # fmt: skip
        self.out("| --- | --- | --- | --- | --- | --- |")
        for n, run in ((1, one), (2, two)):
            ratio = run.rate / one.rate
            cores = " / ".join(f"{run.cores.get(k, float('nan')):.2f}" for k in _CORES)
            self.out(f"| {n} | {run.rate:,.0f} | {ratio:.2f} | {'' if n == 1 else f'≥ {WORKERS_TARGET} {verdict}'} | "
                     f"{run.cpu_us:.0f} | {cores} |")  # fmt: skip
        self.out()

    async def decode(self) -> None:
        # Pure CPU in this process, run on the loop's own thread: nothing else is scheduled meanwhile, and a worker
        # thread would only add its hand-off to what is measured.
        cost = decode_cost(self.args.decode_events, self.args.repeats)
        self.out("## Decode and match: Debezium change records against native events of the same record")
        self.out()
        self.out(f"{cost.events:,} updates of one field of a Twenty `person` ({cost.columns} columns, REPLICA "
                 f"IDENTITY FULL), read as the consume loop reads them: the reader (decode, or read the change and "
                 f"map it), the match ({cost.webhooks} webhooks want each) and the `docs` body; in this process, on "
                 f"one core, no broker; medians of {cost.repeats} alternated runs. Every form is the same change, "
                 f"checked to give the native event's body; bytes per record are the record's value as Kafka holds "
                 f"it.")  # fmt: skip
        self.out()
        self.out("| input | bytes per record | events a second | CPU per event (µs) | CPU, ratio to native of the "
                 "same record | ratio to native of the same size | ≤ 1.3 of the same size |")  # fmt: skip
        self.out("| --- | --- | --- | --- | --- | --- | --- |")
        for i, row in enumerate(cost.rows):
            verdict = "" if i < 2 else ("met" if row.ratio_same_size <= TARGET else "missed")
            self.out(f"| {row.label} | {row.bytes_per_record:,.0f} | {row.rate:,.0f} | {row.cpu_us:.1f} | "
                     f"{row.ratio:.2f} | {row.ratio_same_size:.2f} | {verdict} |")  # fmt: skip
        self.out()

    async def filters(self) -> None:
        # Pure CPU in this process, on the loop's own thread, as `decode` is measured.
        cost = filter_cost(self.args.filter_events, self.args.repeats)
        self.out("## Per-webhook filters: match and filter, against match alone")
        self.out()
        self.out(f"{cost.events:,} `opportunity.updated` events (records of {cost.record_bytes:,.0f} bytes of JSON, "
                 f"`updatedFields` stage and updatedAt), each matched against a workspace of {cost.webhooks} webhooks "
                 f"of which {cost.matched} want it; per event the match, the shared lazy record and each matched "
                 f"webhook's filter, all of which pass (the record is parsed once per event when a predicate needs "
                 f"it); in this process, on one core, no broker; medians of {cost.repeats} alternated "
                 f"runs.")  # fmt: skip
        self.out()
        self.out("| filters per matched webhook | events a second | CPU per event (µs) | ratio to no filters |")
        self.out("| --- | --- | --- | --- |")
        for row in cost.rows:
            self.out(f"| {row.label} | {row.rate:,.0f} | {row.cpu_us:.2f} | {row.ratio:.2f} |")
        self.out()

    async def ordering(self) -> None:
        events = self.deliveries
        self.out(f"## Per-record ordering: one webhook, events of {RECORDS:,} distinct records, ordered against not")
        self.out()
        self.out(f"{events:,} `opportunity.updated` events keyed by record (so each record's events share a "
                 f"partition), to 1 webhook at concurrency {CONCURRENCY}, end to end as in the throughput table; the "
                 f"ordered webhook sends each record's deliveries one after the other; medians of "
                 f"{self.args.repeats} alternated runs.")  # fmt: skip
        self.out()
        self.out("| receiver | unordered (/s) | ordered (/s) | ratio | CPU per delivery, unordered / ordered (µs) |")
        self.out("| --- | --- | --- | --- | --- |")
        for delay in DELAYS:
            with self.receiver(delay) as receiver:
                unordered, ordered = await self.side_by_side(
                    functools.partial(ordered_rate, self.stack, receiver, events, False),
                    functools.partial(ordered_rate, self.stack, receiver, events, True),
                )
            ratio = ordered.rate / unordered.rate
            self.out(f"| {receiver.name}, {_regime(delay)} | {unordered.rate:,.0f} | {ordered.rate:,.0f} | "
                     f"{ratio:.2f} | {unordered.cpu_us:.0f} / {ordered.cpu_us:.0f} |")  # fmt: skip
        self.out()

    async def retries(self) -> None:
        rows = self.args.deliveries or RETRY_BACKLOG
        self.out("## A backlog of due retries, drained from Postgres, against the same deliveries made live")
        self.out()
        self.out(f"{rows:,} deliveries to 1 webhook at concurrency {CONCURRENCY}, either produced to Kafka (live) "
                 f"or written to the retry table as due rows (drain); medians of {self.args.repeats} alternated "
                 f"runs.")  # fmt: skip
        self.out()
        self.out("| receiver | live (/s) | retry drain (/s) | ratio | target | CPU per delivery, live / drain (µs) |")
        self.out("| --- | --- | --- | --- | --- | --- |")
        for delay in DELAYS:
            with self.receiver(delay) as receiver:
                live, drain = await self.side_by_side(
                    functools.partial(daemon_rate, self.stack, receiver, rows, 1),
                    functools.partial(drain_rate, self.stack, receiver, rows),
                )
            ratio = drain.rate / live.rate
            verdict = "met" if ratio >= 0.8 else "missed"
            self.out(f"| {receiver.name}, {_regime(delay)} | {live.rate:,.0f} | {drain.rate:,.0f} | {ratio:.2f} | "
                     f"≥ 0.8 {verdict} | {live.cpu_us:.0f} / {drain.cpu_us:.0f} |")  # fmt: skip
        self.out()

    async def isolation(self) -> None:
        healthy, hung = isolation.HEALTHY, isolation.HUNG
        self.out(f"## Isolation: {healthy} healthy endpoints beside {hung} hung from the first event, in both layouts")
        self.out()
        self.out(f"{healthy} endpoints that answer after {isolation.ANSWER_AFTER * 1000:.0f} ms, alone (a workspace "
                 f"of their {healthy} webhooks) or beside {hung} that hang until the {isolation.HUNG_TIMEOUT} s "
                 f"timeout (a workspace of the same {healthy} and {hung} hung ones, new for every run and healed once "
                 f"it is measured); `delivery.concurrency` and `delivery.per_host_concurrency` {isolation.BUDGET}; "
                 f"{isolation.EVENTS} events a run; the healthy endpoints' deliveries a second, medians (best) of "
                 f"{self.args.repeats} alternated runs on one daemon; the receivers are one aiohttp process of their "
                 f"own.")  # fmt: skip
        self.out()
        self.out(f"| layout | alone (/s) | beside {hung} hung (/s) | ratio of medians (of bests) | target | healthy "
                 f"deliveries deferred | target | CPU per healthy delivery, alone / beside (µs) |")  # fmt: skip
        self.out("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for one_host in (True, False):
            result = await isolation.isolation(self.stack, one_host, self.args.repeats)
            runs = [[round(r.rate) for r in rs] for rs in (result.alone, result.beside)]
            print(f"  .. rates {runs}", file=sys.stderr, flush=True)
            alone, beside = isolation.Isolation.median(result.alone), isolation.Isolation.median(result.beside)
            best_alone, best_beside = max(r.rate for r in result.alone), max(r.rate for r in result.beside)
            ratio = beside.rate / alone.rate
            verdict = "met" if ratio >= 0.9 else "missed"
            self.out(f"| {result.layout} | {alone.rate:,.0f} ({best_alone:,.0f}) | {beside.rate:,.0f} "
                     f"({best_beside:,.0f}) | {ratio:.2f} ({best_beside / best_alone:.2f}) | ≥ 0.9 {verdict} | "
                     f"{result.deferred:,} | 0 {'met' if not result.deferred else 'missed'} | "
                     f"{alone.cpu_us:.0f} / {beside.cpu_us:.0f} |")  # fmt: skip
        self.out()

    async def cluster(self) -> None:
        limit, grace = cluster.LIMIT, cluster.GRACE_SECONDS
        self.out(f"## Limits kept cluster-wide: {cluster.DAEMONS} daemons x {cluster.WORKERS} workers, one consumer "
                 f"group, {cluster.PARTITIONS} partitions")  # fmt: skip
        self.out()
        self.out(f"One webhook limited to {limit}/s with `webhookd endpoints limit`, behind a backlog far above that "
                 f"in every partition: its receiver's arrivals over {cluster.WINDOW_SECONDS:.0f} s, from "
                 f"{cluster.SETTLE_SECONDS:.0f} s after the first delivery (the group's rebalances are over by then). "
                 f"Then another webhook, unlimited, fed {cluster.STREAM_RATE} events a second over every partition: "
                 f"once every process has delivered, its receiver answers one request 429 with `Retry-After: "
                 f"{cluster.RETRY_AFTER}`. Default delivery settings; the receiver is a process of its "
                 f"own.")  # fmt: skip
        self.out()
        self.out("| check | measured | target | detail |")
        self.out("| --- | --- | --- | --- |")
        for _ in range(self.args.repeats):
            limited = await cluster.limit_accuracy(self.stack)
            verdict = "met" if abs(limited.error) <= 0.1 else "missed"
            shares = ", ".join(f"{process} {n:,}" for process, n in limited.by_process.items())
            self.out(f"| rate limit {limit}/s | {limited.rate:.1f}/s ({limited.error:+.1%}) | ± 10% {verdict} | "
                     f"{limited.arrivals:,} arrivals in {limited.seconds:.0f} s, busiest second {limited.busiest}; "
                     f"deliveries in the window by daemon/worker: {shares} |")  # fmt: skip
            paused = await cluster.pause_kept(self.stack)
            verdict = "met" if not paused.during else "missed"
            first = "none" if paused.first_after is None else f"{paused.first_after:.2f} s after the 429"
            self.out(f"| `Retry-After: {paused.retry_after}` | {paused.during} requests from {grace} s after the 429 "
                     f"to the pause's end | 0 {verdict} | first request after it: {first}; {paused.in_flight} within "
                     f"{grace} s of the 429 (already on their way) |")  # fmt: skip
        self.out()

    async def attempt_log(self) -> None:
        # Imported here: only this section needs them, and it runs for several minutes on a Postgres of its own.
        from bench.attempt_capacity import attempt_capacity
        from bench.capacity_model import Assumptions, section_lines

        with tempfile.TemporaryDirectory(prefix="webhookd-bench-attempts-") as tmp:
            found = await attempt_capacity(Path(tmp), progress=lambda line: print(line, file=sys.stderr, flush=True))
        for line in section_lines(found, Assumptions()):
            self.out(line)

    async def claims(self) -> None:
        from bench import retry_claims as rc  # this section's own module, kept apart from the others' imports

        target, mb = rc.TARGET_MS, 1024 * 1024
        self.out(f"## The retry table under churn: {rc.ROWS:,} pending rows")
        self.out()
        self.out(f"Each shape loaded anew, then {rc.BATCHES} batches (after {rc.WARM_UP} to warm up) claimed through "
                 "`RetryPoller.claim` (statement, round trip, hand-over) and settled by the outcome writer: a: one "
                 "endpoint's rows all due, its circuit open, another endpoint's 10 due rows failing again; b: the "
                 "endpoint back, its rows delivered; c: the rows in backoff; d: an ordered webhook, queues of "
                 f"{rc.RECORD_QUEUE} per record, heads due, the rest waiting; e: as b with {rc.LOCKED_ELSEWHERE:,} "
                 "rows claimed by other replicas. The depth gauge's sample against the count(*) it replaced; a "
                 f"slice of the lost wake-up sweep ({rc.SWEEP_SLICE} records); a round of pruning what the churn "
                 "delivered; HOT: the churn's updates that were HOT; size: table, TOAST and indexes.")  # fmt: skip
        self.out()
        self.out("| shape | batch | claim median / p99 (ms) | target | rows a claim | depth sample / count(*) (ms) | "
                 "sweep slice (ms) | prune round (ms, rows) | HOT | size before → after churn (MB) |")  # fmt: skip
        self.out("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for shape in rc.SHAPES:
            c = await rc.shape_cost(self.stack.dsn, shape)
            verdict = "met" if c.claim_median_ms < target and c.sample_ms < target else "missed"
            self.out(f"| {c.shape} | {c.batch} | {c.claim_median_ms:.1f} / {c.claim_p99_ms:.1f} | < {target:g} "
                     f"{verdict} | {c.rows_per_claim:.0f} | {c.sample_ms:.2f} / {c.count_ms:.0f} | {c.sweep_ms:.1f} | "
                     f"{c.prune_ms:.0f}, {c.pruned:,} | {c.hot_ratio:.0%} | {c.bytes_before / mb:,.0f} → "
                     f"{c.bytes_after / mb:,.0f} |")  # fmt: skip
        self.out()
        self.out("Fillfactor of the table, under shape b's churn:")
        self.out()
        self.out("| fillfactor | claim median / p99 (ms) | HOT | size before → after churn (MB) |")
        self.out("| --- | --- | --- | --- |")
        for fillfactor in rc.FILLFACTORS:
            c = await rc.fillfactor_cost(self.stack.dsn, fillfactor)
            self.out(f"| {fillfactor} | {c.claim_median_ms:.1f} / {c.claim_p99_ms:.1f} | {c.hot_ratio:.0%} | "
                     f"{c.bytes_before / mb:,.0f} → {c.bytes_after / mb:,.0f} |")  # fmt: skip
        self.out()
        self.out("The pending-count triggers, per statement (shape b, 100,000 rows; medians):")
        self.out()
        self.out("| statement | with the triggers (ms) | without (ms) |")
        self.out("| --- | --- | --- |")
        for t in await rc.trigger_costs(self.stack.dsn):
            self.out(f"| {t.statement} | {t.with_ms:.2f} | {t.without_ms:.2f} |")
        self.out()


async def main_async(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="webhookd-bench-") as tmp:
        async with contextlib.AsyncExitStack() as started:
            # `--only decode,filters` starts neither the broker nor Postgres: they use neither, and servers left idle
            # beside them would only share the CPU they measure.
            stack = None
            if set(args.only) - IN_PROCESS:
                stack = await started.enter_async_context(Stack.started(Path(tmp), args.profile))
            bench = Bench(stack, args)
            bench.out(f"# webhookd benchmark, {datetime.date.today().isoformat()}")
            bench.out()
            servers = "Broker: Tansu (embedded); Postgres: embedded" if stack else "No broker, no Postgres"
            bench.out(f"Machine: {_machine()}. {servers}; `make bench`.")
            bench.out()
            for section in SECTIONS:
                if section in args.only:
                    await getattr(bench, section)()
            return bench.lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--deliveries",
        type=int,
        default=None,
        help=f"deliveries per run ({DELIVERIES:,}; a backlog of {RETRY_BACKLOG:,} for the retry drain)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-events", type=int, default=300)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    parser.add_argument("--latency-rate", type=float, default=500.0, help="events a second, if throughput was skipped")
    parser.add_argument("--backlog-events", type=int, default=100_000)
    parser.add_argument("--backlog-seconds", type=float, default=45.0)
    parser.add_argument("--no-nginx", action="store_true", help="use the multi-process aiohttp receiver")
    parser.add_argument("--decode-events", type=int, default=20_000, help="records per form in a decode run")
    parser.add_argument("--filter-events", type=int, default=20_000, help="events per row in a filters run")
    parser.add_argument("--only", type=lambda v: v.split(","), default=list(SECTIONS), help=",".join(SECTIONS))
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR", help="py-spy samples of every daemon run into DIR"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    setup_logging("warning")  # the index measured in this process logs as the daemon does
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    # The daemon runs on uvloop; so does everything it is compared with, the raw ceiling included.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        lines = runner.run(main_async(args))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
