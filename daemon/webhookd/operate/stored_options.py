"""A webhook and its options as Postgres has them, for `webhookd webhooks`: the subscriptions table's row (read, never
changed) and the `webhookd.webhook_options` row, read as the daemons read it, with what an invalid row holds shown by
key names only, since a hand-edited row may hold a secret anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import orjson

from webhookd.endpoints.sync import Connection
from webhookd.routing.webhook_options import HEADER_NAME, NO_OPTIONS, OptionsError, WebhookOptions, options_from_json

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


@dataclass(frozen=True, slots=True)
class StoredOptions:
    """One webhook's options row as read: the JSON as stored, and what the daemons make of it."""

    exists: bool  # whether the webhook has an options row
    raw: object  # the row's JSON, None without a row or when it cannot be read
    updated_at: datetime | None
    options: WebhookOptions | None  # None when the row cannot be applied
    problem: str | None  # why not, from OptionsError or the JSON reader
    readable: bool = True  # False when the daemons' JSON reader refuses the row

    @classmethod
    def read(cls, text: str | None, updated_at: datetime | None) -> StoredOptions:
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
class WebhookRow:
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


async def read_webhook(conn: Connection, wid: str, table: str) -> WebhookRow:
    row = await conn.fetchrow(_WEBHOOK_SQL.format(table=table), wid)
    if row is None:
        return WebhookRow(wid, found=False)
    return WebhookRow(
        wid, True, row["workspace_id"], row["target_url"], tuple(row["operations"] or ()), row["deleted_at"]
    )


async def read_options(conn: Connection, wid: str, *, for_update: bool = False) -> StoredOptions:
    row = await conn.fetchrow(_OPTIONS_SQL + (" FOR UPDATE" if for_update else ""), wid)
    return StoredOptions.read(None, None) if row is None else StoredOptions.read(row["options"], row["updated_at"])


async def listed_options(conn: Connection, table: str) -> list[tuple[WebhookRow, StoredOptions]]:
    """Every webhook that has options, with them, by id; options left behind by a removed webhook included."""
    read: list[tuple[WebhookRow, StoredOptions]] = []
    for record in await conn.fetch(_LIST_SQL.format(table=table)):
        webhook = WebhookRow(record["webhook_id"], record["found"], deleted_at=record["deleted_at"])
        read.append((webhook, StoredOptions.read(record["options"], record["updated_at"])))
    return read
