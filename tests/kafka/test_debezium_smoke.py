"""Debezium's Postgres connector writes inserts, updates and deletes of a workspace table to Apache Kafka, with
the row before and after: proof that the CDC fixtures work, and the exact JSON shape of a change record."""

from __future__ import annotations

import json
import uuid

import asyncpg

from tests.kafka.debezium import Debezium, read_changes
from webhookd.embedded import EmbeddedPostgres, create_database


async def test_insert_update_and_delete_reach_kafka_with_before_and_after(
    kafka: str, cdc_postgres: EmbeddedPostgres, debezium: Debezium
) -> None:
    database = f"cdc_{uuid.uuid4().hex[:12]}"
    dsn = await create_database(cdc_postgres.dsn, database)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            CREATE SCHEMA workspace_abc;
            CREATE TABLE workspace_abc.person (id uuid PRIMARY KEY, name text NOT NULL, city text);
            ALTER TABLE workspace_abc.person REPLICA IDENTITY FULL;
            """
        )
        prefix = f"crm_{uuid.uuid4().hex[:8]}"
        await debezium.start(database, ["workspace_abc.person"], topic_prefix=prefix)
        person = uuid.uuid4()
        await conn.execute("INSERT INTO workspace_abc.person VALUES ($1, 'Ada', 'London')", person)
        await conn.execute("UPDATE workspace_abc.person SET city = 'Paris' WHERE id = $1", person)
        await conn.execute("DELETE FROM workspace_abc.person WHERE id = $1", person)
    finally:
        await conn.close()

    # Insert, update, delete, and the tombstone that follows a delete (for log compaction).
    changes = await read_changes(kafka, f"{prefix}.workspace_abc.person", 4)
    print("\nan update as Debezium wrote it (the value's payload; its schema is in the record too):")
    print(f"  {json.dumps(changes[1].value['payload'])}")
    assert [c.key["payload"] for c in changes] == [{"id": str(person)}] * 4
    assert changes[3].value is None
    envelopes = [c.value for c in changes[:3]]
    assert all(e["schema"]["name"] == f"{prefix}.workspace_abc.person.Envelope" for e in envelopes)
    payloads = [e["payload"] for e in envelopes]
    assert [p["op"] for p in payloads] == ["c", "u", "d"]
    row = {"id": str(person), "name": "Ada", "city": "London"}
    assert (payloads[0]["before"], payloads[0]["after"]) == (None, row)
    # REPLICA IDENTITY FULL is what gives an update and a delete the whole previous row.
    assert (payloads[1]["before"], payloads[1]["after"]) == (row, {**row, "city": "Paris"})
    assert (payloads[2]["before"], payloads[2]["after"]) == ({**row, "city": "Paris"}, None)
    assert {(p["source"]["schema"], p["source"]["table"], p["source"]["db"]) for p in payloads} == {
        ("workspace_abc", "person", database)
    }
