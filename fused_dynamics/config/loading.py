"""Reading and validating a configuration file; one line per problem, naming the key."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from .base import ConfigError, _key_part, config_sections
from .model_keys import MODEL_TYPES, ModelConfig
from .schema import STAGE_TYPES, RunConfig, StageConfig

__all__ = [
    "format_validation_error",
    "load_config",
    "read_config_file",
    "validate_config",
]


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading ``1e-6`` as a number, as YAML 1.2 and TOML do (YAML 1.1,
    which PyYAML follows, needs a dot: ``1.0e-6``; strict types would then refuse a string)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file {os.fspath(p)!r} does not exist.")
    suffix = p.suffix.lower()
    text = p.read_text()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    elif suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - a safe loader
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    else:
        raise ConfigError(
            f"{p}: unknown configuration format {suffix!r}; allowed: .toml, .yaml, .yml"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a table of keys, got {type(data).__name__}.")
    return data


def validate_config(
    data: dict, base_dir: str | os.PathLike = ".", source: str = "config"
) -> RunConfig:
    """Validate a parsed configuration; raise :class:`ConfigError` naming every bad key."""
    try:
        return RunConfig.model_validate(data, context={"base_dir": os.fspath(base_dir)})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | os.PathLike) -> tuple[RunConfig, Path]:
    """Read and validate a configuration file.

    Returns
    -------
    config : RunConfig
    base_dir : Path
        The folder relative paths in the configuration are resolved against.
    """
    data = read_config_file(path)
    base = Path(path).resolve().parent
    return validate_config(data, base, source=os.fspath(path)), base


def _loc(loc: tuple) -> str:
    """``('stages', 1, 'nvt_langevin', 'dt')`` -> ``stages[1].dt`` (union tags dropped)."""
    out = ""
    skip = set(STAGE_TYPES) | set(MODEL_TYPES) | {"function-after[_one_source(), StructuresConfig]"}
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in skip or str(part).startswith(("function-", "lax-or-strict")):
            continue
        elif part == "[key]":  # a key of a table (model.pairs) that is itself wrong
            continue
        else:
            out += ("." if out else "") + (_key_part(part) if out.endswith("pairs") else str(part))
    return out or "(top level)"


# the members of a union a key allows, as pydantic names them in an error's location
_MEMBERS = {"constrained-float", "constrained-int", "float", "int", "bool", "str", "InfoValue"}


def _one_member(errors: list) -> list:
    """A value a union refused is reported as the member it was meant for: ``{info = ...}``
    (a table) as an :class:`InfoValue`, anything else as the number or string; the member's
    name is dropped from the location."""
    groups: dict[tuple, list] = {}  # the union errors of one key
    order: list = []
    for err in errors:
        loc = tuple(err["loc"])
        members = [  # the member's name ends the location, or heads an InfoValue's keys
            i
            for i, part in enumerate(loc)
            if part in _MEMBERS and (i == len(loc) - 1 or part == "InfoValue")
        ]
        if not members:
            order.append(err)
            continue
        i = members[-1]
        meant = (loc[i] == "InfoValue") == (isinstance(err.get("input"), dict) or len(loc) > i + 1)
        key = loc[:i]
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((meant, {**err, "loc": loc[:i] + loc[i + 1 :]}))
    out = []
    for item in order:
        if isinstance(item, dict):
            out.append(item)
            continue
        found = groups[item]
        kept = [e for meant, e in found if meant] or [e for _, e in found]
        out += kept  # the member meant; every member's when none was meant
    return out


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem: ``key: what is wrong (allowed values)``."""
    errors = _one_member(exc.errors(include_url=False))
    lines = [f"{source}: {len(errors)} problem(s):"]
    for err in errors:
        where = _loc(err["loc"])
        kind = err["type"]
        msg = err["msg"]
        if kind == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag")
            allowed = STAGE_TYPES if where.startswith("stages") else MODEL_TYPES
            what = "stage" if where.startswith("stages") else "model"
            msg = f"unknown {what} {tag!r}; allowed: {', '.join(allowed)}"
            where += ".type"
        elif kind == "union_tag_not_found":
            allowed = STAGE_TYPES if where.startswith("stages") else MODEL_TYPES
            msg = f"missing 'type'; allowed: {', '.join(allowed)}"
            where += ".type"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "extra_forbidden":
            msg = "unknown key"
        elif kind.startswith("literal_error"):
            msg = f"{msg}, got {err.get('input')!r}"
        elif kind == "value_error":
            msg = msg.removeprefix("Value error, ")
            if msg.startswith("@"):  # "@sub.key: what": the key below the failing section
                sub, _, msg = msg[1:].partition(": ")
                where = f"{where}.{sub}" if where != "(top level)" else sub
        elif kind in _EXPECTED:
            msg = _type_message(kind, err.get("input"), err["loc"])
        elif kind in _BOUNDS:
            info = _field_at(err["loc"])
            about = f" ({info.description})" if info is not None and info.description else ""
            limit = next(iter(err.get("ctx", {}).values()), "?")
            limit = f"{limit:g}" if isinstance(limit, float) else limit
            msg = f"must be {_BOUNDS[kind]} {limit}{about}, got {_written(err.get('input'))}"
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_EXPECTED = {
    "float_type": "a number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "bool_type": "true or false",
    "string_type": "a string (in quotes)",
}


_TAGGED = {
    c.model_fields["type"].annotation.__args__[0]: c
    for c in config_sections(StageConfig) + config_sections(ModelConfig)
}


def _field_at(loc: tuple) -> FieldInfo | None:
    """The field an error location points to (None when it is not a key of the schema)."""
    classes: list[type[BaseModel]] = [RunConfig]
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if part in _TAGGED and _TAGGED[part] in classes:
            classes = [_TAGGED[part]]
            continue
        found = [c.model_fields[part] for c in classes if part in c.model_fields]
        if not found:  # a key of a table (model.pairs."Ar-Kr"), or not in the schema
            info = None
            continue
        info = found[0]
        classes = config_sections(info.annotation)
    return info


def _written(value) -> str:
    """A value as it is written in the file (TOML spelling)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _type_message(kind: str, value, loc: tuple) -> str:
    """``must be a number (fs: time step), got "5" (a string): write 5 without quotes``."""
    info = _field_at(loc)
    about = f" ({info.description})" if info is not None and info.description else ""
    what = f"must be {_EXPECTED[kind]}{about}, got {_written(value)}"
    if isinstance(value, bool) and kind != "bool_type":
        return f"{what} (a boolean); booleans are not taken for numbers: write the number"
    if isinstance(value, str) and kind in ("float_type", "int_type", "int_from_float"):
        try:
            number = float(value)
        except ValueError:
            return f"{what} (a string); write a number"
        if kind != "float_type" and math.isfinite(number) and number == int(number):
            shown = str(int(number))
        elif kind == "float_type":
            shown = value.strip()
        else:
            return f"{what} (a string); write a whole number without quotes"
        return f"{what} (a string); strings are not taken for numbers: write {shown} without quotes"
    if isinstance(value, float) and kind in ("int_type", "int_from_float"):
        whole = math.isfinite(value) and value == int(value)
        return f"{what}; write {int(value) if whole else 'a whole number'} (no decimal point)"
    return what
