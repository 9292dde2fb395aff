"""A row of the subscriptions table as a `Webhook`, or None when it can never be delivered to.

The target URL is made absolute as Twenty's server makes it and must name an http(s) host; the secret must not be
empty; operations not of the form `object.action` are dropped, and options that cannot be applied are ignored. Each
refusal is logged once, naming the row, instead of dead-lettering every event.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import asyncpg
import orjson
import structlog

from webhookd.delivery.signing import standard_key
from webhookd.model import Webhook
from webhookd.routing.webhook_options import NO_OPTIONS, OptionsError, WebhookOptions, options_from_json

log = structlog.get_logger("webhookd.routing.subscription_rows")


def webhook_from_row(row: asyncpg.Record) -> Webhook | None:
    """A row as a Webhook, or None (with a warning naming the row) when it can never be delivered to."""
    saved, secret = row["targetUrl"], row["secret"]
    if isinstance(saved, str) and _OTHER_SCHEME.match(saved) and not saved.startswith(_ABSOLUTE_PREFIXES):
        # Twenty would post `ftp://host/x` to https://ftp://host/x, a host named "ftp" that its request never
        # reaches; refusing it here says so once instead of dead-lettering every event.
        log.warning("webhook_skipped", webhook_id=row["id"], reason="targetUrl has a scheme other than http(s)")
        return None
    url = absolute_url(saved) if isinstance(saved, str) else saved
    host_key = _host_key(url)
    if not host_key:
        log.warning("webhook_skipped", webhook_id=row["id"], reason="targetUrl is not an http(s) URL with a host")
        return None
    if not isinstance(secret, str) or not standard_key(secret.encode()):
        # An empty key makes every signature forgeable; refusing the webhook is the only safe answer.
        log.warning("webhook_skipped", webhook_id=row["id"], reason="the secret is empty")
        return None
    operations = tuple(op for op in (row["operations"] or ()) if _valid_operation(op))
    if len(operations) != len(row["operations"] or ()):
        log.warning("webhook_operations_ignored", webhook_id=row["id"], reason="not of the form object.action")
    previous = row.get("previous_secret")
    return Webhook(
        options=_options(row["id"], row.get("options")),
        id=row["id"],
        workspace_id=row["workspaceId"],
        target_url=url,
        saved_url=None if url == saved else saved,
        operations=operations,
        secret=secret.encode(),
        host_key=host_key,
        previous_secret=previous.encode() if isinstance(previous, str) and previous else None,
        previous_until=row.get("previous_until") or 0.0,
    )


def _options(webhook_id: str, stored: object) -> WebhookOptions:
    if stored is None:
        return NO_OPTIONS
    try:
        return options_from_json(orjson.loads(stored) if isinstance(stored, str) else stored)
    except (OptionsError, orjson.JSONDecodeError) as exc:
        # A row edited by hand into something that cannot be applied: the webhook goes on as if it had none.
        log.warning("webhook_options_ignored", webhook_id=webhook_id, reason=str(exc))
        return NO_OPTIONS


# The prefixes Twenty's getAbsoluteUrl leaves alone; anything else gets `https://` in front, untrimmed.
_ABSOLUTE_PREFIXES = ("http://", "https://", "HTTP://", "HTTPS://")
# A URL of some scheme: `ftp://`, `file:///`, or `Http://`, which Twenty's getAbsoluteUrl does not recognise either.
_OTHER_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[/\\]")
# Node's URL parser (WHATWG) reads any run of slashes or backslashes after http: or https: as the start of the host.
_AUTHORITY_START = re.compile(r"(https?:)[/\\]*", re.IGNORECASE)


def absolute_url(saved: str) -> str:
    """Where Twenty's server posts a saved `targetUrl`, so that webhookd delivers what Twenty delivers.

    Twenty's getAbsoluteUrl keeps a URL that starts with one of four exact scheme prefixes and puts `https://` in
    front of anything else, untrimmed (`receiver.example/hook` -> `https://receiver.example/hook`); Node's parser then
    takes `https:////host` for `https://host`.
    """
    absolute = saved if saved.startswith(_ABSOLUTE_PREFIXES) else f"https://{saved}"
    return _AUTHORITY_START.sub(r"\1//", absolute, count=1)


def _host_key(url: object) -> str:
    if not isinstance(url, str):
        return ""
    try:
        parts = urlsplit(url)
        # Whitespace in the authority (a URL saved with a leading space, made absolute as Twenty does) names no
        # host anyone can reach; Twenty's own request fails on it too.
        if parts.scheme in ("http", "https") and parts.hostname and not any(c.isspace() for c in parts.netloc):
            # .port raises for a port out of range: a row like that must be refused here, not crash a delivery.
            return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    except ValueError:
        pass
    return ""


def _valid_operation(op: object) -> bool:
    if not isinstance(op, str):
        return False
    obj, dot, action = op.partition(".")
    return bool(dot and obj and action and "." not in action)
