"""Raw loopback servers that answer scripted bytes, and the delivery HTTP client and sender set up against them,
for the tests of `delivery.http_client`, `delivery.http_wire` and `delivery.sender`."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from webhookd.delivery.egress import EgressPolicy
from webhookd.delivery.http_client import ClientLimits, HttpClient, Origin
from webhookd.delivery.sender import Sender
from webhookd.delivery.signing import Signer
from webhookd.model import AttemptResult, Delivery, Webhook
from webhookd.routing.webhook_options import WebhookOptions

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
SECRET = b"s3cret"
BODY = b'{"event":"person.created","data":{"n":1}}'
BODY_LIMIT = 1024
RAW = b"POST / HTTP/1.1\r\nHost: h\r\n\r\n"  # what HttpClient.exchange carries as is
OPEN = EgressPolicy(allow_private=True)
CLOSED = EgressPolicy(allow_private=False)
SIGNATURE_HEADERS = ["X-Twenty-Webhook-Timestamp", "X-Twenty-Webhook-Signature", "X-Twenty-Webhook-Nonce"]

Reply = tuple[tuple[bytes, ...], bool]  # what the server writes for one request, a write per part; then hang up?


def answer(*parts: bytes, hang_up: bool = False) -> Reply:
    return parts, hang_up  # no parts: silence, and the server waits for the next request or the client's hang-up


@dataclass
class Connection:
    """One accepted connection: the requests read on it, and whether it ended because the client hung up."""

    writer: asyncio.StreamWriter
    requests: list[bytes] = field(default_factory=list)
    client_hung_up: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float = 0.0

    async def hang_up(self, within: float = 2.0) -> float:
        """When the client hung up; fails if it did not within `within` seconds."""
        await asyncio.wait_for(self.ended.wait(), within)
        assert self.client_hung_up, "the server ended the connection, not the client"
        return self.ended_at


class Server:
    """A loopback server of raw bytes: the n-th request it reads gets the n-th reply (the last serves any later)."""

    def __init__(self, *replies: Reply, host: str = "127.0.0.1") -> None:
        self.replies, self.host, self.port = replies or (answer(OK),), host, 0
        self.connections: list[Connection] = []
        self.requests: list[bytes] = []

    def url(self, path: str = "/hook", host: str | None = None) -> str:
        return f"http://{host or (f'[{self.host}]' if ':' in self.host else self.host)}:{self.port}{path}"

    @property
    def origin(self) -> Origin:
        return Origin(False, self.host, self.port)

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        # Hanging up rather than cancelling: Python 3.11's start_server logs a cancelled handler as an error.
        for connection in self.connections:
            connection.writer.transport.abort()
            await connection.ended.wait()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(writer)
        self.connections.append(connection)
        try:
            while (request := await _read_request(reader)) is not None:
                connection.requests.append(request)
                self.requests.append(request)
                parts, hang_up = self.replies[min(len(self.requests), len(self.replies)) - 1]
                for part in parts:
                    writer.write(part)
                    await writer.drain()
                if hang_up:
                    break
            else:
                connection.client_hung_up = True
        except (ConnectionError, asyncio.IncompleteReadError):
            connection.client_hung_up = True
        finally:
            connection.ended_at = time.monotonic()
            connection.ended.set()
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One whole request, or None when the client hung up between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    length = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head, re.IGNORECASE)
    return head + (await reader.readexactly(int(length[1])) if length else b"")


def head_lines(request: bytes) -> list[str]:
    return request.partition(b"\r\n\r\n")[0].decode().split("\r\n")


@contextlib.asynccontextmanager
async def open_client(
    policy: EgressPolicy = OPEN, *, idle_per_origin: int = 4, idle_total: int = 16, idle_seconds: float = 15.0
) -> AsyncIterator[HttpClient]:
    limits = ClientLimits(BODY_LIMIT, idle_per_origin, idle_total, idle_seconds)
    client = HttpClient(policy, ssl.create_default_context(), limits)
    try:
        yield client
    finally:
        await client.close()


async def attempt(
    client: HttpClient,
    url: str,
    *,
    policy: EgressPolicy = OPEN,
    timeout: float = 2.0,
    event_id: str = "ev-1",
    headers: tuple[tuple[str, str], ...] = (),
) -> AttemptResult:
    webhook = Webhook("wh-1", "ws-1", url, ("*.*",), SECRET, options=WebhookOptions(headers=headers))
    sender = Sender(client, policy, timeout, max_retry_after=60.0, signer=Signer("twenty"))
    return await sender.attempt(Delivery(event_id, "person.created", "ws-1", webhook, BODY, None, "events:0:1"))


async def results(client: HttpClient, url: str, count: int) -> list[str]:
    return [(await attempt(client, url)).result for _ in range(count)]
