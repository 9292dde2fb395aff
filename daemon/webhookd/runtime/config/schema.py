"""The configuration's schema: one frozen pydantic model per section, `Settings` holding them, and `describe`.

Single values are checked by the types of `webhookd.runtime.config.values`; the rules that tie keys of a section
together (a certificate needs its key, a key unused by the chosen mode is refused) live here with their models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from webhookd.runtime.config.values import (
    _IDENTIFIER,
    _KEY_VALUE_DSN,
    _choice,
    _comma_list,
    _Count,
    _Delay,
    _File,
    _Flag,
    _fraction,
    _host_port,
    _integer,
    _Name,
    _Network,
    _optional,
    _pattern,
    _rate,
    _secret,
    _Server,
    _Size,
    _text,
    _Timeout,
    _Topic,
    _upper_choice,
    redact,
    split_host_port,
)

_COMBINATION = "combination"


def _combination_error(title: str, problems: list[tuple[str, str]]) -> ValidationError:
    # Raised from a model validator, a ValidationError's locations are kept below the section's, so each problem
    # names its own key (kafka.sasl_username) instead of the whole section; its input is never shown.
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(type=PydanticCustomError(_COMBINATION, message), loc=(key,), input=None)
            for key, message in problems
        ],
    )


def _pair(model: BaseModel, section: str, first: str, second: str) -> list[tuple[str, str]]:
    """A certificate needs its key and a key its certificate."""
    has_first, has_second = getattr(model, first) is not None, getattr(model, second) is not None
    if has_first and not has_second:
        return [(second, f"required with {section}.{first}")]
    if has_second and not has_first:
        return [(first, f"required with {section}.{second}")]
    return []


def _unused(model: BaseModel, keys: Iterable[str], used_when: str, now: str) -> list[tuple[str, str]]:
    """Keys given a value that the chosen mode would ignore: refused, so that a CA or password is never dropped.

    Defaults pass, so that a dump of the effective configuration (`describe`) still loads.
    """
    fields = type(model).model_fields
    return [
        (key, f"only used when {used_when} (it is {now})") for key in keys if getattr(model, key) != fields[key].default
    ]


_RESETS = ("earliest", "latest")
_INPUT_FORMATS = ("native", "debezium")
_BODY_FORMATS = ("docs", "twenty")
_SNAPSHOT_EVENTS = ("skip", "created")
_LEVELS = ("debug", "info", "warning", "error")
_SCHEMES = ("twenty", "standard-webhooks", "both")
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_VERIFYING_SSL_MODES = ("require", "verify-ca", "verify-full")


class _Section(BaseModel):
    # Inputs stay out of pydantic's own messages because they may hold a password; ours redact them.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


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


class PostgresSettings(_Section):
    """Where subscriptions and the daemon's own state live."""

    dsn: str
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
        if isinstance(value, str) and (re.match(r"postgres(ql)?://", value.strip()) or _KEY_VALUE_DSN.fullmatch(value)):
            return value.strip()
        raise ValueError("must be a postgresql:// URI or a key=value DSN such as 'host=db dbname=crm'")

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
            yield name, redact(value) if name == "dsn" else value


class DeliverySettings(_Section):
    """How webhooks are sent, retried and bounded."""

    concurrency: _Count = 256
    per_host_concurrency: _Count = 32
    timeout_seconds: _Timeout = 10.0
    retry_schedule: tuple[_Delay, ...] = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    retry_jitter: Annotated[float, BeforeValidator(_fraction)] = 0.2
    max_retry_after_seconds: _Timeout = 86400.0
    max_event_bytes: _Count = 1048576
    max_pending_deliveries: Annotated[int | None, BeforeValidator(_optional(_integer(1)))] = None
    response_body_limit_bytes: _Size = 4096
    retry_poll_interval_seconds: _Timeout = 1.0
    drain_timeout_seconds: _Delay = 20.0
    # An endpoint that answers nothing this long while it has requests in flight has its queue deferred (scheduler).
    host_wait_seconds: _Delay = 1.0
    host_busy_retry_seconds: _Timeout = 10.0
    signature_scheme: Annotated[Literal["twenty", "standard-webhooks", "both"], BeforeValidator(_choice(*_SCHEMES))] = (
        "twenty"
    )
    secret_rotation_overlap_seconds: _Delay = 86400.0
    # docs: {"event","data","timestamp"} as Twenty's documentation gives it; twenty: the body Twenty's server sends.
    body_format: Annotated[Literal["docs", "twenty"], BeforeValidator(_choice(*_BODY_FORMATS))] = "docs"
    # Receivers are always verified; this bundle is trusted in addition to the system's CAs (webhookd.tls).
    ca_file: _File = None

    @property
    def effective_max_pending_deliveries(self) -> int:
        """The configured bound, or four times `concurrency` when none is set."""
        return self.max_pending_deliveries or 4 * self.concurrency


class EndpointSettings(_Section):
    """How sick receivers are treated: the circuit breaker, rate limits, auto-disable and the attempt log."""

    # The breaker opens when, within the window, at least `circuit_min_requests` attempts were made and this
    # fraction of them failed (timeout, connection error, 5xx, 429).
    circuit_failure_ratio: Annotated[float, BeforeValidator(_fraction)] = 0.7
    circuit_min_requests: _Count = 20
    circuit_window_seconds: _Timeout = 60.0
    # This many timeouts or connection errors in a row open it too: a hanging receiver answers too rarely to fill a
    # window.
    circuit_consecutive_failures: _Count = 5
    # Open for this long, then one probe; each failed probe doubles it, up to the maximum.
    circuit_cooldown_seconds: _Timeout = 30.0
    circuit_max_cooldown_seconds: _Timeout = 600.0
    # Deliveries a second to one endpoint from the whole cluster (webhookd.pacing); unset is unlimited.
    # `webhookd endpoints limit` overrides it per webhook.
    rate_limit_per_second: Annotated[float | None, BeforeValidator(_optional(_rate))] = None
    # Disabled after failing this long without one success (410 Gone disables at once); 0 never disables.
    disable_after_seconds: _Delay = 432000.0
    attempt_log_retention_seconds: _Timeout = 1209600.0
    # How often health is shared with Postgres (and so with replicas and `webhookd endpoints list`).
    sync_interval_seconds: _Timeout = 2.0

    @model_validator(mode="after")
    def _check_cooldowns(self) -> Self:
        if self.circuit_max_cooldown_seconds < self.circuit_cooldown_seconds:
            raise _combination_error(
                type(self).__name__,
                [("circuit_max_cooldown_seconds", "must be at least endpoints.circuit_cooldown_seconds")],
            )
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


class EgressSettings(_Section):
    """Which destination addresses deliveries may reach."""

    allow_private: _Flag = False
    allowed_cidrs: tuple[_Network, ...] = ()
    https_only: _Flag = False


class HttpSettings(_Section):
    """The daemon's own endpoints: /metrics, /healthz, /readyz."""

    listen: Annotated[str, BeforeValidator(_host_port(allow_port_zero=True))] = "0.0.0.0:9000"

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]


class LoggingSettings(_Section):
    """Log verbosity and shape."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_choice(*_LEVELS))] = "info"
    format: Annotated[Literal["json", "console"], BeforeValidator(_choice("json", "console"))] = "json"


class Settings(_Section):
    """The whole validated configuration."""

    kafka: KafkaSettings = KafkaSettings()
    postgres: PostgresSettings
    delivery: DeliverySettings = DeliverySettings()
    endpoints: EndpointSettings = EndpointSettings()
    twenty: TwentySettings = TwentySettings()
    egress: EgressSettings = EgressSettings()
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()

    def dump_redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, for printing: passwords are `***`."""
        data = self.model_dump(mode="json")
        data["postgres"]["dsn"] = redact(data["postgres"]["dsn"])
        if self.kafka.sasl_password is not None:
            data["kafka"]["sasl_password"] = "***"
        return data


def describe(settings: Settings) -> str:
    """The effective configuration as YAML, passwords redacted; durations are shown in seconds."""
    return yaml.safe_dump(settings.dump_redacted(), sort_keys=False)


_SECTIONS: dict[str, type[BaseModel]] = {
    "kafka": KafkaSettings,
    "postgres": PostgresSettings,
    "delivery": DeliverySettings,
    "endpoints": EndpointSettings,
    "twenty": TwentySettings,
    "egress": EgressSettings,
    "http": HttpSettings,
    "logging": LoggingSettings,
}
