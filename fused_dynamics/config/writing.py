"""A configuration written back as a commented file (``fused-dynamics demo --save-config``).

:func:`config_text` writes a configuration (a plain dict, as :func:`~fused_dynamics.config.
validate_config` takes it) as TOML or YAML in which every key of every section is explained
by a comment: what it is, its unit, its default and its allowed values. Keys the configuration
does not give are written commented out at their default (``# key = default``), so the file
lists every key a user may set. ``[structures]`` carries the example of reading one's own
files, ``[model]`` the keys of every model type, ``[[stages]]`` the keys of every stage type.
Comments change nothing: the file loads back to the same configuration.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .base import ConfigError, config_sections
from .model_keys import ModelConfig
from .schema import RunConfig, StageConfig, _StageBase

__all__ = ["MODEL_KEYS_HELP", "config_text", "save_config"]

WIDTH = 99  # characters per comment line

MODEL_KEYS_HELP = """\
[model]: the energy model, and the elements its parameters are for. Types and keys (units):
  lennard_jones: sigma (Å), epsilon (eV), cutoff (Å), switch_onset (Å), shift (true/false)
  morse: D (eV), alpha (1/Å), r0 (Å), cutoff (Å), switch_onset (Å), shift
  soft_sphere: sigma (Å, also the cutoff), epsilon (eV), alpha (exponent)
  eam: file = "Cu.eam.alloy" (setfl .alloy, funcfl .eam or Finnis-Sinclair .fs, read as ASE)
  trained: file = "fit/model.eqx" (written by fused-dynamics train or fused_dynamics.save_model)
One set of parameters is for the elements listed in species (symbols, e.g. ["Ar"]; the same
parameters for every pair of them); without species it is used only when all structures
together hold one element type (here: argon), else the run is refused (exit 2). For several
elements give a table per species pair instead of the parameters (sigma Å, epsilon eV; morse:
D eV, alpha 1/Å, r0 Å), an element alone for its pair with itself:
{example}
Structures with an element that has no parameters are refused before anything runs.
"""

_PAIRS_EXAMPLE = {
    "toml": """\
  [model]
  type = "lennard_jones"
  cutoff = 7.5
  mixing = "lorentz_berthelot"   # or "geometric": fills cross pairs not listed
  [model.pairs]
  Ar = {sigma = 3.405, epsilon = 0.0104}
  Kr = {sigma = 3.65, epsilon = 0.014}
  Ar-Kr = {sigma = 3.5, epsilon = 0.012}   # listed pairs are kept as given""",
    "yaml": """\
  model:
    type: lennard_jones
    cutoff: 7.5
    mixing: lorentz_berthelot    # or geometric: fills cross pairs not listed
    pairs:
      Ar: {sigma: 3.405, epsilon: 0.0104}
      Kr: {sigma: 3.65, epsilon: 0.014}
      Ar-Kr: {sigma: 3.5, epsilon: 0.012}   # listed pairs are kept as given""",
}

_HEADER = """\
fused-dynamics run configuration. Run it:     fused-dynamics run {name}
Check it without running (every check a run makes before compiling):
                                               fused-dynamics run {name} --validate-only
Every key is explained above it: what it is, unit, default, allowed values. A key written
'# key = value' is not set and shows its default: remove the '#' to set it. Units are ASE's:
Å, eV, amu, fs, K, eV/Å³. Relative paths are resolved against this file's folder. Numbers are
written without quotes; true/false are not numbers.
"""

_OWN_FILES = {
    "toml": """\
YOUR OWN STRUCTURES: replace 'generate' (and count, rattle, max_size, seed) by 'path':
  path = "my_structures.extxyz"                     # one file, every frame of it
  path = "cifs/*.cif"                               # a glob: its matches, sorted by name
  path = ["relaxed.extxyz", "POSCAR", "cifs/*.cif"] # a list, read in the listed order
Any format ase.io.read reads (extxyz, cif, POSCAR/CONTCAR, xyz, ...); index = "-1" keeps only
the last frame of each file, format = "vasp" reads files whose suffix does not say.""",
    "yaml": """\
YOUR OWN STRUCTURES: replace 'generate' (and count, rattle, max_size, seed) by 'path':
  path: my_structures.extxyz                        # one file, every frame of it
  path: "cifs/*.cif"                                # a glob: its matches, sorted by name
  path: [relaxed.extxyz, POSCAR, "cifs/*.cif"]      # a list, read in the listed order
Any format ase.io.read reads (extxyz, cif, POSCAR/CONTCAR, xyz, ...); index: "-1" keeps only
the last frame of each file, format: vasp reads files whose suffix does not say.""",
}


# ----------------------------------------------------------------------------- the schema
def _by_type(annotation) -> dict[str, type[BaseModel]]:
    """``{type value: section}`` of a discriminated union (the stages, the model)."""
    return {c.model_fields["type"].annotation.__args__[0]: c for c in config_sections(annotation)}


_STAGES = _by_type(StageConfig)
_MODELS = _by_type(ModelConfig)


def _literals(annotation) -> list:
    """The allowed values of a Literal annotation (through unions and Annotated); [] if none."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    out = []
    for arg in typing.get_args(annotation):
        if not isinstance(arg, str | int | float) or typing.get_origin(arg) is not None:
            out += _literals(arg)
    return out


def _bounds(field: FieldInfo) -> list[str]:
    """``["> 0"]``, ``[">= 0"]``: the numeric bounds of a field (its metadata and types)."""
    found: list = list(field.metadata)

    def walk(annotation):
        for arg in typing.get_args(annotation):
            if isinstance(arg, annotated_types.BaseMetadata):
                found.append(arg)
            else:
                walk(arg)

    walk(field.annotation)
    out = []
    for m in found:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(m, attr, None)
            if value is not None and f"{op} {value}" not in out:
                out.append(f"{op} {value}")
    return out


def _nullable(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def key_help(name: str, field: FieldInfo, fmt: str = "toml", allowed: list | None = None) -> str:
    """One key explained: ``name: description; default ...; allowed ...`` (no comment mark).

    ``allowed`` replaces the values a Literal annotation allows (a union's ``type`` key).
    """
    parts = [f"{name}: {field.description}" if field.description else name]
    if field.is_required():
        parts.append("required")
    elif field.default is not PydanticUndefined and not isinstance(field.default, BaseModel):
        default = field.default
        parts.append("default: none" if default is None else f"default: {_value(default, fmt)}")
    allowed = allowed or _literals(field.annotation)
    if allowed and len(allowed) > 1:
        shown = " | ".join(_value(a, fmt) for a in allowed)
        parts.append(
            f"allowed: {shown}" + (" (or leave it out)" if _nullable(field.annotation) else "")
        )
    bounds = _bounds(field)
    if bounds:
        parts.append(" and ".join(bounds))
    return "; ".join(parts)


# ----------------------------------------------------------------------------- values
def _toml_key(k) -> str:
    """A bare key where TOML allows one (letters, digits, ``_``, ``-``), else quoted."""
    k = str(k)
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _value(v, fmt: str = "toml") -> str:
    """A value in TOML, or in YAML flow style (JSON spelling, which YAML reads the same)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        text = repr(v)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # 1e-06 -> 1.0e-06: YAML 1.1 reads "1e-06" as a string
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x, fmt) for x in v) + "]"
    if isinstance(v, dict):
        sep, key = (" = ", _toml_key) if fmt == "toml" else (": ", json.dumps)
        return "{" + ", ".join(f"{key(k)}{sep}{_value(x, fmt)}" for k, x in v.items()) + "}"
    if v is None and fmt == "yaml":
        return "null"
    raise TypeError(f"cannot write {type(v).__name__} to {fmt.upper()}")


# ----------------------------------------------------------------------------- the text
def _comment(text: str, indent: str = "") -> list[str]:
    out = []
    for para in text.splitlines():
        if para.startswith("  ") or not para.strip():  # examples keep their layout
            out.append(f"{indent}# {para}".rstrip())
            continue
        wrapped = textwrap.wrap(para, WIDTH - len(indent) - 2, subsequent_indent="  ")
        out += [f"{indent}# {line}" for line in wrapped]
    return out


class _Writer:
    """Lines of a TOML or YAML file, one section at a time."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.lines: list[str] = []

    def entry(self, key: str, value, indent: str, first: bool = False) -> str:
        if self.fmt == "toml":
            return f"{_toml_key(key)} = {_value(value, 'toml')}"
        lead = indent[:-2] + "- " if first else indent
        return f"{lead}{key}: {_value(value, 'yaml')}"

    @staticmethod
    def _types(cls, key: str) -> list[str]:
        """The other values ``type`` may take, for a stage or a model section."""
        for by_type in (_STAGES, _MODELS):
            if key == "type" and cls in by_type.values():
                return list(by_type)
        return []

    def keys(self, cls: type[BaseModel] | None, data: dict, indent: str = "", item: bool = False):
        """Every key of ``cls``: explained, set from ``data`` or commented out at its default."""
        fields = dict(cls.model_fields) if cls is not None else {}
        order = (["type"] if "type" in fields else []) + [k for k in fields if k != "type"]
        first = item
        plain = indent
        for k in order + [k for k in data if k not in fields]:
            f = fields.get(k)
            if f is not None:
                self.lines += _comment(key_help(k, f, self.fmt, self._types(cls, k)), plain)
            if k in data and data[k] is not None:
                self.lines.append(self.entry(k, data[k], indent, first))
                first = False
            elif f is not None and not f.is_required() and f.default is not None:
                if not isinstance(f.default, BaseModel):
                    self.lines.append(f"{plain}# {self.entry(k, f.default, plain).strip()}")
        if first:  # an item with no key given: YAML still needs the list item
            self.lines.append(f"{indent[:-2]}- {{}}")

    def table(self, name: str, cls, data: dict, note: str = ""):
        self.lines.append("")
        self.lines += _comment(f"{name}: {RunConfig.model_fields[name].description}")
        if note:
            self.lines += _comment(note)
        if self.fmt == "toml":
            self.lines.append(f"[{name}]")
            self.keys(cls, data)
        else:
            given = any(v is not None for v in data.values())
            self.lines.append(f"{name}:" if given else f"{name}: {{}}")
            self.keys(cls, data, "  ")

    def array(self, name: str, by_type: dict, cls, items: list[dict], note: str = ""):
        self.lines.append("")
        self.lines += _comment(f"{name}: {RunConfig.model_fields[name].description}")
        if note:
            self.lines += _comment(note)
        if self.fmt == "yaml":
            self.lines.append(f"{name}:")
        for i, item in enumerate(items):
            section = by_type.get(item.get("type"), cls) if by_type else cls
            if self.fmt == "toml":
                if i:
                    self.lines.append("")
                self.lines.append(f"[[{name}]]")
                self.keys(section, item)
            else:
                self.keys(section, item, "    ", item=True)


_UNITS = {"Å", "eV", "fs", "K", "1/fs", "1/Å", "eV/Å", "eV/Å³", "Å²/eV", "atoms", "steps"}


def _unit(field: FieldInfo) -> str:
    """The unit a description starts with (``"fs: time step"`` -> ``"fs"``), or ``""``."""
    head = (field.description or "").partition(":")[0].strip()
    return head if head in _UNITS else ""


def _type_summaries(by_type: dict[str, type[BaseModel]], skip: set[str]) -> str:
    """One (wrapped) line per type: its keys, with units, ``?`` marking optional ones."""
    lines = []
    for name, cls in by_type.items():
        keys = []
        for k, f in cls.model_fields.items():
            if k in skip:
                continue
            unit = _unit(f)
            keys.append(k + (f" ({unit})" if unit else "") + ("" if f.is_required() else "?"))
        text = f"{name}: {', '.join(keys)}"
        lines += textwrap.wrap(text, WIDTH - 4, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def config_text(cfg: dict, fmt: str = "toml", name: str = "THIS_FILE") -> str:
    """A configuration as a commented TOML (``fmt="toml"``) or YAML (``"yaml"``) text.

    Parameters
    ----------
    cfg : dict
        A configuration as :func:`~fused_dynamics.config.validate_config` takes it.
    fmt : {"toml", "yaml"}
    name : str
        The file's name, for the commands in the header.

    Returns
    -------
    str
        Every key of every section explained in a comment (unit, default, allowed values),
        the keys ``cfg`` does not give commented out at their defaults. It loads back to the
        same configuration.
    """
    if fmt not in ("toml", "yaml"):
        raise ValueError(f"config_text: fmt must be 'toml' or 'yaml', got {fmt!r}")
    w = _Writer(fmt)
    w.lines += _comment(_HEADER.format(name=name))
    top = RunConfig.model_fields
    sections = ("structures", "model", "capacity", "stages", "outputs", "report")
    for k, f in top.items():
        if k in sections:
            continue
        w.lines.append("")
        w.lines += _comment(key_help(k, f, fmt))
        if k in cfg and cfg[k] is not None:
            w.lines.append(w.entry(k, cfg[k], ""))
        elif f.default is not None:
            w.lines.append(f"# {w.entry(k, f.default, '')}")
    extra = [k for k in cfg if k not in top]
    for k in extra:  # not a key of the schema: written, so that validation names it
        w.lines.append(w.entry(k, cfg[k], ""))
    structures = dict(cfg.get("structures") or {})
    w.table(
        "structures", config_sections(top["structures"].annotation)[0], structures, _OWN_FILES[fmt]
    )
    model = dict(cfg.get("model") or {})
    help_text = MODEL_KEYS_HELP.format(example=_PAIRS_EXAMPLE[fmt])
    w.table("model", _MODELS.get(model.get("type")), model, help_text)
    w.table(
        "capacity", config_sections(top["capacity"].annotation)[0], dict(cfg.get("capacity") or {})
    )
    stage_note = (
        "A system moves on from a stage when its criterion holds (fmax, criteria) or its "
        "budget (n_steps) is spent. Every "
        "stage takes n_steps, fmax, criteria, entry_velocities, entry_temperature, write. "
        "Types and their own keys (? = optional):\n"
        + _type_summaries(_STAGES, {"type", *_StageBase.model_fields})
    )
    w.array("stages", _STAGES, None, list(cfg.get("stages") or []), stage_note)
    out_cls = config_sections(top["outputs"].annotation)[0]
    w.array("outputs", {}, out_cls, list(cfg.get("outputs") or []))
    w.table("report", config_sections(top["report"].annotation)[0], dict(cfg.get("report") or {}))
    return "\n".join(w.lines) + "\n"


def _to_toml(cfg: dict) -> str:
    """:func:`config_text` in TOML (kept for callers of the earlier writer)."""
    return config_text(cfg, "toml")


def save_config(cfg: dict, path: Path, overwrite: bool = False) -> None:
    """Write ``cfg`` as a commented YAML or TOML file (:func:`config_text`).

    Raises
    ------
    ConfigError
        An unknown suffix (allowed: .toml, .yaml, .yml), or a path that exists without
        ``overwrite`` (a directory is never replaced).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        fmt = "yaml"
    elif suffix == ".toml":
        fmt = "toml"
    else:
        raise ConfigError(f"--save-config: unknown format {suffix!r}; allowed: .yaml, .yml, .toml")
    if path.is_dir() or (path.exists() and not overwrite):
        raise ConfigError(
            f"--save-config: {os.fspath(path)!r} exists; give --overwrite to replace a file "
            "(a directory never is), or choose another path"
        )
    text = config_text(cfg, fmt, name=path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
