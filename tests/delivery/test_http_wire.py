"""What the delivery client reads of an answer when the receiver bends HTTP: trailers, cut bodies, bare line ends,
far-off dates; and how it reaches a host whose first address is silent, looking each name up once at a time."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
from typing import Any

from tests.delivery.scripted_server import OK, OPEN, Server, answer, attempt, head_lines, open_client
from webhookd.delivery.http_client import ClientLimits, HttpClient, Origin
from webhookd.delivery.http_wire import MAX_HEAD_BYTES


async def test_endless_trailers_end_the_attempt_at_once_and_a_trailer_never_stands_in_for_a_header() -> None:
    flood = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Flood: "
    flood += b"a" * (4 * MAX_HEAD_BYTES)
    moved = (
        b"HTTP/1.1 302 Found\r\nLocation: http://first.example/\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nLocation: http://trailer.example/\r\n\r\n"
    )
    async with Server(answer(flood), answer(moved)) as server, open_client() as client:
        started = time.monotonic()
        flooded = await attempt(client, server.url())
        assert flooded.result == "connection_error"
        assert "trailers" in (flooded.error or "")
        assert time.monotonic() - started < 1.0, "the trailer was read until the deadline"
        redirected = await attempt(client, server.url())
        assert (redirected.result, redirected.error) == ("3xx", "redirect to http://first.example/…")


async def test_a_body_cut_short_of_its_length_is_a_connection_error_and_one_without_a_length_ends_with_the_close() -> (
    None
):
    cut = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", hang_up=True)
    unframed = answer(b"HTTP/1.1 200 OK\r\n\r\nall of it", hang_up=True)
    async with Server(cut, unframed) as server, open_client() as client:
        cut_short = await attempt(client, server.url())
        assert (cut_short.result, cut_short.error) == (
            "connection_error",
            "the connection was closed in the middle of the answer's body",
        )
        assert (await attempt(client, server.url())).result == "2xx"


async def test_bare_line_feeds_are_read_as_aiohttp_read_them() -> None:
    bare = answer(b"HTTP/1.1 503 Busy\nRetry-After: 7\nContent-Length: 4\n\nbusy")
    async with Server(bare) as server, open_client() as client:
        result = await attempt(client, server.url())
    assert (result.result, result.status, result.retry_after, result.error) == ("5xx", 503, 7.0, "busy")


async def test_a_retry_after_date_past_year_9999_is_no_pause_and_no_crash() -> None:
    far = b"HTTP/1.1 503 Busy\r\nRetry-After: Mon, 1 Jan 9999999999 0:0:0 GMT\r\nContent-Length: 0\r\n\r\n"
    async with Server(answer(far)) as server, open_client() as client:
        result = await attempt(client, server.url())
    assert (result.result, result.retry_after) == ("5xx", None)


async def test_a_url_with_only_a_password_authenticates_and_credentials_beside_an_authorization_header_refuse() -> None:
    async with Server() as server, open_client() as client:
        assert (await attempt(client, server.url().replace("http://", "http://:s3cret@"))).result == "2xx"
        expected = "Authorization: Basic " + base64.b64encode(b":s3cret").decode()
        assert expected in head_lines(server.requests[0])
        both = await attempt(
            client, server.url().replace("http://", "http://u:p@"), headers=(("Authorization", "Bearer t"),)
        )
        assert both.result == "connection_error"
        assert "conflict" in (both.error or "")
        assert len(server.requests) == 1, "a request went out with two Authorization headers"


class TwoAddresses(HttpClient):
    """Resolves every name to a silent address first, then the server's; counts the lookups."""

    def __init__(self, port: int, silent: str) -> None:
        super().__init__(OPEN, ssl.create_default_context(), ClientLimits(1024, 4, 16))
        self.lookups = 0
        self._port, self._silent = port, silent

    async def _resolve(self, origin: Origin) -> list[Any]:
        self.lookups += 1
        await asyncio.sleep(0.05)  # long enough for every caller to be waiting on this one lookup
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (self._silent, self._port)),
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", self._port)),
        ]


async def test_a_silent_first_address_does_not_spend_the_deadline_and_concurrent_deliveries_share_one_lookup() -> None:
    request = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
    async with Server(answer(OK)) as server:
        # A TEST-NET-1 address: documentation only, so nothing ever answers it (dropped, or unreachable at once).
        client = TwoAddresses(server.port, "192.0.2.1")
        try:
            started = time.monotonic()
            origin = Origin(False, "two.example", server.port)
            answers = await asyncio.gather(*(client.exchange(origin, request, 5.0) for _ in range(5)))
            took = time.monotonic() - started
        finally:
            await client.close()
    assert [a.status for a in answers] == [200] * 5
    assert took < 2.0, f"the silent address held the attempts for {took:.1f} s"
    assert client.lookups == 1
