"""Which webhooks get an event: the subscriptions that match it, less those whose filter keeps it back, and for the
webhooks that keep each record's order, the record it belongs to.

A webhook without options costs nothing here beyond the match. The record is parsed (once per event, shared by all
its webhooks) only when a filter has predicates on it or an ordered webhook needs its id. A pair kept back is
counted by reason and written to the attempt log as `filtered`, never as a failure.
"""

from __future__ import annotations

from webhookd.delivery.ordering import order_key
from webhookd.durable.attempts import AttemptLog
from webhookd.model import Event, Webhook
from webhookd.routing.filters import FilterReason, LazyRecord, WebhookFilter
from webhookd.routing.subscription_index import SubscriptionIndex
from webhookd.routing.webhook_options import NO_OPTIONS
from webhookd.runtime.metrics import Metrics


class Router:
    """Matches an event and applies the matched webhooks' options."""

    def __init__(self, index: SubscriptionIndex, attempts: AttemptLog, metrics: Metrics) -> None:
        self._index = index
        self._attempts = attempts
        self._filtered = metrics.filtered_by_reason

    def route(self, event: Event, source: str) -> tuple[list[Webhook], list[str | None] | None]:
        """The webhooks to deliver `event` to, and each one's order key (None for all: no webhook keeps order)."""
        obj, action = event.object_and_action
        webhooks = self._index.match(event.workspace_id, obj, action)
        for webhook in webhooks:
            if webhook.options is not NO_OPTIONS:
                break
        else:
            return webhooks, None
        record = LazyRecord(event.data)
        kept: list[Webhook] = []
        keys: list[str | None] = []
        ordered = False
        key: str | None = None
        for webhook in webhooks:
            options = webhook.options
            flt = options.filter
            if flt is not None:
                reason = flt.rejects(action, event.updated_fields, record)
                if reason is not None:
                    self._filtered[reason].inc()
                    self._attempts.add_filtered(event, webhook.id, source, _why_kept(flt, reason))
                    continue
            kept.append(webhook)
            if options.ordered:
                if not ordered:  # once per event, whatever the number of ordered webhooks
                    key, ordered = order_key(obj, record), True
                keys.append(key)
            else:
                keys.append(None)
        return kept, keys if ordered else None


def _why_kept(flt: WebhookFilter, reason: FilterReason) -> str:
    # Written for each pair kept back: hashing the filter to find it in a cache cost more than writing it.
    if reason == "updated_fields":
        return "filtered: updatedFields has none of " + ", ".join(sorted(flt.updated_fields or ()))
    return "filtered: the record fails " + " and ".join(p.text for p in flt.where)
