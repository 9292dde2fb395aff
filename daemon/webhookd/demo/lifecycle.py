"""What both demos, `webhookd dev` and `webhookd dev --cdc`, share to start and stop: their settings, SIGINT and
SIGTERM caught from the first moment to the last cleanup (`Interrupts`), servers started in threads (`in_thread`),
and the daemon run beside a receiver on loopback (`DemoRun`), which ends the demo at once when it cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import structlog
from aiohttp import web

from webhookd.runtime.config import ConfigError, Settings, load_settings
from webhookd.runtime.logs import setup_logging
from webhookd.runtime.service import Service

log = structlog.get_logger("webhookd.demo")
T = TypeVar("T")

DEV_DEFAULTS = {
    "WEBHOOKD_KAFKA__GROUP_ID": "webhookd-dev",
    "WEBHOOKD_KAFKA__SESSION_TIMEOUT_MS": "6000",
    "WEBHOOKD_KAFKA__FETCH_MAX_WAIT_MS": "20",
    "WEBHOOKD_DELIVERY__CONCURRENCY": "32",
    "WEBHOOKD_DELIVERY__TIMEOUT_SECONDS": "5",
    "WEBHOOKD_DELIVERY__RETRY_SCHEDULE": '["1s", "5s", "30s"]',
    "WEBHOOKD_DELIVERY__DRAIN_TIMEOUT_SECONDS": "5",
    "WEBHOOKD_EGRESS__ALLOW_PRIVATE": "true",
    "WEBHOOKD_LOGGING__FORMAT": "console",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dev_settings(config: Path | None, overrides: Mapping[str, str]) -> Settings | None:
    """A demo's settings, logging set up by them; None (after saying why) when the file or an override is bad."""
    if config is None:
        # Without a file, the same settings as config/dev.yaml: the demo receiver is on loopback, and retries must
        # show within a minute.
        overrides = {**DEV_DEFAULTS, **overrides}
    try:
        settings = load_settings(config, {**os.environ, **overrides})
    except ConfigError as exc:
        print(f"webhookd: {exc}")
        return None
    setup_logging(settings.logging.level, settings.logging.format)
    return settings


class Interrupted(Exception):
    """A signal came while the demo was starting; `Interrupts.status` is the exit status."""


class DemoFailed(Exception):
    """Something the demo needs did not start; the message says what and why."""


class Interrupts:
    """SIGINT and SIGTERM, caught from a demo's first moment until its last cleanup, as an event.

    Without it, asyncio would cancel whatever the demo awaits at a Ctrl-C: a server that a thread is starting then
    comes up after its `finally` has run, and nobody stops it until exit; a wait for the daemon would not notice.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal: int | None = None

    def __enter__(self) -> Self:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._caught, sig)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _caught(self, sig: int) -> None:
        if self.signal is None:
            self.signal = sig
        self.event.set()

    @property
    def status(self) -> int:
        """The shell's exit status for a process ended by the signal: 130 for Ctrl-C."""
        return 128 + (self.signal or signal.SIGINT)

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted

    async def race(self, step: Awaitable[T]) -> T:
        """`step`'s result; or, as soon as a signal comes, Interrupted, the step cancelled."""
        task = asyncio.ensure_future(step)
        await first_of(task, self.event.wait())
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Interrupted


async def first_of(*waits: Awaitable[Any], timeout: float | None = None) -> None:
    """Until the first of `waits` ends, or `timeout` s. The others are cancelled, except tasks: those are only
    watched, their owners decide (and read their outcome)."""
    futures = [asyncio.shield(w) if isinstance(w, asyncio.Task) else asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # read, so that asyncio does not report it as never retrieved


async def in_thread(what: str, blocking: Callable[[], T], interrupts: Interrupts) -> T:
    """`blocking()` (a server's start, say), run in a thread; DemoFailed saying that `what` failed, when it does.

    A signal does not cancel it: a server that a start is about to return must be kept, to be stopped in order,
    and starts are bounded by their own timeouts. The caller keeps what is returned, then calls
    `interrupts.check()`; it races the call only where abandoning the thread leaves nothing behind.
    """
    try:
        return await asyncio.to_thread(blocking)
    except Exception as exc:
        interrupts.check()  # a Ctrl-C reached a child in our process group too (Maven): not a failure
        raise DemoFailed(f"{what} failed: {exc}") from exc


async def wait_started(
    started: asyncio.Event, serving: asyncio.Task[int], interrupts: Interrupts, timeout: float
) -> None:
    """Until the daemon has `started`. DemoFailed as soon as `serving` ends first or after `timeout` s, Interrupted as
    soon as a signal comes: a daemon that cannot start must not be waited for."""
    await first_of(started.wait(), serving, interrupts.event.wait(), timeout=timeout)
    if started.is_set():
        return
    if serving.done():
        raise DemoFailed(f"the daemon did not start (exit status {serving.result()}): see the error it logged")
    interrupts.check()
    raise DemoFailed(f"the daemon did not start within {timeout:g} s; its log above shows how far it came")


class DemoRun:
    """A demo's receiver on loopback and the daemon beside it; `finish` stops both."""

    def __init__(self, settings: Settings, handle: Handler, path: str, port: int, interrupts: Interrupts) -> None:
        self._handle, self._path, self._port = handle, path, port
        self.service = Service(settings)
        self._interrupts = interrupts
        self.interrupted = interrupts.event
        self._runner: web.AppRunner | None = None
        self.serving: asyncio.Task[int] | None = None

    async def start(self, startup_timeout: float) -> None:
        app = web.Application()
        app.router.add_post(self._path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        self.serving = asyncio.create_task(self._serve())
        await wait_started(self.service.started, self.serving, self._interrupts, startup_timeout)

    async def _serve(self) -> int:
        try:
            return await self.service.serve(install_signal_handlers=False)
        except Exception as exc:  # a bug: shown with its traceback where the daemon logs, and the demo ends
            log.error("daemon_failed", exc_info=exc)
            return 1

    @property
    def going(self) -> bool:
        return not self.interrupted.is_set() and self.serving is not None and not self.serving.done()

    async def finish(self, status: int) -> int:
        """Stop the daemon and the receiver; the worse of `status` and the daemon's own."""
        if self.serving is not None:
            # A daemon that stopped (or never started) on its own must not be asked again: a second request exits.
            if not self.serving.done() and not self.service.stopping.is_set():
                self.service.request_stop()
            status = max(status, await self.serving)
        if self._runner is not None:
            await self._runner.cleanup()
        return status
