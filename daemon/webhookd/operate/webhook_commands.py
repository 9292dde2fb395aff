"""`webhookd webhooks show | set | unset`: each webhook's own options (a filter, per-record ordering, custom headers).

Options are kept in `webhookd.webhook_options`, one JSON object per webhook, beside Twenty's subscriptions table,
which is only ever read here. `set` merges into what is stored and `unset` removes from it, each under a lock on the
webhook's options, so two operators at once never lose each other's change; `set` validates the merged result with
`options_from_json`, the reader the daemons use, so a refused change leaves everything as it was. A trigger tells
running daemons, which apply a change within 2 seconds.

Header values may be secrets: they are never printed, in text or in JSON, nor repeated in an error message; nor is
text that is not a valid header name, which may be a header line pasted whole, its secret included.

The webhook and its options are read by `stored_options`, shown by `webhook_view`; what `set` asks becomes options in
`options_change`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import orjson

from webhookd.endpoints.sync import Connection
from webhookd.operate.options_change import canonical, check_authorization, merged_for_set, set_changes
from webhookd.operate.output import NotFound, UsageError, webhook_id
from webhookd.operate.stored_options import listed_options, read_options, read_webhook
from webhookd.operate.webhook_view import emit_list, emit_webhook, when
from webhookd.routing.webhook_options import HEADER_NAME, OptionsError, WebhookOptions, options_from_json

APPLIED_NOTE = "running daemons apply it within 2 seconds"

# An advisory lock rather than only SELECT ... FOR UPDATE: when a webhook has no options row yet there is nothing to
# lock, and two first `set`s would each insert their own merge, the later one erasing the earlier.
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('webhookd.webhook_options:' || $1::text, 0))"
_UPSERT_SQL = """
    INSERT INTO webhookd.webhook_options (webhook_id, options) VALUES ($1::uuid, $2::jsonb)
    ON CONFLICT (webhook_id) DO UPDATE SET options = EXCLUDED.options, updated_at = now()
"""
_DELETE_SQL = "DELETE FROM webhookd.webhook_options WHERE webhook_id = $1::uuid"


async def lock_options(conn: Connection, wid: str) -> None:
    """Hold, until the transaction ends, the lock that every `set` and `unset` of this webhook takes first."""
    await conn.execute(_LOCK_SQL, wid)


async def show_webhooks(conn: Connection, args: argparse.Namespace, table: str) -> int:
    if args.id is None:
        emit_list(await listed_options(conn, table), args.json)
        return 0
    wid = webhook_id(args.id)
    webhook, stored = await read_webhook(conn, wid, table), await read_options(conn, wid)
    if not webhook.found and not stored.exists:
        raise NotFound(f"no webhook {wid} in the subscriptions table, and no options for it")
    emit_webhook(webhook, stored, args.json)
    return 0


async def set_options(conn: Connection, args: argparse.Namespace, table: str) -> int:
    wid = webhook_id(args.id)
    fields, where, headers = set_changes(args)
    async with conn.transaction():
        await lock_options(conn, wid)
        webhook = await read_webhook(conn, wid, table)
        if not webhook.found:
            raise NotFound(f"no live webhook {wid} in the subscriptions table")
        if webhook.deleted_at is not None:
            raise NotFound(f"no live webhook {wid}: it was deleted {when(webhook.deleted_at)}")
        before = await read_options(conn, wid, for_update=True)
        if not before.readable:
            # Merging onto nothing would silently drop whatever the row held: the operator removes it knowingly.
            raise UsageError(
                f"refused, nothing changed: {before.problem}; `webhookd webhooks unset {wid} --all` removes it, "
                "then set the options again"
            )
        merged = merged_for_set(before.raw, args, fields, where, headers)
        try:
            options = options_from_json(merged)
        except OptionsError as exc:
            raise UsageError(f"refused, nothing changed: {exc}") from None
        check_authorization(webhook, options)
        await _write(conn, wid, options)
        after = await read_options(conn, wid)
    emit_webhook(webhook, after, args.json)
    if not args.json:
        print(APPLIED_NOTE + ".")
    return 0


async def _write(conn: Connection, wid: str, options: WebhookOptions) -> None:
    if options:
        await conn.execute(_UPSERT_SQL, wid, orjson.dumps(canonical(options)).decode())
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
        webhook = await read_webhook(conn, wid, table)
        if args.all:
            # Without reading the row: one that no reader can parse must still be removable.
            changed = await conn.fetchval(_DELETE_SQL + " RETURNING true", wid) is not None
            exists = changed
        else:
            before = await read_options(conn, wid, for_update=True)
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
        after = await read_options(conn, wid)
    emit_webhook(webhook, after, args.json)
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
