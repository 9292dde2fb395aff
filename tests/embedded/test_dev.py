"""`webhookd dev` while it starts: a daemon that cannot start ends it at once with the reason, and a Ctrl-C stops
everything at once, in order, leaving no process behind; the waits beneath both end as soon as they can."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import webhookd_cli
from webhookd.demo.lifecycle import DemoFailed, Interrupted, Interrupts, wait_started

DEV_CONFIG = Path(__file__).resolve().parents[2] / "config" / "dev.yaml"


async def test_waiting_for_the_daemon_ends_as_soon_as_it_exits_without_starting() -> None:
    async def failing_start() -> int:
        await asyncio.sleep(0.05)
        return 1

    serving = asyncio.create_task(failing_start())
    began = time.monotonic()

    with pytest.raises(DemoFailed, match=r"did not start \(exit status 1\)"):
        await wait_started(asyncio.Event(), serving, Interrupts(), timeout=60)
    assert time.monotonic() - began < 5


async def test_waiting_for_the_daemon_ends_at_a_signal_and_leaves_the_daemon_to_its_owner() -> None:
    serving = asyncio.create_task(asyncio.sleep(60, result=0))
    interrupts = Interrupts()
    asyncio.get_running_loop().call_later(0.05, interrupts.event.set)
    try:
        with pytest.raises(Interrupted):
            await wait_started(asyncio.Event(), serving, interrupts, timeout=60)
        assert not serving.done(), "the daemon is stopped by DemoRun.finish, in order, not cancelled by the wait"
    finally:
        serving.cancel()


async def test_dev_whose_daemon_cannot_start_exits_1_at_once_saying_why(tmp_path: Path) -> None:
    not_a_certificate = tmp_path / "ca.pem"
    not_a_certificate.write_text("not a certificate\n")
    env = {"WEBHOOKD_KAFKA__SECURITY_PROTOCOL": "SSL", "WEBHOOKD_KAFKA__SSL_CA_FILE": str(not_a_certificate)}
    began = time.monotonic()

    status, out = await webhookd_cli("dev", "--config", str(DEV_CONFIG), "--events", "1", env=env, timeout=45)

    assert status == 1, out[-3000:]
    assert "kafka.ssl_ca_file" in out  # the daemon's own reason, logged as it gives up
    assert "webhookd dev: the daemon did not start" in out
    assert "Traceback" not in out
    assert time.monotonic() - began < 30, "it waited for a daemon that had already given up"
    _assert_gone(_started_pids(out))


async def test_ctrl_c_while_dev_starts_stops_everything_at_once_with_status_130() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "webhookd",
        "dev",
        "--config",
        str(DEV_CONFIG),
        "--events",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        seen = b""
        while b"broker pid" not in seen:  # both servers are up; what comes next is the rest of the startup
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, f"webhookd dev ended before starting its servers: {seen.decode(errors='replace')}"
            seen += line
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = (seen + rest).decode(errors="replace")

    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "interrupted while starting" in out
    assert "Traceback" not in out
    _assert_gone(_started_pids(out))


def _started_pids(out: str) -> list[int]:
    started = re.search(r"broker pid (\d+) .* Postgres pid (\d+)", out)
    assert started is not None, out[:2000]
    return [int(pid) for pid in started.groups()]


def _assert_gone(pids: list[int]) -> None:
    for pid in pids:
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        assert not alive, f"webhookd dev left process {pid} running"
