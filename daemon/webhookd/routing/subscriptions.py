"""Which webhooks want an event: the subscriptions table, held in memory per workspace and kept current.

Matching is Twenty's: an event `X.op` goes to every live webhook of the same workspace whose `operations` holds any of
`X.op`, `*.op`, `X.*` or `*.*`. The index answers from memory, so its cost per event does not grow with the number of
webhooks. Changes arrive through LISTEN/NOTIFY (a trigger that `migrate` installs). A full reload follows every
reconnect, for what a lost connection missed, and a periodic check of the table's hash catches what no trigger
announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import orjson
import structlog
from asyncpg.pool import PoolConnectionProxy

from webhookd.delivery.signing import standard_key
from webhookd.durable.listening import Listening
from webhookd.model import Webhook
from webhookd.routing.webhook_options import NO_OPTIONS, OptionsError, WebhookOptions, options_from_json
from webhookd.runtime.tls import PostgresConnect

NOTIFY_CHANNEL = "webhookd_subscriptions"
# Past this many changed rows at once, one full reload is cheaper than reading them one by one.
_BULK_CHANGE_THRESHOLD = 500
# Notifications are gathered for this long so that a burst of row changes is read in one query.
_DEBOUNCE_SECONDS = 0.05

log = structlog.get_logger("webhookd.routing.subscriptions")

# Rows indexed between two yields to the event loop during a full reload: about a few milliseconds of work.
_ROWS_PER_SLICE = 500
_PRUNE_PREVIOUS_SECRETS = "DELETE FROM webhookd.previous_secrets WHERE replaced_at < now() - make_interval(secs => $1)"


class SubscriptionIndex:
    """Webhooks by workspace and by operation pattern; rows are replaced whole, never edited in place."""

    def __init__(self) -> None:
        self._by_id: dict[str, Webhook] = {}
        self._by_workspace: dict[str, dict[str, dict[str, Webhook]]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, webhook_id: str) -> Webhook | None:
        return self._by_id.get(webhook_id)

    def match(self, workspace_id: str, obj: str, action: str) -> list[Webhook]:
        patterns = self._by_workspace.get(workspace_id)
        if not patterns:
            return []
        found: dict[str, Webhook] = {}
        exact = f"{obj}.{action}"
        for key in (exact,) if exact in _EXACT_ONLY else (exact, f"*.{action}", f"{obj}.*", "*.*"):
            hooks = patterns.get(key)
            if hooks:
                found.update(hooks)
        return list(found.values())

    def put(self, webhook: Webhook) -> None:
        self.remove(webhook.id)
        self._by_id[webhook.id] = webhook
        if not webhook.operations:
            return
        patterns = self._by_workspace.setdefault(webhook.workspace_id, {})
        for op in webhook.operations:
            patterns.setdefault(op, {})[webhook.id] = webhook

    def remove(self, webhook_id: str) -> None:
        old = self._by_id.pop(webhook_id, None)
        if old is None:
            return
        patterns = self._by_workspace.get(old.workspace_id)
        if patterns is None:  # a webhook without operations never had an entry
            return
        for op in old.operations:
            hooks = patterns.get(op)
            if hooks is not None:
                hooks.pop(webhook_id, None)
                if not hooks:
                    del patterns[op]
        if not patterns:
            del self._by_workspace[old.workspace_id]

    def adopt(self, fresh: SubscriptionIndex) -> None:
        """Take `fresh`'s contents in one step, so that a match never sees half of a reload."""
        self._by_id, self._by_workspace = fresh._by_id, fresh._by_workspace


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


# Events that Twenty's matching gives only to webhooks naming them exactly, never to a wildcard: a running workflow
# updates its run on every step.
_EXACT_ONLY = frozenset({"workflowRun.updated"})
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


class SubscriptionStore:
    """Loads the table into a SubscriptionIndex and follows its changes until closed."""

    def __init__(
        self,
        postgres: PostgresConnect,
        pool: asyncpg.Pool,
        table: str,
        refresh_seconds: float,
        rotation_overlap: float = 0.0,
        on_count: Callable[[int], object] = lambda _: None,
    ) -> None:
        self.index = SubscriptionIndex()
        self._pool = pool
        self._select = (
            'SELECT w.id::text AS id, w."workspaceId"::text AS "workspaceId", w."targetUrl", w.operations, '
            "w.secret, p.secret AS previous_secret, "
            "extract(epoch FROM p.replaced_at)::float8 + $1 AS previous_until, o.options::text AS options "
            f"FROM {table} w LEFT JOIN webhookd.previous_secrets p "
            "ON p.webhook_id = w.id AND p.replaced_at > now() - make_interval(secs => $1) "
            "LEFT JOIN webhookd.webhook_options o ON o.webhook_id = w.id "
            'WHERE w."deletedAt" IS NULL'
        )
        # One number per table state, so that the periodic safety net costs Postgres one scan instead of costing this
        # process a rebuild of every webhook: the rows' text hashed and summed, with their count.
        self._fingerprint_sql = (
            "SELECT count(*) AS n, coalesce(sum(hashtextextended(s::text, 0)), 0)::text AS digest "
            f"FROM ({self._select}) s"
        )
        self._loaded_fingerprint: tuple[int, str] | None = None
        self._overlap = rotation_overlap
        self._refresh_seconds = refresh_seconds
        self._on_count = on_count
        self._changed: set[str] = set()
        self._wake = asyncio.Event()
        self.loaded = asyncio.Event()
        # The daemon waits for the first load before it consumes: a table that is missing or not Twenty's shape must
        # end that wait with the cause, not leave it to time out.
        self._listening = Listening(
            postgres,
            NOTIFY_CHANNEL,
            self._on_notify,
            self._reload_on,
            self._follow,
            "subscriptions_listener_lost",
            strict_first_catch_up=True,
        )

    @property
    def listening(self) -> bool:
        return self._listening.listening

    async def _prune(self) -> None:
        # Old secrets are kept only as long as they may still sign; past that they are just a liability. Once per
        # period is enough: the rows read never include an expired one.
        await self._pool.execute(_PRUNE_PREVIOUS_SECRETS, self._overlap)

    async def _fingerprint(self, conn: PoolConnectionProxy[asyncpg.Record]) -> tuple[int, str]:
        row = await conn.fetchrow(self._fingerprint_sql, self._overlap)
        assert row is not None  # an aggregate without GROUP BY always returns one row
        return int(row["n"]), str(row["digest"])

    async def reload(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            # One snapshot for both, so that the fingerprint describes exactly the rows indexed.
            fingerprint = await self._fingerprint(conn)
            rows = await conn.fetch(self._select, self._overlap)
        fresh = SubscriptionIndex()
        for n, row in enumerate(rows, 1):
            webhook = webhook_from_row(row)
            if webhook is not None:
                fresh.put(webhook)
            if n % _ROWS_PER_SLICE == 0:
                # A large table takes a second or more to index; deliveries go on meanwhile, in between slices.
                await asyncio.sleep(0)
        self.index.adopt(fresh)
        self._loaded_fingerprint = fingerprint
        self.loaded.set()
        self._on_count(len(self.index))
        log.debug("subscriptions_reloaded", count=len(self.index))

    async def refresh(self) -> None:
        """The safety net for changes no notification announced: a full reload if the table differs from the index.

        A period in which notifications changed the index ends in one reload; a quiet table costs only the check.
        """
        await self._prune()
        async with self._pool.acquire() as conn:
            fingerprint = await self._fingerprint(conn)
        if fingerprint != self._loaded_fingerprint:
            await self.reload()

    async def _apply_changes(self, ids: list[str]) -> None:
        rows = await self._pool.fetch(self._select + " AND w.id = ANY($2::uuid[])", self._overlap, ids)
        live = {row["id"]: row for row in rows}
        for webhook_id in ids:
            row = live.get(webhook_id)
            webhook = webhook_from_row(row) if row is not None else None
            if webhook is None:
                self.index.remove(webhook_id)
            else:
                self.index.put(webhook)
        # The index no longer matches the fingerprint of its last reload, and the table may yet return to that state
        # through a change no one announces (a row restored, say): only a reload may vouch for the index again.
        self._loaded_fingerprint = None
        self._on_count(len(self.index))

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._changed.add(str(payload))
        self._wake.set()

    async def run(self) -> None:
        """Follow changes forever: reconnects on its own, reloading in full after every reconnect.

        Raises what failed the first load unless it is transient (a missing table, a missing column): retrying it
        would only hide the cause.
        """
        await self._listening.run()

    async def _reload_on(self, _conn: asyncpg.Connection) -> None:
        await self.reload()

    async def _follow(self, conn: asyncpg.Connection) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self._refresh_seconds
        while not conn.is_closed():
            with contextlib.suppress(TimeoutError):
                # Wake at least every second to notice a dead connection, which asyncpg reports only when used.
                await asyncio.wait_for(self._wake.wait(), timeout=min(1.0, self._refresh_seconds))
            if self._wake.is_set():
                await asyncio.sleep(_DEBOUNCE_SECONDS)
                self._wake.clear()
                changed, self._changed = list(self._changed), set()
                if len(changed) > _BULK_CHANGE_THRESHOLD:
                    await self.reload()
                elif changed:
                    await self._apply_changes(changed)
            if loop.time() >= next_check:
                await self.refresh()
                next_check = loop.time() + self._refresh_seconds
            else:
                await conn.fetchval("SELECT 1", timeout=5)
