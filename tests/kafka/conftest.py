"""Session-wide Apache Kafka (or WEBHOOKD_TEST_APACHE_KAFKA) and a Postgres for change data capture
(`wal_level=logical`, TCP on 127.0.0.1), and per test a `debezium` that starts Debezium connectors against them.

The fixtures of tests/conftest.py still apply: `kafka` is overridden here, so `topic`, `dsn` and the daemon
helpers of tests.support run on Apache Kafka, and the daemon's databases live on the CDC Postgres. Without Java or
Maven the fixtures fail (never skip), saying what to install.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.kafka.debezium import Debezium
from webhookd.embedded import EmbeddedPostgres
from webhookd.embedded.apache_kafka import ApacheKafka
from webhookd.embedded.jars import JavaMissing, resolve_jars
from webhookd.runtime.children import free_port

T = TypeVar("T")

# Room for a few connectors per test and the walsenders they hold while they stop.
CDC_SETTINGS = {"wal_level": "logical", "max_replication_slots": "20", "max_wal_senders": "20"}


def _needing_java(start: Callable[[], T]) -> T:
    try:
        return start()
    except JavaMissing as exc:
        missing = str(exc)
    # Failed outside the except block, so that the report is this one line and not two chained tracebacks.
    pytest.fail(f"make test-kafka needs Java and Maven: {missing}", pytrace=False)


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    outside = os.environ.get("WEBHOOKD_TEST_APACHE_KAFKA")
    if outside:
        yield outside
        return
    broker = _needing_java(ApacheKafka.start)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def cdc_postgres() -> Iterator[EmbeddedPostgres]:
    with tempfile.TemporaryDirectory(prefix="webhookd-test-cdc-") as tmp:
        server = None
        for attempt in range(3):
            try:
                server = EmbeddedPostgres.start(Path(tmp) / "data", settings=CDC_SETTINGS, tcp_port=free_port())
                break
            except RuntimeError:
                # The TCP port from free_port() was taken before Postgres bound it; another one will do.
                if attempt == 2:
                    raise
        assert server is not None
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def postgres_admin(cdc_postgres: EmbeddedPostgres) -> str:
    return os.environ.get("WEBHOOKD_TEST_POSTGRES_DSN") or cdc_postgres.dsn


@pytest.fixture
async def debezium(kafka: str, cdc_postgres: EmbeddedPostgres) -> AsyncIterator[Debezium]:
    await asyncio.to_thread(_needing_java, resolve_jars)
    connectors = Debezium(kafka, cdc_postgres)
    try:
        yield connectors
    finally:
        await connectors.stop_all()


class _WhatTheySaw:
    """Shows, after the run, what the tests printed (each Twenty operation and its delivery, the pairs and
    duplicates of each crash), without the daemons' logs that pytest captured with it."""

    _LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d[ T]|\{")

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed:
            printed = [
                line for line in report.capstdout.splitlines() if line.strip() and not self._LOG_LINE.match(line)
            ]
            if printed:
                self.lines += [report.nodeid, *printed]

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.lines:
            terminalreporter.section("what the suites on Apache Kafka and Debezium saw")
            for line in self.lines:
                terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_WhatTheySaw(), "webhookd-what-they-saw")
