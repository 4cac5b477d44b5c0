"""A configuration written back as a file (``fused-dynamics demo --save-config``): YAML or
TOML, with the keys of the model explained in comments."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from .base import ConfigError

__all__ = ["MODEL_KEYS_HELP", "save_config"]


MODEL_KEYS_HELP = """\
[model]: the pair potential, and the elements its parameters are for. Keys and units:
  lennard_jones: sigma (Å), epsilon (eV), cutoff (Å), switch_onset (Å), shift (true/false)
  morse: D (eV), alpha (1/Å), r0 (Å), cutoff (Å), switch_onset (Å), shift
  soft_sphere: sigma (Å, also the cutoff), epsilon (eV), alpha (exponent)
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


def _commented(text: str, fmt: str) -> str:
    """``text`` with :data:`MODEL_KEYS_HELP` as comments just before the model section."""
    help_text = MODEL_KEYS_HELP.format(example=_PAIRS_EXAMPLE[fmt])
    block = "".join(f"# {line}".rstrip() + "\n" for line in help_text.splitlines())
    marker = "[model]\n" if fmt == "toml" else "model:"
    lines = text.splitlines(keepends=True)
    for k, line in enumerate(lines):
        if line.startswith(marker):
            return "".join(lines[:k]) + block + "".join(lines[k:])
    return block + text


def save_config(cfg: dict, path: Path, overwrite: bool = False) -> None:
    """Write ``cfg`` as YAML or TOML, with the model keys explained in comments."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        text = _commented(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), "yaml")
    elif suffix == ".toml":
        text = _commented(_to_toml(cfg), "toml")
    else:
        raise ConfigError(f"--save-config: unknown format {suffix!r}; allowed: .yaml, .yml, .toml")
    if path.is_dir() or (path.exists() and not overwrite):
        raise ConfigError(
            f"--save-config: {os.fspath(path)!r} exists; give --overwrite to replace a file "
            "(a directory never is), or choose another path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k) -> str:
    """A bare key where TOML allows one (letters, digits, ``_``, ``-``), else quoted."""
    k = str(k)
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _to_toml(cfg: dict) -> str:
    """A minimal TOML writer for configuration dicts (scalars, tables, arrays of tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, (dict, list))]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [
                f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None
            ]
        elif isinstance(v, list) and all(isinstance(x, dict) for x in v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [
                    f"{_toml_key(kk)} = {_toml_value(vv)}"
                    for kk, vv in item.items()
                    if vv is not None
                ]
        elif isinstance(v, list):
            lines.insert(0, f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
