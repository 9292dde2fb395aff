"""Configuration: loading, environment overrides, validation messages and secret redaction."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from webhookd.runtime.config import ConfigError, Settings, describe, load_settings, parse_duration, redact

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
DSN = "postgresql://webhookd:hunter2@db.internal:5432/twenty"
DSN_ENV = {"WEBHOOKD_POSTGRES__DSN": DSN}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "webhookd.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ or {})
    return caught.value.problems


def test_defaults_fill_in_everything_but_the_dsn(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, f"postgres:\n  dsn: {DSN}\n"), {})

    assert settings.kafka.bootstrap_servers == ("localhost:9092",)
    assert settings.kafka.topics == ("crm.events",)
    assert settings.kafka.group_id == "webhookd"
    assert settings.kafka.auto_offset_reset == "earliest"
    assert settings.postgres.subscriptions_table == "core.webhook"
    assert settings.postgres.subscriptions_table_sql == '"core"."webhook"'
    assert settings.delivery.concurrency == 256
    assert settings.delivery.retry_schedule == (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    assert settings.delivery.effective_max_pending_deliveries == 4 * 256
    assert settings.egress.allow_private is False
    assert settings.egress.allowed_cidrs == ()
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 9000)
    assert (settings.logging.level, settings.logging.format) == ("info", "json")


def test_empty_sections_and_an_empty_file_mean_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "kafka:\ndelivery:\n"), DSN_ENV)

    assert settings.delivery.concurrency == 256


def test_production_example_loads_with_the_dsn_from_the_environment() -> None:
    settings = load_settings(CONFIG_DIR / "webhookd.yaml", DSN_ENV)

    assert settings.postgres.dsn == DSN
    assert len(settings.kafka.bootstrap_servers) == 3
    assert settings.egress.allow_private is False


def test_production_example_alone_is_refused_for_want_of_a_dsn() -> None:
    assert problems_of(CONFIG_DIR / "webhookd.yaml") == ["postgres.dsn: required"]


def test_dev_example_loads_with_the_overrides_webhookd_dev_sets() -> None:
    environ = {**DSN_ENV, "WEBHOOKD_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:19092"}

    settings = load_settings(CONFIG_DIR / "dev.yaml", environ)

    assert settings.kafka.bootstrap_servers == ("127.0.0.1:19092",)
    assert settings.egress.allow_private is True
    assert settings.logging.format == "console"
    assert settings.delivery.retry_schedule == (1.0, 5.0, 30.0)


def test_environment_override_wins_and_is_parsed_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, f"postgres:\n  dsn: {DSN}\ndelivery:\n  concurrency: 8\n")
    environ = {
        "WEBHOOKD_DELIVERY__CONCURRENCY": "10",
        "webhookd_kafka__topics": '["a", "b"]',
        "WEBHOOKD_Egress__Allow_Private": "true",
        "WEBHOOKD_KAFKA__BOOTSTRAP_SERVERS": "k1:9092, k2:9093",
        "WEBHOOKD_TEST_KAFKA": "not an override",
    }

    settings = load_settings(path, environ)

    assert settings.delivery.concurrency == 10
    assert settings.kafka.topics == ("a", "b")
    assert settings.egress.allow_private is True
    assert settings.kafka.bootstrap_servers == ("k1:9092", "k2:9093")


def test_text_keys_take_the_variable_verbatim_not_as_yaml() -> None:
    dsn = "host=db dbname=crm password='a #b: c'"
    environ = {"WEBHOOKD_POSTGRES__DSN": dsn, "WEBHOOKD_KAFKA__GROUP_INSTANCE_ID": "webhookd-0"}

    settings = load_settings(None, environ)

    assert settings.postgres.dsn == dsn
    assert settings.kafka.group_instance_id == "webhookd-0"


def test_empty_variable_clears_an_optional_key(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka:\n  group_instance_id: pod-0\ndelivery:\n  max_pending_deliveries: 5\n")
    environ = {**DSN_ENV, "WEBHOOKD_KAFKA__GROUP_INSTANCE_ID": "", "WEBHOOKD_DELIVERY__MAX_PENDING_DELIVERIES": ""}

    settings = load_settings(path, environ)

    assert settings.kafka.group_instance_id is None
    assert settings.delivery.effective_max_pending_deliveries == 4 * settings.delivery.concurrency


def test_every_problem_is_listed_at_once_with_its_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
kafka:
  topics: ["ok", "bad topic!"]
delivery:
  concurrency: abc
  retry_jitter: 2
logging:
  level: loud
""",
    )

    assert problems_of(path) == [
        "kafka.topics[1]: must be a Kafka topic name: 1 to 249 of letters, digits, '.', '_', '-' (got 'bad topic!')",
        "postgres.dsn: required",
        "delivery.concurrency: must be an integer >= 1 (got 'abc')",
        "delivery.retry_jitter: must be a number from 0 to 1 (got 2)",
        "logging.level: must be one of debug, info, warning, error (got 'loud')",
    ]


def test_a_problem_from_an_override_names_its_variable(tmp_path: Path) -> None:
    environ = {**DSN_ENV, "WEBHOOKD_DELIVERY__CONCURRENCY": "0"}

    assert problems_of(None, environ) == [
        "delivery.concurrency: must be an integer >= 1 (got 0 from WEBHOOKD_DELIVERY__CONCURRENCY)"
    ]


def test_unknown_key_and_section_are_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, f"postgres:\n  dsn: {DSN}\nkafka:\n  topcis: [a]\nmetrics: {{}}\n")

    assert problems_of(path) == [
        "kafka.topcis: unknown key (did you mean 'topics'?)",
        "metrics: unknown section",
    ]


def test_unknown_override_is_named_by_its_variable() -> None:
    environ = {
        **DSN_ENV,
        "WEBHOOKD_POSTGRESS__POOL_SIZE": "3",
        "WEBHOOKD_DELIVERY__CONCURENCY": "3",
        "WEBHOOKD_LOGGING_LEVEL": "debug",
    }

    assert problems_of(None, environ) == [
        "WEBHOOKD_DELIVERY__CONCURENCY: unknown key 'concurency' in delivery (did you mean 'concurrency'?)",
        "WEBHOOKD_LOGGING_LEVEL: not an override; did you mean WEBHOOKD_LOGGING__LEVEL?",
        "WEBHOOKD_POSTGRESS__POOL_SIZE: unknown section 'postgress' (did you mean 'postgres'?)",
    ]


def test_missing_dsn_is_required() -> None:
    assert problems_of(None) == ["postgres.dsn: required"]


@pytest.mark.parametrize("dsn", ["postgres://db/crm", "postgresql://u@db/crm", "host=db dbname=crm user=w"])
def test_dsn_accepts_uris_and_key_value_strings(dsn: str) -> None:
    assert load_settings(None, {"WEBHOOKD_POSTGRES__DSN": dsn}).postgres.dsn == dsn


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("1.5", 1.5), (" 7 ", 7.0)],
)
def test_parse_duration_understands_units_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5s", "5x", "s", "five", "1e3"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_bad_duration_is_named_by_key_and_position(tmp_path: Path) -> None:
    path = write(tmp_path, 'delivery:\n  timeout_seconds: 0\n  retry_schedule: ["5s", "5x", -1]\n')

    assert problems_of(path, DSN_ENV) == [
        "delivery.timeout_seconds: must be a duration > 0 such as '250ms', '5s', '5m', '2h', '1d' or seconds (got 0)",
        "delivery.retry_schedule[1]: must be a duration >= 0 such as '250ms', '5s', '5m', '2h', '1d' or seconds"
        " (got '5x')",
        "delivery.retry_schedule[2]: must be a duration >= 0 such as '250ms', '5s', '5m', '2h', '1d' or seconds"
        " (got -1)",
    ]


def test_empty_retry_schedule_means_no_retries(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "delivery:\n  retry_schedule: []\n"), DSN_ENV)

    assert settings.delivery.retry_schedule == ()


def test_cidrs_become_networks_and_bad_ones_are_named(tmp_path: Path) -> None:
    good = load_settings(None, {**DSN_ENV, "WEBHOOKD_EGRESS__ALLOWED_CIDRS": '["10.0.0.0/8", "fd00::/8"]'})
    path = write(tmp_path, 'egress:\n  allowed_cidrs: ["10.0.0.1/8", "nope"]\n')

    assert good.egress.allowed_cidrs == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert problems_of(path, DSN_ENV) == [
        "egress.allowed_cidrs[0]: host bits are set (got '10.0.0.1/8')",
        "egress.allowed_cidrs[1]: must be a CIDR such as 10.0.0.0/8 (got 'nope')",
    ]


@pytest.mark.parametrize(("listen", "host", "port"), [("[::]:9000", "::", 9000), ("127.0.0.1:0", "127.0.0.1", 0)])
def test_listen_gives_host_and_port(listen: str, host: str, port: int) -> None:
    settings = load_settings(None, {**DSN_ENV, "WEBHOOKD_HTTP__LISTEN": listen})

    assert (settings.http.host, settings.http.port) == (host, port)


@pytest.mark.parametrize("listen", ["9000", "::1:9000", "host:99999", ":9000", "host:"])
def test_bad_listen_is_refused(listen: str) -> None:
    [problem] = problems_of(None, {**DSN_ENV, "WEBHOOKD_HTTP__LISTEN": listen})

    assert problem.startswith("http.listen: must be host:port")


@pytest.mark.parametrize("table", ["core.web-hook", "a.b.c", "1table", "core.", 'core."webhook"'])
def test_bad_table_name_is_refused(table: str) -> None:
    [problem] = problems_of(None, {**DSN_ENV, "WEBHOOKD_POSTGRES__SUBSCRIPTIONS_TABLE": table})

    assert problem.startswith("postgres.subscriptions_table: must be table or schema.table")


def test_table_without_schema_is_quoted_alone() -> None:
    settings = load_settings(None, {**DSN_ENV, "WEBHOOKD_POSTGRES__SUBSCRIPTIONS_TABLE": "Hooks"})

    assert settings.postgres.subscriptions_table_sql == '"Hooks"'


def test_password_never_shows_in_repr_str_or_describe() -> None:
    settings = load_settings(None, DSN_ENV)

    for text in (repr(settings), str(settings), repr(settings.postgres), describe(settings)):
        assert "hunter2" not in text
        assert "webhookd:***@db.internal" in text
    assert settings.dump_redacted()["postgres"]["dsn"] == "postgresql://webhookd:***@db.internal:5432/twenty"
    assert settings.postgres.dsn == DSN


@pytest.mark.parametrize(
    "dsn",
    ["mysql://u:hunter2@db/x", "u:hunter2@db", "host=db password=hunter2 justaword", "host=db password='hunter2"],
)
def test_password_never_shows_in_errors(dsn: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"WEBHOOKD_POSTGRES__DSN": dsn})

    assert caught.value.problems[0].startswith("postgres.dsn: must be a postgresql:// URI")
    assert "hunter2" not in str(caught.value)


def test_password_in_a_misplaced_dsn_is_hidden_too(tmp_path: Path) -> None:
    path = write(tmp_path, f'postgres: "{DSN}"\n')

    assert problems_of(path) == [
        "postgres: must be a mapping of keys (got 'postgresql://webhookd:***@db.internal:5432/twenty')"
    ]


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://h/db?password=zz&sslmode=require", "postgresql://h/db?password=***&sslmode=require"),
        ("host=h password='a b' port=1", "host=h password=*** port=1"),
        ("postgresql://h:5432/db", "postgresql://h:5432/db"),
    ],
)
def test_redact_hides_only_passwords(text: str, hidden: str) -> None:
    assert redact(text) == hidden


def test_describe_is_yaml_that_loads_back_to_the_same_settings() -> None:
    settings = load_settings(CONFIG_DIR / "webhookd.yaml", DSN_ENV)

    data = yaml.safe_load(describe(settings))
    data["postgres"]["dsn"] = DSN

    assert Settings.model_validate(data) == settings


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, f"postgres:\n  dsn: {DSN}\nkafka:\n  topics: [a\n  group_id: x\n")

    [problem] = problems_of(path)

    assert problem.startswith(f"{path}:5:")
    assert "invalid YAML" in problem
    assert "line 4" in problem


def test_duplicate_key_is_an_error_not_a_silent_override(tmp_path: Path) -> None:
    path = write(tmp_path, "delivery:\n  concurrency: 1\n  concurrency: 2\n")

    assert problems_of(path, DSN_ENV) == [f"{path}:3:3: invalid YAML: duplicate key 'concurrency'"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "# sections\n- kafka\n- postgres\n")

    assert problems_of(path, DSN_ENV) == [f"{path}:2: the top level must be a mapping of sections (got list)"]


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    assert problems_of(path, DSN_ENV) == [f"{path}: cannot read: No such file or directory"]


def test_config_error_message_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "delivery:\n  concurrency: 0\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})

    assert caught.value.source == path
    assert str(caught.value).splitlines() == [
        f"invalid configuration in {path}:",
        "  postgres.dsn: required",
        "  delivery.concurrency: must be an integer >= 1 (got 0)",
    ]


def test_settings_are_frozen() -> None:
    settings = load_settings(None, DSN_ENV)

    with pytest.raises(ValueError, match="frozen"):
        settings.delivery.concurrency = 1  # type: ignore[misc]  # the assignment is what must fail


@pytest.mark.parametrize(
    ("yaml_text", "names", "says"),
    [
        ("kafka: {topic_pattern: '(?i)twenty\\..*'}", "kafka.topic_pattern", "scope them"),
        ("kafka: {topic_pattern: 'twenty.('}", "kafka.topic_pattern", "not a valid regular expression"),
        ("kafka: {topics: []}", "kafka.topics", "at least one topic unless kafka.topic_pattern"),
        ("kafka: {input_format: avro}", "kafka.input_format", "native, debezium"),
        ("delivery: {body_format: svix}", "delivery.body_format", "docs, twenty"),
        ("twenty: {snapshot_events: maybe}", "twenty.snapshot_events", "skip, created"),
    ],
)
def test_each_key_of_the_debezium_input_is_checked_with_a_message_naming_it(
    tmp_path: Path, yaml_text: str, names: str, says: str
) -> None:
    problems = problems_of(write(tmp_path, f"postgres: {{dsn: 'postgresql://db/twenty'}}\n{yaml_text}\n"))

    assert any(names in p and says in p for p in problems), problems


def test_a_topic_pattern_may_stand_alone() -> None:
    settings = Settings.model_validate(
        {
            "postgres": {"dsn": "postgresql://db/twenty"},
            "kafka": {"topics": [], "topic_pattern": r"twenty\.workspace_.*"},
        }
    )

    assert (settings.kafka.topics, settings.kafka.topic_pattern) == ((), r"twenty\.workspace_.*")


@pytest.mark.parametrize(
    ("yaml_text", "says"),
    [
        (
            "postgres: {dsn: 'postgresql://db/twenty'}\nendpoints: {attempt_log: everything}\n",
            "endpoints.attempt_log: must be one of full, compact, aggregate",
        ),
        (
            "postgres: {dsn: 'postgresql://db/twenty', attempts_dsn: 'mysql://u:hunter2@log/x'}\n",
            "postgres.attempts_dsn: must be a postgresql:// URI",
        ),
    ],
)
def test_the_attempt_log_keys_are_checked_with_a_message_naming_them(tmp_path: Path, yaml_text: str, says: str) -> None:
    problems = problems_of(write(tmp_path, yaml_text))

    assert any(p.startswith(says) for p in problems), problems
    assert not any("hunter2" in p for p in problems)


def test_the_attempt_log_is_compact_in_the_main_database_unless_told_otherwise() -> None:
    settings = load_settings(None, DSN_ENV)
    assert settings.endpoints.attempt_log == "compact"
    assert settings.postgres.attempt_log_dsn == DSN

    log_dsn = "postgresql://webhookd:hunter3@log.internal/attempts"
    settings = load_settings(None, {**DSN_ENV, "WEBHOOKD_POSTGRES__ATTEMPTS_DSN": log_dsn})
    assert settings.postgres.attempt_log_dsn == log_dsn
    for text in (repr(settings), describe(settings)):
        assert "hunter3" not in text
