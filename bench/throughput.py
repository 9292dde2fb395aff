"""`make bench` (first part): signed deliveries a second, the daemon end to end against the raw aiohttp ceiling.

One run on one machine, alternating the two (ceiling, daemon, ceiling, daemon, ...) and reporting medians, because
a shared machine is noisy. The ceiling is plain aiohttp POSTs of the same bodies, signed the same way, to the same
receiver with the same concurrency, without Kafka or Postgres. The daemon is `webhookd run` as its own process,
from producing the events to the receiver's last 2xx. The receiver runs in processes of its own (one per core,
sharing the port) and answers at once or after a delay.

    python -m bench.throughput [--events 5000] [--repeats 3] [--delays 0,0.05] [--webhooks 1,5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import yaml
from aiohttp import web
from aiokafka import AIOKafkaProducer

from webhookd.embedded import EmbeddedPostgres, KafkaBroker, create_database, create_topic, free_port
from webhookd.payload import build_body
from webhookd.signing import Signer
from webhookd.store.migrate import migrate

CONCURRENCY = 64
SECRET = b"bench-secret"


def _receiver_process(port: int, delay: float, counter: Any) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        with counter.get_lock():
            counter.value += 1
        return web.Response(text="ok")

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        await web.SockSite(runner, sock).start()
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(serve())


class Receivers:
    """`processes` receivers sharing one port (SO_REUSEPORT); `count` is every 2xx they gave."""

    def __init__(self, delay: float, processes: int) -> None:
        self.port = free_port()
        self.counter: Any = multiprocessing.Value("q", 0)
        self._procs = [
            multiprocessing.Process(target=_receiver_process, args=(self.port, delay, self.counter), daemon=True)
            for _ in range(processes)
        ]

    @property
    def count(self) -> int:
        return int(self.counter.value)

    def start(self) -> None:
        for proc in self._procs:
            proc.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the receivers did not start")

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
            proc.join(5)


async def ceiling(url: str, bodies: list[bytes], concurrency: int) -> float:
    """Plain aiohttp: the same bodies, signed the same way, at the same concurrency; deliveries a second."""
    signer = Signer("twenty")
    queue = list(enumerate(bodies))
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                i, body = queue.pop()
                headers = {"Content-Type": "application/json"}
                headers.update(signer.headers(f"b{i}", body, SECRET, None, time.time()))
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.monotonic() - started)


@dataclass
class Stack:
    """The broker and Postgres every daemon run of the benchmark shares."""

    broker: KafkaBroker
    postgres: EmbeddedPostgres
    dsn: str


async def daemon_rate(stack: Stack, workdir: Path, receivers: Receivers, events: int, webhooks: int) -> float:
    """`webhookd run` end to end: deliveries a second from producing `events` to the last of events x webhooks."""
    run_id = uuid.uuid4().hex[:8]
    topic, workspace = f"bench.{run_id}", str(uuid.uuid4())
    conn = await asyncpg.connect(stack.dsn)
    try:
        for n in range(webhooks):
            await conn.execute(
                'INSERT INTO core.webhook ("workspaceId", "targetUrl", operations, secret) VALUES ($1, $2, $3, $4)',
                uuid.UUID(workspace),
                f"http://127.0.0.1:{receivers.port}/{run_id}/{n}",
                ["*.*"],
                SECRET.decode(),
            )
    finally:
        await conn.close()
    await create_topic(stack.broker.bootstrap, topic, 4)
    listen = f"127.0.0.1:{free_port()}"
    config: dict[str, Any] = {
        "kafka": {"bootstrap_servers": stack.broker.bootstrap, "topics": [topic], "group_id": f"bench-{run_id}"},
        "postgres": {"dsn": stack.dsn},
        "delivery": {"concurrency": CONCURRENCY, "per_host_concurrency": CONCURRENCY},
        "egress": {"allow_private": True},
        "http": {"listen": listen},
        "logging": {"level": "warning", "format": "json"},
    }
    path = workdir / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (workdir / f"{run_id}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhookd", "run", "--config", str(path), stdout=log, stderr=log
    )
    try:
        # Wait until it is ready (consuming), so that the rate leaves out start-up.
        ready = f"http://{listen}/readyz"
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(ready) as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        target = receivers.count + events * webhooks
        producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, enable_idempotence=False, linger_ms=5)
        await producer.start()
        started = time.monotonic()
        try:
            for i in range(events):
                doc = {"id": f"{run_id}-{i}", "event": "person.updated", "workspaceId": workspace, "data": {"i": i}}
                await producer.send(topic, orjson.dumps(doc))
            await producer.flush()
        finally:
            await producer.stop()
        while receivers.count < target:
            if time.monotonic() - started > 600:
                raise TimeoutError(f"the daemon delivered {receivers.count - target + events * webhooks} only")
            await asyncio.sleep(0.01)
        return events * webhooks / (time.monotonic() - started)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
        log.close()


async def main_async(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    results: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="webhookd-bench-") as tmp:
        workdir = Path(tmp)
        broker = await asyncio.to_thread(KafkaBroker.start)
        postgres = await asyncio.to_thread(EmbeddedPostgres.start, workdir / "postgres")
        try:
            dsn = await create_database(postgres.dsn, "bench")
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn, '"core"."webhook"')
            finally:
                await conn.close()
            stack = Stack(broker, postgres, dsn)
            for delay in args.delays:
                receivers = Receivers(delay, processes=max(2, os.cpu_count() or 2))
                receivers.start()
                try:
                    for webhooks in args.webhooks:
                        bodies = [
                            build_body("person.updated", {"i": i}, "2026-01-01T00:00:00.000Z")
                            for i in range(args.events * webhooks)
                        ]
                        url = f"http://127.0.0.1:{receivers.port}/ceiling"
                        raw, end_to_end = [], []
                        for _ in range(args.repeats):  # alternated, so that noise hits both alike
                            raw.append(await ceiling(url, bodies, CONCURRENCY))
                            end_to_end.append(await daemon_rate(stack, workdir, receivers, args.events, webhooks))
                        label = f"{delay * 1000:.0f} ms receiver, {webhooks} webhook(s) per event"
                        results.append((label, statistics.median(raw), statistics.median(end_to_end)))
                        print(f"  {label}: ceiling {raw}, daemon {end_to_end}", flush=True)
                finally:
                    receivers.stop()
        finally:
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(postgres.stop)
    return results


def table(results: list[tuple[str, float, float]]) -> str:
    lines = [
        "| regime | raw aiohttp ceiling (/s) | webhookd end to end (/s) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {label} | {raw:.0f} | {daemon:.0f} | {daemon / raw:.2f} |" for label, raw, daemon in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delays", type=lambda v: [float(x) for x in v.split(",")], default=[0.0, 0.05])
    parser.add_argument("--webhooks", type=lambda v: [int(x) for x in v.split(",")], default=[1, 5])
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    print(f"throughput: {args.events} events, concurrency {CONCURRENCY}, {os.cpu_count()} cores", flush=True)
    text = table(asyncio.run(main_async(args)))
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
