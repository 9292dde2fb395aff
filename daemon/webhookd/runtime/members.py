"""The daemon processes alive in the cluster, counted in Postgres, and each one's share of a cluster-wide cap.

`delivery.per_host_concurrency` is sized for the receiving host, not for the number of pods, which KEDA changes
under it: every process (each worker of each replica) takes `share(cap) = max(1, cap // live)` of it, `live` being
the number of processes that have sent a heartbeat lately. Rounding down keeps the sum within the cap; a cap below
the number of processes still gives each one slot (no process may be kept from a host altogether), so the cluster
then has as many requests in flight to the host as it has processes.

Each process upserts its row in `webhookd.members` every `interval` seconds (`endpoints.sync_interval_seconds`) and
reads the count in the same statement, which also deletes rows not seen for `_FORGET_BEATS` intervals; it deletes
its own row when it stops. A process that dies without leaving counts until it has missed `_LIVE_BEATS` heartbeats,
so for a few seconds after a crash the others keep the smaller share. A process that joins takes its share from its
first heartbeat, sent before it delivers anything; the others learn of it within one interval, during which the
cluster may hold one share more than the cap.
Cost: one round trip per process per interval (every 2 s by default), whatever the traffic. When Postgres cannot be
reached the last count stands.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable

import asyncpg
import structlog

from webhookd.durable.transient import TRANSIENT

log = structlog.get_logger("webhookd.runtime.members")

# A member is live while its last heartbeat is at most this many intervals old: one late beat does not drop it.
_LIVE_BEATS = 3
# Rows not seen for this many intervals (and at least a minute) are deleted: their process is gone for good.
_FORGET_BEATS = 30
_FORGET_MIN_SECONDS = 60.0

# The process's own row is neither deleted nor counted by the other parts of the statement: the sub-statements of
# one statement see the table as it was before any of them, and must not touch the same row twice.
_BEAT = """
WITH beat AS (
    INSERT INTO webhookd.members AS m (member_id, seen_at, attempt_log) VALUES ($1, clock_timestamp(), $4)
    ON CONFLICT (member_id) DO UPDATE SET seen_at = EXCLUDED.seen_at, attempt_log = EXCLUDED.attempt_log
), gone AS (
    DELETE FROM webhookd.members
    WHERE member_id <> $1 AND seen_at < clock_timestamp() - make_interval(secs => $3)
)
SELECT count(*) + 1 FROM webhookd.members
WHERE member_id <> $1 AND seen_at >= clock_timestamp() - make_interval(secs => $2)
"""
_LEAVE = "DELETE FROM webhookd.members WHERE member_id = $1"


def share(cap: int, live: int) -> int:
    """One process's part of a cluster-wide cap (see the module's docstring)."""
    return max(1, cap // max(1, live))


class Membership:
    """This process's heartbeat in `webhookd.members`, and the count of live processes it reads back."""

    def __init__(
        self, pool: asyncpg.Pool, interval: float, member_id: str | None = None, attempt_log: str = "compact"
    ) -> None:
        self._pool = pool
        # Its endpoints.attempt_log, shown to operators; a row without one is a daemon of an earlier release, which
        # still writes webhookd.attempts (see durable.attempt_partitions.retire_old_table).
        self._attempt_log = attempt_log
        self._interval = interval
        self.member_id = member_id or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self._live = 1  # until the first heartbeat: this process alone, as a single process would be
        self._followers: list[Callable[[int], object]] = []

    @property
    def live(self) -> int:
        """Processes alive in the cluster, this one included."""
        return self._live

    def share(self, cap: int) -> int:
        return share(cap, self._live)

    def follow(self, on_live: Callable[[int], object]) -> None:
        """Call `on_live(live)` now and whenever the count changes (e.g. to set a scheduler's host share)."""
        self._followers.append(on_live)
        on_live(self._live)

    async def beat(self) -> int:
        """Send one heartbeat and return the live count it read; raises if Postgres cannot be reached."""
        live = await self._pool.fetchval(
            _BEAT,
            self.member_id,
            _LIVE_BEATS * self._interval,
            max(_FORGET_BEATS * self._interval, _FORGET_MIN_SECONDS),
            self._attempt_log,
        )
        self._set(int(live))
        return self._live

    def _set(self, live: int) -> None:
        if live == self._live:
            return
        log.info("cluster_members_changed", live=live, was=self._live)
        self._live = live
        for on_live in self._followers:
            on_live(live)

    async def run(self) -> None:
        """Heartbeat every interval until cancelled, the first one at once."""
        while True:
            try:
                await self.beat()
            except TRANSIENT as exc:
                log.warning("heartbeat_failed", error=str(exc) or type(exc).__name__, live=self._live)
            await asyncio.sleep(self._interval)

    async def leave(self) -> None:
        """Remove this process's row, so that the others take its share at their next heartbeat (once `run` has
        been cancelled: a heartbeat after it would put the row back)."""
        await self._pool.execute(_LEAVE, self.member_id)
