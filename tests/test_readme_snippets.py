"""The verification snippets in the README work: each one, run as written, accepts what webhookd sends (in both
schemes, and during a secret rotation with either secret) and refuses a wrong secret or a changed body."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_payload import NODE
from webhookd.payload import build_body
from webhookd.signing import Signer

README = Path(__file__).resolve().parent.parent / "README.md"
BODY = build_body("person.created", {"id": "p1", "name": "Zoë", "score": 1.5}, "2025-02-10T15:30:50.123Z")
OLD, NEW = "old-secret-Ω", "new-secret"


def snippet(name: str) -> str:
    match = re.search(rf"<!-- snippet: {name} -->\n```\w+\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert match is not None, f"README has no snippet {name!r}"
    return match.group(1)


def python_function(name: str, function: str) -> Callable[..., bool]:
    namespace: dict[str, Any] = {}
    exec(compile(snippet(name), f"README:{name}", "exec"), namespace)
    result: Callable[..., bool] = namespace[function]
    return result


def signed(scheme: str, secret: str, previous: str | None = None) -> dict[str, str]:
    return Signer(scheme).headers("evt-1", BODY, secret.encode(), previous.encode() if previous else None, time.time())


def test_the_python_snippets_accept_deliveries_and_refuse_forgeries() -> None:
    verify_twenty = python_function("python-twenty", "verify_twenty")
    verify_standard = python_function("python-standard", "verify_standard")
    rotating = signed("both", NEW, previous=OLD)

    assert verify_twenty(OLD, signed("twenty", OLD), BODY)
    assert verify_twenty(NEW, rotating, BODY)
    assert verify_twenty(OLD, rotating, BODY)
    assert not verify_twenty("wrong", rotating, BODY)
    assert not verify_twenty(NEW, rotating, BODY + b" ")
    assert verify_standard(OLD, signed("standard-webhooks", OLD), BODY)
    assert verify_standard(NEW, rotating, BODY)
    assert verify_standard(OLD, rotating, BODY)
    assert not verify_standard("wrong", rotating, BODY)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_node_snippet_accepts_deliveries_and_refuses_forgeries() -> None:
    assert NODE is not None
    cases = [
        ("verifyTwenty", OLD, signed("twenty", OLD), BODY, True),
        ("verifyTwenty", NEW, signed("both", NEW, OLD), BODY, True),
        ("verifyTwenty", OLD, signed("both", NEW, OLD), BODY, True),
        ("verifyTwenty", "wrong", signed("both", NEW, OLD), BODY, False),
        ("verifyTwenty", NEW, signed("both", NEW, OLD), BODY + b" ", False),
        ("verifyStandard", OLD, signed("standard-webhooks", OLD), BODY, True),
        ("verifyStandard", OLD, signed("both", NEW, OLD), BODY, True),
        ("verifyStandard", "wrong", signed("both", NEW, OLD), BODY, False),
    ]
    payload = [
        {"fn": fn, "secret": secret, "headers": {k.lower(): v for k, v in headers.items()}, "body": body.decode()}
        for fn, secret, headers, body, _ in cases
    ]
    program = snippet("node") + (
        "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        "const verdicts = cases.map((c) => module.exports[c.fn](c.secret, c.headers, Buffer.from(c.body)));\n"
        "console.log(JSON.stringify(verdicts));\n"
    )
    out = subprocess.run([NODE, "-e", program], input=json.dumps(payload), capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [expected for *_, expected in cases]
