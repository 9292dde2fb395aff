"""The receivers the benchmark delivers to, none of them the bottleneck, and a measure of their own capacity.

nginx with Debian's echo module (`apt-get install nginx-light libnginx-mod-http-echo`) where it is installed: in C,
it costs the machine least, so most of the two cores go to what is measured. Otherwise several aiohttp processes
sharing one port. Either answers at once or after a delay, and counts the requests it received.

Two more for single measurements: one that records each delivery's latency from the `sent_ms` its event carries,
and one that accepts connections and never answers (the backlog case). And one whose paths behave differently side
by side, on one port or many: healthy, hung until healed, or noting each arrival (the isolation and cluster cases).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson
import uvloop
from aiohttp import web

from bench.stack import process_tree
from webhookd.runtime.children import free_port

_ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
_STATUS_PATH = "/__status"


class Receiver(Protocol):
    """A receiver on 127.0.0.1:`port` that answers 200 and counts what it answered."""

    port: int
    name: str

    @property
    def count(self) -> int: ...

    def pids(self) -> list[int]:
        """The receiver's processes, whose CPU the bench reports beside the daemon's."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _wait_listening(port: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on port {port}")


class NginxReceiver:
    """nginx, one worker: `return 200` at once, or the echo module's `echo_sleep` for a delay.

    With `latency_log`, it logs each request's arrival time and body, from which `latencies` reads the milliseconds
    from each event's `sent_ms` to its arrival: the measuring costs nginx's few microseconds, not a Python process.
    """

    def __init__(self, delay: float, latency_log: bool = False) -> None:
        self.port = free_port()
        self.name = "nginx (1 worker)"
        self._delay = delay
        self._dir = Path(tempfile.mkdtemp(prefix="webhookd-bench-nginx-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._status_reads = 0
        self._latency_log = self._dir / "latency.log" if latency_log else None
        self._read_to = 0

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None and _ECHO_MODULE.exists()

    def _config(self) -> str:
        # `return` answers before the body is read, so a logged body needs the echo module's answer.
        answer = f"echo_sleep {self._delay}; echo ok;" if self._delay else "echo ok;"
        if not self._delay and self._latency_log is None:
            answer = 'return 200 "ok\\n";'
        temp = " ".join(f"{kind}_temp_path {self._dir / kind};" for kind in ("client_body", "proxy", "fastcgi"))
        log = (
            # $msec is when the line is written, after any delay; less $request_time, it is when the request came.
            f"log_format latency escape=none '$msec $request_time $request_body'; "
            f"access_log {self._latency_log} latency;"
            if self._latency_log is not None
            else "access_log off;"
        )
        return f"""
load_module {_ECHO_MODULE};
daemon off;
worker_processes 1;
pid {self._dir / "nginx.pid"};
error_log {self._dir / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
    {log}
    {temp} uwsgi_temp_path {self._dir / "uwsgi"}; scgi_temp_path {self._dir / "scgi"};
    keepalive_requests 10000000;
    client_max_body_size 16m;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        location = {_STATUS_PATH} {{ stub_status; }}
        location / {{ echo_read_request_body; {answer} }}
    }}
}}
"""

    @property
    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{_STATUS_PATH}", timeout=5) as response:
            text = response.read().decode()
        self._status_reads += 1
        # stub_status counts every request as it arrives (with a delay, up to that delay before it is answered),
        # its own reads (this one included) among them.
        return int(text.splitlines()[2].split()[2]) - self._status_reads

    def pids(self) -> list[int]:
        """nginx's master and its worker."""
        return process_tree(self._proc.pid if self._proc is not None else None)

    async def latencies(self) -> list[float]:
        """Milliseconds from `sent_ms` to arrival of each request logged since the last call."""
        if self._latency_log is None or not self._latency_log.exists():
            return []
        with self._latency_log.open("rb") as log:
            log.seek(self._read_to)
            text = log.read()
        complete = text[: text.rfind(b"\n") + 1]  # a line being written is read next time
        self._read_to += len(complete)
        found: list[float] = []
        for line in complete.splitlines():
            logged, took, body = line.split(b" ", 2)
            if body.startswith(b"{"):  # not a status read
                arrived = float(logged) - float(took)
                found.append(arrived * 1000 - orjson.loads(body)["data"]["sent_ms"])
        return found

    def start(self) -> None:
        config = self._dir / "nginx.conf"
        config.write_text(self._config())
        self._proc = subprocess.Popen(
            ["nginx", "-p", str(self._dir), "-e", str(self._dir / "error.log"), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.port, "nginx")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGQUIT)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def _aiohttp_receiver(port: int, delay: float, counter: Any) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        with counter.get_lock():
            counter.value += 1
        return web.Response(text="ok")

    async def serve() -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        await web.SockSite(runner, sock, backlog=4096).start()
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(serve())


class AiohttpReceivers:
    """`processes` aiohttp receivers sharing one port (SO_REUSEPORT); `count` is every 2xx they gave."""

    def __init__(self, delay: float, processes: int) -> None:
        self.port = free_port()
        self.name = f"aiohttp ({processes} processes)"
        self._counter: Any = multiprocessing.Value("q", 0)
        self._procs = [
            multiprocessing.Process(target=_aiohttp_receiver, args=(self.port, delay, self._counter), daemon=True)
            for _ in range(processes)
        ]

    @property
    def count(self) -> int:
        return int(self._counter.value)

    def start(self) -> None:
        for proc in self._procs:
            proc.start()
        _wait_listening(self.port, "the aiohttp receivers")

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def stop(self) -> None:
        for proc in self._procs:
            if proc.pid is not None:  # started
                proc.terminate()
                proc.join(5)


class _Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


R = TypeVar("R", bound=_Startable)


@contextlib.contextmanager
def running(receiver: R) -> Iterator[R]:
    """`receiver`, started, and stopped on the way out however that goes (a failed start included)."""
    try:
        receiver.start()
        yield receiver
    finally:
        receiver.stop()


def receiver_for(delay: float, prefer_nginx: bool = True) -> Receiver:
    if prefer_nginx and NginxReceiver.available():
        return NginxReceiver(delay)
    return AiohttpReceivers(delay, processes=max(2, os.cpu_count() or 2))


def _load_process(url: str, body: bytes, seconds: float, concurrency: int, out: Any) -> None:
    async def run() -> int:
        done = 0
        deadline = time.monotonic() + seconds
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    async with session.post(url, data=body) as response:
                        await response.read()
                    done += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done

    out.put(asyncio.run(run()))


def capacity(receiver: Receiver, body: bytes, concurrency: int, seconds: float = 4.0, clients: int = 2) -> float:
    """Requests a second `receiver` answered to `clients` load processes at once: a floor on its own capacity,
    since on a small machine the clients run out of CPU first."""
    results: Any = multiprocessing.Queue()
    url = f"http://127.0.0.1:{receiver.port}/capacity"
    procs = [
        multiprocessing.Process(target=_load_process, args=(url, body, seconds, concurrency, results))
        for _ in range(clients)
    ]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join(10)
    return float(total) / (time.monotonic() - started)


def _latency_receiver(port: int, delay: float) -> None:
    latencies: list[float] = []

    async def deliver(request: web.Request) -> web.Response:
        body = await request.read()
        latencies.append(time.time() * 1000 - orjson.loads(body)["data"]["sent_ms"])
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text="ok")

    async def collect(_: web.Request) -> web.Response:
        taken, latencies[:] = list(latencies), []
        return web.Response(body=orjson.dumps(taken))

    app = web.Application()
    app.router.add_post("/{tail:.*}", deliver)
    app.router.add_get("/latencies", collect)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=False)


class LatencyReceiver:
    """One aiohttp process that notes, per delivery, milliseconds from the event's `sent_ms` to its arrival."""

    def __init__(self, delay: float) -> None:
        self.port = free_port()
        self.name = "aiohttp (1 process, recording latency)"
        self._proc = multiprocessing.Process(target=_latency_receiver, args=(self.port, delay), daemon=True)

    def start(self) -> None:
        self._proc.start()
        _wait_listening(self.port, "the latency receiver")

    async def latencies(self) -> list[float]:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}/latencies") as response:
            return list(orjson.loads(await response.read()))

    def stop(self) -> None:
        if self._proc.pid is not None:  # started
            self._proc.terminate()
            self._proc.join(5)


class SilentReceiver:
    """Accepts connections, reads what comes, never answers: every delivery waits for its timeout."""

    def __init__(self) -> None:
        self.port = free_port()
        self._proc = multiprocessing.Process(target=_silent, args=(self.port,), daemon=True)

    def start(self) -> None:
        self._proc.start()
        _wait_listening(self.port, "the silent receiver")

    def stop(self) -> None:
        if self._proc.pid is not None:  # started
            self._proc.terminate()
            self._proc.join(5)


def _silent(port: int) -> None:
    async def swallow(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    async def serve() -> None:
        server = await asyncio.start_server(swallow, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(serve())


@dataclass(frozen=True)
class ScriptedState:
    """What a ScriptedReceiver has seen, its times on the machine's monotonic clock (`time.monotonic()` in any
    process): `/ok/` answers and when the last was given, every `/log/` arrival, and when it refused one."""

    answered: int
    last_answer: float
    arrivals: list[float]
    refused_at: float | None


class _Script:
    """The behaviour of a ScriptedReceiver's paths, inside its process."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.answered = 0
        self.last_answer = 0.0
        self.arrivals: list[float] = []
        self.retry_after: int | None = None  # the next `/log/` request is answered 429 with this Retry-After
        self.refused_at: float | None = None
        self.heals: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)

    async def ok(self, request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(self.delay)
        self.answered += 1
        self.last_answer = time.monotonic()
        return web.Response(text="ok")

    async def hung(self, request: web.Request) -> web.Response:
        await self.heals[request.match_info["run"]].wait()
        return web.Response(text="ok")

    async def log(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        await request.read()
        if self.retry_after is not None:
            seconds, self.retry_after, self.refused_at = self.retry_after, None, self.arrivals[-1]
            return web.Response(status=429, headers={"Retry-After": str(seconds)})
        return web.Response(text="ok")

    async def heal(self, request: web.Request) -> web.Response:
        self.heals[request.match_info["run"]].set()
        return web.Response(status=204)

    async def refuse(self, request: web.Request) -> web.Response:
        self.retry_after = int(request.match_info["seconds"])
        return web.Response(status=204)

    async def state(self, _request: web.Request) -> web.Response:
        fields = {"answered": self.answered, "last_answer": self.last_answer, "arrivals": self.arrivals}
        return web.Response(body=orjson.dumps({**fields, "refused_at": self.refused_at}))


def _scripted(socks: list[socket.socket], delay: float) -> None:
    async def serve() -> None:
        script = _Script(delay)
        app = web.Application()
        app.router.add_post("/ok/{tail:.*}", script.ok)
        app.router.add_post("/hung/{run}/{tail:.*}", script.hung)
        app.router.add_post("/log/{tail:.*}", script.log)
        app.router.add_post("/__heal/{run}", script.heal)
        app.router.add_post("/__refuse/{seconds}", script.refuse)
        app.router.add_get("/__state", script.state)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        for sock in socks:
            await web.SockSite(runner, sock, backlog=4096).start()
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # uvloop, as the daemon has: the receiver's CPU per request is the least the two cores can give it.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


class ScriptedReceiver:
    """One aiohttp process listening on `ports` ports, whose paths behave as the isolation and cluster sections need.

    - `/ok/...` answers after `delay`, counted;
    - `/hung/RUN/...` hangs until `heal(RUN)`, then answers at once;
    - `/log/...` answers at once, its arrival noted; after `refuse_once(seconds)`, the next one is answered 429 with
      that `Retry-After`.

    Its own process, so that the bench's CPU never delays an answer; the sockets are bound here before it starts,
    so that their ports are known and cannot be taken meanwhile.
    """

    def __init__(self, ports: int = 1, delay: float = 0.0) -> None:
        self._socks = [socket.create_server(("127.0.0.1", 0), backlog=4096) for _ in range(ports)]
        self.ports = [sock.getsockname()[1] for sock in self._socks]
        self._proc = multiprocessing.Process(target=_scripted, args=(self._socks, delay), daemon=True)
        self._http: aiohttp.ClientSession | None = None

    def url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[index]}{path}"

    async def __aenter__(self) -> ScriptedReceiver:
        self._proc.start()
        for sock in self._socks:  # the child has them now
            sock.close()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._proc.pid is not None:  # started
            self._proc.terminate()
            await asyncio.to_thread(self._proc.join, 5)

    async def _call(self, method: str, path: str) -> bytes:
        assert self._http is not None, "used inside `async with`"
        async with self._http.request(method, self.url(0, path)) as response:
            response.raise_for_status()
            return await response.read()

    async def state(self) -> ScriptedState:
        return ScriptedState(**orjson.loads(await self._call("GET", "/__state")))

    async def heal(self, run: str) -> None:
        await self._call("POST", f"/__heal/{run}")

    async def refuse_once(self, retry_after: int) -> None:
        await self._call("POST", f"/__refuse/{retry_after}")
