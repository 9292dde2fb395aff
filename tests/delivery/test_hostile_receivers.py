"""Receivers that misbehave on purpose: each attempt ends in bounded time and memory, as a failure with a fitting
result label and last error, and the daemon keeps delivering to a healthy webhook meanwhile.

One daemon process serves every hostile receiver at once, so its memory can be watched from outside while they
stream huge bodies, endless headers or a byte a second. Raw asyncio servers stand in where aiohttp's own server
would be too well-behaved; the retry schedule is empty, so each hostile webhook gets exactly one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from tests.daemon_tools import RssSampler, fresh_database, fresh_topic, get_text, metric, wait_ready
from tests.support import DaemonProcess, Receiver, add_webhook, config_for, fetch, new_workspace, write_config
from webhookd.runtime.children import free_port

TIMEOUT = 2.0
BODY_LIMIT = 4096
HUGE = 200 * 2**20
CHUNK = (b"\x00\xff<boom>\x1b[31m" * 5000)[: 64 * 1024]  # NULs, invalid UTF-8 and escapes, as a hostile body has
METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
HEALTHY_EVENTS = 8
HEALTHY_SPACING = 0.3


@dataclass
class Exchange:
    """What one hostile server saw of the daemon: its connections, when it hung up, and how much it was sent."""

    opened: list[float] = field(default_factory=list)
    hung_up: list[float] = field(default_factory=list)
    bytes_sent: int = 0

    def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        self.bytes_sent += len(data)

    @property
    def seconds_open(self) -> float | None:
        if not self.opened or not self.hung_up:
            return None
        return self.hung_up[0] - self.opened[0]


Script = Callable[[asyncio.StreamWriter, Exchange], Awaitable[None]]


class RawServer:
    """A TCP server on loopback that runs `script` for each connection, after reading the request unless told not
    to; it notes when the daemon hangs up, which is how the tests see an attempt end from the receiver's side."""

    def __init__(self, script: Script, *, read_request: bool = True) -> None:
        self.exchange = Exchange()
        self.port = 0
        self._script = script
        self._read_request = read_request
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def stop(self) -> None:
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        assert current is not None
        self._handlers.add(current)
        self.exchange.opened.append(time.monotonic())
        pending: set[asyncio.Task[Any]] = set()
        try:
            if self._read_request:
                await _read_request(reader)
            pending = {asyncio.create_task(self._run_script(writer)), asyncio.create_task(_until_eof(reader))}
            done, pending = await asyncio.wait(pending, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if any(task.result() for task in done):
                self.exchange.hung_up.append(time.monotonic())
        except (ConnectionError, asyncio.IncompleteReadError):
            self.exchange.hung_up.append(time.monotonic())
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            writer.close()
            self._handlers.discard(current)

    async def _run_script(self, writer: asyncio.StreamWriter) -> bool:
        """True when the script was cut short by the daemon hanging up."""
        try:
            await self._script(writer, self.exchange)
        except ConnectionError:
            return True
        return False


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            await reader.readexactly(int(value))


async def _until_eof(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    return True


# The scripts: one misbehaviour each.


async def endless_headers(writer: asyncio.StreamWriter, seen: Exchange) -> None:
    seen.send(writer, b"HTTP/1.1 200 OK\r\n")
    for n in range(10**9):
        seen.send(writer, b"X-Header-%d: %s\r\n" % (n, b"v" * 64))
        await writer.drain()


async def giant_header(writer: asyncio.StreamWriter, seen: Exchange) -> None:
    seen.send(writer, b"HTTP/1.1 200 OK\r\nX-Giant: ")
    while seen.bytes_sent < HUGE:
        seen.send(writer, b"g" * 65536)
        await writer.drain()


def drip(response: bytes, *, at_once: int = 0) -> Script:
    """Send the first `at_once` bytes of `response` at once, then one byte a second."""

    async def script(writer: asyncio.StreamWriter, seen: Exchange) -> None:
        seen.send(writer, response[:at_once])
        for byte in response[at_once:]:
            seen.send(writer, bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)

    return script


def redirect(status: str, location: str) -> Script:
    async def script(writer: asyncio.StreamWriter, seen: Exchange) -> None:
        seen.send(
            writer,
            f"HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode(),
        )
        await writer.drain()

    return script


async def slam(writer: asyncio.StreamWriter, _seen: Exchange) -> None:
    writer.close()


async def reset(writer: asyncio.StreamWriter, _seen: Exchange) -> None:
    # A zero linger time turns close into a TCP reset: a receiver that crashed mid-request.
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def garbage(data: bytes) -> Script:
    async def script(writer: asyncio.StreamWriter, seen: Exchange) -> None:
        seen.send(writer, data)
        await writer.drain()
        await asyncio.sleep(60)  # and keep the socket open: the daemon must give up on its own

    return script


async def hold(_writer: asyncio.StreamWriter, _seen: Exchange) -> None:
    await asyncio.sleep(60)


class HugeResponder:
    """aiohttp handlers that answer with a 200 MB body in 64 KiB writes; they note where the daemon stopped them."""

    def __init__(self) -> None:
        self.exchanges: dict[str, Exchange] = {"/huge-200-chunked": Exchange(), "/huge-500-sized": Exchange()}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        seen = self.exchanges[request.path]
        seen.opened.append(time.monotonic())
        await request.read()
        response = web.StreamResponse(status=200 if "200" in request.path else 500)
        if "chunked" in request.path:
            response.enable_chunked_encoding()
        else:
            response.content_length = HUGE
        await response.prepare(request)
        try:
            while seen.bytes_sent < HUGE:
                await response.write(CHUNK)
                seen.bytes_sent += len(CHUNK)
            await response.write_eof()
        except ConnectionError:
            seen.hung_up.append(time.monotonic())
        return response


# What each hostile webhook must end as: the attempt's result label, and the row's last_status.
EXPECTED: dict[str, tuple[str, int | None]] = {
    "huge-200-chunked": ("2xx", None),  # a success: no row
    "huge-500-sized": ("5xx", 500),
    "endless-headers": ("connection_error", None),
    "giant-header": ("connection_error", None),
    "drip-status-line": ("timeout", None),
    "drip-body": ("timeout", None),
    "redirect-metadata": ("3xx", 302),
    "redirect-loopback": ("3xx", 307),
    "closed-at-once": ("connection_error", None),
    "reset-after-request": ("connection_error", None),
    "garbage-text": ("connection_error", None),
    "garbage-binary": ("connection_error", None),
}


@dataclass
class Outcome:
    """Everything the scenario observed, for the tests below to judge one aspect each."""

    exchanges: dict[str, Exchange]
    rows: dict[str, dict[str, Any]]  # hostile kind -> its webhookd.deliveries row
    results: dict[str, str]  # hostile kind -> result label the daemon logged for its attempt
    trap: Exchange  # the loopback server a redirect pointed at
    trap_port: int
    metrics: str
    healthz: int
    exit_status: int
    log: str
    rss_baseline: float
    rss_peak: float
    healthy_latencies: list[float]
    healthy_before_drips_ended: int


@pytest.fixture(scope="module")
async def outcome(kafka: str, postgres_admin: str) -> Outcome:
    dsn, topic = await fresh_database(postgres_admin), await fresh_topic(kafka)
    async with contextlib.AsyncExitStack() as stack:
        trap = RawServer(hold, read_request=False)
        await trap.start()  # first: a redirect below points at its port
        stack.push_async_callback(trap.stop)
        raw = {
            "endless-headers": RawServer(endless_headers),
            "giant-header": RawServer(giant_header),
            "drip-status-line": RawServer(drip(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")),
            "drip-body": RawServer(drip(b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n" + b"x" * 60, at_once=38)),
            "redirect-metadata": RawServer(redirect("302 Found", METADATA)),
            "redirect-loopback": RawServer(redirect("307 Temporary Redirect", trap.url("/stolen"))),
            "closed-at-once": RawServer(slam, read_request=False),
            "reset-after-request": RawServer(reset),
            "garbage-text": RawServer(garbage(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")),
            "garbage-binary": RawServer(garbage(bytes(range(256)) * 16)),
        }
        for server in raw.values():
            await server.start()
            stack.push_async_callback(server.stop)
        huge = HugeResponder()
        app = web.Application()
        app.router.add_post("/{tail:.*}", huge.handle)
        huge_runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await huge_runner.setup()
        stack.push_async_callback(huge_runner.cleanup)
        huge_port = free_port()
        await web.TCPSite(huge_runner, "127.0.0.1", huge_port).start()
        healthy = Receiver()
        await healthy.start()
        stack.push_async_callback(healthy.stop)

        ws = new_workspace()
        urls = {kind: server.url() for kind, server in raw.items()}
        urls |= {path.strip("/"): f"http://127.0.0.1:{huge_port}{path}" for path in huge.exchanges}
        webhook_kind = {await add_webhook(dsn, ws, url, ["probe.sent"]): kind for kind, url in urls.items()}
        await add_webhook(dsn, ws, healthy.url("/healthy"), ["person.*"])
        exchanges = {kind: server.exchange for kind, server in raw.items()}
        exchanges |= {path.strip("/"): seen for path, seen in huge.exchanges.items()}

        config = config_for(
            kafka,
            dsn,
            topic,
            delivery={"timeout_seconds": TIMEOUT, "retry_schedule": [], "response_body_limit_bytes": BODY_LIMIT},
            logging={"level": "info", "format": "json"},
        )
        listen = config["http"]["listen"]
        producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=False)
        await producer.start()
        stack.push_async_callback(producer.stop)
        failures = sum(1 for result, _ in EXPECTED.values() if result != "2xx")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="webhookd-hostile-")))
        log_path = tmp / "daemon.log"
        daemon = DaemonProcess(write_config(tmp / "c.yaml", config), {}, log_path)
        stack.callback(daemon.kill)  # a no-op once it has exited; a SIGKILL if a step below failed
        daemon.start()
        assert daemon.proc is not None
        await wait_ready(daemon, listen)
        sampler = RssSampler(daemon.proc.pid)
        sampler.start()
        stack.push_async_callback(sampler.stop)
        await asyncio.sleep(1.0)  # the baseline: the daemon consuming, nothing to deliver yet
        probe_at = time.monotonic()
        probe = {"event": "probe.sent", "workspaceId": ws, "data": {"n": 0}, "id": "probe"}
        await producer.send_and_wait(topic, orjson.dumps(probe))
        sent_at: dict[str, float] = {}
        for n in range(HEALTHY_EVENTS):
            event_id = f"healthy-{n}"
            sent_at[event_id] = time.monotonic()
            record = {"event": "person.created", "workspaceId": ws, "data": {"n": n}, "id": event_id}
            await producer.send_and_wait(topic, orjson.dumps(record))
            await asyncio.sleep(HEALTHY_SPACING)
        deadline = time.monotonic() + 20
        rows: list[Any] = []
        while time.monotonic() < deadline:
            rows = await fetch(
                dsn,
                "SELECT webhook_id::text AS webhook, status, attempts, last_status, last_error "
                "FROM webhookd.deliveries",
            )
            if len(rows) >= failures and len(healthy.requests) >= HEALTHY_EVENTS:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # let the counters of the last attempts settle before scraping
        _, metrics = await get_text(f"http://{listen}/metrics")
        healthz, _ = await get_text(f"http://{listen}/healthz")
        await sampler.stop()
        exit_status = await asyncio.to_thread(daemon.terminate)
        log = log_path.read_text(errors="replace")

    results: dict[str, str] = {}
    for line in log.splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "delivery_dead_lettered":
                results[webhook_kind.get(entry.get("webhook_id", ""), "?")] = str(entry.get("result"))
    drips_ended = min((exchanges[kind].hung_up or [float("inf")])[0] for kind in ("drip-status-line", "drip-body"))
    healthy_arrivals = {r.event_id: r.at for r in healthy.requests}
    return Outcome(
        exchanges=exchanges,
        rows={webhook_kind[r["webhook"]]: dict(r) for r in rows if r["webhook"] in webhook_kind},
        results=results,
        trap=trap.exchange,
        trap_port=trap.port,
        metrics=metrics,
        healthz=healthz,
        exit_status=exit_status,
        log=log,
        rss_baseline=sampler.peak(until=probe_at),
        rss_peak=sampler.peak(since=probe_at),
        healthy_latencies=[healthy_arrivals[e] - sent_at[e] for e in sent_at if e in healthy_arrivals],
        healthy_before_drips_ended=sum(1 for at in healthy_arrivals.values() if at < drips_ended),
    )


def test_every_hostile_receiver_ends_as_its_expected_result(outcome: Outcome) -> None:
    failed = {kind: result for kind, (result, _) in EXPECTED.items() if result != "2xx"}
    assert outcome.results == failed, {k: outcome.rows.get(k, {}).get("last_error") for k in EXPECTED}


def test_every_failure_is_one_dead_letter_with_its_status_and_a_short_printable_error(outcome: Outcome) -> None:
    for kind, row in sorted(outcome.rows.items()):
        print(f"\n{kind:<20} {row['last_status']!s:<5} {row['last_error'][:110]!r}", end="")
    assert set(outcome.rows) == {kind for kind, (result, _) in EXPECTED.items() if result != "2xx"}
    for kind, row in outcome.rows.items():
        result, status = EXPECTED[kind]
        assert (row["status"], row["attempts"], row["last_status"]) == ("dead", 1, status), kind
        error = row["last_error"]
        assert error, kind
        # The excerpt of a receiver's answer is capped, so a hostile body cannot bloat the table or the logs.
        assert len(error) <= 600, (kind, len(error))
        assert "\x00" not in error, kind
        if status is None:
            assert error.startswith(result), (kind, error)


def test_a_huge_body_is_read_only_up_to_the_limit(outcome: Outcome) -> None:
    for kind in ("huge-200-chunked", "huge-500-sized"):
        seen = outcome.exchanges[kind]
        print(f"\n{kind}: the receiver got {seen.bytes_sent / 2**20:.1f} MiB out before the daemon hung up "
              f"after {seen.seconds_open}s")  # fmt: skip
        assert seen.hung_up, f"{kind}: the daemon read all {HUGE} bytes instead of hanging up"
        # Socket buffers on both sides take a few MiB; reading the body would have taken all 200.
        assert seen.bytes_sent < 32 * 2**20, (kind, seen.bytes_sent)
        assert seen.seconds_open is not None, kind
        assert seen.seconds_open < TIMEOUT, kind
    assert "HTTP 500" in outcome.rows["huge-500-sized"]["last_error"]


def test_memory_stays_flat_while_receivers_stream_huge_bodies_and_headers(outcome: Outcome) -> None:
    growth = outcome.rss_peak - outcome.rss_baseline
    print(f"\ndaemon RSS: {outcome.rss_baseline:.1f} MiB before the hostile attempts, peak {outcome.rss_peak:.1f} MiB")
    assert outcome.rss_baseline > 0
    assert growth < 40, f"RSS grew by {growth:.1f} MiB"


def test_endless_and_giant_headers_are_cut_off_at_once(outcome: Outcome) -> None:
    for kind in ("endless-headers", "giant-header"):
        seen = outcome.exchanges[kind]
        print(f"\n{kind}: {seen.bytes_sent / 2**20:.1f} MiB written before the daemon hung up after "
              f"{seen.seconds_open}s")  # fmt: skip
        assert seen.seconds_open is not None, kind
        assert seen.seconds_open < 1.0, kind
        assert seen.bytes_sent < 32 * 2**20, kind


def test_a_slow_drip_ends_as_a_timeout_within_the_delivery_timeout(outcome: Outcome) -> None:
    for kind in ("drip-status-line", "drip-body"):
        seen = outcome.exchanges[kind]
        assert seen.seconds_open is not None, f"{kind}: the daemon never hung up"
        assert TIMEOUT - 0.2 <= seen.seconds_open <= TIMEOUT + 1.0, (kind, seen.seconds_open)
        assert outcome.rows[kind]["last_error"].startswith("timeout")


def test_a_redirect_is_a_3xx_failure_and_its_location_is_never_requested(outcome: Outcome) -> None:
    assert outcome.trap.opened == [], "the daemon followed a redirect to loopback"
    for kind, target in (("redirect-metadata", "http://169.254.169.254/"), ("redirect-loopback", None)):
        error = outcome.rows[kind]["last_error"]
        # The operator is told where it pointed (scheme and host; a path may hold a token), and the daemon never
        # went there.
        assert "redirect to" in error, error
        if target is not None:
            assert target in error, error
        assert len(outcome.exchanges[kind].opened) == 1, "one attempt, one connection"


def test_a_socket_closed_or_reset_at_once_is_a_connection_error(outcome: Outcome) -> None:
    for kind in ("closed-at-once", "reset-after-request"):
        assert outcome.results.get(kind) == "connection_error", kind
        assert len(outcome.exchanges[kind].opened) == 1, f"{kind}: one attempt, one connection"


def test_an_answer_that_is_not_http_is_a_connection_error_without_waiting_for_the_timeout(outcome: Outcome) -> None:
    for kind in ("garbage-text", "garbage-binary"):
        seen = outcome.exchanges[kind]
        assert outcome.results.get(kind) == "connection_error", kind
        assert seen.seconds_open is not None, kind
        assert seen.seconds_open < 1.0, (kind, seen.seconds_open)


def test_attempt_counters_by_result_match_the_outcomes(outcome: Outcome) -> None:
    expected: dict[str, int] = {"2xx": HEALTHY_EVENTS}
    for result, _ in EXPECTED.values():
        expected[result] = expected.get(result, 0) + 1
    counted = {
        result: metric(outcome.metrics, "webhookd_delivery_attempts_total", result=result)
        for result in ("2xx", "3xx", "4xx", "5xx", "timeout", "connection_error", "blocked")
    }
    assert counted == {result: float(expected.get(result, 0)) for result in counted}
    dead = metric(outcome.metrics, "webhookd_deliveries_total", outcome="dead_lettered")
    assert dead == len(EXPECTED) - 1


def test_a_healthy_webhook_keeps_getting_its_deliveries_meanwhile(outcome: Outcome) -> None:
    latencies = outcome.healthy_latencies
    print(f"\nhealthy deliveries: {len(latencies)}, latency max {max(latencies, default=0):.2f}s; "
          f"{outcome.healthy_before_drips_ended} arrived while the drips were still open")  # fmt: skip
    assert len(latencies) == HEALTHY_EVENTS
    assert max(latencies) < 1.5
    assert outcome.healthy_before_drips_ended >= 3, "the healthy deliveries did not overlap the hostile attempts"


def test_the_daemon_neither_crashes_nor_logs_an_error(outcome: Outcome) -> None:
    assert outcome.healthz == 200
    assert outcome.exit_status == 0
    levels = [orjson.loads(line).get("level") for line in outcome.log.splitlines() if line.startswith("{")]
    assert "error" not in levels, outcome.log[-3000:]
    assert "critical" not in levels, outcome.log[-3000:]
    assert "Traceback" not in outcome.log
