"""The configuration's schema as a whole: `Settings` holding one model per section, the sections by name, `describe`.

Single values are checked by the types of `webhookd.runtime.config.values`; each section's model, with the rules
that tie its keys together, lives with its kind: `source_settings`, `delivery_settings`, `daemon_settings`.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from webhookd.runtime.config.daemon_settings import HttpSettings, LoggingSettings
from webhookd.runtime.config.delivery_settings import DeliverySettings, EgressSettings, EndpointSettings
from webhookd.runtime.config.section_rules import _Section
from webhookd.runtime.config.source_settings import KafkaSettings, PostgresSettings, TwentySettings
from webhookd.runtime.config.values import redact


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
        if self.postgres.attempts_dsn is not None:
            data["postgres"]["attempts_dsn"] = redact(data["postgres"]["attempts_dsn"])
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
