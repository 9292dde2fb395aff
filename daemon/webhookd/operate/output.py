"""How operator commands answer: aligned tables for people, JSON for scripts, and arguments checked up front."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import orjson

from webhookd.runtime.config.values import parse_duration


class UsageError(Exception):
    """An argument the user can fix; the message names it."""


class NotFound(LookupError):
    """What the operator named does not exist (a delivery, a webhook); the message names it. Its own class, so that
    the command line reports this, and only this, as "not found": a KeyError from a bug stays a traceback."""


def webhook_id(text: str, what: str = "WEBHOOK_ID") -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a webhook id (a UUID)") from None


def workspace_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise UsageError(f"--workspace: {text!r} is not a workspace id (a UUID)") from None


def since(text: str, option: str = "--since") -> datetime:
    """A moment given as an age ("2h", "30m", "1d") or an ISO 8601 time ("2026-11-28T10:00:00Z"), in UTC; errors
    name `option`."""
    try:
        age = parse_duration(text)
    except ValueError:
        age = None
    try:
        if age is not None:
            return datetime.now(UTC) - timedelta(seconds=age)
        moment = datetime.fromisoformat(text.strip())
        # In UTC now, so that a time near year 1 or 9999 fails here, named, rather than in a later conversion.
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is neither an age such as 2h or 1d nor an ISO time") from None
    except OverflowError:
        if age is not None:
            raise UsageError(f"{option}: {text!r} reaches back before year 1; give a smaller age") from None
        raise UsageError(f"{option}: {text!r} is out of range: in UTC it falls before year 1 or after 9999") from None


def emit_json(data: object, out: TextIO | None = None) -> None:
    # sys.stdout is read at the call, not at import, so that a redirected stdout is honoured.
    (out or sys.stdout).write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")


def emit_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], out: TextIO | None = None
) -> None:
    """Rows as aligned columns; `columns` pairs each key with its heading."""
    out = out or sys.stdout
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    headings = [heading for _, heading in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headings)]
    for line in [headings, *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    text = _CONTROL.sub(" ", str(value))  # receivers' error text must not move the terminal's cursor
    return text if len(text) <= 60 else text[:59] + "…"


def plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """A database row as JSON-ready data: times in ISO 8601, UUIDs as text."""
    return {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in row.items()}
