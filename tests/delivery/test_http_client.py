"""The delivery HTTP client and the sender against raw loopback servers: connection reuse and its limits, what is
read of an answer, the one deadline, egress checked at connect, and the exact request bytes that go out.

Each server is a bare `asyncio.start_server` that reads whole requests and answers with scripted bytes, so a test
controls every byte the client gets back and sees every connection it opens and every byte it sends.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import socket
import ssl
import time
from collections.abc import AsyncIterator

import pytest

from tests.delivery.scripted_server import (
    BODY,
    BODY_LIMIT,
    CLOSED,
    OK,
    OPEN,
    RAW,
    SECRET,
    SIGNATURE_HEADERS,
    SWITCH,
    Reply,
    Server,
    answer,
    attempt,
    head_lines,
    open_client,
    results,
)
from webhookd import __version__
from webhookd.delivery.egress import BlockedDestination
from webhookd.delivery.http_client import ClientLimits, HttpClient, Origin
from webhookd.delivery.http_wire import Response
from webhookd.delivery.signing import sign


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server() as started:
        yield started


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    async with open_client() as opened:
        yield opened


async def test_attempts_in_a_row_share_a_connection_and_send_the_exact_request(
    server: Server, client: HttpClient
) -> None:
    assert await results(client, server.url("/hook?x=1"), 3) == ["2xx"] * 3
    assert (len(server.connections), len(server.requests)) == (1, 3)
    for request in server.requests:
        lines = head_lines(request)
        host, agent = f"Host: 127.0.0.1:{server.port}", f"User-Agent: webhookd/{__version__}"
        assert lines[:4] == ["POST /hook?x=1 HTTP/1.1", host, "Content-Type: application/json", agent]
        headers = {name: value for name, _, value in (line.partition(": ") for line in lines[4:])}
        assert list(headers) == [*SIGNATURE_HEADERS, "X-Twenty-Webhook-Event-Id", "Content-Length"]
        assert headers["X-Twenty-Webhook-Event-Id"] == "ev-1"
        assert headers["X-Twenty-Webhook-Signature"] == sign(SECRET, int(headers["X-Twenty-Webhook-Timestamp"]), BODY)
        assert headers["Content-Length"] == str(len(BODY))
        assert request.endswith(b"\r\n\r\n" + BODY)


class Recorder(HttpClient):
    """Keeps what the sender hands the client, for URLs that no loopback server can stand in for."""

    def __init__(self) -> None:
        super().__init__(OPEN, ssl.create_default_context(), ClientLimits(BODY_LIMIT, 4, 16))
        self.sent: list[tuple[Origin, bytes]] = []

    async def exchange(self, origin: Origin, request: bytes, timeout: float) -> Response:
        self.sent.append((origin, request))
        return Response(204, None, None, b"")


@pytest.mark.parametrize(
    ("url", "host", "origin"),
    [
        ("http://example.com:80/p", "example.com", Origin(False, "example.com", 80)),
        ("https://example.com/p", "example.com", Origin(True, "example.com", 443)),
        ("https://example.com:8443/p", "example.com:8443", Origin(True, "example.com", 8443)),
    ],
    ids=["http-80", "https-443", "https-8443"],
)
async def test_the_host_header_leaves_out_the_default_port(url: str, host: str, origin: Origin) -> None:
    recorder = Recorder()
    assert (await attempt(recorder, url)).result == "2xx"
    assert recorder.sent[0][0] == origin
    assert head_lines(recorder.sent[0][1])[1] == f"Host: {host}"


@pytest.mark.parametrize(
    "reply", [b"HTTP/1.1 200 OK\r\nConnection: close\r\n", b"HTTP/1.0 200 OK\r\n"], ids=["connection-close", "http-1.0"]
)
async def test_an_answer_that_does_not_keep_alive_is_not_reused(reply: bytes, client: HttpClient) -> None:
    async with Server(answer(reply + b"Content-Length: 2\r\n\r\nok")) as server:  # which never hangs up itself
        assert await results(client, server.url(), 1) == ["2xx"]
        await server.connections[0].hang_up()
        assert await results(client, server.url(), 1) == ["2xx"]
        assert len(server.connections) == 2


@pytest.mark.parametrize(
    "replies",
    [(answer(OK, hang_up=True), answer(OK)), (answer(OK), answer(hang_up=True), answer(OK))],
    ids=["closed-after-answering", "closed-on-reading-the-next-request"],
)
async def test_a_kept_connection_the_receiver_closed_is_replaced_and_the_attempt_succeeds(
    replies: tuple[Reply, ...], client: HttpClient
) -> None:
    async with Server(*replies) as server:
        assert await results(client, server.url(), 2) == ["2xx", "2xx"]
        assert len(server.connections) == 2
        assert len(set(server.requests)) == 2, "a retry sends the very same bytes; a new attempt, new ones"


@pytest.mark.parametrize(
    ("replies", "connections"),
    [
        ((answer(OK), answer(hang_up=True)), 2),
        ((answer(OK), answer(b"HTTP/1.1 200 OK\r\n", hang_up=True)), 1),
        ((answer(OK, hang_up=True), answer(hang_up=True)), 2),
    ],
    ids=["kept-then-fresh", "kept-after-part-of-an-answer", "fresh"],
)
async def test_a_connection_closed_unanswered_is_retried_only_once_and_only_if_kept(
    replies: tuple[Reply, ...], connections: int, client: HttpClient
) -> None:
    async with Server(*replies) as server:
        assert await results(client, server.url(), 2) == ["2xx", "connection_error"]
        assert len(server.connections) == connections


@pytest.mark.parametrize("status", [200, 500])
@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "chunked"])
async def test_a_body_past_the_limit_is_cut_there_and_its_connection_dropped(
    status: int, chunked: bool, client: HttpClient
) -> None:
    body = bytes(range(256)) * 4096
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    head = b"Content-Length: %d" % len(body)
    if chunked:
        head, pieces = b"Transfer-Encoding: chunked", [b"%x\r\n%b\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    async with Server(answer(b"HTTP/1.1 %d X\r\n%b\r\n\r\n" % (status, head), *pieces)) as server:
        response = await client.exchange(server.origin, RAW, 2.0)
        assert (response.status, response.excerpt) == (status, body[:BODY_LIMIT])
        await server.connections[0].hang_up()


async def test_a_body_within_the_limit_is_read_whole_and_its_connection_kept(client: HttpClient) -> None:
    body = b"e" * BODY_LIMIT  # the very limit: nothing is left unread
    async with Server(answer(b"HTTP/1.1 500 X\r\nContent-Length: %d\r\n\r\n%b" % (BODY_LIMIT, body))) as server:
        assert [(await client.exchange(server.origin, RAW, 2.0)).excerpt for _ in range(2)] == [body, body]
        assert len(server.connections) == 1


@pytest.mark.parametrize("apart", [True, False], ids=["written-apart", "written-at-once"])
async def test_interim_answers_are_passed_over_for_the_real_one(apart: bool, client: HttpClient) -> None:
    parts = (
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nLocation: http://interim.example/\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    )
    async with Server(answer(*parts) if apart else answer(b"".join(parts))) as server:
        for _ in range(2):
            response = await client.exchange(server.origin, RAW, 2.0)
            assert (response.status, response.location) == (201, None)
        assert len(server.connections) == 1


async def test_a_101_switching_protocols_is_a_server_error(client: HttpClient) -> None:
    async with Server(answer(SWITCH)) as server:
        result = await attempt(client, server.url())
        assert (result.result, result.status) == ("5xx", 101)


async def test_a_101_switching_protocols_connection_is_not_reused(client: HttpClient) -> None:
    async with Server(answer(SWITCH), answer(OK)) as server:
        assert await results(client, server.url(), 2) == ["5xx", "2xx"]
        assert len(server.connections) == 2


async def test_bytes_after_a_complete_answer_in_the_same_read_end_the_connection(client: HttpClient) -> None:
    async with Server(answer(OK + b"HTTP/1.1 503 Busy\r\nRetry-After: 9\r\n"), answer(OK)) as server:
        assert await results(client, server.url(), 2) == ["2xx", "2xx"]
        assert len(server.connections) == 2


async def test_retry_after_is_read_as_seconds_or_a_date_and_capped(client: HttpClient) -> None:
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    cases: list[tuple[str, float | None]] = [("7", 7.0), ("120", 60.0), (date, 30.0), ("soon", None)]
    busy = b"HTTP/1.1 503 Busy\r\nRetry-After: %b\r\nContent-Length: 4\r\n\r\nbusy"
    async with Server(*[answer(busy % value.encode()) for value, _ in cases]) as server:
        for _, seconds in cases:
            result = await attempt(client, server.url())
            assert (result.result, result.status, result.error) == ("5xx", 503, "busy")
            assert result.retry_after == (None if seconds is None else pytest.approx(seconds, abs=2))


async def test_a_redirect_is_a_3xx_naming_only_where_it_points(client: HttpClient) -> None:
    location = b"http://user:pw@elsewhere.example:8080/secret/path?token=abc"
    async with Server(answer(b"HTTP/1.1 302 Found\r\nLocation: %b\r\nContent-Length: 0\r\n\r\n" % location)) as server:
        result = await attempt(client, server.url())
        assert (result.result, result.status) == ("3xx", 302)
        assert result.error == "redirect to http://elsewhere.example:8080/…"


async def test_a_receiver_that_never_answers_times_out_within_the_deadline(client: HttpClient) -> None:
    async with Server(answer()) as server:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.exchange(server.origin, RAW, 0.3)
        assert time.monotonic() - started < 1.3
        await server.connections[0].hang_up()
        started = time.monotonic()
        assert (await attempt(client, server.url(), timeout=0.3)).result == "timeout"
        assert time.monotonic() - started < 1.3
        await server.connections[1].hang_up()


async def test_a_name_resolving_to_loopback_is_blocked_at_connect_unless_private_is_allowed(server: Server) -> None:
    async with open_client(CLOSED) as closed:
        with pytest.raises(BlockedDestination):
            await closed.exchange(Origin(False, "localhost", server.port), RAW, 2.0)
        assert (await attempt(closed, server.url(host="localhost"), policy=CLOSED)).result == "blocked"
    assert server.connections == []
    async with open_client(OPEN) as opened:
        assert await results(opened, server.url(host="localhost"), 1) == ["2xx"]
    assert len(server.connections) == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "0x7f.0.0.1", "[::ffff:127.0.0.1]"])
async def test_a_literal_loopback_address_is_blocked_by_the_sender_unconnected(
    host: str, server: Server, client: HttpClient
) -> None:
    # The client's policy would let it through: the sender's own check of the literal is what blocks it.
    assert (await attempt(client, server.url(host=host), policy=CLOSED)).result == "blocked"
    assert server.connections == []


async def test_url_credentials_become_basic_authorization(server: Server, client: HttpClient) -> None:
    assert await results(client, f"http://alice:s%40cret%20pw@127.0.0.1:{server.port}/hook", 1) == ["2xx"]
    lines = head_lines(server.requests[0])
    assert lines[1] == f"Host: 127.0.0.1:{server.port}"
    assert lines[2] == f"Authorization: Basic {base64.b64encode(b'alice:s@cret pw').decode()}"


async def test_an_ipv6_literal_gets_a_bracketed_host_and_its_raw_path(client: HttpClient) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with Server(host="::1") as server:
        assert await results(client, server.url("/p/a%2Fb?q=1&r=%20"), 1) == ["2xx"]
        assert head_lines(server.requests[0])[:2] == ["POST /p/a%2Fb?q=1&r=%20 HTTP/1.1", f"Host: [::1]:{server.port}"]


async def test_idle_connections_are_closed_after_idle_seconds_and_on_close(server: Server) -> None:
    async with open_client(idle_seconds=0.2) as client:
        assert await results(client, server.url(), 1) == ["2xx"]
        idle_from = time.monotonic()
        idle_for = await server.connections[0].hang_up() - idle_from
        # The sweep runs every idle_seconds, so a connection can outlive its time by up to one more period.
        assert 0.15 <= idle_for < 0.2 * 2 + 0.3
        assert await results(client, server.url(), 1) == ["2xx"]
        assert len(server.connections) == 2
        await client.close()
        await server.connections[1].hang_up(within=0.15)  # the next sweep is 0.2 s away


async def test_no_more_than_idle_per_origin_connections_stay_idle(server: Server) -> None:
    async with open_client(idle_per_origin=1) as client:
        together = await asyncio.gather(*[attempt(client, server.url()) for _ in range(2)])
        assert [r.result for r in together] == ["2xx", "2xx"]
        assert len(server.connections) == 2
        waits = [asyncio.create_task(c.ended.wait()) for c in server.connections]
        try:
            await asyncio.wait(waits, timeout=1, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        [dropped], [kept] = [[c for c in server.connections if c.ended.is_set() == ended] for ended in (True, False)]
        assert dropped.client_hung_up
        assert await results(client, server.url(), 1) == ["2xx"]
        assert (len(server.connections), len(kept.requests)) == (2, 2)


async def test_no_more_than_idle_total_connections_stay_idle_over_all_origins(server: Server) -> None:
    async with Server() as other, open_client(idle_total=1) as client:
        assert await results(client, server.url(), 1) == ["2xx"]
        assert await results(client, other.url(), 1) == ["2xx"]
        await other.connections[0].hang_up(within=1.0)
        assert await results(client, server.url(), 1) == ["2xx"]
        assert (len(server.connections), server.connections[0].ended.is_set()) == (1, False)


async def test_custom_headers_follow_the_fixed_ones_and_precede_the_signature(
    server: Server, client: HttpClient
) -> None:
    custom = (("X-Tenant", "acme"), ("X-Api-Key", "k-1"))
    assert (await attempt(client, server.url(), headers=custom)).result == "2xx"
    lines = head_lines(server.requests[0])
    assert lines[4:6] == ["X-Tenant: acme", "X-Api-Key: k-1"]
    assert lines[6].startswith(f"{SIGNATURE_HEADERS[0]}: ")


@pytest.mark.parametrize(
    ("url", "event_id"),
    [("{url}", "ev-1\r\nX-Injected: 1"), ("ftp://127.0.0.1:{port}/hook", "ev-1"), ("http://a b:{port}/", "ev-1")],
    ids=["line-break-in-event-id", "not-http", "space-in-host"],
)
async def test_a_request_that_cannot_be_laid_out_is_a_connection_error_and_nothing_is_sent(
    url: str, event_id: str, server: Server, client: HttpClient
) -> None:
    result = await attempt(client, url.format(url=server.url(), port=server.port), event_id=event_id)
    assert result.result == "connection_error"
    await asyncio.sleep(0.05)  # a connection, had one been opened, is accepted by now
    assert server.connections == []
