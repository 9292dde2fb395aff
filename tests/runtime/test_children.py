"""The ports the daemon's children and the tests listen on: free, and out of the way of outgoing connections."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from webhookd.runtime.children import free_port

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@pytest.mark.skipif(not _RANGE.exists(), reason="the ephemeral range is read from Linux's /proc")
def test_a_free_port_is_below_the_ephemeral_range_and_can_be_listened_on() -> None:
    low = int(_RANGE.read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    # Below the range, the kernel never hands the port to an outgoing connection between the choice and the bind.
    assert all(1024 <= port < low for port in ports), sorted(ports)
    assert len(ports) > 1, "every call chose the same port"
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
            sock.listen()
