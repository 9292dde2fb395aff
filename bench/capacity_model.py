"""The attempt log's capacity model: the traffic whose costs `bench.attempt_capacity` measures, and what those
costs say a deployment needs.

The traffic is deliveries as the daemon makes them from native events: UUID event ids, 1,000 webhooks of Zipf-like
popularity, topic:partition:offset sources, ~1 KB bodies, receivers' answers and capped error excerpts. The rest is
arithmetic on measured costs, no I/O. A deployment is a rate of deliveries a second, a mode of
`endpoints.attempt_log`, and a failure assumption: a share of deliveries that fail once and succeed at the second
attempt, and a share that fail the whole retry schedule and are dead-lettered; the rest succeed at the first attempt.
With 'aggregate', first-try successes cost rows of `webhookd.attempt_counts`, one per webhook, minute and process
that saw one: their number follows the webhooks that are busy and the processes, not the rate.

Storage is what is kept at the most: the attempt log's partitions for the retention plus the day that whole-day
partitions keep, and the retry table's rows for the retention (delivered rows are pruned after it; dead letters are
not, and keep growing past it).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import orjson

from webhookd.model import ATTEMPT_LOG_FORMS, AttemptLogForm, AttemptResult, Delivery, Webhook

DAY = 86_400
GB = 1e9
MB = 1e6
RATES = (500, 5_000)
STORAGE_TARGET_GB = 100  # what 'aggregate' should stay under at 5,000 deliveries a second
WEBHOOKS = 1_000

# The traffic: what the deliveries, answers and errors measured look like.
_NGINX_503 = (
    "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center><h1>503 "
    "Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>"
)
_FAILURES = (
    AttemptResult("5xx", status=503, error=_NGINX_503, duration=0.004),
    AttemptResult("5xx", status=502, error=_NGINX_503.replace("503 Service Temporarily", "502 Bad"), duration=0.03),
    AttemptResult("timeout", error="no answer in time", duration=10.0),
    AttemptResult("connection_error", error="Cannot connect to host hooks.example.com:443 [Connection refused]"),
)
_EVENTS = ("person.updated", "company.updated", "opportunity.updated", "person.created", "task.updated", "note.created")


class Traffic:
    """Deliveries as the daemon makes them from native events, to 1,000 webhooks of Zipf-like popularity."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        # Two webhooks a workspace: ids[:WEBHOOKS] are the webhooks', the rest the workspaces'.
        ids = [str(uuid.UUID(int=self.rng.getrandbits(128), version=4)) for _ in range(WEBHOOKS * 3 // 2)]
        self.webhooks = [
            Webhook(ids[i], ids[WEBHOOKS + i // 2], f"https://hooks-{i}.example.com/in", ("*.*",), b"s")
            for i in range(WEBHOOKS)
        ]
        # The i-th busiest webhook gets 1/i of the busiest one's deliveries.
        weights = [1 / (i + 1) for i in range(WEBHOOKS)]
        self.cumulative = [sum(weights[: i + 1]) for i in range(WEBHOOKS)]
        self.by_id = {w.id: w for w in self.webhooks}
        self.offset = 48_000_000

    def deliveries(self, n: int, body: bool) -> list[Delivery]:
        rng, made = self.rng, []
        for webhook in rng.choices(self.webhooks, cum_weights=self.cumulative, k=n):
            self.offset += 1
            event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            topic = "crm.events.backfill" if self.offset % 50 == 0 else "crm.events"
            source = f"{topic}:{self.offset % 12}:{self.offset // 12}"
            data = _body(rng, event_id, webhook.workspace_id) if body else b""
            name = _EVENTS[self.offset % len(_EVENTS)]
            made.append(Delivery(event_id, name, webhook.workspace_id, webhook, data, 1_765_000_000_000, source))
        return made

    def success(self) -> AttemptResult:
        status = 200 if self.rng.random() < 0.9 else self.rng.choice((201, 202, 204))
        return AttemptResult("2xx", status=status, duration=min(self.rng.lognormvariate(-2.1, 0.8), 10.0))

    def failure(self) -> AttemptResult:
        return self.rng.choice(_FAILURES)


def _body(rng: random.Random, event_id: str, workspace: str) -> bytes:
    """A Twenty `person.updated` body of about 1 KB."""
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2)]
    record = {
        "id": ids[0], "name": {"firstName": "Ada", "lastName": f"Lovelace-{rng.randrange(10**6)}"},
        "emails": {"primaryEmail": f"ada{rng.randrange(10**6)}@example.com", "additionalEmails": []},
        "phones": {"primaryPhoneNumber": f"{rng.randrange(10**9):09d}", "primaryPhoneCountryCode": "+44"},
        "jobTitle": "Head of Analytical Engines", "city": "London", "position": rng.random(), "companyId": ids[1],
        "avatarUrl": f"https://cdn.example.com/avatars/{rng.getrandbits(64):016x}.png",
        "linkedinLink": {"primaryLinkUrl": f"https://www.linkedin.com/in/ada-{rng.randrange(10**6)}"},
        "address": {"addressStreet1": "12 St James's Square", "addressCity": "London", "addressPostcode": "SW1Y 4LB"},
        "createdAt": "2026-11-30T09:12:44.123Z", "updatedAt": "2026-12-01T14:03:27.456Z", "deletedAt": None,
        "createdBy": {"source": "MANUAL", "workspaceMemberId": workspace, "name": "Charles Babbage"},
    }  # fmt: skip
    doc = {"event": "person.updated", "eventDate": "2026-12-01T14:03:27.456Z", "workspaceId": workspace}
    return orjson.dumps({**doc, "eventId": event_id, "record": record, "updatedFields": ["jobTitle", "city"]})


@dataclass(frozen=True)
class Cost:
    """What one way of logging cost, measured as deltas over `deliveries` deliveries of `attempts` attempts.

    "log" is the attempt log's tables (webhookd.attempt_log, first_tries, attempt_counts, every partition), "table"
    the retry table's (webhookd.deliveries and what its triggers write); bytes include indexes and TOAST.
    """

    kind: str  # full, compact, aggregate (first tries), retried or dead
    way: str
    deliveries: int
    attempts: int
    batch: int  # rows a COPY (first tries) or a statement (the retry table) carries
    rows: int  # tuples inserted, updated or deleted (pg_stat_user_tables)
    log_bytes: int
    table_bytes: int  # as written, dead versions included
    table_kept: int  # after VACUUM FULL: the live versions only
    log_wal: int
    table_wal: int
    vacuum_wal: int  # of one VACUUM of the tables written, afterwards
    fpi: int  # full-page images among the writes' WAL records
    log_seconds: float
    table_seconds: float
    count_rows: int = 0  # rows of webhookd.attempt_counts ('aggregate')

    def per(self, value: float) -> float:
        """`value` per delivery."""
        return value / self.deliveries

    @property
    def wal(self) -> int:
        return self.log_wal + self.table_wal + self.vacuum_wal

    @property
    def kept(self) -> int:
        return self.log_bytes + self.table_kept


@dataclass(frozen=True)
class Retention:
    """One day's partition of `rows` rows dropped, against the same rows deleted as the previous release did."""

    rows: int
    drop_ms: float
    drop_wal: int
    dropped: int  # partitions the keeper dropped
    delete_ms: float
    delete_wal: int
    delete_statements: int
    dead_rows: int  # n_dead_tup of the table once the deletes are done
    vacuum_ms: float  # the VACUUM that the dead rows then need
    vacuum_wal: int


@dataclass(frozen=True)
class Capacity:
    """Every measurement of the section, and what was measured on."""

    costs: list[Cost]
    retention: Retention
    migrations: list[str]
    server: str

    def by_kind(self) -> dict[str, Cost]:
        """The costs the sizing uses: of each kind, the run with rows batched as a busy daemon batches them."""
        return {c.kind: c for c in self.costs if c.batch > 1}


@dataclass(frozen=True)
class Assumptions:
    """What the sizing assumes beyond the measurements; printed with it."""

    retried: float = 0.01  # deliveries that fail once, then succeed at the second attempt
    dead: float = 0.001  # deliveries that fail all 8 attempts of the default schedule
    busy_webhooks: int = 1_000  # webhooks with a first-try success in any minute ('aggregate' rows)
    processes: int = 2  # daemon processes (replicas x workers), each writing its own counts
    retention_days: int = 14
    # The criterion for postgres.attempts_dsn: attempt-log WAL past this many bytes a second (a judgement).
    log_wal_budget: float = 1 * MB


@dataclass(frozen=True)
class Sizing:
    """One deployment's load on Postgres: row writes and WAL a second, and the storage kept."""

    rate: float
    mode: AttemptLogForm
    writes: float  # row writes a second
    log_wal: float  # bytes of WAL a second, the attempt log's
    wal: float  # bytes of WAL a second, all of it (vacuum included)
    busy: float  # seconds of one writer's Postgres time a second
    log_gb: float
    table_gb: float

    @property
    def gb(self) -> float:
        return self.log_gb + self.table_gb


def size(costs: Mapping[str, Cost], rate: float, mode: AttemptLogForm, a: Assumptions) -> Sizing:
    """The load of `rate` deliveries a second in `mode`, from the costs measured for 'full', 'compact',
    'aggregate', 'retried' and 'dead'."""
    first = costs[mode]
    ok = rate * (1 - a.retried - a.dead)
    if mode == "aggregate":
        # A row per webhook and minute in each process that saw it: the busy webhooks, or fewer if there are fewer
        # successes in a minute than that.
        count_rows = a.processes * min(a.busy_webhooks, ok * 60 / a.processes) / 60
        share = count_rows / first.count_rows if first.count_rows else 0.0
    else:
        share = ok / first.deliveries
    # Every way as a multiple of its measurement: (the measured way, how many of its runs a second).
    parts = [(first, share), (costs["retried"], rate * a.retried / costs["retried"].deliveries)]
    parts.append((costs["dead"], rate * a.dead / costs["dead"].deliveries))
    log_bytes = sum(c.log_bytes * n for c, n in parts)
    table_bytes = sum(c.table_kept * n for c, n in parts)
    return Sizing(
        rate=rate,
        mode=mode,
        writes=sum(c.rows * n for c, n in parts),
        log_wal=sum(c.log_wal * n for c, n in parts),
        wal=sum(c.wal * n for c, n in parts),
        busy=sum((c.log_seconds + c.table_seconds) * n for c, n in parts),
        log_gb=log_bytes * DAY * (a.retention_days + 1) / GB,
        table_gb=table_bytes * DAY * a.retention_days / GB,
    )


def rate_at(
    costs: Mapping[str, Cost], mode: AttemptLogForm, a: Assumptions, measure: Callable[[Sizing], float], limit: float
) -> float:
    """The rate at which `measure` of a deployment in `mode` reaches `limit`. Every cost grows linearly with the rate
    past a few deliveries a second ('aggregate' counts are flat by then), so two points give the line."""
    low, high = measure(size(costs, 10_000, mode, a)), measure(size(costs, 20_000, mode, a))
    slope = (high - low) / 10_000
    return (limit - (low - slope * 10_000)) / slope


def failures_at(costs: Mapping[str, Cost], rate: float, mode: AttemptLogForm, a: Assumptions, gb: float) -> float:
    """How many times the assumed failure shares (retried and dead alike) bring the total storage to `gb`."""
    none = size(costs, rate, mode, replace(a, retried=0.0, dead=0.0)).gb
    return (gb - none) / (size(costs, rate, mode, a).gb - none)


def cost_lines(costs: list[Cost]) -> list[str]:
    """Table (a): each way of logging, per delivery."""
    lines = [
        "| way | deliveries | attempts | rows a statement | row writes / delivery | bytes / delivery, attempt log "
        "| bytes / delivery, retry table as written / kept | WAL / delivery, writes (of which attempt log) | WAL / "
        "delivery, VACUUM after | full-page images / delivery | Postgres time / delivery (µs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in costs:
        lines.append(
            f"| {c.way}{f' ({c.count_rows:,} rows of counts)' if c.count_rows else ''} | {c.deliveries:,} | "
            f"{c.attempts:,} | {c.batch:,} | {c.per(c.rows):.3f} | "
            f"{c.per(c.log_bytes):,.1f} | {c.per(c.table_bytes):,.0f} / {c.per(c.table_kept):,.0f} | "
            f"{c.per(c.log_wal + c.table_wal):,.0f} ({c.per(c.log_wal):,.0f}) | {c.per(c.vacuum_wal):,.0f} | "
            f"{c.per(c.fpi):.3f} | {c.per(c.log_seconds + c.table_seconds) * 1e6:,.1f} |"
        )
    return lines


def retention_lines(r: Retention) -> list[str]:
    """Table (b): a day's partition dropped against its rows deleted."""
    mib = 2**20
    return [
        f"| retention of {r.rows:,} rows | time (ms) | WAL (MiB) | dead rows left | then VACUUM (ms) | VACUUM WAL "
        "(MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| `DROP TABLE` of the day's partition (keep_attempt_partitions, {r.dropped} dropped) | {r.drop_ms:,.1f} | "
        f"{r.drop_wal / mib:,.2f} | 0 | none needed | 0 |",
        f"| `DELETE` by 10,000 (previous release, {r.delete_statements} statements) | {r.delete_ms:,.0f} | "
        f"{r.delete_wal / mib:,.1f} | {r.dead_rows:,} | {r.vacuum_ms:,.0f} | {r.vacuum_wal / mib:,.1f} |",
    ]


def sizing_lines(costs: Mapping[str, Cost], a: Assumptions) -> list[str]:
    """Table (c), then the rates at which the attempt log's WAL and storage reach their limits in each mode, and the
    failure shares under which 'aggregate' keeps everything under the storage target."""
    lines = [
        "| deliveries / s | mode | row writes / s | WAL MB / s, attempt log / all | writer busy (s / s) | storage "
        f"GB, attempt log ({a.retention_days} + 1 days) / retry table ({a.retention_days} days) | total GB "
        f"| < {STORAGE_TARGET_GB} GB, attempt log / total |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rate in RATES:
        for mode in ATTEMPT_LOG_FORMS:
            s = size(costs, rate, mode, a)
            lines.append(
                f"| {rate:,} | {mode} | {s.writes:,.0f} | {s.log_wal / MB:.2f} / {s.wal / MB:.2f} | {s.busy:.3f} | "
                f"{s.log_gb:,.1f} / {s.table_gb:,.1f} | {s.gb:,.1f} | {_yes(s.log_gb)} / {_yes(s.gb)} |"
            )
    budget, top = a.log_wal_budget, max(RATES)
    wal = ", ".join(f"{m} {rate_at(costs, m, a, lambda s: s.log_wal, budget):,.0f}" for m in ATTEMPT_LOG_FORMS)
    gb = ", ".join(f"{m} {rate_at(costs, m, a, lambda s: s.log_gb, STORAGE_TARGET_GB):,.0f}" for m in ATTEMPT_LOG_FORMS)
    k = failures_at(costs, top, "aggregate", a, STORAGE_TARGET_GB)
    return [
        *lines,
        "",
        f"Deliveries a second at which the attempt log's own WAL reaches {budget / MB:g} MB/s: {wal}; at which its "
        f"storage reaches {STORAGE_TARGET_GB} GB: {gb}. At {top:,}/s, 'aggregate' keeps everything (attempt log and "
        f"retry table) under {STORAGE_TARGET_GB} GB while at most {a.retried * k:.2%} of deliveries are retried and "
        f"{a.dead * k:.3%} dead-lettered.",
    ]


def _yes(gb: float) -> str:
    return "yes" if gb < STORAGE_TARGET_GB else "no"


def assumption_line(a: Assumptions) -> str:
    return (
        f"Assumed: {a.retried:.1%} of deliveries fail once and succeed at the second attempt, {a.dead:.2%} fail all "
        f"8 attempts (dead letters, not pruned: their share keeps growing past {a.retention_days} days); the rest "
        f"succeed at once. 'aggregate' writes a row per webhook, minute and process: {a.busy_webhooks:,} busy "
        f"webhooks, {a.processes} processes. Storage: {a.retention_days} days' retention, plus the day whole-day "
        f"partitions keep for the attempt log; delivered rows pruned after the retention."
    )


def section_lines(capacity: Capacity, a: Assumptions) -> list[str]:
    """The `attempt_log` section of `make bench`: what was measured and how, then tables (a), (b) and (c)."""
    costs = capacity.by_kind()
    return [
        "## The attempt log and the retry table in Postgres: cost per delivery, retention, sizing",
        "",
        f"On a Postgres of the section's own ({capacity.server}; autovacuum off and checkpoints only when asked, so "
        f"that nothing but the writes moves the figures), migrated with {', '.join(capacity.migrations)}. One writer; "
        "every way starts from empty tables and a CHECKPOINT. First tries: `AttemptLog.add` and `flush`, 5,000 a "
        "flush, each a second later on the log's clock ('aggregate': a million successes in 200 s, 1,000 webhooks); "
        "retried deliveries and dead letters: the retry table's own statements (insert, claim, settle) and the "
        "attempt log beside them; dead letters' rounds 3 to 8, hours apart in the default schedule, each after a "
        "CHECKPOINT. Bytes: pg_total_relation_size of every table (indexes and TOAST included) after the writes; the "
        "retry table also after VACUUM FULL (kept: its live versions). WAL: the insert position's move around each "
        "write; VACUUM: that of a VACUUM ANALYZE of the retry table every 10,000 rows settled (in autovacuum's stead) "
        "and of one of every table written, afterwards. Row writes: pg_stat_user_tables; full-page images: the "
        "writers' own WAL statistics. Time: wall time of the writes (COPY, statements) from this process.",
        "",
        "### (a) Per delivery, each way of logging",
        "",
        *cost_lines(capacity.costs),
        "",
        "### (b) Retention: a day's partition dropped against its rows deleted",
        "",
        *retention_lines(capacity.retention),
        "",
        f"### (c) Sizing: {', '.join(f'{r:,}' for r in RATES)} deliveries a second",
        "",
        assumption_line(a),
        "",
        *sizing_lines(costs, a),
        "",
    ]
