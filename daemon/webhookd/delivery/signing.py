"""Signatures of a delivery, in the scheme the operator chose: Twenty's, Standard Webhooks', or both.

Twenty's scheme is what its documentation tells receivers to check: the hex HMAC-SHA256 of `<ms>:<body>`, keyed
by the UTF-8 bytes of the webhook's secret. Standard Webhooks signs `<id>.<seconds>.<body>` and sends
`v1,<base64>`; its key is the base64 payload of a `whsec_` secret, or else the UTF-8 bytes of the secret (what a
receiver gets from `base64(secret)`). During a secret rotation both the new and the previous secret sign.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

_WHSEC = "whsec_"


def sign(secret: bytes, timestamp_ms: int, body: bytes) -> str:
    """Twenty's signature: lowercase hex HMAC-SHA256 of ``b"<timestamp_ms>:" + body`` keyed by ``secret``."""
    # One call into OpenSSL: for bodies of a few kilobytes, copying the body once costs less than the steps of an
    # incremental HMAC object.
    return hmac.digest(secret, b"%d:%b" % (timestamp_ms, body), "sha256").hex()


def standard_key(secret: bytes) -> bytes:
    """The Standard Webhooks key of a secret: a `whsec_<base64>` secret's decoded bytes, else the secret itself."""
    if secret.startswith(_WHSEC.encode()):
        try:
            return base64.b64decode(secret[len(_WHSEC) :] + b"==")
        except binascii.Error:
            pass  # not base64 after all: the whole text is the key, as for any other secret
    return secret


def sign_standard(key: bytes, message_id: str, timestamp_s: int, body: bytes) -> str:
    """One Standard Webhooks signature, `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`."""
    mac = hmac.new(key, b"%s.%d." % (message_id.encode(), timestamp_s), hashlib.sha256)
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode()


class Signer:
    """Builds the signature headers of one attempt for the configured scheme."""

    def __init__(self, scheme: str) -> None:
        self._twenty = scheme in ("twenty", "both")
        self._standard = scheme in ("standard-webhooks", "both")

    def headers(self, event_id: str, body: bytes, secret: bytes, previous: bytes | None, now: float) -> dict[str, str]:
        return dict(self.pairs(event_id, body, secret, previous, now))

    def lines(self, event_id: str, body: bytes, secret: bytes, previous: bytes | None, now: float) -> str:
        """The same headers as they go on the wire: `Name: value` lines, each ending in CRLF."""
        return "".join([f"{name}: {value}\r\n" for name, value in self.pairs(event_id, body, secret, previous, now)])

    def pairs(
        self, event_id: str, body: bytes, secret: bytes, previous: bytes | None, now: float
    ) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        if self._twenty:
            ms = int(now * 1000)
            headers.append(("X-Twenty-Webhook-Timestamp", str(ms)))
            headers.append(("X-Twenty-Webhook-Signature", sign(secret, ms, body)))
            # Twenty's check reads one signature from one header, so the old secret's goes in a header of its own.
            if previous is not None:
                headers.append(("X-Twenty-Webhook-Signature-Previous", sign(previous, ms, body)))
            headers.append(("X-Twenty-Webhook-Nonce", os.urandom(16).hex()))
            headers.append(("X-Twenty-Webhook-Event-Id", event_id))
        if self._standard:
            seconds = int(now)
            signatures = [sign_standard(standard_key(secret), event_id, seconds, body)]
            if previous is not None:
                signatures.append(sign_standard(standard_key(previous), event_id, seconds, body))
            headers.append(("webhook-id", event_id))
            headers.append(("webhook-timestamp", str(seconds)))
            headers.append(("webhook-signature", " ".join(signatures)))
        return headers
