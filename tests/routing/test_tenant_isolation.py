"""Only a workspace's own webhooks ever receive its events, while subscriptions change under the daemon's feet.

Thirty workspaces each hold webhooks of every wildcard form, whose target path names their workspace
(/ws/<workspace>/<form>). Events for random workspaces carry their workspace in their id and data. Some webhooks fail
their first attempt, so deliveries also travel the durable retry path. Meanwhile rows change: a webhook's operations
flip back and forth, one webhook is soft-deleted and restored, and two move to another workspace, one with a new URL
and one keeping its URL.

What can be asserted exactly:
- a request at /ws/X/... carries an event of workspace X, for every path whose row always names workspace X
  (the moved-with-its-URL webhook changes its URL in the same UPDATE, so its path always names its workspace);
- the webhook moved while keeping its URL may carry events of either workspace, but an event produced more than
  the contract's 2 s after the move was committed comes only from the new workspace;
- retries of events whose webhook moved away are never sent, to either URL: they are dead-lettered.
Completeness keeps the test honest: every event reaches every matching webhook whose row never changed, failing ones
after their retry, and late events reach the changed webhooks as their final rows say.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from tests.support import Receiver, fetch, running, settings_for

WORKSPACES = 30
FORMS = {
    "all": ["*.*"],
    "person": ["person.*"],
    "created": ["*.created"],
    "exact": ["person.created"],
    "multi": ["company.deleted", "*.updated"],
}
FAILING_FORMS = ("all", "created")  # in every third workspace: the first attempt of each event gets a 500
EVENT_NAMES = ("person.created", "person.updated", "company.created", "company.deleted", "note.updated")
CONTRACT_SECONDS = 2.0
BATCHES, BATCH_SIZE, BATCH_SPACING = 50, 5, 0.1
PRE_MOVE_EVENTS = 3
RETRY_AFTER = 4  # seconds: long enough for the retry of a pre-move event to come due only after the move


def matches(operations: list[str], name: str) -> bool:
    obj, _, action = name.partition(".")
    return bool({name, f"*.{action}", f"{obj}.*", "*.*"} & set(operations))


def workspace_of_path(path: str) -> str:
    return path.split("/")[2]


class Webhooks:
    """The subscription rows, written through one connection so that changes commit at known moments."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self._turn = asyncio.Lock()  # several tasks change rows; one connection runs one statement at a time

    async def add(self, workspace: str, path: str, operations: list[str], url: str) -> str:
        webhook_id: uuid.UUID = await self.conn.fetchval(
            'INSERT INTO core.webhook ("workspaceId", "targetUrl", operations, secret) '
            "VALUES ($1, $2, $3, 'tenant-secret') RETURNING id",
            uuid.UUID(workspace),
            url + path,
            operations,
        )
        return str(webhook_id)

    async def update(self, webhook_id: str, sql: str, *args: Any) -> float:
        """Apply `SET <sql>` to one row; returns the moment it was committed."""
        async with self._turn:
            await self.conn.execute(
                f'UPDATE core.webhook SET {sql}, "updatedAt" = now() WHERE id = $1', uuid.UUID(webhook_id), *args
            )
            return time.monotonic()


@pytest.fixture
async def hooks(dsn: str) -> AsyncIterator[Webhooks]:
    conn = await asyncpg.connect(dsn)
    try:
        yield Webhooks(conn)
    finally:
        await conn.close()


@pytest.fixture
async def producer(kafka: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=False, linger_ms=5)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def test_events_reach_only_their_own_workspace_while_subscriptions_change(
    kafka: str, dsn: str, topic: str, receiver: Receiver, hooks: Webhooks, producer: AIOKafkaProducer
) -> None:
    rng = random.Random(20250210)
    ws = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(WORKSPACES)]
    base = f"http://127.0.0.1:{receiver.port}"
    static: dict[str, tuple[str, list[str]]] = {}  # path -> (workspace, operations), for rows that never change
    failing: set[str] = set()
    for i, workspace in enumerate(ws):
        for form, operations in FORMS.items():
            path = f"/ws/{workspace}/{form}"
            await hooks.add(workspace, path, operations, base)
            static[path] = (workspace, operations)
            if i % 3 == 0 and form in FAILING_FORMS:
                failing.add(path)
    # The changing rows: moved with a new URL (1 -> 2), moved keeping its URL (3 -> 4), flipped (5), deleted (6).
    moved_url_old, moved_url_new = f"/ws/{ws[1]}/moved-url", f"/ws/{ws[2]}/moved-url"
    moved_keep = f"/ws/{ws[3]}/moved-keep"
    flip, deleted = f"/ws/{ws[5]}/flip", f"/ws/{ws[6]}/deleted"
    moved_url_id = await hooks.add(ws[1], moved_url_old, ["*.*"], base)
    moved_keep_id = await hooks.add(ws[3], moved_keep, ["*.*"], base)
    flip_id = await hooks.add(ws[5], flip, ["*.*"], base)
    deleted_id = await hooks.add(ws[6], deleted, ["*.*"], base)

    moved_paths = (moved_url_old, moved_url_new, moved_keep)
    pre_move = {f"{ws[1]}/pre{n}" for n in range(PRE_MOVE_EVENTS)} | {f"{ws[3]}/pre{n}" for n in range(PRE_MOVE_EVENTS)}
    seen_attempts: collections.Counter[tuple[str, str]] = collections.Counter()

    async def behaviour(request: web.Request, _body: bytes) -> web.StreamResponse:
        event_id = request.headers["X-Twenty-Webhook-Event-Id"]
        seen_attempts[event_id, request.path] += 1
        if event_id in pre_move and request.path in moved_paths:
            # Asks for a retry that comes due only after the move, so the retry meets the moved row.
            return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER)})
        if request.path in failing and seen_attempts[event_id, request.path] == 1:
            return web.Response(status=500, text="first attempt fails")
        return web.Response(text="ok")

    for path in (*failing, moved_url_old, moved_keep):
        receiver.behaviours[path] = behaviour

    sent_at: dict[str, float] = {}
    events: dict[str, tuple[str, str]] = {}  # event id -> (workspace, name)

    async def send(batch: list[tuple[str, str, str]]) -> None:
        futures = []
        for event_id, workspace, name in batch:
            # Some events spell their workspace in capitals: the same tenant, whatever the spelling.
            spelled = workspace.upper() if rng.random() < 0.15 else workspace
            record = {"event": name, "workspaceId": spelled, "data": {"ws": workspace}, "id": event_id}
            sent_at[event_id] = time.monotonic()
            events[event_id] = (workspace, name)
            futures.append(await producer.send(topic, orjson.dumps(record)))
        await asyncio.gather(*futures)

    settings = settings_for(kafka, dsn, topic, delivery={"retry_schedule": ["200ms", "200ms", "200ms"]})
    async with running(settings):
        await send([(e, e.split("/")[0], "person.updated") for e in sorted(pre_move)])
        await receiver.wait_for(
            lambda: all(seen_attempts[e, p] for e in pre_move for p in (moved_url_old, moved_keep) if e[:36] in p),
            20,
            "the pre-move events' first attempts",
        )
        await hooks.update(moved_url_id, '"workspaceId" = $2, "targetUrl" = $3', uuid.UUID(ws[2]), base + moved_url_new)
        moved_keep_at = await hooks.update(moved_keep_id, '"workspaceId" = $2', uuid.UUID(ws[4]))

        async def flow() -> None:
            for b in range(BATCHES):
                batch = []
                for n in range(BATCH_SIZE):
                    workspace = rng.choice(ws)
                    batch.append((f"{workspace}/f{b}-{n}", workspace, rng.choice(EVENT_NAMES)))
                await send(batch)
                await asyncio.sleep(BATCH_SPACING)

        async def flipper() -> list[str]:
            operations = ["*.*"]
            for _ in range(25):
                operations = ["company.*"] if operations == ["*.*"] else ["*.*"]
                await hooks.update(flip_id, "operations = $2", operations)
                await asyncio.sleep(0.15)
            return operations

        async def delete_and_restore() -> tuple[float, float]:
            await asyncio.sleep(0.5)
            deleted_at = await hooks.update(deleted_id, '"deletedAt" = now()')
            await asyncio.sleep(2.5)
            restored_at = await hooks.update(deleted_id, '"deletedAt" = NULL')
            return deleted_at, restored_at

        _, flip_ops, (deleted_at, restored_at) = await asyncio.gather(flow(), flipper(), delete_and_restore())
        await asyncio.sleep(CONTRACT_SECONDS + 0.2)
        late_from = time.monotonic()
        await send([(f"{w}/late-{name}", w, name) for w in ws[:8] for name in EVENT_NAMES])

        expected: dict[tuple[str, str], int] = {}
        for event_id, (workspace, name) in events.items():
            if event_id in pre_move:
                continue
            for path, (owner, operations) in static.items():
                if owner == workspace and matches(operations, name):
                    expected[event_id, path] = 2 if path in failing else 1
            if sent_at[event_id] >= late_from:
                for path, owner, operations in (
                    (moved_url_new, ws[2], ["*.*"]),
                    (moved_keep, ws[4], ["*.*"]),
                    (flip, ws[5], flip_ops),
                    (deleted, ws[6], ["*.*"]),
                ):
                    if owner == workspace and matches(operations, name):
                        expected[event_id, path] = 1

        def complete() -> bool:
            got = collections.Counter(receiver.pairs())
            return all(got[pair] >= n for pair, n in expected.items())

        await receiver.wait_for(complete, 30, "every expected delivery")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            rows = await fetch(
                dsn,
                "SELECT event_id, status, attempts, last_error FROM webhookd.deliveries "
                "WHERE event_id = ANY($1) AND webhook_id = ANY($2::uuid[])",
                sorted(pre_move),
                [moved_url_id, moved_keep_id],
            )
            if len(rows) == len(pre_move) and all(r["status"] == "dead" for r in rows):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # room for a wrong late request to show up before the verdict

    requests = list(receiver.requests)
    print(
        f"\n{len(events)} events, {len(requests)} requests, {len(expected)} expected pairs, "
        f"{sum(1 for r in requests if r.path in failing)} on failing-first webhooks"
    )
    strays = []
    for r in requests:
        event_ws = r.event_id.split("/")[0]
        assert r.json()["data"]["ws"] == event_ws, "the body and the id name the same workspace"
        if r.path == moved_keep:
            produced_after_settle = sent_at[r.event_id] > moved_keep_at + CONTRACT_SECONDS
            allowed = {ws[4]} if produced_after_settle else {ws[3], ws[4]}
        else:
            allowed = {workspace_of_path(r.path)}
        if event_ws not in allowed:
            strays.append((r.event_id, r.path))
    assert strays == [], f"events delivered to another workspace's webhook: {strays[:10]}"

    # Retries of events whose webhook moved away were never sent, to the old URL or the new one: dead letters.
    for event_id in pre_move:
        attempts = [r.path for r in requests if r.event_id == event_id and r.path in moved_paths]
        assert len(attempts) == 1, (event_id, attempts)
    assert all(r.path != moved_url_new or r.event_id.split("/")[0] == ws[2] for r in requests)
    print(f"pre-move rows: {[(r['status'], r['attempts'], r['last_error']) for r in rows]}")
    assert sorted((r["event_id"], r["status"], r["attempts"]) for r in rows) == sorted(
        (event_id, "dead", 1) for event_id in pre_move
    )

    # The soft-deleted webhook got nothing once its deletion had taken effect, until it was restored.
    during = [r.event_id for r in requests if r.path == deleted and deleted_at + CONTRACT_SECONDS < r.at < restored_at]
    assert during == [], during
