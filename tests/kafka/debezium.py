"""Debezium's Postgres connector in Kafka Connect, started for one test, and a reader of the records it writes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer

from webhookd.embedded import EmbeddedPostgres, _dsn_with_database
from webhookd.embedded.kafka_connect import KafkaConnect

POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"


@dataclass
class Debezium:
    """Starts Debezium Postgres connectors (one Connect worker each) and stops them all, slots dropped, at the end."""

    kafka: str
    postgres: EmbeddedPostgres
    _started: list[tuple[KafkaConnect, str]] = field(default_factory=list)  # (worker, replication slot)

    async def start(
        self,
        database: str,
        tables: Sequence[str],
        *,
        publication: str = "webhookd_cdc",
        topic_prefix: str = "crm",
        schemas_enable: bool = True,
        overrides: Mapping[str, Any] | None = None,
        timeout: float = 90.0,
    ) -> KafkaConnect:
        """Capture `tables` ("schema.table") of `database` into topics `<topic_prefix>.<schema>.<table>`; with no
        tables, those that `overrides` (schema.include.list, say) select.

        Returns once the connector's task runs and its replication slot is streaming, so every change committed
        from then on reaches Kafka. The publication is created for `tables` if it does not exist. Only changes
        made after the start are captured, unless `overrides` set another `snapshot.mode`.
        """
        assert self.postgres.tcp_port is not None, "Debezium connects over TCP: start Postgres with tcp_port"
        slot = f"webhookd_{uuid.uuid4().hex[:12]}"
        config: dict[str, Any] = {
            "name": f"debezium-{slot}",
            "connector.class": POSTGRES_CONNECTOR,
            "database.hostname": self.postgres.host,
            "database.port": self.postgres.tcp_port,
            "database.user": "postgres",
            "database.password": "unused",  # 127.0.0.1 is trusted; the connector insists on a value
            "database.dbname": database,
            "topic.prefix": topic_prefix,
            "plugin.name": "pgoutput",
            "publication.name": publication,
            "publication.autocreate.mode": "filtered",
            "slot.name": slot,
            "snapshot.mode": "no_data",
            # Tests read what Debezium wrote moments after the change: send at once.
            "poll.interval.ms": 50,
            **({"table.include.list": ",".join(tables)} if tables else {}),
            **(overrides or {}),
        }
        worker = await asyncio.to_thread(KafkaConnect.start, self.kafka, config, schemas_enable=schemas_enable)
        self._started.append((worker, slot))
        await asyncio.to_thread(worker.wait_until_running, timeout)
        await self._wait_streaming(slot, timeout)
        return worker

    async def _wait_streaming(self, slot: str, timeout: float) -> None:
        # The task counts as RUNNING before its replication stream is open; changes made in between would be
        # missed by a connector that takes no snapshot.
        conn = await asyncpg.connect(self.postgres.dsn)
        try:
            deadline = time.monotonic() + timeout
            while not await conn.fetchval("SELECT active FROM pg_replication_slots WHERE slot_name = $1", slot):
                if time.monotonic() > deadline:
                    raise AssertionError(f"Debezium's replication slot {slot} not streaming within {timeout} s")
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    async def stop_all(self) -> None:
        """Stop every worker started here and drop their slots, which would otherwise keep WAL forever."""
        started, self._started = self._started, []
        for worker, _slot in started:
            await asyncio.to_thread(worker.stop)
        conn = await asyncpg.connect(self.postgres.dsn)
        try:
            for _worker, slot in started:
                deadline = time.monotonic() + 10
                # The walsender of a stopped worker lets go of its slot a moment later.
                while await conn.fetchval("SELECT active FROM pg_replication_slots WHERE slot_name = $1", slot):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"replication slot {slot} still active after its worker stopped")
                    await asyncio.sleep(0.1)
                await conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot
                )
        finally:
            await conn.close()

    def dsn(self, database: str) -> str:
        return _dsn_with_database(self.postgres.dsn, database)


@dataclass(frozen=True)
class Change:
    """One record Debezium wrote: its key and value as JSON (None for a tombstone's value)."""

    offset: int
    key: Any
    value: Any


async def read_changes(kafka: str, topic: str, count: int, timeout: float = 30.0) -> list[Change]:
    """The first `count` records of topic (one partition, as Debezium's topics have here), in order."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    changes: list[Change] = []
    try:
        deadline = time.monotonic() + timeout
        while len(changes) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(changes)} of {count} records on {topic} within {timeout} s: {changes}")
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    key = orjson.loads(record.key) if record.key is not None else None
                    value = orjson.loads(record.value) if record.value is not None else None
                    changes.append(Change(record.offset, key, value))
    finally:
        await consumer.stop()
    return sorted(changes, key=lambda c: c.offset)[:count]
