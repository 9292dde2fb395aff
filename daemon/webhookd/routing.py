"""Which webhooks get an event: the subscriptions that match it, less those whose filter keeps it back, and for the
webhooks that keep each record's order, the record it belongs to.

A webhook without options costs nothing here beyond the match. The record is parsed (once per event, shared by all
its webhooks) only when a filter has predicates on it or an ordered webhook needs its id. A pair kept back is
counted by reason and written to the attempt log as `filtered`, never as a failure.
"""

from __future__ import annotations

from webhookd.attempts import AttemptLog
from webhookd.events import Event
from webhookd.filters import LazyRecord
from webhookd.metrics import Metrics
from webhookd.ordering import order_key
from webhookd.subscriptions import SubscriptionIndex, Webhook

_WHY = {"updated_fields": "filtered: updatedFields has none of ", "record": "filtered: the record fails "}


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
            if webhook.options:
                break
        else:
            return webhooks, None
        record = LazyRecord(event.data)
        kept: list[Webhook] = []
        keys: list[str | None] = []
        ordered = False
        for webhook in webhooks:
            options = webhook.options
            flt = options.filter
            if flt is not None:
                reason = flt.rejects(action, event.updated_fields, record)
                if reason is not None:
                    self._filtered[reason].inc()
                    self._attempts.add_filtered(event, webhook.id, source, _WHY[reason] + self._detail(webhook, reason))
                    continue
            kept.append(webhook)
            if options.ordered:
                value = record.value
                keys.append(order_key(obj, value.get("id") if isinstance(value, dict) else None))
                ordered = True
            else:
                keys.append(None)
        return kept, keys if ordered else None

    @staticmethod
    def _detail(webhook: Webhook, reason: str) -> str:
        flt = webhook.options.filter
        assert flt is not None
        if reason == "updated_fields":
            return ", ".join(sorted(flt.updated_fields or ()))
        return " and ".join(p.text for p in flt.where)
