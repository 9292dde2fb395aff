"""Kafka Connect standalone running one connector (Debezium's Postgres connector, in the tests) against a broker.

`KafkaConnect.start(bootstrap, connector)` runs `org.apache.kafka.connect.cli.ConnectStandalone` from the jars
`webhookd.embedded.jars` fetches, with JSON keys and values (`schemas.enable` as asked, true by default), source
offsets in a file of its own temp dir and the REST API on a free loopback port. `wait_until_running()` reads the
connector's status from that API until its task runs, and raises with the task's trace and the log tail if it
failed. Like every server here it is a child process that dies with us (`webhookd.embedded.processes`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from webhookd.embedded.jars import jvm_argv, resolve_jars, write_log_config
from webhookd.embedded.processes import _ChildServer, _log_tail, _spawn
from webhookd.runtime.children import free_port

_START_ATTEMPTS = 3  # the REST port from free_port() may be taken by someone else before Connect binds it
_JSON_CONVERTER = "org.apache.kafka.connect.json.JsonConverter"
_QUIET_LOGGERS = (
    "org.apache.kafka.common.config.AbstractConfig",  # every client's full configuration, hundreds of lines
    "org.apache.kafka.clients",
    "org.apache.kafka.common.utils.AppInfoParser",
    "org.apache.kafka.connect.runtime.isolation",  # one line per plugin found
    "org.eclipse.jetty",
    "org.glassfish",
)


class ConnectorFailed(RuntimeError):
    """The connector or one of its tasks is FAILED; the message has its trace and the worker's log tail."""


class KafkaConnect(_ChildServer):
    """One Kafka Connect standalone worker running one connector; create it with `KafkaConnect.start()`.

    `rest_url` is its REST API, `connector_name` the connector's name; `stop()` ends the worker and deletes its
    temp dir, source offsets included, so a connector started again begins afresh.
    """

    def __init__(self, rest_port: int, connector_name: str, work_dir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.rest_port = rest_port
        self.rest_url = f"http://127.0.0.1:{rest_port}"
        self.connector_name = connector_name
        self.work_dir = work_dir
        self.log_path = work_dir / "connect.log"
        self._watch(proc)

    @classmethod
    def start(
        cls,
        bootstrap: str,
        connector: Mapping[str, Any],
        *,
        schemas_enable: bool = True,
        worker_settings: Mapping[str, str] | None = None,
        timeout: float = 120.0,
        heap: str = "512m",
    ) -> KafkaConnect:
        """Start a worker on bootstrap running `connector`; returns once its REST API knows the connector. Blocks.

        `connector` holds the connector's properties, `name` and `connector.class` among them; values that are
        not strings are written as Java reads them (`True` as `true`). `worker_settings` add to or override the
        worker's own configuration. The first call may take minutes: Maven fetches the jars.
        """
        name = str(connector["name"])
        config = {key: _java_value(value) for key, value in connector.items() if key != "name"}
        jars = resolve_jars()
        failures: list[str] = []
        for _ in range(_START_ATTEMPTS):
            work_dir = Path(tempfile.mkdtemp(prefix="webhookd-connect-"))
            log_path = work_dir / "connect.log"
            try:
                rest_port = free_port()
                worker = _write_worker_config(work_dir, bootstrap, rest_port, schemas_enable, worker_settings)
                connector_file = work_dir / "connector.json"
                connector_file.write_text(json.dumps({"name": name, "config": config}, indent=2))
                log_config = write_log_config(work_dir / "log4j2.properties", _QUIET_LOGGERS)
                argv = jvm_argv(
                    jars,
                    "org.apache.kafka.connect.cli.ConnectStandalone",
                    [str(worker), str(connector_file)],
                    log_config=log_config,
                    heap=heap,
                )
                proc = _spawn(argv, log_path=log_path, cwd=work_dir)
                instance = cls(rest_port, name, work_dir, proc)
                if instance._wait_known(timeout):
                    return instance
                # Exited during startup (most likely the port was taken): unregister and try again.
                failures.append(f"REST port {rest_port}:\n{_log_tail(log_path)}")
                instance.stop()
            except BaseException:
                shutil.rmtree(work_dir, ignore_errors=True)
                raise
        raise RuntimeError("Kafka Connect did not start; what it logged:\n" + "\n".join(failures))

    def _wait_known(self, timeout: float) -> bool:
        """Wait until the REST API answers for our connector; False if the worker exited first."""
        deadline = time.monotonic() + timeout
        while self.pid is not None:
            with contextlib.suppress(OSError, ValueError):
                if self._get(f"/connectors/{quote(self.connector_name, safe='')}/status") is not None:
                    return True
            if time.monotonic() > deadline:
                tail = _log_tail(self.log_path)
                self.stop()
                raise TimeoutError(f"Kafka Connect's REST API did not know the connector within {timeout} s:\n{tail}")
            time.sleep(0.2)
        return False

    def status(self) -> dict[str, Any] | None:
        """The connector's status (`GET /connectors/<name>/status`), or None while the worker does not know it."""
        return self._get(f"/connectors/{quote(self.connector_name, safe='')}/status")

    def wait_until_running(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the connector and all its tasks (at least one) are RUNNING; returns that status. Blocks.

        Raises `ConnectorFailed` as soon as the connector or a task is FAILED, and RuntimeError if the worker
        exits; both carry the worker's log tail.
        """
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            if self.pid is None:
                raise RuntimeError("Kafka Connect exited; its log ends with:\n" + _log_tail(self.log_path))
            with contextlib.suppress(OSError, ValueError):
                last = self.status()
            if last is not None:
                states = [last["connector"]["state"], *(task["state"] for task in last.get("tasks", []))]
                if "FAILED" in states:
                    traces = [last["connector"].get("trace")] + [t.get("trace") for t in last.get("tasks", [])]
                    trace = "\n".join(t for t in traces if t)
                    raise ConnectorFailed(
                        f"connector {self.connector_name!r} failed: {trace}\nthe worker's log ends with:\n"
                        + _log_tail(self.log_path)
                    )
                if len(states) > 1 and all(state == "RUNNING" for state in states):
                    return last
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"connector {self.connector_name!r} not running within {timeout} s (status {last}); "
                    "the worker's log ends with:\n" + _log_tail(self.log_path)
                )
            time.sleep(0.2)

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.rest_url + path, timeout=5) as response:
                body: dict[str, Any] = json.load(response)
                return body
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def stop(self) -> None:
        """Stop the worker (SIGTERM, SIGKILL after 15 s) and delete its temp dir; calling it again does nothing."""
        self._stop_and_remove(15.0, self.work_dir)

    def __repr__(self) -> str:
        return f"KafkaConnect(rest_url={self.rest_url!r}, connector={self.connector_name!r}, pid={self.pid})"


def _java_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _write_worker_config(
    work_dir: Path, bootstrap: str, rest_port: int, schemas_enable: bool, extra: Mapping[str, str] | None
) -> Path:
    settings = {
        "bootstrap.servers": bootstrap,
        "key.converter": _JSON_CONVERTER,
        "value.converter": _JSON_CONVERTER,
        "key.converter.schemas.enable": _java_value(schemas_enable),
        "value.converter.schemas.enable": _java_value(schemas_enable),
        "offset.storage.file.filename": str(work_dir / "connect.offsets"),
        # Tests restart connectors and read what they wrote: keep the window of unflushed source offsets short.
        "offset.flush.interval.ms": "1000",
        "listeners": f"http://127.0.0.1:{rest_port}",
        # Every plugin here declares itself in META-INF/services, so the slow scan of every class is not needed.
        "plugin.discovery": "service_load",
        **(extra or {}),
    }
    path = work_dir / "worker.properties"
    path.write_text("".join(f"{key}={_escape_property(value)}\n" for key, value in settings.items()))
    return path


def _escape_property(value: str) -> str:
    # java.util.Properties reads a backslash as an escape; file paths and regexes must keep theirs.
    return value.replace("\\", "\\\\")
