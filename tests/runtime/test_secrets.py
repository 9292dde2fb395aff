"""No webhook secret and no password ever leaves the process in anything an operator can read.

One daemon process, logging JSON at debug level with a Postgres DSN that carries a password, goes through
successes, 500s, retries, dead letters, a blocked destination, a webhook it must skip, a secret rotated mid-run and
bad events. Beside it run the commands an operator types (check-config, migrate, run) with that DSN, with broken
files holding other passwords, and `webhookd dev`. Then every byte they produced is searched: the log, each
command's output, the text of the webhookd.deliveries and webhookd.bad_events rows, and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
import pytest
import yaml
from aiohttp import web
from aiokafka import AIOKafkaProducer

from tests.daemon_tools import fresh_database, fresh_topic, get_text, wait_ready
from tests.support import DaemonProcess, Receiver, add_webhook, config_for, fetch, new_workspace, write_config
from webhookd.runtime.children import free_port

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "Sup3rS3cretPw"

# Each secret carries a marker of its own, letters and digits only, so a leak shows whatever escaping the output
# applied (JSON, repr, percent-encoding) and even when only part of the secret got out.
SECRETS = {
    "ok": "whsec_okayMarkerQ7mZp3Xv9Lk2",
    "ok-rotated": "rotatedMarkerHy6Gs1Ve4Nc8",
    "other-workspace": "otherWsMarkerAa3Ss5Dd7Ff9",
    "flaky": "flaky secret FlakyMarkerHn4Rt8Wq1Zs6",
    "blocked": "blockedMarkerJd5Fy2Uc8Pb3",
    "redirect": "redirMarkerMv7Kx4Ne9Ga1",
    "refused": "refusedMarkerTb2Lw6Qh3Yr8",
    "skipped": "skippedMarkerWz9Cp5Dn7Fm4",
    "unicode": "sëcret ünïcode ☃ UnicodeMarkerRk3Vt6",
    "quoted": "quo\"te\\back'slash QuotedMarkerXe8Jm2",
}
URL_PASSWORD = "UrlPassw0rdMarkerPq4Zr"

EVENTS_BEFORE_ROTATION = 3
EVENTS_AFTER_ROTATION = 2
W1_EVENTS = EVENTS_BEFORE_ROTATION + EVENTS_AFTER_ROTATION
W2_EVENTS = 2
FAILING = ("flaky", "blocked", "redirect", "refused", "quoted")  # each of these dead-letters every W1 event
BAD_RECORDS = (
    b"not json at all, not even close",
    b'{"event":"person.created"}',
    b'{"event":"person.created","workspaceId":"not-a-uuid","data":{}}',
    b'{"event":7,"workspaceId":"00000000-0000-0000-0000-000000000000","data":{}}',
    b'{"event":"person.created","workspaceId":"00000000-0000-0000-0000-000000000000","data":{"pad":"'
    + b"x" * 5000
    + b'"}}',
)


def markers(text: str) -> list[str]:
    """The pieces of a secret or password that must never show: the marker word(s) of at least 4 characters."""
    return [piece for piece in re.split(r"[^A-Za-z0-9]+", text) if len(piece) >= 4 and any(c.isdigit() for c in piece)]


def leaks(output: str, secrets: dict[str, str]) -> list[str]:
    """Names of the secrets any of whose markers occur in `output`."""
    return [name for name, secret in secrets.items() if any(marker in output for marker in markers(secret))]


def with_password(dsn: str, password: str, database: str | None = None) -> str:
    parts = urlsplit(dsn)
    if parts.password is not None:
        pytest.skip("the outside Postgres has a password of its own; these tests put theirs in the DSN")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or 'postgres'}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, path=parts.path if database is None else f"/{database}"))


@dataclass(frozen=True)
class Command:
    """One operator command: its arguments ("{config}" is the file written from `config`), environment and the
    exit status it must end with, so that each really went down the path it is meant to exercise."""

    args: tuple[str, ...]
    status: int
    config: dict[str, Any] | str | None = None
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class Exposure:
    """Everything the scenario let out, for the tests to search."""

    log: str
    metrics: str
    probes: str
    rows: str
    delivered: dict[str, int]
    dead: int
    bad_events: int
    exit_status: int | None
    commands: dict[str, tuple[int, str]]
    dev_status: int
    dev_output: str
    dev_secrets: list[str]


# Passwords of the commands' configurations, each its own, so a leak names the case it came from.
COMMAND_PASSWORDS = {
    "closed-port": "Cl0sedPortPwMarker",
    "no-such-database": "N0DbPwMarker",
    "bad-scheme": "PwBadSchemeMarker1",
    "dsn-as-list": "PwAsListMarker2",
    "dsn-as-mapping": "PwMappingMarker3",
    "dsn-in-kafka": "PwInKafkaMarker4",
    "dsn-in-topics": "PwInTopicsMarker5",
    "key-value-broken": "PwKeyValueMarker6",
    "key-value-quoted": "Qx7 Zk9VyMarker7",
    "yaml-syntax": "PwYamlBrokenMarker8",
    "at-sign": "Pw@tSign9:Tail0Marker",
    "percent-encoded": "P@ss/EncMarker11",
    "query-param-broken": "PwQueryParamMarker12",
    "query-param-good": "PwQueryGoodMarker13",
    "env-bad-dsn": "PwEnvVarMarker14",
    "env-typo": "PwEnvTypoMarker15",
    "sasl-good": "SaslPwGoodMarker16",
    "sasl-unused": "SaslPwUnusedMarker17",
    "sasl-as-list": "SaslPwListMarker18",
    "space-in-uri": "Spaced Pw9Marker19",
    "double-quoted": "DqPwMarker20",
}
# Cases that print a password today; each is reported as a bug and stays here, failing strictly once fixed.


def commands(kafka: str, dsn: str, topic: str) -> dict[str, Command]:
    """The operator commands, each a case; built from the scenario's broker and database."""
    good = config_for(kafka, with_password(dsn, PASSWORD), topic)
    pw = COMMAND_PASSWORDS

    def broken(section: str, key: str, value: Any, *, drop_dsn: bool = False) -> dict[str, Any]:
        config = config_for(kafka, with_password(dsn, PASSWORD), topic)
        if drop_dsn:
            del config["postgres"]["dsn"]
        config.setdefault(section, {})[key] = value
        config["delivery"]["concurency"] = 5  # a second problem, so the error lists more than the DSN's
        return config

    without_dsn = config_for(kafka, "postgresql://unused", topic)
    del without_dsn["postgres"]["dsn"]
    closed = f"postgresql://postgres:{pw['closed-port']}@127.0.0.1:{free_port()}/db"
    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_username": "webhookd"}
    yaml_text = yaml.safe_dump(good).replace(PASSWORD, pw["yaml-syntax"])
    check = ("check-config", "--config", "{config}")
    return {
        "check-config": Command(check, 0, good),
        "check-config-dsn-from-env": Command(
            check, 0, without_dsn, (("WEBHOOKD_POSTGRES__DSN", with_password(dsn, PASSWORD)),)
        ),
        "check-config-query-param-password": Command(
            check, 0, config_for(kafka, f"{dsn}{'&' if '?' in dsn else '?'}password={pw['query-param-good']}", topic)
        ),
        "check-config-space-in-uri-password": Command(
            check, 0, config_for(kafka, f"postgresql://postgres:{pw['space-in-uri']}@db.internal/twenty", topic)
        ),
        "check-config-double-quoted-key-value-password": Command(
            check, 0, config_for(kafka, f'host=db user=u password="{pw["double-quoted"]}" dbname=twenty', topic)
        ),
        "check-config-sasl-password": Command(
            check, 0, config_for(kafka, dsn, topic, kafka={**sasl, "sasl_password": pw["sasl-good"]})
        ),
        "migrate": Command(("migrate", "--config", "{config}"), 0, good),
        "run-postgres-closed": Command(
            ("run", "--config", "{config}"), 1, config_for(kafka, closed, topic, logging={"level": "debug"})
        ),
        "migrate-postgres-closed": Command(("migrate", "--config", "{config}"), 1, config_for(kafka, closed, topic)),
        "run-no-such-database": Command(
            ("run", "--config", "{config}"),
            1,
            config_for(kafka, with_password(dsn, pw["no-such-database"], "nope_no_such_db"), topic),
        ),
        "broken-bad-scheme": Command(
            check, 2, broken("postgres", "dsn", f"mysql://postgres:{pw['bad-scheme']}@db.internal/twenty")
        ),
        "broken-dsn-as-list": Command(
            check, 2, broken("postgres", "dsn", [f"postgresql://postgres:{pw['dsn-as-list']}@db/twenty"])
        ),
        "broken-dsn-as-mapping": Command(
            check, 2, broken("postgres", "dsn", {"url": f"postgresql://postgres:{pw['dsn-as-mapping']}@db/twenty"})
        ),
        "broken-dsn-in-kafka": Command(
            check, 2, broken("kafka", "bootstrap_servers", f"postgresql://postgres:{pw['dsn-in-kafka']}@db:5432/x")
        ),
        "broken-dsn-in-topics": Command(
            check, 2, broken("kafka", "topics", [f"postgresql://u:{pw['dsn-in-topics']}@db/twenty"])
        ),
        "broken-key-value": Command(
            check, 2, broken("postgres", "dsn", f"host=db user=u password={pw['key-value-broken']} dbname")
        ),
        "broken-key-value-quoted": Command(
            check, 2, broken("postgres", "dsn", f"host=db password='{pw['key-value-quoted']}' dbname")
        ),
        "broken-yaml-syntax": Command(check, 2, yaml_text.replace("dsn: ", 'dsn: "', 1)),
        "broken-at-sign-in-password": Command(
            check, 2, broken("postgres", "dsn", f"mysql://postgres:{pw['at-sign']}@db/twenty")
        ),
        "broken-percent-encoded": Command(
            check, 2, broken("postgres", "dsn", f"mysql://postgres:{quote(pw['percent-encoded'], safe='')}@db/x")
        ),
        "broken-query-param": Command(
            check, 2, broken("postgres", "dsn", f"postgresql//db/twenty?password={pw['query-param-broken']}")
        ),
        "broken-env-dsn": Command(
            check,
            2,
            without_dsn,
            (("WEBHOOKD_POSTGRES__DSN", f"mysql://u:{pw['env-bad-dsn']}@db/twenty"),),
        ),
        "broken-env-typo": Command(
            check,
            2,
            good,
            (("WEBHOOKD_POSTGRES__DNS", f"postgresql://u:{pw['env-typo']}@db/twenty"),),
        ),
        "broken-sasl-password-unused": Command(
            check, 2, config_for(kafka, dsn, topic, kafka={"sasl_password": pw["sasl-unused"]})
        ),
        "broken-sasl-password-as-list": Command(
            check, 2, config_for(kafka, dsn, topic, kafka={**sasl, "sasl_password": [pw["sasl-as-list"]]})
        ),
    }


async def run_command(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run a command and return its exit status and everything it wrote to stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:  # timed out, or the scenario was cancelled: the child must not outlive it
            # SIGTERM first: `webhookd dev` stops its own broker and Postgres on it, which SIGKILL would orphan.
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def run_operator_commands(kafka: str, dsn: str, topic: str, tmp: Path) -> dict[str, tuple[int, str]]:
    cases = commands(kafka, dsn, topic)

    async def one(name: str, case: Command) -> tuple[int, str]:
        path = tmp / f"{name}.yaml"
        if isinstance(case.config, str):
            path.write_text(case.config)
        elif case.config is not None:
            write_config(path, case.config)
        args = [a.replace("{config}", str(path)) for a in case.args]
        return await run_command([sys.executable, "-m", "webhookd", *args], dict(case.env))

    outputs = await asyncio.gather(*(one(name, case) for name, case in cases.items()))
    return dict(zip(cases, outputs, strict=True))


# `webhookd dev` makes its sample secrets at random when its module is imported, so they cannot be read from
# outside. This runs the very same command-line entry point after writing them down for the test.
DEV_WRAPPER = """
import sys
import webhookd.demo.walk as dev
from webhookd.cli import main
with open(sys.argv[1], "w") as out:
    out.write("\\n".join(sample.secret for sample in dev.SAMPLES))
sys.exit(main(["dev", "--config", sys.argv[2], "--events", "5"]))
"""


async def run_dev(tmp: Path) -> tuple[int, str, list[str]]:
    secrets_file = tmp / "dev-secrets"
    status, output = await run_command(
        [sys.executable, "-c", DEV_WRAPPER, str(secrets_file), str(REPO / "config" / "dev.yaml")],
        {"WEBHOOKD_LOGGING__LEVEL": "debug", "WEBHOOKD_LOGGING__FORMAT": "json"},
        timeout=90,
    )
    secrets = secrets_file.read_text().split() if secrets_file.exists() else []
    return status, output, secrets


async def run_daemon(kafka: str, dsn: str, topic: str, tmp: Path) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        receiver = Receiver()
        await receiver.start()
        stack.push_async_callback(receiver.stop)
        return await _run_daemon(kafka, dsn, topic, tmp, receiver)


async def _run_daemon(kafka: str, dsn: str, topic: str, tmp: Path, receiver: Receiver) -> dict[str, Any]:

    async def internal_error(_request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=500, text="internal error; try again")

    async def moved(_request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "http://example.invalid/next"})

    for path in ("/flaky", "/quoted"):
        receiver.behaviours[path] = internal_error
    receiver.behaviours["/redirect"] = moved
    w1, w2 = new_workspace(), new_workspace()
    urls = {
        "ok": receiver.url("/ok"),
        "flaky": receiver.url("/flaky"),
        "blocked": f"http://10.0.0.1:{receiver.port}/hook",
        "redirect": receiver.url("/redirect"),
        "refused": f"http://hookuser:{URL_PASSWORD}@127.0.0.1:{free_port()}/hook",
        "skipped": "ftp://files.example.com/hook",
        "unicode": receiver.url("/unicode"),
        "quoted": receiver.url("/quoted"),
    }
    ids = {name: await add_webhook(dsn, w1, url, ["*.*"], SECRETS[name]) for name, url in urls.items()}
    await add_webhook(dsn, w2, receiver.url("/other"), ["*.*"], SECRETS["other-workspace"])

    config = config_for(
        kafka,
        with_password(dsn, PASSWORD),
        topic,
        delivery={"retry_schedule": ["100ms"], "max_event_bytes": 4096},
        egress={"allow_private": False, "allowed_cidrs": ["127.0.0.0/8"]},
        logging={"level": "debug", "format": "json"},
    )
    listen = config["http"]["listen"]
    producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=False)
    log_path = tmp / "daemon.log"
    daemon = DaemonProcess(write_config(tmp / "daemon.yaml", config), {}, log_path)
    dead_expected = len(FAILING) * W1_EVENTS
    try:
        daemon.start()
        await wait_ready(daemon, listen)
        await producer.start()

        async def send(record: dict[str, Any] | bytes) -> None:
            await producer.send_and_wait(topic, record if isinstance(record, bytes) else orjson.dumps(record))

        for n in range(EVENTS_BEFORE_ROTATION):
            await send({"event": "person.created", "workspaceId": w1, "data": {"n": n}})
        for n in range(W2_EVENTS):
            await send({"event": "person.created", "workspaceId": w2, "data": {"n": n}})
        for record in BAD_RECORDS:
            await send(record)
        await receiver.wait_for(lambda: len(receiver.at("/ok")) >= EVENTS_BEFORE_ROTATION, 20, "the first events")
        # A rotated secret goes through the change notification and, where supported, an overlap period.
        await fetch(dsn, "UPDATE core.webhook SET secret = $1 WHERE id = $2::uuid", SECRETS["ok-rotated"], ids["ok"])
        await asyncio.sleep(0.5)
        for n in range(EVENTS_AFTER_ROTATION):
            await send({"event": "company.created", "workspaceId": w1, "data": {"n": n}})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            dead = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'dead'")
            bad = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.bad_events")
            if (
                dead[0]["n"] >= dead_expected
                and bad[0]["n"] >= len(BAD_RECORDS)
                and len(receiver.at("/ok")) >= W1_EVENTS
            ):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        _, metrics = await get_text(f"http://{listen}/metrics")
        probes = "".join([(await get_text(f"http://{listen}/{p}"))[1] for p in ("healthz", "readyz")])
        exit_status: int | None = await asyncio.to_thread(daemon.terminate)
    finally:
        daemon.kill()
        await producer.stop()
    deliveries = await fetch(dsn, "SELECT * FROM webhookd.deliveries")
    bad_events = await fetch(dsn, "SELECT * FROM webhookd.bad_events")
    rows = "\n".join(_row_text(row) for row in (*deliveries, *bad_events))
    return {
        "log": log_path.read_text(errors="replace"),
        "metrics": metrics,
        "probes": probes,
        "rows": rows,
        "delivered": {path: len(receiver.at(path)) for path in ("/ok", "/unicode", "/other")},
        "dead": sum(1 for row in deliveries if row["status"] == "dead"),
        "bad_events": len(bad_events),
        "exit_status": exit_status,
    }


def _row_text(row: Any) -> str:
    # Every column as an operator's tool would show it: text as is, bytes decoded, the rest as their str.
    return " | ".join(
        value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value) for value in row.values()
    )


@pytest.fixture(scope="module")
async def exposure(kafka: str, postgres_admin: str) -> Exposure:
    dsn, topic = await fresh_database(postgres_admin), await fresh_topic(kafka)
    with tempfile.TemporaryDirectory(prefix="webhookd-secrets-") as tmp:
        # Side by side to save time; a task group cancels the others if one fails, and each cleans up after itself.
        async with asyncio.TaskGroup() as group:
            daemon = group.create_task(run_daemon(kafka, dsn, topic, Path(tmp)))
            command_outputs = group.create_task(run_operator_commands(kafka, dsn, topic, Path(tmp)))
            dev = group.create_task(run_dev(Path(tmp)))
    dev_status, dev_output, dev_secrets = dev.result()
    return Exposure(
        commands=command_outputs.result(),
        dev_status=dev_status,
        dev_output=dev_output,
        dev_secrets=dev_secrets,
        **daemon.result(),
    )


def all_secrets() -> dict[str, str]:
    return {**SECRETS, "postgres password": PASSWORD, **COMMAND_PASSWORDS}


def test_the_scenario_went_down_every_path_it_searches(exposure: Exposure) -> None:
    # Searching outputs proves nothing unless they hold what they are meant to: deliveries, failures and debug lines.
    assert exposure.exit_status == 0
    assert exposure.delivered == {"/ok": W1_EVENTS, "/unicode": W1_EVENTS, "/other": W2_EVENTS}
    assert exposure.dead == len(FAILING) * W1_EVENTS
    assert exposure.bad_events == len(BAD_RECORDS)
    for line in ('"level":"debug"', "delivery_dead_lettered", "webhook_skipped", "forbidden destination", "HTTP 500"):
        assert line in exposure.log + exposure.rows, line
    assert "webhookd_delivery_attempts_total" in exposure.metrics


def test_the_daemon_log_holds_no_secret_and_no_password(exposure: Exposure) -> None:
    assert leaks(exposure.log, all_secrets()) == []


def test_the_rows_an_operator_lists_hold_no_secret_and_no_password(exposure: Exposure) -> None:
    assert leaks(exposure.rows, all_secrets()) == []


def test_metrics_and_probes_hold_no_secret_and_no_password(exposure: Exposure) -> None:
    assert leaks(exposure.metrics + exposure.probes, all_secrets()) == []


def test_a_password_in_a_target_url_never_shows(exposure: Exposure) -> None:
    # Receivers put basic-auth credentials in their URL; a connection error must not print them back.
    everything = exposure.log + exposure.rows + exposure.metrics
    assert "refused" not in leaks(everything, {"refused": URL_PASSWORD})


@pytest.mark.parametrize(
    "name",
    [
        name for name in commands("k:1", "postgresql://u@h/db", "t")
    ],
)  # fmt: skip
def test_operator_commands_print_no_password(exposure: Exposure, name: str) -> None:
    status, output = exposure.commands[name]
    expected = commands("k:1", "postgresql://u@h/db", "t")[name].status
    assert status == expected, output[-2000:]
    assert leaks(output, all_secrets()) == [], output[-2000:]


def test_check_config_shows_the_hidden_password_as_stars(exposure: Exposure) -> None:
    for name in ("check-config", "check-config-dsn-from-env", "check-config-query-param-password"):
        assert "***" in exposure.commands[name][1], name


def test_dev_output_holds_none_of_its_sample_secrets(exposure: Exposure) -> None:
    assert exposure.dev_status == 0, exposure.dev_output[-3000:]
    assert "signature verified" in exposure.dev_output
    assert len(exposure.dev_secrets) == 4, "the wrapper could not read the sample secrets"
    shown = [secret for secret in exposure.dev_secrets if secret in exposure.dev_output]
    assert shown == [], "webhookd dev printed a sample secret"
