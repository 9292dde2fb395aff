"""One HTTP attempt: sign, POST, and classify what came back.

Every way an attempt can end becomes an AttemptResult with a bounded `result` label; nothing a receiver does (hang,
drip, redirect, huge body, reset) escapes as an exception or holds more than a small, fixed amount of memory.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time

import aiohttp
from yarl import URL

from webhookd import __version__
from webhookd.delivery.egress import BlockedDestination, EgressPolicy, literal_address
from webhookd.delivery.signing import Signer
from webhookd.model import AttemptResult, AttemptResultLabel, Delivery

# What is neither 2xx nor 3xx-5xx (1xx, or a status past 599) counts as a server error: the receiver is broken.
_STATUS_CLASSES: dict[int, AttemptResultLabel] = {3: "3xx", 4: "4xx", 5: "5xx"}


class Sender:
    """Sends attempts through one shared aiohttp session (keep-alive, one connection pool)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        policy: EgressPolicy,
        timeout_seconds: float,
        body_limit: int,
        max_retry_after: float,
        signer: Signer,
        https_only: bool = False,
    ) -> None:
        self._session = session
        self._signer = signer
        self._https_only = https_only
        self._policy = policy
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._body_limit = body_limit
        self._max_retry_after = max_retry_after
        self._user_agent = f"webhookd/{__version__}"
        # Each target URL parsed and judged once, not per attempt: both are pure functions of the URL text.
        self._targets: dict[str, tuple[URL, str | None]] = {}

    def headers(self, delivery: Delivery, now: float) -> dict[str, str]:
        webhook = delivery.webhook
        headers = {"Content-Type": "application/json", "User-Agent": self._user_agent}
        if webhook.options.headers:
            # The webhook's own headers (`webhooks set --header`), which never name one of the signature's.
            headers.update(webhook.options.headers)
        headers.update(
            self._signer.headers(delivery.event_id, delivery.body, webhook.secret, webhook.previous_secret_at(now), now)
        )
        return headers

    async def attempt(self, delivery: Delivery) -> AttemptResult:
        started = time.monotonic()
        try:
            url, refusal = self._target(delivery.webhook.target_url)
            if refusal is not None:
                return AttemptResult("blocked", error=refusal)
            headers = self.headers(delivery, time.time())
            async with self._session.post(
                url, data=delivery.body, headers=headers, allow_redirects=False, timeout=self._timeout
            ) as response:
                excerpt = await self._read_capped(response)
                status = response.status
                duration = time.monotonic() - started
                if 200 <= status < 300:
                    return AttemptResult("2xx", status=status, duration=duration)
                return AttemptResult(
                    _STATUS_CLASSES.get(status // 100, "5xx"),
                    status=status,
                    error=_excerpt_text(excerpt, response.headers.get("Location")),
                    retry_after=self._retry_after(response.headers.get("Retry-After")),
                    duration=duration,
                )
        except TimeoutError:
            return AttemptResult("timeout", error="no answer in time", duration=time.monotonic() - started)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedDestination):
                return AttemptResult("blocked", error=str(exc.os_error), duration=time.monotonic() - started)
            return _connection_error(exc, started)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return _connection_error(exc, started)

    def _target(self, text: str) -> tuple[URL, str | None]:
        """The URL, parsed, and why the policy forbids it (None: allowed so far; names are checked when resolved)."""
        known = self._targets.get(text)
        if known is None:
            if len(self._targets) >= _TARGETS_REMEMBERED:
                self._targets.clear()
            url = URL(text)
            if self._https_only and url.scheme != "https":
                known = url, "egress.https_only forbids plain http targets"
            else:
                known = url, self._refusal(url)
            self._targets[text] = known
        return known

    def _refusal(self, url: URL) -> str | None:
        """Why the policy forbids this URL's literal address, or None (names are checked when resolved)."""
        # aiohttp connects to raw_host and skips the resolver for anything IPv6-like, so that is what is checked.
        host = url.raw_host or ""
        if "%" in host:
            # A zone id only makes sense for link-local addresses, and getaddrinfo reads forms ipaddress does not.
            return "an address with a zone id is a forbidden destination"
        literal = literal_address(host)
        if literal is None and ":" in host:
            return "an IPv6 address that cannot be read is a forbidden destination"
        if literal is not None and not self._policy.allows(literal):
            return f"{literal} is a forbidden destination"
        return None

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        # Read small bodies whole so the connection can be reused; past the cap, stop and let aiohttp close it.
        chunks: list[bytes] = []
        remaining = self._body_limit
        while remaining > 0:
            chunk = await response.content.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _retry_after(self, value: str | None) -> float | None:
        if not value:
            return None
        value = value.strip()
        if _DELTA_SECONDS.fullmatch(value):
            seconds = float(value)
        else:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            seconds = when.timestamp() - time.time()
        return max(0.0, min(seconds, self._max_retry_after))


# Far more distinct target URLs than a deployment has; a full cache is dropped, not evicted one by one.
_TARGETS_REMEMBERED = 100_000

_DELTA_SECONDS = re.compile(r"[0-9]{1,10}")


# A URL quoted in an error message: keep its scheme and host, drop credentials, path and query (tokens live there).
_URL_IN_TEXT = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^@/\s'\"]*@)?([^/?#\s'\"]*)[^\s'\"]*")


def _connection_error(exc: BaseException, started: float) -> AttemptResult:
    message = _URL_IN_TEXT.sub(r"\1\2/…", str(exc)) or type(exc).__name__
    return AttemptResult("connection_error", error=message[:300], duration=time.monotonic() - started)


def _excerpt_text(excerpt: bytes, location: str | None) -> str | None:
    # Receivers' bodies are arbitrary bytes; keep what a log line and a text column can carry.
    text = "".join(c if c.isprintable() else "\ufffd" for c in excerpt[:300].decode("utf-8", "replace")).strip()
    if location:
        # Redirects are never followed; say where it pointed (host only) so an operator can fix the URL.
        where = "".join(c if c.isprintable() else "\ufffd" for c in _URL_IN_TEXT.sub(r"\1\2/…", location[:200]))
        text = f"redirect to {where}" + (f"; {text}" if text else "")
    return text or None


async def close_session(session: aiohttp.ClientSession) -> None:
    await session.close()
    # aiohttp closes TLS transports on the next loop iterations; give them that, as its docs advise.
    await asyncio.sleep(0.05)
