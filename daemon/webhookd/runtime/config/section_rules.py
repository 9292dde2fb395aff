"""What every configuration section shares: a frozen model refusing unknown keys and keeping inputs out of messages,
and the way a rule that ties keys of one section together reports what breaks it, each problem under its own key.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

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


class _Section(BaseModel):
    # Inputs stay out of pydantic's own messages because they may hold a password; ours redact them.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)
