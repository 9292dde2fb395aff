"""Session-wide real services: a Tansu broker and a Postgres server, or the outside ones named by
WEBHOOKD_TEST_KAFKA and WEBHOOKD_TEST_POSTGRES_DSN; each test gets a fresh database (a copy of a migrated template)
and a fresh topic."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import Receiver, drop_template, migrated_database, tansu_brokers
from webhookd.embedded import EmbeddedPostgres, KafkaBroker, create_topic


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    outside = os.environ.get("WEBHOOKD_TEST_KAFKA")
    if outside:
        yield outside
        return
    broker = KafkaBroker.start()
    tansu_brokers.add(broker.bootstrap)
    try:
        yield broker.bootstrap
    finally:
        tansu_brokers.discard(broker.bootstrap)
        broker.stop()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    outside = os.environ.get("WEBHOOKD_TEST_POSTGRES_DSN")
    if outside:
        yield outside
        return
    with tempfile.TemporaryDirectory(prefix="webhookd-test-pg-") as tmp:
        # Throwaway data need not survive a power cut, and without fsync the checkpoint at shutdown takes under a
        # second instead of up to 20 s of flushing the files of every test's database, nor does it hold up the
        # other worker's commits on the same disk.
        server = EmbeddedPostgres.start(Path(tmp) / "data", settings={"fsync": "off"})
        try:
            yield server.dsn
        finally:
            server.stop()


@pytest.fixture(scope="session")
async def database_template(postgres_admin: str) -> AsyncIterator[None]:
    """The migrated template that every test's database is copied from (see `migrated_database`), dropped at the
    end so that an outside server keeps none."""
    yield
    await drop_template(postgres_admin)


@pytest.fixture
async def dsn(postgres_admin: str, database_template: None) -> str:
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
