"""Records that break the input contract, interleaved with good events on one partition: none is delivered, none
stops the partition, each is kept for an operator with where it came from, why it was refused and its bytes, and the
partition's committed offset passes all of them."""

from __future__ import annotations

import asyncio
import re
import uuid

import orjson
from aiokafka import TopicPartition

from tests.support import Receiver, add_webhook, committed_offset, fetch, new_workspace, produce, running, settings_for

MAX_EVENT_BYTES = 2048


def sized(workspace: str, event_id: str, size: int) -> bytes:
    """A well-formed event padded to exactly `size` bytes."""
    empty = orjson.dumps({"event": "person.created", "workspaceId": workspace, "data": {"pad": ""}, "id": event_id})
    return orjson.dumps(
        {"event": "person.created", "workspaceId": workspace, "data": {"pad": "x" * (size - len(empty))},
         "id": event_id}
    )  # fmt: skip


def bad_records(ws: str) -> list[tuple[str, bytes, str]]:
    """(name, record value, pattern the kept reason must match). Each carries an id and the subscribed workspace
    wherever its shape allows, so that a bad record that slipped through would be seen at the receiver."""

    def doc(**fields: object) -> bytes:
        return orjson.dumps({"id": f"bad-{len(fields)}-{uuid.uuid4().hex[:6]}", **fields})

    good_fields = {"event": "person.created", "workspaceId": ws, "data": {"id": "x"}}
    return [
        ("not JSON", b'{"event": "person.created", "workspaceId": ', r"json"),
        ("empty value", b"", r"json"),
        ("not UTF-8", b"\xff\xfe\x00{}", r"utf-8"),
        (
            "JSON with a string that is not UTF-8",
            b'{"event":"person.created","workspaceId":"' + ws.encode() + b'","data":{"name":"\xc3\x28"},"id":"bad-u"}',
            r"utf-8",
        ),
        ("a JSON array", orjson.dumps([good_fields]), r"array|object"),
        ("a JSON string", b'"person.created"', r"string|object"),
        ("JSON null", b"null", r"null|object"),
        ("missing event", doc(workspaceId=ws, data={}), r"missing.*\bevent\b"),
        ("missing workspaceId", doc(event="person.created", data={}), r"missing.*workspaceId"),
        ("missing data", doc(event="person.created", workspaceId=ws), r"missing.*\bdata\b"),
        ("event is a number", doc(**{**good_fields, "event": 5}), r"\bevent\b.*string"),
        ("workspaceId is a number", doc(**{**good_fields, "workspaceId": 123}), r"workspaceId.*string"),
        ("data is an array", doc(**{**good_fields, "data": [{"id": "x"}]}), r"data.*object"),
        ("data is a string", doc(**{**good_fields, "data": "{}"}), r"data.*object"),
        ("data is null", doc(**{**good_fields, "data": None}), r"data"),
        ("timestamp is a number", doc(**{**good_fields, "timestamp": 1739201450}), r"timestamp.*string"),
        ("id is a number", orjson.dumps({**good_fields, "id": 42}), r"\bid\b.*string"),
        ("event without an action", doc(**{**good_fields, "event": "person"}), r"event"),
        ("event with a space", doc(**{**good_fields, "event": "person created"}), r"event"),
        ("event with three parts", doc(**{**good_fields, "event": "person.created.now"}), r"event"),
        ("event with a wildcard", doc(**{**good_fields, "event": "*.created"}), r"event"),
        ("workspaceId not a UUID", doc(**{**good_fields, "workspaceId": "workspace-1"}), r"workspaceId.*UUID"),
        ("one byte too large", sized(ws, "bad-big-1", MAX_EVENT_BYTES + 1), r"large|bytes|max_event_bytes"),
        ("far too large", sized(ws, "bad-big-2", 200_000), r"large|bytes|max_event_bytes"),
    ]


async def test_bad_records_are_kept_never_delivered_and_never_stop_their_partition(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/h"), ["*.*"])
    bad = bad_records(ws)
    good_ids: list[str] = []
    records: list[dict[str, object] | bytes] = []
    bad_at: dict[int, tuple[str, bytes, str]] = {}
    # Good events on both sides of every bad one, so that a bad record that stopped the partition is caught at once.
    for i, entry in enumerate(bad):
        good_ids.append(f"good-{i}")
        records.append(
            orjson.dumps({"event": "person.created", "workspaceId": ws, "data": {"i": i}, "id": good_ids[i]})
        )
        bad_at[len(records)] = entry
        records.append(entry[1])
    good_ids.append("good-at-the-limit")
    records.append(sized(ws, "good-at-the-limit", MAX_EVENT_BYTES))
    good_ids.append("good-last")
    records.append(orjson.dumps({"event": "note.deleted", "workspaceId": ws, "data": {}, "id": "good-last"}))

    settings = settings_for(kafka, dsn, topic, delivery={"max_event_bytes": MAX_EVENT_BYTES})
    async with running(settings):
        await produce(kafka, topic, records, partition=0)
        await receiver.wait_for(lambda: len(receiver.requests) >= len(good_ids), 30, "every good event")
        for _ in range(100):  # the kept rows are written beside the deliveries, not before them
            if len(await fetch(dsn, "SELECT 1 FROM webhookd.bad_events")) >= len(bad):
                break
            await asyncio.sleep(0.1)
        # A bad record that was delivered after all would arrive with the good ones; give it time to show up.
        await asyncio.sleep(0.5)

    assert sorted(r.event_id for r in receiver.requests) == sorted(good_ids), "only the good events are delivered"

    rows = await fetch(dsn, 'SELECT topic, "partition", "offset", reason, raw, raw_size FROM webhookd.bad_events')
    kept = {row["offset"]: row for row in rows}
    assert sorted(kept) == sorted(bad_at), "exactly the bad records are kept, each under its own offset"
    for offset, (name, value, reason) in bad_at.items():
        row = kept[offset]
        assert (row["topic"], row["partition"]) == (topic, 0), name
        assert re.search(reason, row["reason"], re.IGNORECASE), f"{name}: the reason {row['reason']!r} names no problem"
        assert row["raw_size"] == len(value), name
        raw = bytes(row["raw"])
        if len(value) <= MAX_EVENT_BYTES + 1:
            assert raw == value, f"{name}: a small record is kept whole"
        else:
            assert 0 < len(raw) < len(value), f"{name}: a large record is kept capped, not whole and not empty"
            assert value.startswith(raw), f"{name}: the kept bytes are the start of the record"

    committed = await committed_offset(kafka, f"g-{topic}", TopicPartition(topic, 0))
    assert committed == len(records), "the committed offset passes every record, bad ones included"
    print(f"{len(bad)} bad records kept, {len(good_ids)} good events delivered, committed offset {committed}")
