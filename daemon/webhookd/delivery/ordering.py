"""Per-record order, for the webhooks that ask for it (`webhooks set ID --ordered`).

The deliveries of one record (workspace, object, record id) to one ordered webhook leave one after the other, in
the order their events were read from Kafka. In this process a record's deliveries form a line: each waits for the
one before it to settle. A delivery that settles without reaching the receiver (a failure waiting for its retry, or a
deferral) sends every later one of its record to the retry table behind it, where the retry path claims only the
earliest pending row of a record (`retries`). So the hold lives in Postgres and outlasts a restart or a rebalance:
the first delivery of a line asks Postgres (in batches) whether its record still has a pending row, and if so joins
the queue there instead of being sent. Other records, other webhooks and unordered webhooks never wait.

In the retry table "earlier" is the event's offset (`order_pos`), not the order rows were written in: a record read
again after a crash may write an earlier delivery after later ones, and must still go first. Rows waiting behind an
earlier one are due at 'infinity' until it settles, so that claims never scan them (`outcomes`, `retries`).

A line is held in memory (its deliveries count in the consumer's pending budget): a record updated in a burst,
sent to an ordered endpoint that answers slowly, takes as much of that budget as its line is long.

Kafka orders the records of one partition only: producers key a record's events by its id (Debezium does, by
primary key), so that they share a partition.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from webhookd.durable.transient import TRANSIENT
from webhookd.model import Delivery
from webhookd.routing.filters import LazyRecord

log = structlog.get_logger("webhookd.delivery.ordering")

_PENDING = """
SELECT k.webhook_id::text AS webhook_id, k.order_key FROM unnest($1::uuid[], $2::text[]) AS k (webhook_id, order_key)
WHERE EXISTS (
    SELECT 1 FROM webhookd.deliveries d
    WHERE d.webhook_id = k.webhook_id AND d.order_key = k.order_key AND d.status = 'pending'
)
"""
_BATCH_LIMIT = 1000

_Key = tuple[str, str]  # webhook id, order key


def order_key(obj: str, record: LazyRecord) -> str | None:
    """The record an event of `obj` is about ("<object>:<data.id>"), or None when it has no id to order by."""
    value = record.value
    record_id = value.get("id") if isinstance(value, dict) else None
    if isinstance(record_id, str) and record_id:
        return f"{obj}:{record_id}"
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        return f"{obj}:{record_id}"
    return None


class PendingCheck:
    """Asks Postgres whether a record has a delivery pending for a webhook; the questions of many deliveries go
    in one query."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._asked: dict[_Key, asyncio.Future[bool]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name="order-check")
        return self._task

    async def pending(self, webhook_id: str, key: str) -> bool:
        asked = self._asked.get((webhook_id, key))
        if asked is None:
            asked = asyncio.get_running_loop().create_future()
            self._asked[(webhook_id, key)] = asked
            self._wake.set()
        # Shielded: one caller's cancellation must not cancel the answer another caller waits for.
        return await asyncio.shield(asked)

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._asked:
                    batch = dict(list(self._asked.items())[:_BATCH_LIMIT])
                    pending = await self._query(list(batch))
                    for key, answer in batch.items():
                        del self._asked[key]
                        if not answer.done():
                            answer.set_result(key in pending)
        except BaseException as exc:
            # Whoever waits must learn that no answer will come, rather than wait forever.
            failure = exc if isinstance(exc, Exception) else RuntimeError("the order check stopped")
            for answer in self._asked.values():
                if not answer.done():
                    answer.set_exception(failure)
                    answer.exception()  # retrieved: its caller may be gone
            raise

    async def _query(self, keys: list[_Key]) -> set[_Key]:
        backoff = 0.2
        while True:
            try:
                rows = await self._pool.fetch(_PENDING, [k[0] for k in keys], [k[1] for k in keys])
                return {(r["webhook_id"], r["order_key"]) for r in rows}
            except TRANSIENT as exc:
                # Until Postgres answers, these deliveries wait (and their records stay uncommitted), as writes do.
                log.warning("order_check_retrying", error=str(exc), keys=len(keys), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


class RecordLines:
    """The deliveries of each (webhook, record) under way in this process, each behind the one before it.

    `join` puts a delivery at the end of its record's line and returns the settling of the one ahead (None: it is
    first); `leave` settles it, holding back the ones behind when it ended waiting in the retry table: they must
    wait there too.
    """

    def __init__(self) -> None:
        self._tails: dict[_Key, asyncio.Future[bool]] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def join(self, delivery: Delivery) -> tuple[asyncio.Future[bool] | None, asyncio.Future[bool]]:
        assert delivery.order_key is not None
        key = (delivery.webhook.id, delivery.order_key)
        ahead = self._tails.get(key)
        mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        return ahead, mine

    def leave(self, delivery: Delivery, mine: asyncio.Future[bool], *, holds_back: bool) -> None:
        assert delivery.order_key is not None
        if not mine.done():
            mine.set_result(holds_back)
        key = (delivery.webhook.id, delivery.order_key)
        if self._tails.get(key) is mine:
            del self._tails[key]
