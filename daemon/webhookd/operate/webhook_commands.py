"""`webhookd webhooks show | set | unset`: each webhook's own options (a filter, per-record ordering, custom headers).

Options are kept in `webhookd.webhook_options`, one JSON object per webhook, beside Twenty's subscriptions table,
which is only ever read here. `set` merges into what is stored and `unset` removes from it, each under a lock on the
webhook's options, so two operators at once never lose each other's change; `set` validates the merged result with
`options_from_json`, the reader the daemons use, so a refused change leaves everything as it was. A trigger tells
running daemons, which apply a change within 2 seconds.

Header values may be secrets: they are never printed, in text or in JSON, nor repeated in an error message; nor is
text that is not a valid header name, which may be a header line pasted whole, its secret included.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from yarl import URL

from webhookd.endpoints.sync import Connection, display_url
from webhookd.operate.output import NotFound, UsageError, emit_json, emit_table, webhook_id
from webhookd.routing.subscriptions import absolute_url
from webhookd.routing.webhook_options import (
    HEADER_NAME,
    NO_OPTIONS,
    OptionsError,
    WebhookOptions,
    check_header,
    options_from_json,
)

APPLIED_NOTE = "running daemons apply it within 2 seconds"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_COLUMNS = (
    ("webhook_id", "WEBHOOK"),
    ("state", "STATE"),
    ("ordered", "ORDERED"),
    ("filter", "FILTER"),
    ("headers", "HEADERS"),
    ("updated_at", "CHANGED"),
)

_WEBHOOK_SQL = """
    SELECT w.id::text AS id, w."workspaceId"::text AS workspace_id, w."targetUrl" AS target_url, w.operations,
           w."deletedAt" AS deleted_at
    FROM {table} w WHERE w.id = $1::uuid
"""
_OPTIONS_SQL = "SELECT options::text AS options, updated_at FROM webhookd.webhook_options WHERE webhook_id = $1::uuid"
_LIST_SQL = """
    SELECT o.webhook_id::text AS webhook_id, o.options::text AS options, o.updated_at, w.id IS NOT NULL AS found,
           w."deletedAt" AS deleted_at
    FROM webhookd.webhook_options o LEFT JOIN {table} w ON w.id = o.webhook_id
    ORDER BY o.webhook_id
"""
# An advisory lock rather than only SELECT ... FOR UPDATE: when a webhook has no options row yet there is nothing to
# lock, and two first `set`s would each insert their own merge, the later one erasing the earlier.
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('webhookd.webhook_options:' || $1::text, 0))"
_UPSERT_SQL = """
    INSERT INTO webhookd.webhook_options (webhook_id, options) VALUES ($1::uuid, $2::jsonb)
    ON CONFLICT (webhook_id) DO UPDATE SET options = EXCLUDED.options, updated_at = now()
"""
_DELETE_SQL = "DELETE FROM webhookd.webhook_options WHERE webhook_id = $1::uuid"


@dataclass(frozen=True, slots=True)
class _Stored:
    """One webhook's options row as read: the JSON as stored, and what the daemons make of it."""

    exists: bool  # whether the webhook has an options row
    raw: object  # the row's JSON, None without a row or when it cannot be read
    updated_at: datetime | None
    options: WebhookOptions | None  # None when the row cannot be applied
    problem: str | None  # why not, from OptionsError or the JSON reader
    readable: bool = True  # False when the daemons' JSON reader refuses the row

    @classmethod
    def read(cls, text: str | None, updated_at: datetime | None) -> _Stored:
        if text is None:
            return cls(False, None, None, NO_OPTIONS, None)
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            # Postgres stores JSON that orjson, the daemons' reader, refuses: a number beyond a double (1e400 is
            # kept as 401 digits) or nesting deeper than 1024. The daemons ignore such a row as any invalid one.
            # `msg` is the reason alone, never a piece of the row.
            problem = f"the stored JSON cannot be read: {exc.msg}"
            return cls(True, None, updated_at, None, problem, readable=False)
        try:
            return cls(True, raw, updated_at, options_from_json(raw), None)
        except OptionsError as exc:
            return cls(True, raw, updated_at, None, str(exc))

    def stored_keys(self) -> list[str]:
        """What an invalid row holds, as key names only: a hand-edited row may have a secret anywhere, even in a
        key (a header line pasted whole as a header's name), so a key that is not a plain name is shown by its
        position, which is also how the validator's message names it."""
        if not self.readable:
            return ["(the JSON cannot be read: not shown)"]
        if not isinstance(self.raw, Mapping):
            return [f"(not a JSON object but {type(self.raw).__name__})"]
        keys: list[str] = []
        for number, (key, value) in enumerate(self.raw.items(), 1):
            if key in ("filter", "headers") and isinstance(value, Mapping) and value:
                keys.extend(f"{key}.{_key_name(sub, n)}" for n, sub in enumerate(value, 1))
            else:
                keys.append(_key_name(key, number))
        return keys


def _key_name(key: object, number: int) -> str:
    # A plain name has no space, colon or control character: it cannot hold a header line or move the cursor.
    return key if isinstance(key, str) and HEADER_NAME.fullmatch(key) else f"#{number} (not a valid name)"


@dataclass(frozen=True, slots=True)
class _Webhook:
    """A webhook as the subscriptions table has it; `found` is false for options left behind by a removed row."""

    id: str
    found: bool
    workspace_id: str | None = None
    target_url: str | None = None
    operations: tuple[str, ...] = ()
    deleted_at: datetime | None = None

    @property
    def state(self) -> str:
        if not self.found:
            return "removed"
        return "deleted" if self.deleted_at is not None else "live"


async def _webhook(conn: Connection, wid: str, table: str) -> _Webhook:
    row = await conn.fetchrow(_WEBHOOK_SQL.format(table=table), wid)
    if row is None:
        return _Webhook(wid, found=False)
    return _Webhook(
        wid, True, row["workspace_id"], row["target_url"], tuple(row["operations"] or ()), row["deleted_at"]
    )


async def lock_options(conn: Connection, wid: str) -> None:
    """Hold, until the transaction ends, the lock that every `set` and `unset` of this webhook takes first."""
    await conn.execute(_LOCK_SQL, wid)


async def _stored(conn: Connection, wid: str, *, for_update: bool = False) -> _Stored:
    row = await conn.fetchrow(_OPTIONS_SQL + (" FOR UPDATE" if for_update else ""), wid)
    return _Stored.read(None, None) if row is None else _Stored.read(row["options"], row["updated_at"])


async def show_webhooks(conn: Connection, args: argparse.Namespace, table: str) -> int:
    if args.id is None:
        return await _list(conn, args, table)
    wid = webhook_id(args.id)
    webhook, stored = await _webhook(conn, wid, table), await _stored(conn, wid)
    if not webhook.found and not stored.exists:
        raise NotFound(f"no webhook {wid} in the subscriptions table, and no options for it")
    _emit(webhook, stored, args.json)
    return 0


async def _list(conn: Connection, args: argparse.Namespace, table: str) -> int:
    read: list[tuple[_Webhook, _Stored]] = []
    for record in await conn.fetch(_LIST_SQL.format(table=table)):
        webhook = _Webhook(record["webhook_id"], record["found"], deleted_at=record["deleted_at"])
        read.append((webhook, _Stored.read(record["options"], record["updated_at"])))
    if args.json:
        emit_json([_summary_json(webhook, stored) for webhook, stored in read])
        return 0
    rows: list[dict[str, Any]] = []
    for webhook, stored in read:
        options = stored.options
        row: dict[str, Any] = {"webhook_id": webhook.id, "state": webhook.state, "updated_at": stored.updated_at}
        if options is None:
            row |= {"ordered": "-", "filter": "INVALID, ignored by daemons (see show)", "headers": "-"}
        else:
            row |= {
                "ordered": "yes" if options.ordered else "no",
                "filter": _filter_summary(options),
                "headers": ", ".join(name for name, _ in options.headers) or "-",
            }
        rows.append(row)
    emit_table(rows, _COLUMNS)
    for webhook, stored in read:
        if stored.options is None:
            print(f"warning: webhook {webhook.id}: its stored options are ignored by running daemons: {stored.problem}")
    return 0


def _summary_json(webhook: _Webhook, stored: _Stored) -> dict[str, Any]:
    data: dict[str, Any] = {
        "webhook_id": webhook.id,
        "state": webhook.state,
        "deleted_at": webhook.deleted_at,
        "options_updated_at": stored.updated_at,
        "valid": stored.options is not None,
        "options": stored.options.shown() if stored.options is not None else None,
    }
    if stored.options is None:
        data |= {"problem": stored.problem, "stored_keys": stored.stored_keys()}
    return data


def _filter_summary(options: WebhookOptions) -> str:
    return "; ".join(options.filter.describe()) if options.filter is not None else "-"


def _emit(webhook: _Webhook, stored: _Stored, as_json: bool) -> None:
    if as_json:
        emit_json(_as_json(webhook, stored))
    else:
        _print(webhook, stored)


def _as_json(webhook: _Webhook, stored: _Stored) -> dict[str, Any]:
    summary = _summary_json(webhook, stored)
    data: dict[str, Any] = {
        "webhook_id": webhook.id,
        "state": webhook.state,
        "workspace_id": webhook.workspace_id,
        "url": _url(webhook),
        "operations": list(webhook.operations),
    }
    return data | summary


def _url(webhook: _Webhook) -> str | None:
    return None if webhook.target_url is None else display_url(absolute_url(webhook.target_url))


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.isoformat(timespec="seconds")


def _line(label: str, values: list[str] | str) -> None:
    lines = [values] if isinstance(values, str) else values or ["-"]
    print(f"{label + ':':<18}{lines[0]}")
    for more in lines[1:]:
        print(f"{'':<18}{more}")


def _print(webhook: _Webhook, stored: _Stored) -> None:
    _line("webhook", webhook.id)
    if webhook.found:
        _line("workspace", webhook.workspace_id or "-")
        _line("target", _url(webhook) or "-")
        _line("operations", ", ".join(webhook.operations) or "-")
        _line("state", "live" if webhook.deleted_at is None else f"deleted {_when(webhook.deleted_at)}")
    else:
        _line("state", "not in the subscriptions table: these options are left over (`unset ID --all` removes them)")
    if not stored.exists:
        _line("options", "no options (every event it subscribes to, unordered, no custom headers)")
        return
    _line("options changed", _when(stored.updated_at))
    if stored.options is None:
        _line(
            "warning",
            [
                "these stored options are invalid and ignored by running daemons, which deliver as if there were none:",
                stored.problem or "",
            ],
        )
        _line("stored keys", ", ".join(stored.stored_keys()))
        at_fault = " (or unset the option at fault)" if stored.readable else ""
        _line("fix", f"webhookd webhooks unset {webhook.id} --all{at_fault}, then set them again")
        return
    options = stored.options
    _line("filter", options.filter.describe() if options.filter is not None else "none (every event it subscribes to)")
    _line("ordered", "yes (one record's deliveries leave in order)" if options.ordered else "no")
    _line("headers", [f"{name}: ***" for name, _ in options.headers] or "none")


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


def _set_changes(args: argparse.Namespace) -> tuple[list[str] | None, list[str], dict[str, str]]:
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


def _merged_for_set(
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


def _canonical(options: WebhookOptions) -> dict[str, Any]:
    """The stored form, with a predicate given twice kept once."""
    data = options.to_json()
    where = data.get("filter", {}).get("where")
    if where:
        data["filter"]["where"] = list(dict.fromkeys(where))
    return data


async def set_options(conn: Connection, args: argparse.Namespace, table: str) -> int:
    wid = webhook_id(args.id)
    fields, where, headers = _set_changes(args)
    async with conn.transaction():
        await lock_options(conn, wid)
        webhook = await _webhook(conn, wid, table)
        if not webhook.found:
            raise NotFound(f"no live webhook {wid} in the subscriptions table")
        if webhook.deleted_at is not None:
            raise NotFound(f"no live webhook {wid}: it was deleted {_when(webhook.deleted_at)}")
        before = await _stored(conn, wid, for_update=True)
        if not before.readable:
            # Merging onto nothing would silently drop whatever the row held: the operator removes it knowingly.
            raise UsageError(
                f"refused, nothing changed: {before.problem}; `webhookd webhooks unset {wid} --all` removes it, "
                "then set the options again"
            )
        merged = _merged_for_set(before.raw, args, fields, where, headers)
        try:
            options = options_from_json(merged)
        except OptionsError as exc:
            raise UsageError(f"refused, nothing changed: {exc}") from None
        _check_authorization(webhook, options)
        await _write(conn, wid, options)
        after = await _stored(conn, wid)
    _emit(webhook, after, args.json)
    if not args.json:
        print(APPLIED_NOTE + ".")
    return 0


def _check_authorization(webhook: _Webhook, options: WebhookOptions) -> None:
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


async def _write(conn: Connection, wid: str, options: WebhookOptions) -> None:
    if options:
        await conn.execute(_UPSERT_SQL, wid, orjson.dumps(_canonical(options)).decode())
    else:
        # Nothing left in effect (`set --unordered` on a row that only ordered): no row, as after `unset`.
        await conn.execute(_DELETE_SQL, wid)


def _merged_for_unset(raw: Mapping[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The stored form without what `unset` names, and the headers named that were not set."""
    merged = dict(raw)
    if args.updated_fields or args.where:
        dropped = {"updated_fields"} if args.updated_fields else set()
        dropped |= {"where"} if args.where else set()
        # A filter that is not an object has nothing in it worth keeping.
        flt = merged.pop("filter", None)
        kept_filter = {k: v for k, v in flt.items() if k not in dropped} if isinstance(flt, Mapping) else {}
        if kept_filter:
            merged["filter"] = kept_filter
    if args.ordered:
        merged.pop("ordered", None)
    missing: list[str] = []
    if args.header:
        current = merged.get("headers")
        names = {name.lower() for name in args.header}
        if isinstance(current, Mapping):
            found = {str(k).lower() for k in current}
            missing = [name for name in args.header if name.lower() not in found]
            kept = {k: v for k, v in current.items() if str(k).lower() not in names}
            if kept:
                merged["headers"] = kept
            else:
                merged.pop("headers")
        else:
            missing = list(args.header) if current is None else []
            merged.pop("headers", None)
    return merged, missing


async def unset_options(conn: Connection, args: argparse.Namespace, table: str) -> int:
    wid = webhook_id(args.id)
    if not (args.all or args.updated_fields or args.where or args.ordered or args.header):
        raise UsageError("give at least one option to remove: --updated-fields, --where, --ordered, --header, --all")
    missing: list[str] = []
    async with conn.transaction():
        await lock_options(conn, wid)
        webhook = await _webhook(conn, wid, table)
        if args.all:
            # Without reading the row: one that no reader can parse must still be removable.
            changed = await conn.fetchval(_DELETE_SQL + " RETURNING true", wid) is not None
            exists = changed
        else:
            before = await _stored(conn, wid, for_update=True)
            exists = changed = False
            if before.exists:
                exists = True
                if not before.readable:
                    raise UsageError(f"{before.problem}; only --all removes these options; nothing changed")
                if not isinstance(before.raw, Mapping):
                    raise UsageError(
                        "the stored options are not a JSON object (edited by hand?); only --all removes them; "
                        "nothing changed"
                    )
                merged, missing = _merged_for_unset(before.raw, args)
                changed = merged != before.raw
                if not merged:
                    await conn.execute(_DELETE_SQL, wid)
                elif changed:
                    # Not validated: a removal never makes valid options invalid, and it must stay possible to take
                    # the faulty part out of a row edited by hand.
                    await conn.execute(_UPSERT_SQL, wid, orjson.dumps(merged).decode())
        if not webhook.found and not exists:
            raise NotFound(f"no webhook {wid} in the subscriptions table, and no options for it")
        after = await _stored(conn, wid)
    _emit(webhook, after, args.json)
    if not args.json:
        if missing:
            # As typed, which may be a whole header line with its secret (`--header 'Authorization: Bearer ...'`).
            shown = [
                name if HEADER_NAME.fullmatch(name) else f"--header #{n} (not a valid name)"
                for n, name in enumerate(args.header, 1)
                if name in missing
            ]
            print(f"not set, so not removed: header(s) {', '.join(shown)}")
        print(APPLIED_NOTE + "." if changed else "nothing was removed: none of those options was set.")
    return 0
