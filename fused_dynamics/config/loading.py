"""Reading and validating a configuration file; one line per problem, naming the key."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import yaml
from pydantic import ValidationError

from .base import ConfigError, _key_part
from .model_keys import MODEL_TYPES
from .schema import STAGE_TYPES, RunConfig

__all__ = [
    "format_validation_error",
    "load_config",
    "read_config_file",
    "validate_config",
]


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
            data = yaml.safe_load(text)
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


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem: ``key: what is wrong (allowed values)``."""
    lines = [f"{source}: {exc.error_count()} problem(s):"]
    for err in exc.errors(include_url=False):
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
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)
