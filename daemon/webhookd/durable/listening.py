"""A LISTEN that lasts as long as the daemon: a connection of its own, connected again (with backoff) after any loss.

A notification sent while the connection is down is lost for good, so after every (re)connect, once the listener
is in place, the caller catches up: it reads whatever may have been announced meanwhile. Then it follows the
connection until the connection fails.

Errors that another try may cure (`pgerrors.TRANSIENT`) are always retried. Others are retried too once the first
catch-up has succeeded, so that a change made later cannot stop the daemon; before that, `strict_first_catch_up`
makes them end `run` instead: a caller that starts with that first catch-up learns at once why it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from webhookd.durable.transient import TRANSIENT
from webhookd.runtime.tls import PostgresConnect

log = structlog.get_logger("webhookd.durable.listening")

_FIRST_RETRY_SECONDS = 0.5
_MAX_RETRY_SECONDS = 10.0

# asyncpg's listener callback: (connection, pid of the notifying backend, channel, payload).
OnNotify = Callable[[Any, int, str, Any], None]
Step = Callable[[asyncpg.Connection], Awaitable[None]]


class Listening:
    """LISTEN on `channel` until cancelled: `catch_up(conn)` after each (re)connect, then `follow(conn)`, which
    returns or raises once the connection is gone. `listening` says whether the listener is in place now."""

    def __init__(
        self,
        postgres: PostgresConnect,
        channel: str,
        on_notify: OnNotify,
        catch_up: Step,
        follow: Step,
        lost: str,
        *,
        strict_first_catch_up: bool = False,
    ) -> None:
        self._postgres = postgres  # the pool's own connect arguments, TLS included
        self._channel = channel
        self._on_notify = on_notify
        self._catch_up = catch_up
        self._follow = follow
        self._lost = lost  # the event logged when the connection is lost
        self._strict_first_catch_up = strict_first_catch_up
        self.listening = False

    async def run(self) -> None:
        backoff = _FIRST_RETRY_SECONDS
        caught_up = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._postgres.dsn, ssl=self._postgres.ssl)
                await conn.add_listener(self._channel, self._on_notify)
                self.listening = True
                await self._catch_up(conn)
                caught_up = True
                backoff = _FIRST_RETRY_SECONDS
                await self._follow(conn)
            except (*TRANSIENT, asyncpg.PostgresError) as exc:
                if self._strict_first_catch_up and not caught_up and not isinstance(exc, TRANSIENT):
                    raise
                log.warning(self._lost, error=str(exc) or type(exc).__name__, retry_in=backoff)
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):  # the connection may already be gone; nothing to save
                        await conn.close(timeout=1)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_RETRY_SECONDS)
