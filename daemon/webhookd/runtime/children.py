"""What the daemon's own child processes need: to end with their parent, and a loopback port to listen on.

Used for the workers of `webhookd run --workers N` and for the embedded broker and Postgres: a parent killed with
SIGKILL must not leave a daemon consuming, or a server holding its port, with nobody to stop it (Linux; elsewhere
nothing is arranged).
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def _load_prctl() -> Callable[[int, int], int] | None:
    if sys.platform != "linux":
        return None
    prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


# Resolved once, in the parent: the forked child should do as little as possible before exec.
_prctl = _load_prctl()


def end_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A `preexec_fn` that has the child sent `sig` when the process calling this dies."""
    parent_pid = os.getpid()

    def preexec() -> None:
        if _prctl is None:
            return
        _prctl(_PR_SET_PDEATHSIG, sig)
        # The parent may have died between fork and prctl; then no signal will ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def free_port() -> int:
    """A loopback TCP port that was free a moment ago; another process may still take it first.

    Chosen below the kernel's ephemeral range where there is room: a port from bind(0) is one the kernel may give the
    next outgoing connection of any process (a daemon starting up connects to Kafka and Postgres before it listens),
    and one below the range is only ever taken by someone who asks for it by number.
    """
    low = _ephemeral_low()
    if low > _BELOW_EPHEMERAL + 1024:
        for _ in range(20):
            port = random.randrange(low - _BELOW_EPHEMERAL, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


# How far below the ephemeral range free_port looks.
_BELOW_EPHEMERAL = 10_000


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux); 0 where it cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
