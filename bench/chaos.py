"""`make chaos`: deliver while everything breaks, then count, from what the receivers saw, what was lost.

The run starts its own broker (behind a TCP proxy it controls) and Postgres, three receivers per event that fail
about half their requests with 500 and let some time out, and `webhookd run` as a real process. While the daemon
works through the events it is killed with SIGKILL at random moments and started again, Postgres is restarted,
and the broker connection is cut. At the end every (event, webhook) pair must have been answered 2xx at least once:
the report gives lost (must be 0), duplicated and the time to drain.

    python -m bench.chaos [--events 20000] [--kills 10] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import yaml
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from bench.proxy import TcpProxy
from webhookd.durable.migrate import migrate
from webhookd.embedded import EmbeddedPostgres, KafkaBroker, create_database, create_topic
from webhookd.runtime.children import free_port

WEBHOOKS = 3
PARTITIONS = 4
GROUP = "chaos"  # the daemon's consumer group
TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class Plan:
    """What goes wrong, and how much work there is meanwhile."""

    events: int = 20_000
    kills: int = 10
    postgres_restarts: int = 1
    broker_cut_seconds: float = 10.0
    fail_ratio: float = 0.5  # requests answered 500
    hang_ratio: float = 0.02  # requests left to time out
    seed: int = 0
    deadline_seconds: float = 900.0


@dataclass
class Report:
    """What the receivers saw, counted against what was owed to them."""

    pairs: int
    delivered: int
    lost: int
    duplicated: int
    requests: int
    drain_seconds: float
    faults: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # the daemon ending by itself (restarted, as a supervisor would)

    def table(self) -> str:
        rows = [
            ("pairs (event x webhook)", f"{self.pairs}"),
            ("delivered at least once", f"{self.delivered}"),
            ("lost", f"{self.lost}"),
            ("duplicated (2xx more than once)", f"{self.duplicated}"),
            ("requests the receivers saw", f"{self.requests}"),
            ("time to drain", f"{self.drain_seconds:.1f} s"),
            ("faults", "; ".join(self.faults)),
            ("daemon exits of its own", "; ".join(self.exits) or "none"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class FlakyReceivers:
    """One HTTP server standing for every receiver; the path names the webhook. Fails and hangs at random."""

    def __init__(self, plan: Plan) -> None:
        self._rng = random.Random(plan.seed)
        self._plan = plan
        self.port = free_port()
        self.accepted: dict[tuple[str, str], int] = {}
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{webhook}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        luck = self._rng.random()
        if luck < self._plan.hang_ratio:
            await asyncio.sleep(TIMEOUT_SECONDS * 3)
            return web.Response(status=504)
        if luck < self._plan.hang_ratio + self._plan.fail_ratio:
            return web.Response(status=500, text="flaky")
        key = (request.headers["X-Twenty-Webhook-Event-Id"], request.match_info["webhook"])
        self.accepted[key] = self.accepted.get(key, 0) + 1
        return web.Response(text="ok")


class Daemon:
    """`webhookd run` as a process of its own, to be killed and started again."""

    def __init__(self, config: Path, log: Path) -> None:
        self._config = config
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "webhookd", "run", "--config", str(self._config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def last_error(self) -> str:
        """The last error the daemon logged (its reason for exiting), shortened."""
        lines = self._log.read_text(errors="replace").splitlines()
        for line in reversed(lines):
            if '"level":"error"' in line and "Unclosed" not in line:
                with contextlib.suppress(ValueError):
                    entry = orjson.loads(line)
                    return f"{entry.get('event')}: {str(entry.get('error') or entry.get('exception', ''))[-160:]}"
        return "no error logged"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


async def _setup_database(admin_dsn: str, receivers: FlakyReceivers) -> tuple[str, str, list[str]]:
    dsn = await create_database(admin_dsn, "chaos")
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, '"core"."webhook"')
        workspace = str(uuid.uuid4())
        webhooks = []
        for n in range(WEBHOOKS):
            webhook = str(uuid.uuid4())
            await conn.execute(
                'INSERT INTO core.webhook (id, "workspaceId", "targetUrl", operations, secret) '
                "VALUES ($1, $2, $3, '{*.*}', 'chaos-secret')",
                uuid.UUID(webhook),
                uuid.UUID(workspace),
                f"http://127.0.0.1:{receivers.port}/w{n}",
            )
            webhooks.append(f"w{n}")
    finally:
        await conn.close()
    return dsn, workspace, webhooks


async def _produce(bootstrap: str, topic: str, workspace: str, events: int) -> dict[TopicPartition, int]:
    """Produce the events; returns each partition's end, the offset after its last record."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=20)
    await producer.start()
    try:
        sent = []
        for i in range(events):
            doc = {
                "id": f"chaos-{i}",
                "event": "person.updated",
                "workspaceId": workspace,
                "data": {"id": str(i), "name": f"person {i}"},
            }
            sent.append(await producer.send(topic, orjson.dumps(doc), key=str(i % 97).encode()))
        await producer.flush()
        ends: dict[TopicPartition, int] = {}
        for metadata in await asyncio.gather(*sent):
            tp = TopicPartition(metadata.topic, metadata.partition)
            ends[tp] = max(ends.get(tp, 0), metadata.offset + 1)
        return ends
    finally:
        await producer.stop()


def _config(bootstrap: str, dsn: str, topic: str, workdir: Path) -> Path:
    config: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": GROUP, "session_timeout_ms": 3000},
        "postgres": {"dsn": dsn},
        "delivery": {
            "timeout_seconds": TIMEOUT_SECONDS,
            # Half the attempts fail: 30 attempts leave about one chance in a billion for a pair to die.
            "retry_schedule": ["200ms"] * 10 + ["1s"] * 20,
            "retry_jitter": 0.5,
            "retry_poll_interval_seconds": 0.2,
            "drain_timeout_seconds": 5,
        },
        # Receivers that fail half their requests may trip a circuit now and then; short cool-downs keep the
        # drain time about delivery, not about waiting.
        "endpoints": {"circuit_cooldown_seconds": 1, "circuit_max_cooldown_seconds": 4},
        "egress": {"allow_private": True},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "logging": {"level": "warning", "format": "json"},
    }
    path = workdir / "webhookd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _committed_to_the_end(reader: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Whether the group's commits, as `reader` reads them, have reached `ends`: the ends the producer saw (Tansu
    answers aiokafka's `end_offsets` with 1 for every partition)."""
    try:
        for tp, end in ends.items():
            if await reader.committed(tp) != end:
                return False
        return True
    except KafkaError:
        return False  # the broker is still out of reach: not yet


async def run(plan: Plan, workdir: Path, say: Any = print) -> Report:
    """Run the plan; `say` receives a line per fault as it happens."""
    rng = random.Random(plan.seed)
    proxy_port = free_port()
    broker = await asyncio.to_thread(KafkaBroker.start, advertised_port=proxy_port)
    proxy = TcpProxy(proxy_port, broker.port)
    postgres = await asyncio.to_thread(EmbeddedPostgres.start, workdir / "postgres")
    receivers = FlakyReceivers(plan)
    daemon: Daemon | None = None
    faults: list[str] = []
    try:
        await proxy.start()
        await receivers.start()
        dsn, workspace, webhooks = await _setup_database(postgres.dsn, receivers)
        topic = "chaos.events"
        await create_topic(broker.bootstrap, topic, PARTITIONS)
        ends = await _produce(broker.bootstrap, topic, workspace, plan.events)
        expected = {(f"chaos-{i}", w) for i in range(plan.events) for w in webhooks}
        daemon = Daemon(_config(broker.bootstrap, dsn, topic, workdir), workdir / "daemon.log")
        started = time.monotonic()
        daemon.start()

        exits: list[str] = []

        def progress() -> float:
            return len(receivers.accepted) / len(expected)

        def when() -> str:
            return f"at {progress():.0%} ({time.monotonic() - started:.0f} s)"

        def supervise() -> None:
            # As Kubernetes would: a daemon that ended by itself is started again, and the exit is reported.
            assert daemon is not None
            assert daemon.proc is not None
            if daemon.proc.poll() is not None:
                reason = daemon.last_error()
                # Refusing to start while the broker is cut off is what it should do (the supervisor retries);
                # anything else is the daemon failing at what it must ride out.
                if "startup_failed" in reason:
                    faults.append(f"startup refused {when()}: {reason}")
                else:
                    exits.append(f"exit {daemon.proc.returncode} {when()}: {reason}")
                say(f"the daemon exited {daemon.proc.returncode} by itself {when()}; restarting it")
                daemon.start()

        # Faults are spread over the first part of the work, each once progress has passed its mark.
        marks: list[tuple[float, str]] = [(rng.uniform(0.05, 0.85), "kill") for _ in range(plan.kills)]
        marks += [(rng.uniform(0.2, 0.6), "postgres") for _ in range(plan.postgres_restarts)]
        if plan.broker_cut_seconds > 0:
            marks.append((rng.uniform(0.3, 0.7), "broker"))
        marks.sort()
        for mark, fault in marks:
            while progress() < mark:
                if time.monotonic() - started > plan.deadline_seconds:
                    raise TimeoutError(f"stuck at {progress():.0%} before the {fault} fault")
                supervise()
                await asyncio.sleep(0.05)
            if fault == "kill":
                daemon.kill()
                await asyncio.sleep(rng.uniform(0.0, 1.0))
                daemon.start()
                faults.append(f"SIGKILL {when()}")
            elif fault == "postgres":
                await asyncio.to_thread(postgres.restart)
                faults.append(f"Postgres restarted {when()}")
            else:
                faults.append(f"broker cut for {plan.broker_cut_seconds:g} s {when()}")
                await proxy.cut(plan.broker_cut_seconds)
            say(faults[-1])
        while not expected <= receivers.accepted.keys():
            if time.monotonic() - started > plan.deadline_seconds:
                break
            supervise()
            await asyncio.sleep(0.1)
        drain = time.monotonic() - started
        # The run ends once everything is delivered and committed. A stop while the last commit still waits on a
        # broker that was cut a moment ago ends in status 1 (final_commit_failed), rightly, and reads those records
        # again later; this run is about what faults lose, not about when it stops.
        # A consumer of the group that never subscribes only reads the group's commits; it does not join the group.
        reader = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=GROUP, enable_auto_commit=False)
        await reader.start()
        try:
            while not await _committed_to_the_end(reader, ends):
                if time.monotonic() - started > plan.deadline_seconds:
                    faults.append("the group's commits never reached the end of the partitions")
                    break
                supervise()
                await asyncio.sleep(0.2)
        finally:
            await reader.stop()
        status = daemon.stop()
        if status not in (0, None):
            faults.append(f"the daemon exited {status} at the end")
        delivered = len(expected & receivers.accepted.keys())
        return Report(
            pairs=len(expected),
            delivered=delivered,
            lost=len(expected) - delivered,
            duplicated=sum(n - 1 for n in receivers.accepted.values()),
            requests=receivers.requests,
            drain_seconds=drain,
            faults=faults,
            exits=exits,
        )
    finally:
        if daemon is not None:
            daemon.kill()
        await receivers.stop()
        await proxy.stop()
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(postgres.stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=Plan.events)
    parser.add_argument("--kills", type=int, default=Plan.kills)
    parser.add_argument("--broker-cut", type=float, default=Plan.broker_cut_seconds, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", "0")) or None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    plan = Plan(events=args.events, kills=args.kills, broker_cut_seconds=args.broker_cut, seed=seed)
    print(f"chaos: {plan.events} events x {WEBHOOKS} webhooks, {plan.kills} SIGKILLs, seed {seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="webhookd-chaos-") as tmp:
        report = asyncio.run(run(plan, Path(tmp), say=lambda line: print(f"  {line}", flush=True)))
    print(report.table())
    return 0 if report.lost == 0 and not report.exits else 1


if __name__ == "__main__":
    sys.exit(main())
