"""One HTTP attempt: lay the request out for its target, sign it, POST it, and classify what came back.

Every way an attempt can end becomes an AttemptResult with a bounded `result` label; nothing a receiver does (hang,
drip, redirect, huge body, reset) escapes as an exception or holds more than a small, fixed amount of memory.
"""

from __future__ import annotations

import email.utils
import re
import time

from webhookd import __version__
from webhookd.delivery.egress import BlockedDestination, EgressPolicy
from webhookd.delivery.http_client import HttpClient
from webhookd.delivery.signing import Signer
from webhookd.delivery.targets import Target, Targets
from webhookd.model import AttemptResult, AttemptResultLabel, Delivery

# What is neither 2xx nor 3xx-5xx (1xx, or a status past 599) counts as a server error: the receiver is broken.
_STATUS_CLASSES: dict[int, AttemptResultLabel] = {3: "3xx", 4: "4xx", 5: "5xx"}


class Sender:
    """Lays out each attempt's request (signed now) and carries it through the delivery HTTP client."""

    def __init__(
        self,
        client: HttpClient,
        policy: EgressPolicy,
        timeout_seconds: float,
        max_retry_after: float,
        signer: Signer,
        https_only: bool = False,
    ) -> None:
        self._client = client
        self._signer = signer
        self._timeout = timeout_seconds
        self._max_retry_after = max_retry_after
        self._targets = Targets(policy, https_only, f"webhookd/{__version__}")

    def request(self, delivery: Delivery, target: Target, now: float) -> bytes:
        """The whole request of one attempt, signed at `now`."""
        webhook = delivery.webhook
        event_id = delivery.event_id
        if "\n" in event_id or "\r" in event_id:
            raise ValueError("the event id holds a line break, which no header may carry")
        custom = webhook.options.headers
        own = ""
        if custom:
            # The webhook's own headers (`webhooks set --header`) never name one of the signature's; they were
            # checked then, against the URL of that moment: the URL may have gained credentials since.
            if target.authorized and any(name.lower() == "authorization" for name, _ in custom):
                raise ValueError("the target URL's credentials and the webhook's Authorization header conflict")
            own = "".join([f"{name}: {value}\r\n" for name, value in custom])
        body = delivery.body
        signature = self._signer.lines(event_id, body, webhook.secret, webhook.previous_secret_at(now), now)
        return f"{target.head}{own}{signature}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def attempt(self, delivery: Delivery) -> AttemptResult:
        started = time.monotonic()
        target = self._targets.get(delivery.webhook.target_url)
        if target.refusal is not None:
            return AttemptResult("blocked", error=target.refusal)
        try:
            if target.origin is None:
                raise ValueError(target.fault)
            request = self.request(delivery, target, time.time())
            response = await self._client.exchange(target.origin, request, self._timeout)
        except TimeoutError:
            return AttemptResult("timeout", error="no answer in time", duration=time.monotonic() - started)
        except BlockedDestination as exc:
            return AttemptResult("blocked", error=str(exc), duration=time.monotonic() - started)
        except (OSError, ValueError) as exc:
            return _connection_error(exc, started)
        duration = time.monotonic() - started
        status = response.status
        if 200 <= status < 300:
            return AttemptResult("2xx", status=status, duration=duration)
        return AttemptResult(
            _STATUS_CLASSES.get(status // 100, "5xx"),
            status=status,
            error=_excerpt_text(response.excerpt, response.location),
            retry_after=self._retry_after(response.retry_after),
            duration=duration,
        )

    async def close(self) -> None:
        await self._client.close()

    def _retry_after(self, value: str | None) -> float | None:
        if not value:
            return None
        value = value.strip()
        if _DELTA_SECONDS.fullmatch(value):
            seconds = float(value)
        else:
            try:
                # A date past year 9999 overflows, one without a zone compares badly: neither is a pause.
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, OverflowError, OSError):
                return None
        return max(0.0, min(seconds, self._max_retry_after))


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
