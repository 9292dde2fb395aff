"""The bodies a webhook can be sent (`delivery.body_format`), written from an Event for each of its webhooks.

- `docs`: `{"event","data","timestamp"}`, as Twenty's webhook documentation describes it; one body per event, the
  same bytes for every webhook.
- `twenty`: the body Twenty's server POSTs today, built by its CallWebhookJobsJob per webhook:
  `{"targetUrl","eventName","objectMetadata":{"id","nameSingular"},"workspaceId","webhookId","eventDate","record",
  "updatedFields"}` in that order. `targetUrl` is the URL as saved (the request goes to its absolute form);
  `updatedFields` is present only when known for an update; the user ids Twenty adds for writes made in its UI
  are not in a change record and so not here. `eventDate` is the event's time (Twenty takes the time its job
  fans out, a few milliseconds later), so every retry carries the same body.
Both are JavaScript-exact: the record's bytes were written that way once (`payload`), the rest is strings.
"""

from __future__ import annotations

from typing import Literal, Protocol

import orjson

from webhookd.model import Event, Webhook

BodyFormatName = Literal["docs", "twenty"]


def docs_body(event: Event) -> bytes:
    """`{"event":E,"data":D,"timestamp":T}`, keys in that order, as the contract and Twenty's docs give it."""
    return b'{"event":%b,"data":%b,"timestamp":%b}' % (
        orjson.dumps(event.name),
        event.data,
        orjson.dumps(event.timestamp),
    )


class BodyFormat(Protocol):
    """Writes the body each webhook of an event gets."""

    def bodies(self, event: Event, webhooks: list[Webhook]) -> list[bytes]: ...


class DocsBody:
    """`{"event":E,"data":D,"timestamp":T}`, one body for every webhook."""

    def bodies(self, event: Event, webhooks: list[Webhook]) -> list[bytes]:
        return [docs_body(event)] * len(webhooks)


class TwentyBody:
    """The body of Twenty's own CallWebhookJob, written per webhook around the event's shared parts."""

    def bodies(self, event: Event, webhooks: list[Webhook]) -> list[bytes]:
        obj, _ = event.object_and_action
        dumps = orjson.dumps
        middle = b',"eventName":%b,"objectMetadata":{"id":%b,"nameSingular":%b},"workspaceId":%b,"webhookId":' % (
            dumps(event.name),
            dumps(event.object_id),
            dumps(obj),
            dumps(event.workspace_id),
        )
        tail = b',"eventDate":%b,"record":%b%b}' % (
            dumps(event.timestamp),
            event.data,
            b"" if event.updated_fields is None else b',"updatedFields":' + dumps(event.updated_fields),
        )
        return [
            b'{"targetUrl":%b%b%b%b' % (dumps(webhook.saved_target_url), middle, dumps(webhook.id), tail)
            for webhook in webhooks
        ]


def body_format(name: BodyFormatName) -> BodyFormat:
    return TwentyBody() if name == "twenty" else DocsBody()
