"""What `webhookd webhooks` prints of a webhook and its options, as text or JSON: one webhook in full, or the table
of every webhook that has options. Header values are never shown, only their names; an invalid row is shown by its
key names and the reason the daemons ignore it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from webhookd.endpoints.sync import display_url
from webhookd.operate.output import emit_json, emit_table
from webhookd.operate.stored_options import StoredOptions, WebhookRow
from webhookd.routing.subscription_rows import absolute_url
from webhookd.routing.webhook_options import WebhookOptions

_COLUMNS = (
    ("webhook_id", "WEBHOOK"),
    ("state", "STATE"),
    ("ordered", "ORDERED"),
    ("filter", "FILTER"),
    ("headers", "HEADERS"),
    ("updated_at", "CHANGED"),
)


def emit_list(read: list[tuple[WebhookRow, StoredOptions]], as_json: bool) -> None:
    if as_json:
        emit_json([_summary_json(webhook, stored) for webhook, stored in read])
        return
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


def _summary_json(webhook: WebhookRow, stored: StoredOptions) -> dict[str, Any]:
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


def emit_webhook(webhook: WebhookRow, stored: StoredOptions, as_json: bool) -> None:
    if as_json:
        emit_json(_as_json(webhook, stored))
    else:
        _print(webhook, stored)


def _as_json(webhook: WebhookRow, stored: StoredOptions) -> dict[str, Any]:
    summary = _summary_json(webhook, stored)
    data: dict[str, Any] = {
        "webhook_id": webhook.id,
        "state": webhook.state,
        "workspace_id": webhook.workspace_id,
        "url": _url(webhook),
        "operations": list(webhook.operations),
    }
    return data | summary


def _url(webhook: WebhookRow) -> str | None:
    return None if webhook.target_url is None else display_url(absolute_url(webhook.target_url))


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.isoformat(timespec="seconds")


def _line(label: str, values: list[str] | str) -> None:
    lines = [values] if isinstance(values, str) else values or ["-"]
    print(f"{label + ':':<18}{lines[0]}")
    for more in lines[1:]:
        print(f"{'':<18}{more}")


def _print(webhook: WebhookRow, stored: StoredOptions) -> None:
    _line("webhook", webhook.id)
    if webhook.found:
        _line("workspace", webhook.workspace_id or "-")
        _line("target", _url(webhook) or "-")
        _line("operations", ", ".join(webhook.operations) or "-")
        _line("state", "live" if webhook.deleted_at is None else f"deleted {when(webhook.deleted_at)}")
    else:
        _line("state", "not in the subscriptions table: these options are left over (`unset ID --all` removes them)")
    if not stored.exists:
        _line("options", "no options (every event it subscribes to, unordered, no custom headers)")
        return
    _line("options changed", when(stored.updated_at))
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
