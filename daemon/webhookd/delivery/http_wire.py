"""One HTTP/1.1 exchange at a time on one connection: the request's bytes out, the response read back by llhttp.

Only what a delivery needs is kept of the response: its status, `Location`, `Retry-After` and the first bytes of
its body, up to the configured cap. Everything a hostile receiver can stretch is bounded here: the header block
(size and count), the body kept, and, through the caller's deadline, the time. A response that breaks the protocol
fails the exchange at once; the connection is reused only after a complete response that allows it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

import httptools

# What a receiver may send before its body: far above any real response's, far below what would cost memory.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# Interim answers (100 Continue, 103 Early Hints) before the real one: a few are HTTP, an endless stream is not.
MAX_INTERIM = 8


class ProtocolError(OSError):
    """The receiver's answer is not HTTP/1.1 that can be read within the bounds: a connection error."""


class StaleConnection(ConnectionError):
    """A kept-alive connection ended before a single byte of the answer: the receiver had closed it meanwhile."""


@dataclass(frozen=True, slots=True)
class Response:
    """What the daemon reads of an answer."""

    status: int
    location: str | None
    retry_after: str | None
    excerpt: bytes


class WireProtocol(asyncio.Protocol):
    """A client connection that carries one exchange at a time and says whether it may carry another."""

    def __init__(self, body_limit: int) -> None:
        self._body_limit = body_limit
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        # What aiohttp's client accepted and hand-written receivers send: bare LF line ends, loose header values,
        # spaces after a chunk size. Framing stays strict (lengths, chunked, the status line).
        self._parser.set_dangerous_leniencies(
            lenient_headers=True, lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True
        )
        self._waiter: asyncio.Future[Response] | None = None
        self.reusable = False
        self.idle_since = 0.0
        self._interim = 0
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._head_bytes = 0
        self._headers = 0
        self._headers_done = False
        self._framed = False  # a Content-Length or chunked body, whose end the answer itself marks
        self._after_head = 0  # bytes after the header block: the body, its chunk framing and any trailers
        self._got_bytes = False
        self._location: str | None = None
        self._retry_after: str | None = None
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._violation: str | None = None

    # -- what the pool calls

    def exchange(self, request: bytes) -> asyncio.Future[Response]:
        """Send `request`; the future ends with the response, or with the error that ended the connection."""
        assert self._waiter is None, "one exchange at a time"
        transport = self._transport
        if transport is None or not self.open:
            raise StaleConnection("the connection was closed while idle")
        self.reusable = False
        self._reset()
        self._interim = 0
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            transport.write(request)
        except RuntimeError as exc:  # uvloop's word for a transport that closed under it
            self._waiter = None
            self.close()
            raise StaleConnection("the connection was closed while idle") from exc
        return waiter

    @property
    def open(self) -> bool:
        """Connected, and neither side has begun to close (a receiver's close may still be on its way here)."""
        return self._transport is not None and not self._transport.is_closing()

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            # abort, not close: nothing of ours is left to send, and a receiver that stopped reading must not
            # keep the socket (and its buffer) alive.
            self._transport.abort()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for (an answer after ours was complete): the stream cannot be trusted any more.
            self.close()
            return
        self._got_bytes = True
        if not self._headers_done:
            self._head_bytes += len(data)
        else:
            self._after_head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A 101 (or any upgrade) is an answer, though not one a webhook can accept; the connection is spent.
            # llhttp has already completed the message, so the exchange may be settled: the close must not wait on it.
            self._finish(reusable=False)
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(self._violation or f"the answer is not valid HTTP/1.1: {exc}"))
        else:
            if not self._headers_done:
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._fail(ProtocolError(f"the answer's headers exceed {MAX_HEAD_BYTES} bytes"))
            elif self._after_head - self._body_bytes > MAX_HEAD_BYTES + 8 * self._body_bytes:
                # Chunk framing may outweigh a body of tiny chunks, but not without bound: beyond this it is
                # trailers, which llhttp would otherwise gather in memory for as long as they keep coming.
                self._fail(ProtocolError(f"the answer's chunk framing and trailers exceed {MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool | None:
        return False  # let the transport close; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._waiter is None:
            return
        if self._headers_done and not self._framed:
            # A body without a length ends with the connection; whatever it delivered is the answer.
            self._finish(reusable=False)
        elif self._headers_done:
            self._fail(ProtocolError("the connection was closed in the middle of the answer's body"))
        elif not self._got_bytes:
            self._fail(StaleConnection("the connection was closed before any answer"))
        else:
            self._fail(ProtocolError("the connection was closed in the middle of the answer's headers"))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # An answer after ours, in the same read: the receiver speaks out of turn, and the stream cannot be
            # trusted to carry another exchange.
            self._violation = "the receiver sent more than one answer"
            raise ProtocolError(self._violation)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a trailer: counted with the framing, never read (as aiohttp never read them)
        self._headers += 1
        if self._headers > MAX_HEADERS:
            # Raised through llhttp, which reports it as a callback error: the reason travels beside it.
            self._violation = f"the answer has more than {MAX_HEADERS} headers"
            raise ProtocolError(self._violation)
        size = len(name)
        if size == 8 and self._location is None and name.lower() == b"location":
            self._location = value.decode("latin-1")
        elif size == 11 and self._retry_after is None and name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")
        elif (size == 14 and name.lower() == b"content-length") or (
            size == 17 and name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        if 100 <= self._status < 200 and self._status != 101:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        kept = self._body_limit - self._body_bytes
        if kept > 0:
            self._body.append(body[:kept] if len(body) > kept else body)
        self._body_bytes += len(body)
        if self._body_bytes > self._body_limit:
            # Past the cap: the rest is never read, so the connection cannot carry another exchange.
            self._finish(reusable=False)
            self.close()

    def on_message_complete(self) -> None:
        if not self._headers_done:
            self._interim += 1
            if self._interim > MAX_INTERIM:
                self._violation = f"the answer began with more than {MAX_INTERIM} interim answers"
                raise ProtocolError(self._violation)
            self._reset()  # the interim answer ended; count the real one's head afresh
            self._got_bytes = True
            return
        self._finish(reusable=self._parser.should_keep_alive() and not self._parser.should_upgrade())

    # --

    def _finish(self, reusable: bool) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        self.reusable = reusable and self.open
        excerpt = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        waiter.set_result(Response(self._status, self._location, self._retry_after, excerpt))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
