"""Target URLs as requests go to them: parsed, judged and laid out once per URL, not per attempt.

A target is where to connect (its origin), the head every request to it shares (request line, `Host`, Basic
authentication from the URL's credentials, `Content-Type`, `User-Agent`), and why no request may go there: the egress
rules forbid its literal address or plain http, or the URL cannot carry a request at all. Names are judged later, by
the delivery client, on the addresses they resolve to.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from yarl import URL

from webhookd.delivery.egress import EgressPolicy, literal_address
from webhookd.delivery.http_client import Origin


@dataclass(frozen=True, slots=True)
class Target:
    """A target URL as every attempt to it uses it: where to connect, and the head its requests share."""

    origin: Origin | None
    head: str  # the request line and the headers that depend only on the URL, each line ending in CRLF
    refusal: str | None = None  # why the egress rules forbid it (None: allowed so far; names are checked at connect)
    fault: str | None = None  # why no request can be made of it at all
    authorized: bool = False  # the head carries Basic authentication from the URL's credentials


class Targets:
    """The targets of the URLs seen so far; each is a pure function of the URL's text and the egress rules."""

    def __init__(self, policy: EgressPolicy, https_only: bool, user_agent: str) -> None:
        self._policy = policy
        self._https_only = https_only
        self._user_agent = user_agent
        self._known: dict[str, Target] = {}

    def get(self, text: str) -> Target:
        """The target of this URL text, laid out the first time it is asked for."""
        target = self._known.get(text)
        if target is None:
            if len(self._known) >= _TARGETS_REMEMBERED:
                self._known.clear()
            target = self._known[text] = self._target(text)
        return target

    def _target(self, text: str) -> Target:
        try:
            url = URL(text)
        except (TypeError, ValueError) as exc:
            return Target(None, "", fault=f"the target URL cannot be read: {exc}")
        if url.scheme not in ("http", "https"):
            return Target(None, "", fault=f"the target URL's scheme {url.scheme!r} is neither http nor https")
        if self._https_only and url.scheme != "https":
            return Target(None, "", refusal="egress.https_only forbids plain http targets")
        host = url.raw_host
        if not host or url.port is None:
            return Target(None, "", fault="the target URL names no host")
        refusal = self._refusal(host)
        authorization = ""
        if url.raw_user is not None or url.raw_password is not None:
            # Credentials in the URL become Basic authentication, as browsers and HTTP clients make of them.
            try:
                credentials = f"{url.user or ''}:{url.password or ''}".encode("latin-1")
            except UnicodeEncodeError:
                return Target(None, "", fault="the target URL's credentials are not Latin-1 text")
            authorization = f"Authorization: Basic {base64.b64encode(credentials).decode()}\r\n"
        path, host_port = url.raw_path_qs or "/", url.host_port_subcomponent or host
        if any(c in path or c in host_port for c in "\r\n\0 "):
            return Target(None, "", fault="the target URL holds a space or a control character")
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host_port}\r\n{authorization}"
            f"Content-Type: application/json\r\nUser-Agent: {self._user_agent}\r\n"
        )
        return Target(Origin(url.scheme == "https", host, url.port), head, refusal, authorized=bool(authorization))

    def _refusal(self, host: str) -> str | None:
        """Why the policy forbids this host's literal address, or None (names are checked when resolved)."""
        if "%" in host:
            # A zone id only makes sense for link-local addresses, and getaddrinfo reads forms ipaddress does not.
            return "an address with a zone id is a forbidden destination"
        literal = literal_address(host)
        if literal is None and ":" in host:
            return "an IPv6 address that cannot be read is a forbidden destination"
        if literal is not None and not self._policy.allows(literal):
            return f"{literal} is a forbidden destination"
        return None


# Far more distinct target URLs than a deployment has; a full cache is dropped, not evicted one by one.
_TARGETS_REMEMBERED = 100_000
