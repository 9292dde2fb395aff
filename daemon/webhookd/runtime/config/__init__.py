"""Configuration: the YAML file, its environment overrides and their validation.

`load_settings` turns a file plus `WEBHOOKD_<SECTION>__<KEY>` variables into a frozen `Settings`, or raises
`ConfigError` listing every problem at once, each as `path.to.key: what is wrong (got <value>)`, so that an
operator fixes a file in one pass. Passwords in the Postgres DSN never reach a repr, an error or `describe`.

- `values`: what a valid value is (durations, counts, host:port, CIDRs, files, choices, secrets) and `redact`.
- `section_rules`: what every section model shares, and how a rule tying keys of a section together reports.
- `source_settings`, `delivery_settings`, `daemon_settings`: the section models, grouped by what they configure.
- `schema`: `Settings` holding the sections, and `describe`.
- `loading`: reading the YAML file, applying the overrides, turning errors into lines; `load_settings`.
"""

from webhookd.runtime.config.daemon_settings import HttpSettings, LoggingSettings
from webhookd.runtime.config.delivery_settings import DeliverySettings, EgressSettings, EndpointSettings
from webhookd.runtime.config.loading import ConfigError, load_settings
from webhookd.runtime.config.schema import Settings, describe
from webhookd.runtime.config.source_settings import KafkaSettings, PostgresSettings
from webhookd.runtime.config.values import parse_duration, redact, split_host_port

__all__ = [
    "ConfigError",
    "DeliverySettings",
    "EgressSettings",
    "EndpointSettings",
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
