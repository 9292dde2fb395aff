"""Apache Kafka itself (4.x, KRaft): one node that is both broker and controller, for `make test-kafka`.

`ApacheKafka.start()` formats a fresh log dir (`kafka.tools.StorageTool format --standalone`, as
`kafka-storage.sh` does) and runs `kafka.Kafka` on two free loopback ports, one for clients and one for the
controller, from the jars `webhookd.embedded.jars` fetches. Like every server here it is a child process that dies
with us (`webhookd.embedded.processes`). Its settings make one node work (replication factors of 1) and keep it
quick and small: no initial rebalance delay, few internal partitions, a small cleaner buffer.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from webhookd.embedded.jars import jvm_argv, resolve_jars, write_log_config
from webhookd.embedded.processes import _ChildServer, _log_tail, _spawn, _terminate
from webhookd.runtime.children import free_port

_NODE_ID = 1
_START_ATTEMPTS = 3  # a port from free_port() may be taken by someone else before Kafka binds it
_FORMAT_TIMEOUT = 120.0

# What a one-node cluster needs (every replication factor 1) and what keeps it fast and small in tests.
_SERVER_SETTINGS = {
    "process.roles": "broker,controller",
    "node.id": str(_NODE_ID),
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "auto.create.topics.enable": "true",
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "5",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # A group's first member gets its partitions at once instead of 3 s later.
    "group.initial.rebalance.delay.ms": "0",
    "num.network.threads": "2",
    "num.io.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
    "background.threads": "2",
    # The cleaner (for the compacted __consumer_offsets) takes a 128 MB buffer by default.
    "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
    "log.cleaner.threads": "1",
}
_QUIET_LOGGERS = ("kafka.request.logger", "state.change.logger", "org.apache.kafka.clients", "kafka.log.LogCleaner")


class ApacheKafka(_ChildServer):
    """One Apache Kafka node (broker and controller) on 127.0.0.1; create it with `ApacheKafka.start()`.

    `bootstrap` is its client address; `stop()` ends it and deletes its log dir, so nothing outlives a run.
    """

    def __init__(self, port: int, controller_port: int, work_dir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.controller_port = controller_port
        self.bootstrap = f"127.0.0.1:{port}"
        self.work_dir = work_dir
        self.log_path = work_dir / "kafka.log"
        self._watch(proc)

    @classmethod
    def start(cls, *, timeout: float = 120.0, heap: str = "512m") -> ApacheKafka:
        """Format a new single-node cluster and start it; returns once it answers clients. Blocks.

        The first call may take minutes: Maven fetches the jars (`webhookd.embedded.jars.resolve_jars`).
        """
        jars = resolve_jars()
        failures: list[str] = []
        for _ in range(_START_ATTEMPTS):
            work_dir = Path(tempfile.mkdtemp(prefix="webhookd-kafka-"))
            try:
                port = free_port()
                controller_port = free_port()
                while controller_port == port:
                    controller_port = free_port()
                config = _write_config(work_dir, port, controller_port)
                log_config = write_log_config(work_dir / "log4j2.properties", _QUIET_LOGGERS)
                _format_storage(jars, config, log_config, heap, work_dir / "kafka.log")
                proc = _spawn(
                    jvm_argv(jars, "kafka.Kafka", [str(config)], log_config=log_config, heap=heap),
                    log_path=work_dir / "kafka.log",
                    cwd=work_dir,
                )
                if _wait_ready(proc, port, timeout, work_dir / "kafka.log"):
                    return cls(port, controller_port, work_dir, proc)
                failures.append(f"ports {port}/{controller_port}:\n{_log_tail(work_dir / 'kafka.log')}")
            except BaseException:
                shutil.rmtree(work_dir, ignore_errors=True)
                raise
            shutil.rmtree(work_dir, ignore_errors=True)
        raise RuntimeError("Apache Kafka did not start; what it logged:\n" + "\n".join(failures))

    def stop(self) -> None:
        """Stop the node (SIGTERM, SIGKILL after 15 s) and delete its data; calling it again does nothing."""
        # A controlled shutdown takes well under a second here; SIGKILL only for one that hangs.
        self._stop_and_remove(15.0, self.work_dir)

    def __repr__(self) -> str:
        return f"ApacheKafka(bootstrap={self.bootstrap!r}, pid={self.pid})"


def _write_config(work_dir: Path, port: int, controller_port: int) -> Path:
    settings = {
        **_SERVER_SETTINGS,
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "log.dirs": str(work_dir / "data"),
    }
    path = work_dir / "server.properties"
    path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    return path


def _cluster_id() -> str:
    """16 random bytes in URL-safe base64 without padding, as `kafka-storage random-uuid` makes them."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # One in 64 starts with "-", which the storage tool's argument parser reads as an option and fails on; Kafka's
        # own generator draws again in that case.
        if not cluster_id.startswith("-"):
            return cluster_id


def _format_storage(jars: Path, config: Path, log_config: Path, heap: str, log_path: Path) -> None:
    cluster_id = _cluster_id()
    argv = jvm_argv(
        jars,
        "kafka.tools.StorageTool",
        ["format", "--standalone", "--cluster-id", cluster_id, "--config", str(config)],
        log_config=log_config,
        heap=heap,
    )
    with open(log_path, "ab") as log:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=_FORMAT_TIMEOUT, check=False
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"formatting the Kafka log dir failed with status {result.returncode}:\n" + _log_tail(log_path)
        )


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float, log_path: Path) -> bool:
    """Wait until our process listens on port and answers a request there; False if it exited first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        # Only our own listening socket counts: if someone else holds the port, a reply would come from them.
        if _listens(proc.pid, port) and _answers_api_versions(port):
            return True
        if time.monotonic() > deadline:
            _terminate(proc, signal.SIGKILL, 5.0)
            raise TimeoutError(
                f"Apache Kafka did not answer on 127.0.0.1:{port} within {timeout} s; its log ends with:\n"
                + _log_tail(log_path)
            )
        time.sleep(0.1)
    return False


def _listens(pid: int, port: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return True
    return False


def _answers_api_versions(port: int) -> bool:
    """Whether the broker answers ApiVersions (v0) without an error.

    Kafka binds its client port early but serves requests only once the node has joined the quorum, caught up
    with the metadata log and been unfenced, that is, once it can serve clients; an answer proves all of that.
    """
    client_id = b"webhookd-probe"
    # Request header v1: api_key=18 (ApiVersions), api_version=0, correlation_id, client_id as int16-prefixed bytes.
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _read_exactly(sock, 4 + 4 + 2)
    except OSError:
        return False
    if header is None:
        return False
    _size, correlation_id, error_code = struct.unpack(">iih", header)
    return bool(correlation_id == 7 and error_code == 0)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
