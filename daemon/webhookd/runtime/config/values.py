"""What a valid configuration value is: the checks behind every key, and DSN password redaction.

Each check turns a raw YAML or environment value into the typed value or raises ValueError with a message a user
can act on; the `Annotated` types below attach them to the fields of the section models (`*_settings`). `redact` hides
Postgres DSN passwords wherever text might reach a repr, an error or `describe`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BeforeValidator, SecretStr

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


def _rate(value: object) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise ValueError("must be a number of deliveries per second > 0, such as 50 or 0.5")


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


def _pattern(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a regular expression such as 'twenty\\.workspace_.*'")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None
    try:
        # The daemon matches it whole, inside a group of its own: a flag for the whole expression, such as a
        # leading (?i), cannot stand there.
        re.compile(f"(?:{value})\\Z")
    except re.error:
        raise ValueError("must not set flags for the whole expression; scope them, as in '(?i:twenty)\\..*'") from None
    return value


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


_Count = Annotated[int, BeforeValidator(_integer(1))]
_Size = Annotated[int, BeforeValidator(_integer(0))]
_Delay = Annotated[float, BeforeValidator(_duration(positive=False))]
_Timeout = Annotated[float, BeforeValidator(_duration(positive=True))]
_Name = Annotated[str, BeforeValidator(_text)]
_Flag = Annotated[bool, BeforeValidator(_boolean)]
_Server = Annotated[str, BeforeValidator(_host_port(allow_port_zero=False))]
_Topic = Annotated[str, BeforeValidator(_topic)]
_Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_cidr)]
_File = Annotated[str | None, BeforeValidator(_optional(_readable_file))]
