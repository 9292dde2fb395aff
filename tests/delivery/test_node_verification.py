"""Twenty's documented Node.js signature check, run by real `node`, accepts every delivery, including events whose
data is hostile to canonical JSON: the check signs `JSON.stringify(req.body)`, not the bytes it received, so a body
verifies only if it already is what JavaScript writes back after parsing it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.node import needs_node, require_node
from tests.support import add_webhook, new_workspace, produce, running, settings_for

pytestmark = needs_node

# The check is the one webhooks.mdx documents, line for line; only the server around it is ours. Express is not
# available, so `req.body` is filled the way express.json() fills it: the UTF-8 body through JSON.parse.
_RECEIVER_JS = r"""
const crypto = require("crypto");
const http = require("http");

const secrets = JSON.parse(process.env.WEBHOOK_SECRETS);

function verify(req, secret) {
  const timestamp = req.headers["x-twenty-webhook-timestamp"];
  const payload = JSON.stringify(req.body);
  const stringToSign = `${timestamp}:${payload}`;
  const expectedSignature = crypto
    .createHmac("sha256", secret)
    .update(stringToSign)
    .digest("hex");
  const receivedSignature = req.headers["x-twenty-webhook-signature"];
  return crypto.timingSafeEqual(
    Buffer.from(expectedSignature, "hex"),
    Buffer.from(receivedSignature, "hex")
  );
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const raw = Buffer.concat(chunks).toString("utf8");
    let valid = false;
    let error = null;
    try {
      req.body = JSON.parse(raw);
      valid = verify(req, secrets[req.url]);
    } catch (e) {
      error = String(e);  // timingSafeEqual throws on a length mismatch: that is a failed check too
    }
    const report = { path: req.url, eventId: req.headers["x-twenty-webhook-event-id"], valid, error };
    if (!valid) {
      report.raw = raw.slice(0, 400);
      report.restringified = req.body === undefined ? null : JSON.stringify(req.body).slice(0, 400);
    }
    process.stdout.write(JSON.stringify(report) + "\n");
    res.writeHead(valid ? 200 : 401, { "Content-Type": "text/plain" });
    res.end(valid ? "ok" : "bad signature");
  });
});

server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n");
});
"""

SECRETS = {
    "/ascii": "s3cr3t",
    "/latin": "ünïcode-sécret",
    "/astral": "🔑 秘密\u2028\u00e9\u0301 \U0010ffff",
}

FLOATS: list[float] = [
    1.0, 1e21, 1e20, 1.5e-7, 1e-6, 1e-7, -0.0, 0.1 + 0.2, 5e-324, 1.7976931348623157e308, 2.0**53, 1e16,
    123456789012345.67, -2.5e-5, 100.0, 0.5, 1.25e-310, 4.35, 1e300, -1e-300,
]  # fmt: skip
BIG_INTS: list[int] = [2**53 + 1, 10**30, -(2**53) - 1, 2**64, -(10**25), 2**63 - 1, 2**53 - 1, 0, -1, 10**308 * 17]
KEYS: list[str] = [
    "10", "2", "b", "01", "0", "1", "-1", "4294967294", "4294967295", "1.5", "", " 1", "__proto__", "é", "😀",
    "\u2028", "1e3", "007",
]  # fmt: skip
STRINGS: list[str] = [
    "😀👩‍👩‍👧",
    "\u2028\u2029",
    "".join(map(chr, range(0x20))) + "\x7f\x80\x9f",
    '"\\/\b\f\n\r\t',
    "\ufeff\ufffe\uffff",
    "e\u0301",
    "שלום عربى",
    "\U0010ffff\U0001d11e",
    "",
    "</script><!--",
]

# Number texts that no Python serializer writes, so they only reach the daemon as hand-written records; each is
# JSON that JavaScript parses to a value it writes back (the out-of-range ones as null, through Infinity).
RAW_NUMBERS = [
    "1E2", "-0", "1.0e-7", "0.1e1", "12345678901234567890123456789", "9007199254740993",
    "1.00000000000000011102230246251565404236316680908203125", "1e400", "-1e400", "0.000001", "1E+21", "-0.0e0",
]  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    path: str
    event_id: str
    valid: bool
    detail: dict[str, Any]


def hostile_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth > 0 and roll < 0.25:
        return {rng.choice(KEYS): hostile_value(rng, depth - 1) for _ in range(rng.randint(0, 5))}
    if depth > 0 and roll < 0.4:
        return [hostile_value(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    pool: list[Any] = [*FLOATS, *BIG_INTS, *STRINGS, True, False, None, {}, []]
    return rng.choice(pool)


def hostile_records(workspace: str, count: int) -> tuple[list[dict[str, Any] | bytes], list[str]]:
    """`count` generated events plus hand-written ones, as record bytes, with their event ids."""
    rng = random.Random(20250210)  # fixed, so a failure names an event that the next run produces again
    records: list[dict[str, Any] | bytes] = []
    ids: list[str] = []

    def add(event_id: str, data: Any, *, ascii_only: bool = False, timestamp: str | None = None) -> None:
        doc: dict[str, Any] = {
            "event": rng.choice(["person.created", "company.updated", "note.deleted"]),
            "workspaceId": workspace,
            "data": data,
            "id": event_id,
        }
        if timestamp is not None:
            doc["timestamp"] = timestamp
        # Both escaped and literal non-ASCII input must come out the same way.
        records.append(json.dumps(doc, ensure_ascii=ascii_only, allow_nan=False).encode())
        ids.append(event_id)

    for i in range(count):
        data = {rng.choice(KEYS): hostile_value(rng, 4) for _ in range(rng.randint(0, 8))}
        data["id"] = f"rec-{i}"
        add(f"n-{i}", data, ascii_only=i % 2 == 1, timestamp="2025-02-10T15:30:50Z" if i % 3 == 0 else None)
    add("n-empty", {})
    add("n-index-keys", {"10": 1, "2": 2, "b": 3, "01": 4, "4294967295": 5, "4294967294": 6, "0": 7})
    add("n-floats", dict(zip(map(str, range(len(FLOATS))), FLOATS, strict=True)))
    add("n-ints", {f"k{i}": v for i, v in enumerate(BIG_INTS)})
    add("n-strings", {s or "empty": s for s in STRINGS})
    nested: Any = {"leaf": [1.0, {}, []]}
    for level in range(120):  # deep, within payload.MAX_DEPTH (deeper data is a bad event)
        nested = {str(level % 3): nested} if level % 2 else [nested]
    add("n-deep", {"nested": nested})

    raw_data = ",".join(f'"r{i}":{text}' for i, text in enumerate(RAW_NUMBERS))
    for event_id, data_text in [
        ("n-raw-numbers", "{" + raw_data + "}"),
        ("n-raw-duplicate-keys", '{"a":1,"2":"x","a":3,"2":"y","1":0}'),
        ("n-raw-whitespace", '{ "a" : [ 1.50 , 2E-7 ] ,\n\t"b":{ } }'),
        ("n-raw-escapes", '{"s":"\\u00e9\\ud83d\\ude00\\u2028\\/\\u0000"}'),
    ]:
        text = f'{{"event":"person.updated","workspaceId":"{workspace}","id":"{event_id}","data":{data_text}}}'
        records.append(text.encode())
        ids.append(event_id)
    return records, ids


async def start_node_receiver(node: str, script: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        node, str(script), stdout=asyncio.subprocess.PIPE, env={**os.environ, "WEBHOOK_SECRETS": json.dumps(SECRETS)}
    )
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 10)
        return proc, int(json.loads(first)["port"])
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


async def collect(stream: asyncio.StreamReader, into: list[Verdict]) -> None:
    while line := await stream.readline():
        report = json.loads(line)
        into.append(Verdict(report["path"], report["eventId"], report["valid"], report))


@contextlib.asynccontextmanager
async def node_receiver(tmp_path: Path, *, with_body: bool = False) -> AsyncIterator[tuple[int, list[Verdict]]]:
    """The documented check in real `node` on a port of its own, and the verdicts it reports, one per request.

    `with_body`: each verdict's `detail["body"]` is the body as Node parsed it, for tests that read what arrived.
    """
    node = require_node(optional=False)  # tests/kafka uses it too, and never skips
    script = tmp_path / "receiver.js"
    script.write_text(
        _RECEIVER_JS.replace("const report = {", "const report = { body: req.body,") if with_body else _RECEIVER_JS
    )
    proc, port = await start_node_receiver(node, script)
    verdicts: list[Verdict] = []
    assert proc.stdout is not None
    reader = asyncio.create_task(collect(proc.stdout, verdicts))
    try:
        yield port, verdicts
        assert proc.returncode is None, f"the node receiver exited with {proc.returncode}"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def test_the_documented_node_check_verifies_every_delivery_of_hostile_data(
    kafka: str, dsn: str, topic: str, tmp_path: Path
) -> None:
    async with node_receiver(tmp_path) as (port, verdicts):
        ws = new_workspace()
        for path, secret in SECRETS.items():
            await add_webhook(dsn, ws, f"http://127.0.0.1:{port}{path}", ["*.*"], secret=secret)
        records, ids = hostile_records(ws, 200)
        expected = {(event_id, path) for event_id in ids for path in SECRETS}

        async with running(settings_for(kafka, dsn, topic, delivery={"retry_schedule": ["100ms"]})):
            await produce(kafka, topic, records)
            deadline = asyncio.get_running_loop().time() + 60
            while {(v.event_id, v.path) for v in verdicts} < expected:
                assert asyncio.get_running_loop().time() < deadline, (
                    f"node saw {len({(v.event_id, v.path) for v in verdicts})} of {len(expected)} deliveries"
                )
                await asyncio.sleep(0.1)
            # A failed check is retried; give a retry time to show up so that it is counted too.
            await asyncio.sleep(0.5)

    failures = [v.detail for v in verdicts if not v.valid]
    assert failures == [], f"{len(failures)} deliveries failed the documented check; first: {failures[:3]}"
    verified = [(v.event_id, v.path) for v in verdicts]
    assert sorted(verified) == sorted(expected), "each (event, webhook) pair must arrive exactly once"
    print(f"node verified {len(verified)} deliveries ({len(ids)} events x {len(SECRETS)} webhooks), 0 failures")
