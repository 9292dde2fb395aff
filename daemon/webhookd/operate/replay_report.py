"""What a `webhookd deliveries replay` did, or in a dry run would do: the rows reset, the records queued again from
Kafka, and each reason a pair was not replayed, printed as text or JSON; any pair not replayed makes it exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from webhookd.operate.delivery_commands import print_skipped_disabled
from webhookd.operate.output import emit_json
from webhookd.operate.replay_window import Pair

SHOWN = 20  # pairs a dry run lists, and entries each "not replayed" line names


@dataclass(slots=True)
class Report:
    """What a replay did, or (dry run) would do; each list is one reason a pair was not replayed."""

    reset: list[int] = field(default_factory=list)
    from_kafka: list[dict[str, Any]] = field(default_factory=list)
    skipped_disabled: list[dict[str, Any]] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    gone_from_kafka: list[dict[str, Any]] = field(default_factory=list)
    no_source: list[dict[str, Any]] = field(default_factory=list)
    changed_in_kafka: list[dict[str, Any]] = field(default_factory=list)
    not_read: list[dict[str, Any]] = field(default_factory=list)
    already_queued: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(
            self.skipped_disabled
            or self.in_flight
            or self.gone_from_kafka
            or self.no_source
            or self.changed_in_kafka
            or self.not_read
        )

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def print_warnings(window: dict[str, Any]) -> None:
    for warning in window["warnings"]:
        print(f"warning: {warning}")


def finish(args: argparse.Namespace, window: dict[str, Any], pairs: list[Pair], report: Report) -> int:
    if args.json:
        emit_json({**window, "dry_run": False, "count": len(pairs), **report.as_json()})
        return 1 if report.failed else 0
    done = len(report.reset) + len(report.from_kafka)
    print(
        f"replayed {done} deliveries of webhook {window['webhook_id']} "
        f"({len(report.reset)} reset, {len(report.from_kafka)} read again from Kafka)"
    )
    print_warnings(window)
    print_skipped_disabled(report.skipped_disabled)
    if report.in_flight:
        print(f"being attempted right now, left alone: {', '.join(map(str, report.in_flight))}")
    print_missed(report)
    return 1 if report.failed else 0


def print_missed(report: Report, *, dry_run: bool = False) -> None:
    verb = "would not be replayed" if dry_run else "not replayed"
    for title, missed in (
        ("gone from Kafka", report.gone_from_kafka),
        ("no source recorded", report.no_source),
        ("changed in Kafka", report.changed_in_kafka),
        ("not read from Kafka", report.not_read),
        ("queued meanwhile by someone else", report.already_queued),
    ):
        if not missed:
            continue
        print(f"{title}, {verb}: {len(missed)}")
        for m in missed[:SHOWN]:
            at = f" at {m['source']}" if m.get("source") else ""
            print(f"  {m['event_id']} ({m['event_name']}){at}: {m['why']}")
        if len(missed) > SHOWN:
            print(f"  ... and {len(missed) - SHOWN} more (--json lists all)")
