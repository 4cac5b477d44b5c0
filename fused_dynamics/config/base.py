"""The configuration layer's base: :class:`ConfigError`, sections that refuse unknown keys.

Nothing here imports the engine, the application service or the command line.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["ConfigError", "output_format"]


class ConfigError(ValueError):
    """A configuration (or its input files) cannot be used; the message says what to fix."""


class _Section(BaseModel):
    """A section of the configuration: unknown keys are errors that list the allowed keys.

    Types are strict (pydantic's strict mode): a boolean or a string is never taken for a
    number (``cutoff = true`` and ``cutoff = "7.5"`` are refused, naming the key), a float is
    never truncated to an integer; an integer is a valid float. No number of a configuration is
    infinite or NaN (``initial_temperature = inf`` passed ``--validate-only`` and failed the
    run).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            unknown = [k for k in data if k not in allowed]
            if unknown:
                hints = []
                for k in unknown:
                    close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                    hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                raise ValueError(
                    f"unknown key {', '.join(hints)}; allowed keys: {', '.join(sorted(allowed))}"
                )
        return data


def config_sections(annotation) -> list[type[BaseModel]]:
    """The configuration sections an annotation allows (through unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += config_sections(arg)
    return out


def _key_part(key: Any) -> str:
    """A table key as it is written in a dotted key: bare (``Ar``) or quoted (``"Ar-Kr"``)."""
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else json.dumps(key)


def output_format(path: str) -> str:
    """``"extxyz"`` or ``"zarr"`` from a path's suffix; ValueError for any other suffix."""
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    if suffix in (".extxyz", ".xyz"):
        return "extxyz"
    if suffix == ".zarr":
        return "zarr"
    raise ValueError(
        f"cannot tell the format of {path!r} from its suffix {suffix!r}; allowed: .extxyz, "
        ".xyz, .zarr"
    )
