"""Where configuration values come from: the YAML file, WEBHOOKD_<SECTION>__<KEY> overrides, `load_settings`.

The file is read with line numbers for its errors and refuses a key given twice; each override is checked against
the schema's sections and keys; pydantic's errors become one `path.to.key: what is wrong (got <value>)` line each,
gathered into a single `ConfigError`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import SecretStr, ValidationError

from webhookd.runtime.config.schema import _SECTIONS, Settings
from webhookd.runtime.config.section_rules import _COMBINATION
from webhookd.runtime.config.values import redact

ENV_PREFIX = "WEBHOOKD_"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str], source: Path | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source is not None else ""
        super().__init__(f"invalid configuration{where}:\n" + "\n".join(f"  {p}" for p in problems))


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
