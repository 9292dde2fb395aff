"""`webhookd run --workers N`: N consumer processes of one group in one pod, behind the pod's one HTTP port.

Each worker is a whole `webhookd run` of its own and shares nothing with the others but Kafka (one consumer group,
so the partitions are split between them) and Postgres. The supervisor starts, watches and stops them, and answers
the pod's /healthz, /readyz and /metrics by asking every worker on a private loopback port: alive when every
running worker is alive, ready when every worker is ready, and /metrics is every worker's series with a `worker`
label. Counters and histograms add up across workers; the gauges that each worker reads from Postgres
(`webhookd_retry_queue_depth`, `webhookd_retry_table_bytes`, `webhookd_retry_table_dead_rows`,
`webhookd_subscriptions`, `webhookd_endpoints_disabled`) say the same thing once per worker, so take their max() over
a pod, not their sum().

A worker that exits on its own is started again after a pause that doubles up to 30 s; the records it had not
committed go to whichever worker holds the partitions next, so nothing is lost. SIGTERM and SIGINT are passed on to
every worker, which drains as a lone daemon does; the supervisor exits 0 when every worker did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from webhookd.runtime.children import end_with_parent, free_port
from webhookd.runtime.config import Settings
from webhookd.runtime.probes import start_server

log = structlog.get_logger("webhookd.runtime.workers")

_FIRST_PAUSE, _LONGEST_PAUSE = 1.0, 30.0
# A worker that ran this long before exiting was not crash-looping: its next restart waits the first pause again.
_STEADY_SECONDS = 60.0
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass
class Worker:
    """One worker process: its index (its `worker` label), its private port, and how it last exited."""

    index: int
    port: int = 0
    proc: asyncio.subprocess.Process | None = None
    exit_code: int | None = None
    serving: bool = False  # its HTTP port has answered since it was last started (it opens last in start-up)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class _Merged(Collector):
    """Collected once per scrape: the families read from every worker."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(texts: Iterable[tuple[int, str]]) -> list[Metric]:
    """Every worker's families as one set, each sample labelled with its worker's index."""
    families: dict[str, Metric] = {}
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(
                Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    return list(families.values())


class Supervisor:
    """Starts `count` workers with `config`, keeps them running, answers for them, and stops them on a signal."""

    def __init__(self, settings: Settings, config: Path, count: int) -> None:
        self._settings = settings
        self._config = config
        self.workers = [Worker(i) for i in range(count)]
        self._registry = CollectorRegistry(auto_describe=True)
        self._restarts = Counter(
            "webhookd_worker_restarts", "Workers started again after exiting on their own.", registry=self._registry
        )
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        self._http = aiohttp.ClientSession(timeout=_PROBE_TIMEOUT)
        http = self._settings.http
        try:
            runner = await start_server(self._app(), http.host, http.port)
        except OSError as exc:
            log.error("http_listen_failed", listen=http.listen, error=str(exc))
            await self._http.close()
            return 1
        log.info("workers_starting", workers=len(self.workers), listen=http.listen)
        keepers = [asyncio.create_task(self._keep(worker)) for worker in self.workers]
        relay = asyncio.create_task(self._relay_signals())
        failed = False
        try:
            # Every keeper runs until the stop; one that fails (no fork, say) stops the others, which drain.
            for keeper in asyncio.as_completed(keepers):
                try:
                    await keeper
                except Exception as exc:  # reported; then every worker is stopped and awaited
                    log.error("worker_start_failed", error=repr(exc))
                    failed = True
                    self._signals.put_nowait(signal.SIGTERM)
        finally:
            relay.cancel()
            await runner.cleanup()
            await self._http.close()
        codes = [worker.exit_code for worker in self.workers]
        log.info("workers_stopped", exit_codes=codes)
        return 1 if failed or any(code != 0 for code in codes) else 0

    async def _relay_signals(self) -> None:
        # The workers run in sessions of their own, so a terminal's Ctrl-C or a signal to the whole process group
        # reaches them only through here, once: a second copy would make them exit at once without draining.
        while True:
            sig = await self._signals.get()
            self._stopping.set()
            log.info("workers_signalled", signal=sig.name)
            for worker in self.workers:
                if worker.running and worker.proc is not None:
                    with contextlib.suppress(ProcessLookupError):  # it exited between the check and the signal
                        worker.proc.send_signal(sig)

    async def _keep(self, worker: Worker) -> None:
        pause = _FIRST_PAUSE
        while not self._stopping.is_set():
            worker.port = free_port()
            env = {
                **os.environ,
                "WEBHOOKD_HTTP__LISTEN": f"127.0.0.1:{worker.port}",
                "WEBHOOKD_WORKER": str(worker.index),
            }
            started = time.monotonic()
            worker.serving = False
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "webhookd",
                "run",
                "--config",
                str(self._config),
                env=env,
                start_new_session=True,
                preexec_fn=end_with_parent(signal.SIGTERM),
            )
            if self._stopping.is_set():  # the signal came while it was starting, and the relay did not see it
                worker.proc.send_signal(signal.SIGTERM)
            worker.exit_code = await worker.proc.wait()
            if self._stopping.is_set():
                if worker.exit_code in (-signal.SIGTERM, -signal.SIGINT):
                    # Ended by the signal itself: it came before the worker had set up its handlers, so before it
                    # consumed anything. Nothing was left undone.
                    worker.exit_code = 0
                return
            if time.monotonic() - started > _STEADY_SECONDS:
                pause = _FIRST_PAUSE
            log.error("worker_exited", worker=worker.index, exit_code=worker.exit_code, restart_in=pause)
            self._restarts.inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)
            pause = min(pause * 2, _LONGEST_PAUSE)
        # Stopped while this worker waited to be started again: it has nothing left to drain.
        worker.exit_code = 0

    async def _ask(self, worker: Worker, path: str) -> tuple[int, str] | None:
        if not worker.running or self._http is None:
            return None
        try:
            async with self._http.get(f"http://127.0.0.1:{worker.port}{path}") as response:
                worker.serving = True
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None

    def _app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            asked = [w for w in self.workers if w.running]
            answers = await asyncio.gather(*(self._ask(w, "/healthz") for w in asked))
            # A worker being restarted, or still starting (its port opens last), does not fail liveness: restarting
            # the pod would not bring it back sooner, and would stop the healthy ones. Readiness says it.
            alive = all(
                (answer is not None and answer[0] == 200) or (answer is None and not worker.serving)
                for worker, answer in zip(asked, answers, strict=True)
            )
            return web.Response(text="ok\n" if alive else "a worker is stalled\n", status=200 if alive else 503)

        async def readyz(_: web.Request) -> web.Response:
            answers = await asyncio.gather(*(self._ask(w, "/readyz") for w in self.workers))
            ready = all(answer is not None and answer[0] == 200 for answer in answers)
            return web.Response(text="ready\n" if ready else "not ready\n", status=200 if ready else 503)

        async def metrics(_: web.Request) -> web.Response:
            answers = await asyncio.gather(*(self._ask(w, "/metrics") for w in self.workers))
            texts = [(w.index, a[1]) for w, a in zip(self.workers, answers, strict=True) if a and a[0] == 200]
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Merged(merge_expositions(texts)))
            body = generate_latest(registry) + generate_latest(self._registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app
