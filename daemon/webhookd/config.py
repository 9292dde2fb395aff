"""Configuration: the YAML file, its environment overrides and their validation.

`load_settings` turns a file plus `WEBHOOKD_<SECTION>__<KEY>` variables into a frozen `Settings`, or raises
`ConfigError` listing every problem at once, each as `path.to.key: what is wrong (got <value>)`, so that an
operator fixes a file in one pass. Passwords in the Postgres DSN never reach a repr, an error or `describe`.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar, get_origin

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

__all__ = [
    "ConfigError",
    "DeliverySettings",
    "EgressSettings",
    "HttpSettings",
    "KafkaSettings",
    "LoggingSettings",
    "PostgresSettings",
    "Settings",
    "describe",
    "load_settings",
    "parse_duration",
    "redact",
    "split_host_port",
]

ENV_PREFIX = "WEBHOOKD_"
_T = TypeVar("_T")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_KEY_VALUE = r"\w+\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']+)"
# Pairs need whitespace between them so that the pattern cannot backtrack exponentially on a long bad value.
_KEY_VALUE_DSN = re.compile(rf"\s*{_KEY_VALUE}(?:\s+{_KEY_VALUE})*\s*")
# "user:password@", with or without a scheme before it; the password runs to the last "@" of its line because
# users paste passwords with an unencoded "@" or a space in them: hiding too much beats showing a password.
_USERINFO_PASSWORD = re.compile(r"((?:^|[\s'\"]|://)[^\s:/@'\"]*:)(?!//)[^\n]*(@)")
# An unterminated quote hides the rest of the text: better too much hidden than a password shown.
_PARAM_PASSWORD = re.compile(
    r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|(?:\\.|[^\s&'\"\\])+)", re.IGNORECASE
)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str], source: Path | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source is not None else ""
        super().__init__(f"invalid configuration{where}:\n" + "\n".join(f"  {p}" for p in problems))


def redact(text: str) -> str:
    """Return `text` with any DSN password, in URI or key=value form, replaced by `***`."""
    return _PARAM_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1***\2", text))


def parse_duration(text: str) -> float:
    """Return the seconds in "250ms", "5s", "5m", "2h", "1d" or a plain number; raise ValueError if not."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match[1]) * _UNIT_SECONDS[match[2] or "s"]


# Validators run before pydantic's own so that each key gets a message a user can act on, and so that
# booleans, which Python counts as integers, are never taken for numbers.


def _integer(minimum: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        raise ValueError(f"must be an integer >= {minimum}")

    return check


def _duration(positive: bool) -> Callable[[object], float]:
    def check(value: object) -> float:
        seconds = math.nan
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):  # falls through to the message below
                seconds = parse_duration(value)
        if math.isfinite(seconds) and (seconds > 0 or (seconds == 0 and not positive)):
            return seconds
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"must be a duration {bound} such as '250ms', '5s', '5m', '2h', '1d' or seconds")

    return check


def _fraction(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise ValueError("must be a number from 0 to 1")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("must be true or false")


def _text(value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError("must be a non-empty string")


def _choice(*options: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        raise ValueError(f"must be one of {', '.join(options)}")

    return check


def _optional(check: Callable[[object], _T]) -> Callable[[object], _T | None]:
    def maybe(value: object) -> _T | None:
        return None if value is None or value == "" else check(value)

    return maybe


def split_host_port(text: str) -> tuple[str, int]:
    """Split "host:port" or "[v6address]:port"; ValueError if it is neither."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("must be host:port, with an IPv6 address in brackets as in [::1]:9000")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be host:port with a port from 0 to 65535")
    return host, int(port)


def _host_port(allow_port_zero: bool) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("must be host:port, as a string")
        _, port = split_host_port(value)
        if port == 0 and not allow_port_zero:
            raise ValueError("must be host:port with a port from 1 to 65535")
        return value.strip()

    return check


def _comma_list(value: object) -> object:
    return [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value


def _topic(value: object) -> str:
    if isinstance(value, str) and _TOPIC.fullmatch(value) and value not in (".", ".."):
        return value
    raise ValueError("must be a Kafka topic name: 1 to 249 of letters, digits, '.', '_', '-'")


def _cidr(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value.strip() if isinstance(value, str) else "", strict=True)
    except ValueError as exc:
        reason = "host bits are set" if "host bits" in str(exc) else "must be a CIDR such as 10.0.0.0/8"
        raise ValueError(reason) from None


def _upper_choice(*options: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and value.strip().upper() in options:
            return value.strip().upper()
        raise ValueError(f"must be one of {', '.join(options)}")

    return check


def _readable_file(value: object) -> str:
    # Checked here so that check-config catches a wrong mount path before a start does; whether the content is a
    # usable certificate or key is only known when it is loaded, at startup.
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a file path")
    path = Path(value.strip())
    if not path.exists():
        raise ValueError("no such file")
    if not path.is_file():
        raise ValueError("not a regular file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    return str(path)


def _secret(value: object) -> SecretStr | None:
    # Kept verbatim, surrounding spaces included: a password is whatever the server holds, not a name to tidy.
    if value is None or value == "":
        return None
    if isinstance(value, SecretStr):
        return value
    if isinstance(value, str):
        return SecretStr(value)
    raise ValueError("must be a string (quote it in YAML)")


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


_Count = Annotated[int, BeforeValidator(_integer(1))]
_Size = Annotated[int, BeforeValidator(_integer(0))]
_Delay = Annotated[float, BeforeValidator(_duration(positive=False))]
_Timeout = Annotated[float, BeforeValidator(_duration(positive=True))]
_Name = Annotated[str, BeforeValidator(_text)]
_Flag = Annotated[bool, BeforeValidator(_boolean)]
_RESETS = ("earliest", "latest")
_LEVELS = ("debug", "info", "warning", "error")
_SCHEMES = ("twenty", "standard-webhooks", "both")
_Server = Annotated[str, BeforeValidator(_host_port(allow_port_zero=False))]
_Topic = Annotated[str, BeforeValidator(_topic)]
_Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_cidr)]
_File = Annotated[str | None, BeforeValidator(_optional(_readable_file))]
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
    topics: Annotated[tuple[_Topic, ...], Field(min_length=1)] = ("crm.events",)
    group_id: _Name = "webhookd"
    group_instance_id: Annotated[str | None, BeforeValidator(_optional(_text))] = None
    client_id: _Name = "webhookd"
    auto_offset_reset: Annotated[Literal["earliest", "latest"], BeforeValidator(_choice(*_RESETS))] = "earliest"
    session_timeout_ms: _Count = 10000
    commit_interval_ms: _Count = 500
    max_poll_records: _Count = 500
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
    signature_scheme: Annotated[Literal["twenty", "standard-webhooks", "both"], BeforeValidator(_choice(*_SCHEMES))] = (
        "twenty"
    )
    secret_rotation_overlap_seconds: _Delay = 86400.0
    # Receivers are always verified; this bundle is trusted in addition to the system's CAs (webhookd.tls).
    ca_file: _File = None

    @property
    def effective_max_pending_deliveries(self) -> int:
        """The configured bound, or four times `concurrency` when none is set."""
        return self.max_pending_deliveries or 4 * self.concurrency


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
    "egress": EgressSettings,
    "http": HttpSettings,
    "logging": LoggingSettings,
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping, where the later would silently win."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key_node.value)
    return dict(loader.construct_mapping(node, deep=True))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read: {reason}"], path) from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = ""
        if exc.context and exc.context_mark and exc.context_mark is not mark:
            context = f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError([f"{where}: invalid YAML: {exc.problem}{context}"], path) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"], path) from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        kind = type(data).__name__
        raise ConfigError([f"{path}:{line}: the top level must be a mapping of sections (got {kind})"], path)
    return data


_Origin = dict[tuple[str, str], str]  # (section, key) -> the variable that set it


def _apply_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> tuple[list[str], _Origin]:
    problems: list[str] = []
    origin: _Origin = {}
    typos = {f"{s}_{k}": f"{ENV_PREFIX}{s}__{k}".upper() for s, m in _SECTIONS.items() for k in m.model_fields}
    for var in sorted(environ):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if "__" not in name:
            # Other WEBHOOKD_ variables, such as the tests' WEBHOOKD_TEST_KAFKA, are not overrides, but one
            # that names a key after a single "_" is a typo that would otherwise be silently ignored.
            if name in typos:
                problems.append(f"{var}: not an override; did you mean {typos[name]}?")
            continue
        section, _, key = name.partition("__")
        if section not in _SECTIONS:
            problems.append(f"{var}: unknown section {section!r}{_suggest(section, _SECTIONS)}")
            continue
        known = _SECTIONS[section].model_fields
        if key not in known:
            problems.append(f"{var}: unknown key {key!r} in {section}{_suggest(key, known)}")
            continue
        if (section, key) in origin:
            problems.append(f"{var}: sets {section}.{key} again after {origin[section, key]}")
            continue
        value: object = environ[var]
        if not _is_text(known[key].annotation):
            # A text key keeps the variable verbatim: YAML would cut a DSN at " #" or read "a: b" as a mapping.
            with contextlib.suppress(yaml.YAMLError):  # not YAML: the text itself is the value
                value = yaml.safe_load(environ[var])
        target = data.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value
            origin[section, key] = var
    return problems, origin


def _is_text(annotation: object) -> bool:
    return annotation in (str, str | None, SecretStr | None) or get_origin(annotation) is Literal


def _suggest(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_MESSAGES = {
    "missing": "required",
    "model_type": "must be a mapping of keys",
    "tuple_type": "must be a list",
    "too_short": "must not be empty",
    "string_type": "must be a string",
}


_SECRET_KEYS = {("kafka", "sasl_password")}  # their values never reach an error message


def _problem(error: Mapping[str, Any], origin: _Origin) -> str:
    loc = error["loc"]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if error["type"] == "extra_forbidden":
        known = _SECTIONS[loc[0]].model_fields if len(loc) == 2 and loc[0] in _SECTIONS else _SECTIONS
        what = "unknown section" if len(loc) == 1 else "unknown key"
        return f"{path}: {what}{_suggest(str(loc[-1]), known)}"
    if error["type"] == _COMBINATION:
        return f"{path}: {error['msg']}"
    if error["type"] == "value_error":
        message = str(error["ctx"]["error"])
    else:
        message = _MESSAGES.get(error["type"], error["msg"][:1].lower() + error["msg"][1:])
    if message == "required":
        return f"{path}: required"
    shown = "***" if tuple(loc[:2]) in _SECRET_KEYS else redact(repr(error["input"]))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    source = f" from {origin[loc[0], loc[1]]}" if tuple(loc[:2]) in origin else ""
    return f"{path}: {message} (got {shown}{source})"


def load_settings(path: Path | None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Read `path` (None: defaults only), apply WEBHOOKD_<SECTION>__<KEY> overrides and validate."""
    data = _read_file(path) if path is not None else {}
    for section in _SECTIONS:
        if data.get(section) is None:
            data[section] = {}  # so that a missing section reports "postgres.dsn: required", not "postgres"
    problems, origin = _apply_overrides(data, environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems += [_problem(error, origin) for error in exc.errors(include_url=False)]
        raise ConfigError(problems, path) from None
    if problems:
        raise ConfigError(problems, path)
    return settings
