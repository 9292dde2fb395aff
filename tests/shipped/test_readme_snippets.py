"""The README's commands work as written: each verification snippet accepts what webhookd sends (in both schemes,
and during a secret rotation with either secret) and refuses a wrong secret or a changed body, and "Running it"
checks the shipped configuration with the variables it exports."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.node import needs_node, require_node
from webhookd.delivery.payload import build_body
from webhookd.delivery.signing import Signer

README = Path(__file__).resolve().parents[2] / "README.md"
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


@needs_node
def test_the_node_snippet_accepts_deliveries_and_refuses_forgeries() -> None:
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
    out = subprocess.run(
        [require_node(), "-e", program], input=json.dumps(payload), capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [expected for *_, expected in cases]


def test_running_it_checks_the_shipped_config_as_written_with_the_variables_it_exports() -> None:
    section = README.read_text(encoding="utf-8").split("## Running it\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "README's Running it has no sh block"
    lines = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    exported = dict(words[1].split("=", 1) for words in lines if words[:1] == ["export"])
    (check,) = [words for words in lines if words[:2] == ["webhookd", "check-config"]]
    webhookd = Path(sys.executable).with_name("webhookd")  # the entry point `pip install .` makes
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")}

    done = subprocess.run(
        [str(webhookd), *check[1:]],
        cwd=README.parent,
        env={**environ, **exported},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["postgres"]["dsn"] == "postgresql://webhookd:***@db.example.internal:5432/twenty"
    assert printed["kafka"]["bootstrap_servers"] == ["kafka.example.internal:9092"]
