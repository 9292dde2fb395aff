"""The HTTP/1.1 client of deliveries: kept-alive connections per origin, opened only to addresses egress allows.

Webhookd sends one request shape, so its client is that shape and no more: a POST whose bytes the sender has
already laid out, written in one call on a pooled connection, its answer parsed by llhttp (`http_wire`). A general
client's machinery (a request and response object per attempt, header multidicts, stream readers, per-request
timers and tracing hooks) was most of what a delivery cost.

A host name is resolved (cached for `dns_ttl`), every address the egress policy forbids is dropped, and the socket
connects to the very address that was checked: no second lookup, hence no DNS rebinding. TLS goes through asyncio's
transports with the delivery context, which always verifies the chain and the host name. One deadline bounds the
whole attempt: lookup, connect, handshake, request and answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import aiohappyeyeballs

from webhookd.delivery.egress import BlockedDestination, EgressPolicy, literal_address
from webhookd.delivery.http_wire import Response, StaleConnection, WireProtocol

# What getaddrinfo answers: family, type, protocol, canonical name, socket address.
_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]

# Addresses of names remembered at most this many at once; a full cache is dropped, not evicted one by one.
_NAMES_REMEMBERED = 10_000


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a connection goes: scheme, host as resolved or connected (no brackets), port."""

    tls: bool
    host: str
    port: int


@dataclass(frozen=True)
class ClientLimits:
    """How long idle connections and resolved names are kept, and how many idle connections an origin keeps."""

    body_limit: int  # bytes of an answer's body kept; past them the connection is closed
    idle_per_origin: int
    idle_total: int  # idle connections over all origins: each is a socket, and receivers can be many
    idle_seconds: float = 15.0
    dns_ttl: float = 30.0


class HttpClient:
    """Carries requests to origins over kept-alive connections, within one deadline each."""

    def __init__(self, policy: EgressPolicy, tls: ssl.SSLContext, limits: ClientLimits) -> None:
        self._policy = policy
        self._tls = tls
        self._limits = limits
        self._idle: dict[Origin, list[WireProtocol]] = {}
        self._idle_count = 0
        self._names: dict[tuple[str, int], tuple[float, list[_AddrInfo]]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Task[list[_AddrInfo]]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def exchange(self, origin: Origin, request: bytes, timeout: float) -> Response:
        """Send `request` to `origin` and read its answer, all within `timeout` seconds.

        Raises TimeoutError when the deadline passes, BlockedDestination when egress forbids every address of the
        host, and OSError (ssl.SSLError and http_wire.ProtocolError among them) for everything else that fails.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection = self._idle_connection(origin, loop.time())
        if connection is not None:
            try:
                return await self._carry(connection, origin, request, deadline, loop)
            except StaleConnection:
                pass  # the receiver closed it while idle, before reading a byte: once more, on a new connection
        connection = await self._connect(origin, deadline, loop)
        return await self._carry(connection, origin, request, deadline, loop)

    async def close(self) -> None:
        """Close every idle connection; those in use close as their exchanges end."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        self._idle_count = 0
        # Aborted transports let go of their sockets on the loop's next iteration.
        await asyncio.sleep(0)

    # -- connections

    def _idle_connection(self, origin: Origin, now: float) -> WireProtocol | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if connection.open and now - connection.idle_since < self._limits.idle_seconds:
                return connection
            connection.close()
        return None

    async def _carry(
        self,
        connection: WireProtocol,
        origin: Origin,
        request: bytes,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> Response:
        try:
            waiter = connection.exchange(request)
        except StaleConnection:
            connection.close()
            raise
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            if connection.reusable and not self._closed:
                self._keep(connection, origin, loop)
            else:
                connection.close()

    def _keep(self, connection: WireProtocol, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = []
        if len(idle) >= self._limits.idle_per_origin or self._idle_count >= self._limits.idle_total:
            connection.close()
            return
        connection.idle_since = loop.time()
        idle.append(connection)
        self._idle_count += 1
        if self._sweep is None:
            self._sweep = loop.call_later(self._limits.idle_seconds, self._close_expired, loop)

    def _close_expired(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close connections idle past `idle_seconds`: receivers drop them about then, and each holds a socket."""
        self._sweep = None
        oldest = loop.time() - self._limits.idle_seconds
        for origin in list(self._idle):
            idle = self._idle[origin]
            # Oldest first: connections are appended when they become idle and taken from the end.
            expired = 0
            while expired < len(idle) and (idle[expired].idle_since <= oldest or not idle[expired].open):
                idle[expired].close()
                expired += 1
            del idle[:expired]
            self._idle_count -= expired
            if not idle:
                del self._idle[origin]
        if self._idle:
            self._sweep = loop.call_later(self._limits.idle_seconds, self._close_expired, loop)

    async def _connect(self, origin: Origin, deadline: float, loop: asyncio.AbstractEventLoop) -> WireProtocol:
        async with asyncio.timeout_at(deadline):
            addresses = await self._addresses(origin, loop)
            try:
                # Happy eyeballs (RFC 8305), as aiohttp connects: the next address is tried 250 ms into the one
                # before, IPv6 and IPv4 taking turns, so one silent address does not spend the whole deadline.
                sock = await aiohappyeyeballs.start_connection(
                    addresses, happy_eyeballs_delay=_NEXT_ADDRESS_SECONDS, interleave=1, loop=loop
                )
            except OSError as exc:
                raise ConnectionError(f"cannot connect to {origin.host}:{origin.port} ({_reason(exc)})") from exc
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _, connection = await loop.create_connection(
                    lambda: WireProtocol(self._limits.body_limit),
                    sock=sock,
                    ssl=self._tls if origin.tls else None,
                    # A name's root dot is no part of the name its certificate carries.
                    server_hostname=origin.host.rstrip(".") if origin.tls else None,
                )
            except OSError as exc:
                sock.close()
                if not origin.tls:
                    raise
                raise ConnectionError(f"TLS with {origin.host}:{origin.port} failed: {_reason(exc)}") from exc
            except BaseException:
                sock.close()
                raise
            return connection

    async def _addresses(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> list[_AddrInfo]:
        """The addresses of the origin's host that egress allows; BlockedDestination when there are none."""
        key = (origin.host, origin.port)
        known = self._names.get(key)
        if known is not None and known[0] > loop.time():
            addresses = known[1]
        else:
            lookup = self._lookups.get(key)
            if lookup is None:
                # One lookup for every delivery that wants the name meanwhile: they would each take a thread of the
                # resolver's small pool, which every other host's lookups share.
                lookup = self._lookups[key] = loop.create_task(self._resolve(origin))
                lookup.add_done_callback(lambda task: self._looked_up(key, task))
            addresses = await asyncio.shield(lookup)
        allowed = [a for a in addresses if self._policy.allows(ipaddress.ip_address(str(a[4][0]).split("%")[0]))]
        if not allowed:
            raise BlockedDestination(origin.host)
        return allowed

    async def _resolve(self, origin: Origin) -> list[_AddrInfo]:
        loop = asyncio.get_running_loop()
        literal = literal_address(origin.host)
        infos = await loop.getaddrinfo(
            str(literal) if literal is not None else origin.host,
            origin.port,
            type=socket.SOCK_STREAM,
            proto=socket.IPPROTO_TCP,
            # Only the families this machine can reach, as aiohttp asked.
            flags=socket.AI_NUMERICHOST if literal is not None else socket.AI_ADDRCONFIG,
        )
        if len(self._names) >= _NAMES_REMEMBERED:
            self._names.clear()
        addresses: list[_AddrInfo] = [(f, t, p, c, tuple(a)) for f, t, p, c, a in infos]
        self._names[(origin.host, origin.port)] = (loop.time() + self._limits.dns_ttl, addresses)
        return addresses

    def _looked_up(self, key: tuple[str, int], task: asyncio.Task[list[_AddrInfo]]) -> None:
        self._lookups.pop(key, None)
        if not task.cancelled():
            task.exception()  # the callers have it; read here too, for when every caller was cancelled first


# How long a connection attempt runs alone before the host's next address is tried beside it (RFC 8305's default).
_NEXT_ADDRESS_SECONDS = 0.25


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno and not str(exc).strip():
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _expire(waiter: asyncio.Future[Response]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
