"""Helpers for the tests that run `webhookd run` as a real process and look at it from outside: waiting for
readiness, reading /metrics, sampling its memory, and making a database and topic that outlive one test."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import psutil

from tests.support import DaemonProcess, get_text, metric, migrated_database
from webhookd.embedded import create_topic

__all__ = ["RssSampler", "fresh_database", "fresh_topic", "get_text", "metric", "wait_ready"]

fresh_database = migrated_database  # module-scoped scenarios cannot use the per-test `dsn` fixture


async def fresh_topic(kafka: str, partitions: int = 2) -> str:
    name = f"events-{uuid.uuid4().hex[:10]}"
    await create_topic(kafka, name, partitions)
    return name


async def wait_ready(daemon: DaemonProcess, listen: str, timeout: float = 40) -> None:
    """Wait for /readyz to answer 200, i.e. the process consumes and Postgres answers."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            assert daemon.proc is not None
            if daemon.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with status {daemon.proc.returncode} during startup")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"http://{listen}/readyz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon was not ready within {timeout} s")
            await asyncio.sleep(0.1)


@dataclass
class RssSampler:
    """Samples a process's resident memory in the background, in MiB."""

    pid: int
    interval: float = 0.05
    samples: list[tuple[float, float]] = field(default_factory=list)  # (monotonic time, MiB)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        process = psutil.Process(self.pid)
        with contextlib.suppress(psutil.Error):  # the process may end under us; what was sampled stays
            while True:
                self.samples.append((time.monotonic(), process.memory_info().rss / 2**20))
                await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def peak(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max((mib for at, mib in self.samples if since <= at <= until), default=0.0)
