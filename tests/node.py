"""Where the tests find `node`, and what a test that needs it does without it: skip on a developer's machine, fail
under CI (the environment variable `CI` set, as `.ci/run` and CI services set it). The Node.js checks prove the
seed's central promise, that Twenty's documented check verifies every delivery; in CI they must never pass by not
running."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping

import pytest

INSTALL = "install Node.js (Debian: apt-get install nodejs)"


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """`CI` set to anything but nothing, 0 or false (any case)."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false")


def require_node(
    which: Callable[[str], str | None] = shutil.which, environ: Mapping[str, str] = os.environ, *, optional: bool = True
) -> str:
    """The path of `node`. Without it: pytest.fail under CI, or always when not `optional` (the suites on Apache
    Kafka fail, never skip, for want of a tool); pytest.skip otherwise."""
    path = which("node")
    if path is not None:
        return path
    if in_ci(environ):
        pytest.fail(f"`node` is not on PATH and CI is set, where the Node.js checks must run: {INSTALL}", pytrace=False)
    if not optional:
        pytest.fail(f"`node` is not on PATH, and this check of signatures runs in Node.js: {INSTALL}", pytrace=False)
    pytest.skip(f"`node` is not on PATH; {INSTALL} to run the Node.js checks (under CI this fails)")


# For `skipif(NODE is None)` guards (tests/delivery/test_signatures.py has one): None only where a test may skip.
# Under CI it names `node` even when it is missing, so that the guarded test runs into `require_node`, which fails
# saying why.
NODE: str | None = shutil.which("node") or ("node" if in_ci() else None)
needs_node = pytest.mark.skipif(NODE is None, reason=f"`node` is not on PATH; {INSTALL} to run the Node.js checks")
