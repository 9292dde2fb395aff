"""What `webhookd webhooks set` was asked to change, turned into options: its flags checked before anything is read,
headers taken from the command line or the environment, and merged into the stored options; refusals name the flag
at fault and never repeat a header's value, nor text that is not a valid header name, which may be a header line
pasted whole, its secret included.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

from yarl import URL

from webhookd.operate.output import UsageError
from webhookd.operate.stored_options import WebhookRow
from webhookd.routing.subscription_rows import absolute_url
from webhookd.routing.webhook_options import HEADER_NAME, OptionsError, WebhookOptions, check_header

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _updated_fields(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(
            "--updated-fields: give at least one field name, such as stage,amount; "
            "`webhookd webhooks unset ID --updated-fields` removes the condition"
        )
    return names


def _headers(args: argparse.Namespace) -> dict[str, str]:
    """The headers of `--header` and `--header-from-env`, each checked; an error never repeats a value."""
    given: list[tuple[str, str, str]] = []  # (flag, name, value)
    for number, text in enumerate(args.header or [], 1):
        name, colon, value = text.partition(":")
        name = name.strip()
        if not colon or not HEADER_NAME.fullmatch(name):
            raise UsageError(
                f"--header #{number}: expected 'Name: value' with a header name (letters, digits and "
                "!#$%&'*+.^_`|~-) before the first colon; the argument is not repeated here, it may hold a secret"
            )
        # Only spaces and tabs around the value are the header syntax's; a line break is the user's and is refused.
        given.append(("--header", name, value.strip(" \t")))
    for number, text in enumerate(args.header_from_env or [], 1):
        name, equals, variable = (part.strip() for part in text.partition("="))
        if not equals or not HEADER_NAME.fullmatch(name) or not _ENV_NAME.fullmatch(variable):
            # Not repeated: a value given in place of the variable's name (`Authorization=Bearer ...`) is a secret.
            raise UsageError(
                f"--header-from-env #{number}: expected 'Name=ENVVAR' with a header name and an environment "
                "variable's name, such as 'Authorization=API_TOKEN'; the argument is not repeated here, it may hold "
                "a secret"
            )
        value = os.environ.get(variable)
        if not value:
            raise UsageError(
                f"--header-from-env {name}={variable}: the environment variable {variable} is not set or empty"
            )
        given.append(("--header-from-env", name, value))
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for number, (flag, name, value) in enumerate(given, 1):
        if name.lower() in seen:
            raise UsageError(f"{flag}: header {name!r} is given twice (header names ignore case)")
        seen.add(name.lower())
        try:
            check_header(name, value, number)
        except OptionsError as exc:
            raise UsageError(f"{flag}: {exc}; nothing changed") from None
        headers[name] = value
    return headers


def set_changes(args: argparse.Namespace) -> tuple[list[str] | None, list[str], dict[str, str]]:
    """What `set` was asked to change, checked before anything is read: fields, predicates, headers."""
    fields = None if args.updated_fields is None else _updated_fields(args.updated_fields)
    where: list[str] = list(args.where or [])
    if args.replace_where and not where:
        raise UsageError("--replace-where needs --where; `webhookd webhooks unset ID --where` removes every predicate")
    headers = _headers(args)
    if fields is None and not where and not headers and args.ordered is None:
        raise UsageError(
            "give at least one option to set: --updated-fields, --where, --ordered or --unordered, --header, "
            "--header-from-env"
        )
    return fields, where, headers


def merged_for_set(
    raw: object, args: argparse.Namespace, fields: list[str] | None, where: list[str], headers: dict[str, str]
) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UsageError(
            "the stored options are not a JSON object (edited by hand?); `webhookd webhooks unset ID --all` first; "
            "nothing changed"
        )
    merged = dict(raw)
    if fields is not None or where:
        current = merged.get("filter")
        # A filter that is not an object is left as it is: validation refuses it below, naming it.
        if current is None or isinstance(current, Mapping):
            flt = dict(current or {})
            if fields is not None:
                flt["updated_fields"] = fields
            if where:
                kept = flt.get("where", [])
                flt["where"] = where if args.replace_where or not isinstance(kept, list) else [*kept, *where]
            merged["filter"] = flt
    if args.ordered is not None:
        merged["ordered"] = args.ordered
    if headers:
        current = merged.get("headers")
        if current is None or isinstance(current, Mapping):
            replaced = {k.lower() for k in headers}
            kept_headers = {k: v for k, v in (current or {}).items() if str(k).lower() not in replaced}
            merged["headers"] = {**kept_headers, **headers}
    return merged


def canonical(options: WebhookOptions) -> dict[str, Any]:
    """The stored form, with a predicate given twice kept once."""
    data = options.to_json()
    where = data.get("filter", {}).get("where")
    if where:
        data["filter"]["where"] = list(dict.fromkeys(where))
    return data


def check_authorization(webhook: WebhookRow, options: WebhookOptions) -> None:
    """Refuse an Authorization header beside credentials in the targetUrl: aiohttp sends those as Authorization
    itself and refuses every request that has both. The URL's credentials are never repeated."""
    authorization = next((name for name, _ in options.headers if name.lower() == "authorization"), None)
    if authorization is None or webhook.target_url is None:
        return
    try:
        url = URL(absolute_url(webhook.target_url))
    except ValueError:
        return  # a targetUrl that cannot be read fails every delivery whatever the headers, and says so
    if url.raw_user is None and url.raw_password is None:
        return
    raise UsageError(
        f"refused, nothing changed: header {authorization!r}: the webhook's targetUrl already carries credentials "
        "(user:password@host), which are sent as the Authorization header, so every request would fail; remove "
        f"them from the targetUrl, or leave {authorization} out of this webhook's headers"
    )
