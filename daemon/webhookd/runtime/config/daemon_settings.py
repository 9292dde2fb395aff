"""The sections for the daemon's own surface: where its HTTP endpoints listen, and how verbose and shaped its
logs are."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator

from webhookd.runtime.config.section_rules import _Section
from webhookd.runtime.config.values import _choice, _host_port, split_host_port

_LEVELS = ("debug", "info", "warning", "error")


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
