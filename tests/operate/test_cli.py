"""The command line as an operator meets it: `python -m webhookd` in a child process, its exit status and output.

Every invocation is started at once by one module fixture, so that the interpreter start-ups overlap.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from webhookd import cli
from webhookd.operate import endpoint_commands as operate_endpoints
from webhookd.operate.output import NotFound

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "webhookd.yaml"
PASSWORD = "hunter2-Pa55"
DSN = f"postgresql://webhookd:{PASSWORD}@db.internal:5432/twenty"

GOOD = f"""\
kafka:
  bootstrap_servers: "kafka-0:9092,kafka-1:9092"
  topics: ["crm.events", "crm.backfill"]
postgres:
  dsn: "{DSN}"
delivery:
  concurrency: 64
  retry_schedule: ["5s", "250ms", "2m"]
logging:
  format: console
"""


@dataclass(frozen=True)
class Invocation:
    args: list[str]  # "{config}" stands for the path of the case's file
    config: str | None = None  # the file's text; None writes no file
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Outcome:
    status: int
    stdout: str
    stderr: str


def check(config: str, *env: tuple[str, str]) -> Invocation:
    return Invocation(["check-config", "--config", "{config}"], config, env)


BROKEN = {
    "unknown-key": (
        check(GOOD.replace("  concurrency: 64\n", "  concurrency: 64\n  concurency: 5\n")),
        ["delivery.concurency: unknown key", "'concurrency'"],
    ),
    "bad-type": (
        check(GOOD.replace("concurrency: 64", "concurrency: lots")),
        ["delivery.concurrency: must be an integer"],
    ),
    "bad-duration": (
        check(GOOD.replace('"250ms"', '"5 minutes"')),
        ["delivery.retry_schedule[1]: must be a duration"],
    ),
    "yaml-syntax": (check(GOOD.replace('"crm.backfill"]', '"crm.backfill"')), ["invalid YAML", ".yaml:"]),
    "missing-dsn": (check(GOOD.replace(f'  dsn: "{DSN}"\n', "")), ["postgres.dsn: required"]),
    "missing-file": (Invocation(["check-config", "--config", "{config}"]), ["cannot read"]),
}
# One file with a problem in every section: all of them are reported in a single run.
MANY_PROBLEMS = (
    GOOD.replace("postgresql://", "mysql://").replace("  concurrency: 64\n", "  concurrency: 0\n  nonsense: 1\n")
    + "egress:\n  allow_private: maybe\negres:\n  allowed_cidrs: []\n"
)
MANY_PROBLEMS_REPORTED = [
    "postgres.dsn: must be a postgresql:// URI",
    "delivery.concurrency: must be an integer >= 1",
    "delivery.nonsense: unknown key",
    "egress.allow_private: must be true or false",
    "egres: unknown section",
    "delivery.timeout_seconds: must be a duration",
    "WEBHOOKD_DELIVERY__TIMEOUT_SECONDS",
]
KEY_VALUE_DSN = f"host=db.internal dbname=twenty password={PASSWORD} user=webhookd"

HELP = {
    "top": ["--help"],
    "run": ["run", "--help"],
    "migrate": ["migrate", "--help"],
    "check-config": ["check-config", "--help"],
    "dev": ["dev", "--help"],
}

INVOCATIONS: dict[str, Invocation] = {
    "good": check(GOOD),
    "shipped-with-env-dsn": Invocation(
        ["check-config", "--config", str(SHIPPED_CONFIG)], env=(("WEBHOOKD_POSTGRES__DSN", KEY_VALUE_DSN),)
    ),
    "many-problems": check(MANY_PROBLEMS, ("WEBHOOKD_DELIVERY__TIMEOUT_SECONDS", "soon")),
    "no-command": Invocation([]),
    "check-config-without-config": Invocation(["check-config"]),
    **{f"broken:{name}": invocation for name, (invocation, _) in BROKEN.items()},
    **{f"help:{name}": Invocation(args) for name, args in HELP.items()},
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    folder = tmp_path_factory.mktemp("cli")
    base_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WEBHOOKD_")}
    running: dict[str, subprocess.Popen[str]] = {}
    for number, (name, invocation) in enumerate(INVOCATIONS.items()):
        path = folder / f"case{number}.yaml"
        if invocation.config is not None:
            path.write_text(invocation.config, encoding="utf-8")
        args = [arg.replace("{config}", str(path)) for arg in invocation.args]
        running[name] = subprocess.Popen(
            [sys.executable, "-m", "webhookd", *args],
            env={**base_env, **dict(invocation.env)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=folder,
        )
    results = {}
    try:
        for name, process in running.items():
            stdout, stderr = process.communicate(timeout=60)
            results[name] = Outcome(process.returncode, stdout, stderr)
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def test_check_config_accepts_a_good_file_and_prints_the_effective_configuration(
    outcomes: dict[str, Outcome],
) -> None:
    good = outcomes["good"]

    assert good.status == 0, good.stderr
    printed = yaml.safe_load(good.stdout)
    assert printed["kafka"]["bootstrap_servers"] == ["kafka-0:9092", "kafka-1:9092"]
    assert printed["kafka"]["topics"] == ["crm.events", "crm.backfill"]
    assert printed["delivery"]["concurrency"] == 64
    assert printed["delivery"]["retry_schedule"] == [5.0, 0.25, 120.0]
    assert printed["delivery"]["per_host_concurrency"] == 32  # a default fills what the file leaves out
    assert printed["logging"]["format"] == "console"


def test_check_config_shows_the_dsn_password_as_stars_and_never_the_password(outcomes: dict[str, Outcome]) -> None:
    good = outcomes["good"]

    assert yaml.safe_load(good.stdout)["postgres"]["dsn"] == "postgresql://webhookd:***@db.internal:5432/twenty"
    assert PASSWORD not in good.stdout + good.stderr


def test_the_shipped_config_checks_with_a_key_value_dsn_from_the_environment_and_hides_its_password(
    outcomes: dict[str, Outcome],
) -> None:
    result = outcomes["shipped-with-env-dsn"]

    assert result.status == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["postgres"]["dsn"] == "host=db.internal dbname=twenty password=*** user=webhookd"
    assert printed["kafka"]["bootstrap_servers"] == ["kafka-0.kafka:9092", "kafka-1.kafka:9092", "kafka-2.kafka:9092"]
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_config_refuses_a_broken_file_with_status_2_naming_the_key(
    outcomes: dict[str, Outcome], case: str
) -> None:
    result = outcomes[f"broken:{case}"]
    _, expected = BROKEN[case]

    assert result.status == 2
    assert result.stdout == ""
    for text in expected:
        assert text in result.stderr
    assert PASSWORD not in result.stderr


def test_check_config_lists_every_problem_in_one_run_without_the_password(outcomes: dict[str, Outcome]) -> None:
    result = outcomes["many-problems"]

    assert result.status == 2
    assert result.stdout == ""
    for text in MANY_PROBLEMS_REPORTED:
        assert text in result.stderr
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_of_every_command_exits_0_and_shows_usage(outcomes: dict[str, Outcome], command: str) -> None:
    result = outcomes[f"help:{command}"]

    assert result.status == 0, result.stderr
    assert result.stdout.startswith("usage: webhookd")


def test_help_lists_every_command(outcomes: dict[str, Outcome]) -> None:
    text = outcomes["help:top"].stdout

    for command in ("run", "migrate", "check-config", "dev"):
        assert command in text


@pytest.mark.parametrize("case", ["no-command", "check-config-without-config"])
def test_bad_usage_exits_2_with_a_usage_message(outcomes: dict[str, Outcome], case: str) -> None:
    result = outcomes[case]

    assert result.status == 2
    assert "usage: webhookd" in result.stderr
    assert result.stdout == ""


def test_dev_without_the_embedded_extra_exits_2_naming_the_install_and_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The names it checks are the real ones, which the test install has.
    assert all(importlib.util.find_spec(name) is not None for name in cli.EMBEDDED_MODULES)
    monkeypatch.setattr(cli, "EMBEDDED_MODULES", (*cli.EMBEDDED_MODULES, "webhookd_no_such_module"))

    status = cli.main(["dev"])

    err = capsys.readouterr().err
    assert status == 2
    assert "pip install 'webhookd[embedded]'" in err
    assert "missing: webhookd_no_such_module" in err


class _Connection:
    """Stands in for the Postgres connection an operator command gets; the command under test never uses it."""

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("error", "status"),
    [(KeyError("webhook_id"), None), (NotFound("no webhook with id 7f1c in the subscriptions table"), 1)],
    ids=["bug", "not-found"],
)
def test_only_not_found_is_reported_as_not_found_and_a_keyerror_from_a_bug_surfaces(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, error: Exception, status: int
) -> None:
    async def connect(_settings: object) -> _Connection:
        return _Connection()

    async def failing(*_args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_connect", connect)
    monkeypatch.setattr(operate_endpoints, "list_endpoints", failing)
    config = tmp_path / "c.yaml"
    config.write_text(GOOD, encoding="utf-8")
    argv = ["endpoints", "list", "--config", str(config)]

    if status is None:
        with pytest.raises(KeyError, match="webhook_id"):  # uncaught: Python prints the traceback and exits 1
            cli.main(argv)
        assert capsys.readouterr().err == ""
    else:
        assert cli.main(argv) == status
        assert capsys.readouterr().err == f"webhookd endpoints list: {error}\n"


# Every command that takes --config, with the other arguments it requires.
CONFIG_COMMANDS = {
    "run": ["run"],
    "migrate": ["migrate"],
    "check-config": ["check-config"],
    "deliveries list": ["deliveries", "list"],
    "deliveries show": ["deliveries", "show", "7"],
    "deliveries retry": ["deliveries", "retry", "7"],
    "deliveries replay": ["deliveries", "replay", "--webhook", "7f1c", "--since", "2h"],
    "endpoints list": ["endpoints", "list"],
    "endpoints enable": ["endpoints", "enable", "7f1c"],
    "endpoints disable": ["endpoints", "disable", "7f1c"],
    "endpoints limit": ["endpoints", "limit", "7f1c", "20"],
    "webhooks show": ["webhooks", "show"],
    "webhooks set": ["webhooks", "set", "7f1c", "--ordered"],
    "webhooks unset": ["webhooks", "unset", "7f1c", "--all"],
}


def _commands_with_config(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _commands_with_config(sub, f"{prefix} {name}".strip())
        elif "--config" in action.option_strings and prefix != "dev":
            found.add(prefix)
    return found


def test_the_config_commands_listed_here_are_every_command_that_takes_config() -> None:
    # A new command with --config must be added to CONFIG_COMMANDS, so that the tests below cover it too.
    assert _commands_with_config(cli._parser()) == set(CONFIG_COMMANDS)


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_every_config_command_reads_its_file_from_webhookd_config_when_config_is_not_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    # A file that does not exist: the command stops at reading it, before any Kafka or Postgres, and names it.
    absent = tmp_path / "from-the-environment.yaml"
    monkeypatch.setenv("WEBHOOKD_CONFIG", str(absent))

    status = cli.main(CONFIG_COMMANDS[command])

    err = capsys.readouterr().err
    assert status == 2
    assert "cannot read" in err
    assert str(absent) in err


def test_check_config_with_webhookd_config_prints_the_configuration_of_that_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(GOOD, encoding="utf-8")
    monkeypatch.setenv("WEBHOOKD_CONFIG", str(config))

    assert cli.main(["check-config"]) == 0

    assert yaml.safe_load(capsys.readouterr().out)["delivery"]["concurrency"] == 64


def test_config_given_on_the_command_line_wins_over_webhookd_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(GOOD, encoding="utf-8")
    monkeypatch.setenv("WEBHOOKD_CONFIG", str(tmp_path / "not-this-one.yaml"))

    assert cli.main(["check-config", "--config", str(config)]) == 0

    assert yaml.safe_load(capsys.readouterr().out)["delivery"]["concurrency"] == 64


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_without_config_or_webhookd_config_a_command_exits_2_saying_both_ways(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("WEBHOOKD_CONFIG", raising=False)
    else:
        monkeypatch.setenv("WEBHOOKD_CONFIG", value)

    with pytest.raises(SystemExit) as exited:
        cli.main(CONFIG_COMMANDS[command])

    captured = capsys.readouterr()
    assert exited.value.code == 2
    assert captured.out == ""
    assert f"usage: webhookd {command} " in captured.err  # the command's own usage, not the top level's
    assert captured.err.rstrip().endswith("error: --config FILE is required (or set WEBHOOKD_CONFIG)")


def test_dev_keeps_its_own_default_and_ignores_webhookd_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import webhookd.demo.walk

    started: list[Path | None] = []

    def run_dev(config: Path | None, events: int) -> int:
        started.append(config)
        return 0

    monkeypatch.setattr(webhookd.demo.walk, "run_dev", run_dev)
    monkeypatch.setenv("WEBHOOKD_CONFIG", "/nonexistent/production.yaml")

    assert cli.main(["dev"]) == 0
    assert started == [None]
