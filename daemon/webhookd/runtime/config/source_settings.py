"""The sections for what the daemon reads: Kafka (and how Debezium's records become Twenty's events) and Postgres.

Both connections carry transport security whose keys go together (a certificate needs its key, a SASL password
needs SASL); the rules that tie them are checked here with their models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from webhookd.runtime.config.section_rules import _combination_error, _pair, _Section, _unused
from webhookd.runtime.config.values import (
    _IDENTIFIER,
    _KEY_VALUE_DSN,
    _choice,
    _comma_list,
    _Count,
    _File,
    _Flag,
    _Name,
    _optional,
    _pattern,
    _secret,
    _Server,
    _text,
    _Timeout,
    _Topic,
    _upper_choice,
    redact,
)

_RESETS = ("earliest", "latest")
_INPUT_FORMATS = ("native", "debezium")
_SNAPSHOT_EVENTS = ("skip", "created")
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_VERIFYING_SSL_MODES = ("require", "verify-ca", "verify-full")


class KafkaSettings(_Section):
    """Where events come from and how the consumer group behaves."""

    bootstrap_servers: Annotated[tuple[_Server, ...], BeforeValidator(_comma_list), Field(min_length=1)] = (
        "localhost:9092",
    )
    topics: tuple[_Topic, ...] = ("crm.events",)
    # Every topic whose whole name matches is consumed as well, including topics created later (Debezium writes
    # one topic per table).
    topic_pattern: Annotated[str | None, BeforeValidator(_optional(_pattern))] = None
    input_format: Annotated[Literal["native", "debezium"], BeforeValidator(_choice(*_INPUT_FORMATS))] = "native"
    # How often the cluster's topics are listed again: the longest a new topic waits to be matched.
    metadata_max_age_ms: _Count = 30000
    group_id: _Name = "webhookd"
    group_instance_id: Annotated[str | None, BeforeValidator(_optional(_text))] = None
    client_id: _Name = "webhookd"
    auto_offset_reset: Annotated[Literal["earliest", "latest"], BeforeValidator(_choice(*_RESETS))] = "earliest"
    session_timeout_ms: _Count = 10000
    commit_interval_ms: _Count = 500
    max_poll_records: _Count = 500
    # How long a fetch may wait at the broker for records; brokers that do not answer early when records arrive
    # (Tansu) add up to this much latency to every event.
    fetch_max_wait_ms: _Count = 500
    # Transport security of the connections to the brokers; webhookd.tls turns these into aiokafka's arguments.
    security_protocol: Annotated[
        Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], BeforeValidator(_upper_choice(*_PROTOCOLS))
    ] = "PLAINTEXT"
    sasl_mechanism: Annotated[
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"], BeforeValidator(_upper_choice(*_MECHANISMS))
    ] = "PLAIN"
    sasl_username: Annotated[str | None, BeforeValidator(_optional(_text))] = None
    sasl_password: Annotated[SecretStr | None, BeforeValidator(_secret)] = None
    ssl_ca_file: _File = None
    ssl_cert_file: _File = None
    ssl_key_file: _File = None
    ssl_check_hostname: _Flag = True

    @model_validator(mode="after")
    def _check_security(self) -> Self:
        protocol = self.security_protocol
        problems: list[tuple[str, str]] = []
        if not self.topics and self.topic_pattern is None:
            problems.append(("topics", "must name at least one topic unless kafka.topic_pattern is set"))
        if protocol.startswith("SASL_"):
            problems += [
                (key, f"required when kafka.security_protocol is {protocol}")
                for key in ("sasl_username", "sasl_password")
                if getattr(self, key) is None
            ]
        else:
            sasl_keys = ("sasl_mechanism", "sasl_username", "sasl_password")
            problems += _unused(self, sasl_keys, "kafka.security_protocol is SASL_PLAINTEXT or SASL_SSL", protocol)
        if protocol.endswith("SSL"):
            problems += _pair(self, "kafka", "ssl_cert_file", "ssl_key_file")
        else:
            ssl_keys = ("ssl_ca_file", "ssl_cert_file", "ssl_key_file", "ssl_check_hostname")
            problems += _unused(self, ssl_keys, "kafka.security_protocol is SSL or SASL_SSL", protocol)
        if problems:
            raise _combination_error(type(self).__name__, problems)
        return self


class TwentySettings(_Section):
    """How Debezium's change records of Twenty's database become Twenty's events (kafka.input_format: debezium)."""

    # Rows read by Debezium's initial snapshot: skipped, or delivered as `<object>.created`.
    snapshot_events: Annotated[Literal["skip", "created"], BeforeValidator(_choice(*_SNAPSHOT_EVENTS))] = "skip"
    # What the connector writes for a value it does not have (its `unavailable.value.placeholder`); never delivered.
    unavailable_value_placeholder: Annotated[str, BeforeValidator(_text)] = "__debezium_unavailable_value"
    # How often the object and field metadata of the workspaces seen so far is compared with Twenty's tables; a
    # table or column not known yet is looked up at once, whatever this says.
    metadata_refresh_seconds: _Timeout = 10.0


class PostgresSettings(_Section):
    """Where subscriptions and the daemon's own state live."""

    dsn: str
    # The attempt log's own database, so that its writes leave the one holding Twenty's tables and the retry queue
    # alone (see the README's sizing); unset, the attempt log lives in `dsn`'s. The TLS settings below apply to both.
    attempts_dsn: str | None = None
    subscriptions_table: str = "core.webhook"
    pool_size: _Count = 10
    subscriptions_refresh_seconds: _Timeout = 30.0
    # Unset, the DSN's sslmode, sslrootcert, sslcert and sslkey apply as asyncpg reads them; set, these build the
    # TLS settings of every connection instead (webhookd.tls).
    ssl_mode: Annotated[
        Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None,
        BeforeValidator(_optional(_choice(*_SSL_MODES))),
    ] = None
    ssl_ca_file: _File = None
    ssl_cert_file: _File = None
    ssl_key_file: _File = None

    @model_validator(mode="after")
    def _check_ssl(self) -> Self:
        problems = _pair(self, "postgres", "ssl_cert_file", "ssl_key_file")
        if self.ssl_mode not in _VERIFYING_SSL_MODES:
            problems += _unused(
                self,
                ("ssl_ca_file", "ssl_cert_file", "ssl_key_file"),
                "postgres.ssl_mode is require, verify-ca or verify-full",
                self.ssl_mode or "not set",
            )
        if problems:
            raise _combination_error(type(self).__name__, problems)
        return self

    @field_validator("dsn", mode="before")
    @classmethod
    def _check_dsn(cls, value: object) -> str:
        if value is None or value == "":
            raise ValueError("required")
        return _dsn(value)

    @field_validator("attempts_dsn", mode="before")
    @classmethod
    def _check_attempts_dsn(cls, value: object) -> str | None:
        return None if value is None or value == "" else _dsn(value)

    @property
    def attempt_log_dsn(self) -> str:
        """Where the attempt log lives."""
        return self.attempts_dsn or self.dsn

    @field_validator("subscriptions_table", mode="before")
    @classmethod
    def _check_table(cls, value: object) -> str:
        parts = value.split(".") if isinstance(value, str) else []
        if 1 <= len(parts) <= 2 and all(_IDENTIFIER.fullmatch(p) for p in parts):
            return str(value)
        raise ValueError("must be table or schema.table, each name of letters, digits and '_'")

    @property
    def subscriptions_table_sql(self) -> str:
        """The table name quoted for SQL, '"core"."webhook"'; quoting keeps each name exactly as written."""
        return ".".join(f'"{part}"' for part in self.subscriptions_table.split("."))

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact(value) if name in ("dsn", "attempts_dsn") and value else value


def _dsn(value: object) -> str:
    if isinstance(value, str) and (re.match(r"postgres(ql)?://", value.strip()) or _KEY_VALUE_DSN.fullmatch(value)):
        return value.strip()
    raise ValueError("must be a postgresql:// URI or a key=value DSN such as 'host=db dbname=crm'")
