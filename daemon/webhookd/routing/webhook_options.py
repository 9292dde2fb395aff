"""Per-webhook options: a filter, per-record ordering and custom headers, kept in `webhookd.webhook_options`.

The stored form is one JSON object per webhook, for example::

    {"filter": {"updated_fields": ["stage"], "where": ["stage in [WON, LOST]"]},
     "ordered": true,
     "headers": {"Authorization": "Bearer ..."}}

Every key is optional. `options_from_json` is the one reader of that form: `webhookd webhooks set` validates with
it before writing (so a bad option is refused with its reason and nothing changes), and the daemon reads every row
with it, ignoring (with a warning naming the webhook) a row edited by hand into something it cannot apply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from webhookd.routing.filter_parsing import FilterError, build_filter
from webhookd.routing.filters import WebhookFilter


class OptionsError(ValueError):
    """Options that cannot be applied; the message names the option and what is wrong."""


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    """What a webhook asks beyond Twenty's row. Header values may be secrets: never in a repr or a log line."""

    filter: WebhookFilter | None = None
    ordered: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        return f"WebhookOptions(filter={self.filter!r}, ordered={self.ordered}, headers={[n for n, _ in self.headers]})"

    def __bool__(self) -> bool:
        return self.filter is not None or self.ordered or bool(self.headers)

    def to_json(self) -> dict[str, Any]:
        """The stored form, which `options_from_json` reads back to equal options."""
        data: dict[str, Any] = {}
        if self.filter is not None:
            flt: dict[str, Any] = {}
            if self.filter.updated_fields is not None:
                flt["updated_fields"] = sorted(self.filter.updated_fields)
            if self.filter.where:
                flt["where"] = [p.text for p in self.filter.where]
            data["filter"] = flt
        if self.ordered:
            data["ordered"] = True
        if self.headers:
            data["headers"] = dict(self.headers)
        return data

    def shown(self) -> dict[str, Any]:
        """The stored form with every header value replaced by `***`, for `webhooks show` and logs."""
        data = self.to_json()
        if "headers" in data:
            data["headers"] = dict.fromkeys(data["headers"], "***")
        return data


NO_OPTIONS = WebhookOptions()

# Headers that webhookd itself sets on every request, each with the reason a refusal gives: a webhook that set one
# could forge what the secret vouches for, contradict the body, break the connection, or pass for another client.
_SIGNATURE = "part of the signature scheme, which receivers trust"
_BODY = "it describes the body"
_CONNECTION = "it belongs to the connection"
_OWNED_HEADERS: Mapping[str, str] = {
    "host": "it picks the receiver",
    "user-agent": "always webhookd/<version>, which receivers may rely on",
    "content-length": _BODY,
    "content-type": _BODY,
    "content-encoding": _BODY,
    "transfer-encoding": _BODY,
    "connection": _CONNECTION,
    "keep-alive": _CONNECTION,
    "upgrade": _CONNECTION,
    "te": _CONNECTION,
    "trailer": _CONNECTION,
    "expect": _CONNECTION,
    "webhook-id": _SIGNATURE,
    "webhook-timestamp": _SIGNATURE,
    "webhook-signature": _SIGNATURE,
}
_OWNED_PREFIX = "x-twenty-webhook-"
# RFC 9110's token characters. Text that does not match is never quoted in a message, here or in `webhooks show`: a
# name typed by hand may be a whole header line, secret included (`Authorization: Bearer ...`).
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")
_NAME_RULE = "letters, digits and !#$%&'*+.^_`|~-, at most 100"
# Visible ASCII and inner spaces or tabs: anything else (CR, LF, NUL) could end the header and forge another.
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?|")
_MAX_HEADERS = 20
_MAX_VALUE = 4096
_KNOWN_KEYS = frozenset({"filter", "ordered", "headers"})
_FILTER_KEYS = frozenset({"updated_fields", "where"})


def check_header(name: str, value: str, number: int) -> None:
    """Raise OptionsError unless `name: value` is a header a webhook may add to its requests; `number`, the header's
    position from 1, names it when its name is not valid (that text is never quoted)."""
    if not HEADER_NAME.fullmatch(name):
        raise OptionsError(
            f"header #{number}: not a valid header name ({_NAME_RULE}); it is not repeated here, it may hold a secret"
        )
    lower = name.lower()
    owned = _OWNED_HEADERS.get(lower, _SIGNATURE if lower.startswith(_OWNED_PREFIX) else None)
    if owned is not None:
        raise OptionsError(f"header {name!r}: webhookd sets it on every request ({owned})")
    if len(value) > _MAX_VALUE or not _HEADER_VALUE.fullmatch(value):
        # The value itself is never quoted: it may be a secret.
        raise OptionsError(
            f"header {name!r}: the value must be printable ASCII of at most {_MAX_VALUE} characters, "
            "without line breaks or leading or trailing spaces"
        )


def _unknown_keys(keys: Iterable[object], known: frozenset[str]) -> str | None:
    """The keys not in `known`, for a message, or None if there are none. A key that is not a plain name is given by
    its position instead (as `webhooks show` lists it): typed by hand where a header belongs, it may be a whole
    header line, secret included."""
    unknown = [
        key if HEADER_NAME.fullmatch(key) else f"#{number} (not a valid name, not shown)"
        for number, key in enumerate(map(str, keys), 1)
        if key not in known
    ]
    return ", ".join(unknown) if unknown else None


def options_from_json(data: object) -> WebhookOptions:
    """Read the stored form; raises OptionsError naming what cannot be applied."""
    if not isinstance(data, Mapping):
        raise OptionsError("options must be a JSON object")
    unknown = _unknown_keys(data, _KNOWN_KEYS)
    if unknown is not None:
        raise OptionsError(f"unknown option(s) {unknown}; known: filter, ordered, headers")
    ordered = data.get("ordered", False)
    if not isinstance(ordered, bool):
        raise OptionsError("ordered must be true or false")
    options = WebhookOptions(filter=_filter(data.get("filter")), ordered=ordered, headers=_headers(data.get("headers")))
    # The one empty value, so that routing tells a webhook without options by identity, per event and webhook.
    return options if options else NO_OPTIONS


def _filter(data: object) -> WebhookFilter | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise OptionsError("filter must be a JSON object with updated_fields and/or where")
    unknown = _unknown_keys(data, _FILTER_KEYS)
    if unknown is not None:
        raise OptionsError(f"filter: unknown key(s) {unknown}; known: updated_fields, where")
    fields, where = data.get("updated_fields"), data.get("where", [])
    if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        raise OptionsError("filter.updated_fields must be a list of field names")
    if not (isinstance(where, list) and all(isinstance(w, str) for w in where)):
        raise OptionsError("filter.where must be a list of predicates such as 'stage in [WON, LOST]'")
    try:
        built = build_filter(fields, where)
    except FilterError as exc:
        raise OptionsError(f"filter: {exc}") from None
    return built if built.updated_fields is not None or built.where else None


def _headers(data: object) -> tuple[tuple[str, str], ...]:
    if data is None:
        return ()
    if not isinstance(data, Mapping) or not all(isinstance(v, str) for v in data.values()):
        raise OptionsError("headers must be a JSON object of header names to text values")
    if len(data) > _MAX_HEADERS:
        raise OptionsError(f"headers: at most {_MAX_HEADERS} per webhook")
    seen: set[str] = set()
    for number, (name, value) in enumerate(data.items(), 1):
        check_header(str(name), value, number)
        if name.lower() in seen:
            raise OptionsError(f"header {name!r}: given twice (header names ignore case)")
        seen.add(name.lower())
    return tuple((str(name), value) for name, value in data.items())
