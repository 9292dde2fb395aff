"""Child processes that must never outlive us: spawning, termination, log tails.

Every server is a child process of ours and must never outlive us: a `kill -9` of `webhookd dev` or of
pytest runs no `finally` and no `atexit`, and a broker or postmaster left behind would hold its port, its socket
and its memory until someone finds it by hand. So each child gets PR_SET_PDEATHSIG=SIGKILL on Linux (the kernel
kills it when we die, however we die) and its own process group (a Ctrl-C in the terminal reaches only us, so we
decide the order of shutdown). Graceful stops still happen through `stop()`, context managers and `atexit`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from webhookd.runtime.children import end_with_parent

_LOG_TAIL_BYTES = 4000


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
                preexec_fn=end_with_parent(signal.SIGKILL),
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


class _ChildServer:
    """What the servers here share: one child process, its pid while it runs, its stopping, and `with` for it."""

    _proc: subprocess.Popen[bytes] | None
    _stopped: bool
    _lock: threading.Lock | threading.RLock

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        raise NotImplementedError

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Take `proc` as this server's process, to be stopped by `stop`, at the latest when we exit."""
        self._proc = proc
        self._stopped = False
        self._lock = threading.Lock()
        atexit.register(self.stop)

    def _stop_and_remove(self, grace: float, work_dir: Path) -> None:
        """Stop the process (SIGTERM, SIGKILL after `grace` s) and delete `work_dir`; calling it again does nothing."""
        with self._lock:
            if self._stopped:
                return
            if self._proc is not None:
                _terminate(self._proc, signal.SIGTERM, grace)
            self._proc = None
            self._stopped = True
            shutil.rmtree(work_dir, ignore_errors=True)
            atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
