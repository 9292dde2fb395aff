"""Session-wide real services: a Tansu broker and a Postgres server, or the outside ones named by
WEBHOOKD_TEST_KAFKA and WEBHOOKD_TEST_POSTGRES_DSN; each test gets a fresh database and a fresh topic."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import Receiver, migrated_database
from webhookd.embedded import EmbeddedPostgres, KafkaBroker, create_topic


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    outside = os.environ.get("WEBHOOKD_TEST_KAFKA")
    if outside:
        yield outside
        return
    broker = KafkaBroker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    outside = os.environ.get("WEBHOOKD_TEST_POSTGRES_DSN")
    if outside:
        yield outside
        return
    with tempfile.TemporaryDirectory(prefix="webhookd-test-pg-") as tmp:
        server = EmbeddedPostgres.start(Path(tmp) / "data")
        try:
            yield server.dsn
        finally:
            server.stop()


@pytest.fixture
async def dsn(postgres_admin: str) -> str:
    """A new, migrated database for one test."""
    return await migrated_database(postgres_admin)


@pytest.fixture
async def topic(kafka: str) -> str:
    name = f"events-{uuid.uuid4().hex[:10]}"
    await create_topic(kafka, name, 4)
    return name


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()
