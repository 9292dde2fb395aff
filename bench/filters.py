"""What per-webhook filters add to matching an event: pure CPU, in this process, no broker.

One workspace holds 10 webhooks, of which an `opportunity.updated` event matches 5 (by exact name and by each kind of
wildcard). Each event is an update of a Twenty-like opportunity (about 1 KB of JSON: amount, close date, point of
contact, company, creator) whose `updatedFields` are `stage` and `updatedAt`. Per event the loop does what the
consume loop does between reading an event and writing bodies, through the same `Router`: the index's match, a
`LazyRecord` of the event's data, and for every matched webhook its filter, if it has one. Two rows:

- no filters: the match and the pass-through of webhooks without a filter;
- 3 filters: every matched webhook has `updated_fields` and two predicates, which all pass, so that every part is
  evaluated and the record is parsed (once per event, shared by the 5 webhooks).

Runs take turns (none, 3 filters, none, ...) and the medians are reported, because a shared machine is noisy; CPU is
`time.process_time`, the process's own.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final, cast

import asyncpg
import orjson

from bench.throughput import Run
from webhookd.durable.attempts import AttemptLog
from webhookd.model import Event, Webhook
from webhookd.routing.filter_parsing import build_filter
from webhookd.routing.filters import LazyRecord
from webhookd.routing.router import Router
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.routing.webhook_options import NO_OPTIONS, WebhookOptions
from webhookd.runtime.metrics import Metrics

WORKSPACE: Final = "5a1f3c2e-7b4d-4e8f-9a6b-0c1d2e3f4a5b"
EVENT_NAME: Final = "opportunity.updated"
UPDATED_FIELDS: Final = ("stage", "updatedAt")
FILTER_FIELDS: Final = ("stage", "amount")
PREDICATES: Final = ("stage in [WON, LOST]", "amount.currencyCode = USD")
# The 5 webhooks of the workspace the event goes to, then the 5 it does not.
MATCHING: Final = (
    ("opportunity.updated",),
    ("*.updated",),
    ("opportunity.*",),
    ("*.*",),
    ("company.created", "opportunity.updated"),
)
NOT_MATCHING: Final = (
    ("person.updated",),
    ("company.*",),
    ("opportunity.created",),
    ("*.deleted",),
    ("person.created", "opportunity.destroyed"),
)
_STAGES: Final = ("WON", "LOST")
_NAMES: Final = (("Ada", "Lovelace"), ("Grace", "Hopper"), ("Alan", "Turing"), ("Edsger", "Dijkstra"))


@dataclass(frozen=True)
class Row:
    """One line of the table: its label, median events a second and CPU per event, and its CPU against no filter."""

    label: str
    rate: float
    cpu_us: float
    ratio: float


@dataclass(frozen=True)
class FilterCost:
    """The measured rows, no filters first, and what they were measured on."""

    rows: list[Row]
    events: int
    repeats: int
    webhooks: int
    matched: int
    record_bytes: float


def _uuid(i: int, kind: int) -> str:
    return str(uuid.UUID(int=(kind << 96) | (i * 2_654_435_761 % (1 << 64)) | (4 << 76) | (1 << 63)))


def _iso(i: int, second: int) -> str:
    clock = f"{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}.{i % 1000:03d}"
    return f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{clock}Z"


def opportunity(i: int) -> dict[str, Any]:
    """Opportunity `i` just after its stage changed, as Twenty's API writes it in an event's `data`."""
    first, last = _NAMES[i % len(_NAMES)]
    contact, company = _uuid(i % 300, 2), _uuid(i % 120, 3)
    return {
        "id": _uuid(i, 1),
        "name": f"{first} {last} expansion, seat pack {i}",
        "stage": _STAGES[i % len(_STAGES)],
        "amount": {"amountMicros": 12_500_000_000 + i * 1_000_000, "currencyCode": "USD"},
        "closeDate": _iso(i + 90, i * 13),
        "pointOfContactId": contact,
        "companyId": company,
        "position": float(i),
        "createdAt": _iso(i, i * 37),
        "updatedAt": _iso(i + 1, i * 41),
        "deletedAt": None,
        "createdBy": {
            "source": "MANUAL",
            "workspaceMemberId": _uuid(i % 20, 4),
            "name": f"{first} {last}",
            "context": {},
        },
        "pointOfContact": {
            "id": contact,
            "name": {"firstName": first, "lastName": last},
            "emails": {"primaryEmail": f"{first.lower()}.{last.lower()}@example.com", "additionalEmails": None},
            "jobTitle": "Head of Procurement",
            "city": "Lisbon",
        },
        "company": {
            "id": company,
            "name": f"{last} Industries",
            "domainName": {"primaryLinkUrl": f"https://{last.lower()}.example.com", "primaryLinkLabel": ""},
            "employees": 250 + i % 1000,
            "idealCustomerProfile": i % 3 == 0,
        },
    }


def events(count: int) -> list[Event]:
    return [
        Event(
            id=f"twenty.events:0:{i}",
            name=EVENT_NAME,
            workspace_id=WORKSPACE,
            timestamp=_iso(i + 1, i * 41),
            data=orjson.dumps(opportunity(i)),
            kafka_timestamp_ms=None,
            updated_fields=UPDATED_FIELDS,
        )
        for i in range(count)
    ]


def router(options: WebhookOptions) -> Router:
    """The consume loop's router over the workspace's 10 webhooks, the 5 the event goes to carrying `options`."""
    index = SubscriptionIndex()
    for n, operations in enumerate(MATCHING + NOT_MATCHING):
        mine = options if operations in MATCHING else NO_OPTIONS
        index.put(Webhook(f"wh-{n}", WORKSPACE, f"https://hooks.example.com/{n}", operations, b"secret", options=mine))
    # No pair is filtered out in these runs (checked below), so the attempt log is never written to.
    attempts = AttemptLog(cast(asyncpg.Pool, None), retention_seconds=0)
    return Router(index, attempts, Metrics())


def _run(label: str, batch: list[Event], route: Router) -> Run:
    """One pass over the events as the consume loop routes them: match, the shared record, each webhook's filter."""
    delivered = 0
    gc.collect()  # garbage left by the previous run is not this one's to collect
    started, cpu = time.perf_counter(), time.process_time()
    for event in batch:
        webhooks, _ = route.route(event, "bench:0:0")
        delivered += len(webhooks)
    cpu, seconds = time.process_time() - cpu, time.perf_counter() - started
    # Keeps the run honest: every matched webhook must have got past its filter, every predicate evaluated.
    if delivered != len(MATCHING) * len(batch):
        raise RuntimeError(f"{label}: {delivered} deliveries for {len(batch)} events, not {len(MATCHING)} each")
    return Run.of(len(batch), seconds, cpu)


def filter_cost(count: int, repeats: int) -> FilterCost:
    """Median events a second and CPU per event, without filters and with 3-part filters, over alternated runs."""
    batch = events(count)
    with_filters = build_filter(FILTER_FIELDS, PREDICATES)
    # A filter that rejects must reject: the bench measures filters that work, not ones that pass everything.
    other_stage = build_filter(FILTER_FIELDS, ["stage = OPEN"])
    if other_stage.rejects(*_sample(batch[0])) != "record":
        raise RuntimeError("a filter on another stage did not reject the event")
    forms: list[tuple[str, Router]] = [
        ("no filters", router(NO_OPTIONS)),
        (
            f"{1 + len(PREDICATES)} filters: updated_fields and {len(PREDICATES)} predicates",
            router(WebhookOptions(filter=with_filters)),
        ),
    ]
    _run("warm-up", batch[: count // 10 or 1], forms[1][1])
    runs: list[list[Run]] = [[] for _ in forms]
    for _ in range(repeats):
        for i, (label, route) in enumerate(forms):
            runs[i].append(_run(label, batch, route))
    print(f"  .. CPU µs per event {[[round(r.cpu_us, 2) for r in rs] for rs in runs]}", file=sys.stderr, flush=True)
    medians = [Run(statistics.median(r.rate for r in rs), statistics.median(r.cpu_us for r in rs)) for rs in runs]
    base = medians[0].cpu_us
    rows = [Row(label, run.rate, run.cpu_us, run.cpu_us / base) for (label, _), run in zip(forms, medians, strict=True)]
    record_bytes = statistics.mean(len(event.data) for event in batch)
    return FilterCost(rows, count, repeats, len(MATCHING + NOT_MATCHING), len(MATCHING), record_bytes)


def _sample(event: Event) -> tuple[str, tuple[str, ...] | None, LazyRecord]:
    return event.object_and_action[1], event.updated_fields, LazyRecord(event.data)


if __name__ == "__main__":
    cost = filter_cost(20_000, 5)
    for row in cost.rows:
        print(f"{row.label}: {row.cpu_us:.2f} µs per event, {row.rate:,.0f} events/s, ratio {row.ratio:.2f}")
