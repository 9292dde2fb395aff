"""The webhooks held in memory, by workspace and by operation pattern: which of them an event goes to.

Matching is Twenty's: an event `X.op` goes to every live webhook of the same workspace whose `operations` holds any of
`X.op`, `*.op`, `X.*` or `*.*`. The index answers from memory, so its cost per event does not grow with the number of
webhooks; `SubscriptionStore` keeps it current.
"""

from __future__ import annotations

from webhookd.model import Webhook

# Events that Twenty's matching gives only to webhooks naming them exactly, never to a wildcard: a running workflow
# updates its run on every step.
_EXACT_ONLY = frozenset({"workflowRun.updated"})


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
