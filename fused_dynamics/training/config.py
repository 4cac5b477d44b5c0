"""The configuration of ``fused-dynamics train CONFIG`` (TOML or YAML), validated before training.

Every section refuses unknown keys; a problem is reported as ``key: what is wrong`` (the CLI
exits with code 2). See :mod:`fused_dynamics.training` for a worked example and the keys.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import jax
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from ..models import LennardJones, Morse, SoftSphere
from .data import read_structures
from .outputs import OUTPUT_FILES
from .serialization import load_model
from .trainer import OPTIMIZERS, SCHEDULES, train

__all__ = [
    "TrainConfig",
    "TrainConfigError",
    "load_train_config",
    "build_train_model",
    "run_train_config",
    "TRAIN_MODEL_TYPES",
]

NEQUIP_CLASS = "fused_dynamics.models.nequip:NequIP"
PAIR_CLASSES = {"lennard_jones": LennardJones, "morse": Morse, "soft_sphere": SoftSphere}
TRAIN_MODEL_TYPES = (*PAIR_CLASSES, "nequip", "class", "checkpoint")


class TrainConfigError(ValueError):
    """A ``train`` configuration (or its data) cannot be used; the message names the key."""


class _Section(BaseModel):
    """A section that refuses unknown keys, listing the allowed ones."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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


class ModelSection(BaseModel):
    """``[model]``: ``type`` and, by type, its keys.

    ``lennard_jones`` / ``morse`` / ``soft_sphere``: every other key is a constructor argument
    of :class:`~fused_dynamics.models.LennardJones` / ``Morse`` / ``SoftSphere`` (``sigma``,
    ``epsilon``, ``cutoff``, ``switch_onset``, ``species``, ...; ``pairs`` with optional
    ``mixing`` for ``from_pairs``). ``nequip``: ``hyperparameters``. ``class``:
    ``import_path`` (``"package.module:Class"``) and ``hyperparameters``. ``checkpoint``:
    ``path`` of a model file.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal[TRAIN_MODEL_TYPES]  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _keys_of_type(self):
        extra = set(self.model_extra or {})
        allowed = {
            "nequip": {"hyperparameters"},
            "class": {"import_path", "hyperparameters"},
            "checkpoint": {"path"},
        }.get(self.type)
        if allowed is not None:
            unknown = sorted(extra - allowed)
            if unknown:
                raise ValueError(
                    f"unknown key(s) {unknown} for type {self.type!r}; allowed: "
                    f"{', '.join(sorted(allowed))}"
                )
            if self.type == "class" and ":" not in str(self.get("import_path", "")):
                raise ValueError("import_path: write it as 'package.module:ClassName'")
            if self.type == "checkpoint" and not isinstance(self.get("path"), str):
                raise ValueError("path: give the model file (a string)")
        return self

    def get(self, key: str, default=None):
        return (self.model_extra or {}).get(key, default)


class DataConfig(_Section):
    path: str | list[str] = Field(description="file(s) or glob(s) ase.io reads")
    index: str | int = Field(":", description="ASE frame selection of each file")
    energy_key: str | None = Field(None, description="atoms.info key (default: calculator)")
    forces_key: str | None = Field(None, description="atoms.arrays key (default: calculator)")
    stress_key: str | None = Field(None, description="atoms.info key (default: calculator)")


class ValidationConfig(_Section):
    fraction: float = Field(0.1, ge=0.0, lt=1.0, description="drawn from data with seed")
    path: str | list[str] | None = Field(None, description="explicit validation file(s)")
    index: str | int = ":"


class LossConfig(_Section):
    energy: NonNegativeFloat = 1.0
    forces: NonNegativeFloat = 1.0
    stress: NonNegativeFloat = 1.0


class OptimizerConfig(_Section):
    name: Literal[OPTIMIZERS] = "adam"  # type: ignore[valid-type]
    learning_rate: PositiveFloat = 1e-3
    schedule: Literal[SCHEDULES] = "constant"  # type: ignore[valid-type]
    warmup_epochs: int = Field(0, ge=0)
    final_learning_rate: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 1e-4
    clip_norm: PositiveFloat | None = None
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: PositiveInt = 10


class TrainingConfig(_Section):
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 8
    max_atoms: PositiveInt | None = None
    patience: PositiveInt | None = Field(None, description="early stopping (epochs)")
    min_delta: NonNegativeFloat = 0.0


class TrainConfig(_Section):
    """A whole ``train`` configuration."""

    seed: int = 0
    dtype: Literal["float32", "float64"] = "float64"
    output_dir: str
    data: DataConfig
    validation: ValidationConfig = ValidationConfig()
    model: ModelSection
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig = TrainingConfig()


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in TRAIN_MODEL_TYPES or str(part).startswith(("function-", "lax-or-strict")):
            continue
        elif part in ("str", "list[str]", "int"):  # union members
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s):"]
    seen = set()
    for err in exc.errors(include_url=False):
        where, kind, msg = _loc(err["loc"]), err["type"], err["msg"]
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            tag = err.get("ctx", {}).get("tag")
            where += ".type"
            head = f"unknown model type {tag!r}" if tag else "missing 'type'"
            msg = f"{head}; allowed: {', '.join(TRAIN_MODEL_TYPES)}"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        if (where, msg) not in seen:
            seen.add((where, msg))
            lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def _read(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TrainConfigError(f"configuration file {os.fspath(p)!r} does not exist.")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(p.read_text())
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(p.read_text())
        else:
            raise TrainConfigError(
                f"{p}: unknown configuration format {suffix!r}; allowed: .toml, .yaml, .yml"
            )
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise TrainConfigError(f"{p}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"{p}: the top level must be a table of keys.")
    return data


def load_train_config(path: str | os.PathLike) -> tuple[TrainConfig, Path]:
    """Read and validate a ``train`` configuration file (TOML or YAML).

    Returns
    -------
    config : TrainConfig
    base_dir : Path
        The folder that relative paths in the configuration are resolved against.

    Raises
    ------
    TrainConfigError
        One line per problem, naming the key.
    """
    data = _read(path)
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise TrainConfigError(_format(exc, os.fspath(path))) from None
    return cfg, Path(path).resolve().parent


def _resolve(base: Path, p: str | list[str]) -> list[str]:
    paths = [p] if isinstance(p, str) else list(p)
    return [os.path.join(base, os.path.expanduser(x)) for x in paths]


def build_train_model(cfg: TrainConfig, base: Path):
    """The model a configuration starts from.

    Raises
    ------
    TrainConfigError
        Naming ``model.*`` when the model cannot be built, imported or loaded.
    """
    m = cfg.model
    if m.type == "checkpoint":
        path = _resolve(base, m.get("path"))[0]
        if not os.path.isfile(path):
            raise TrainConfigError(f"model.path: {path!r} does not exist")
        try:
            return load_model(path)
        except (ValueError, OSError) as exc:
            raise TrainConfigError(f"model.path: {exc}") from None
    if m.type in ("class", "nequip"):
        target = m.get("import_path") if m.type == "class" else NEQUIP_CLASS
        key = "model.import_path" if m.type == "class" else "model.type"
        module, _, name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise TrainConfigError(f"{key}: cannot import {target}: {exc}") from None
        kwargs = dict(m.get("hyperparameters") or {})
        try:
            if "key" in inspect.signature(cls).parameters and "key" not in kwargs:
                kwargs["key"] = jax.random.key(cfg.seed)
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise TrainConfigError(f"model.hyperparameters: {target}: {exc}") from None
    cls = PAIR_CLASSES[m.type]
    kwargs = dict(m.model_extra or {})
    try:
        if "images" in kwargs:
            kwargs["images"] = tuple(kwargs["images"])
        if "pairs" in kwargs:
            table = {
                tuple(k.split("-")) if "-" in k else k: v for k, v in kwargs.pop("pairs").items()
            }
            return cls.from_pairs(table, mixing=kwargs.pop("mixing", None), **kwargs)
        return cls(**kwargs)
    except (TypeError, ValueError, AttributeError) as exc:
        raise TrainConfigError(f"model: {m.type}: {exc}") from None


def plan_train_outputs(cfg: TrainConfig, base: Path, overwrite: bool) -> Path:
    """The output folder; refuse one that exists and is not empty unless ``overwrite``.

    Raises
    ------
    TrainConfigError
        Naming ``output_dir`` and ``--overwrite``.
    """
    out = Path(_resolve(base, cfg.output_dir)[0])
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"output_dir: {os.fspath(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TrainConfigError(
            f"output_dir: {os.fspath(out)!r} exists and is not empty; choose another "
            f"output_dir or pass --overwrite (replaces {', '.join(OUTPUT_FILES)})"
        )
    return out


def run_train_config(
    path: str | os.PathLike, *, overwrite: bool = False, progress: bool = True, echo=print
):
    """Load, check and run a ``train`` configuration; returns the :class:`TrainResult`.

    Everything that can be checked (keys, data files, model, output folder) is checked before
    training. Bad configuration and input raise :class:`TrainConfigError` naming the key.
    """
    cfg, base = load_train_config(path)
    if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    out = plan_train_outputs(cfg, base, overwrite)
    model = build_train_model(cfg, base)
    try:
        data = read_structures(_resolve(base, cfg.data.path), index=cfg.data.index)
    except Exception as exc:  # any reader error: ase's UnknownFileTypeError, ...
        raise TrainConfigError(f"data.path: {type(exc).__name__}: {exc}") from None
    validation = None
    if cfg.validation.path is not None:
        try:
            validation = read_structures(
                _resolve(base, cfg.validation.path), index=cfg.validation.index
            )
        except Exception as exc:  # any reader error: ase's UnknownFileTypeError, ...
            raise TrainConfigError(f"validation.path: {type(exc).__name__}: {exc}") from None
    o, t = cfg.optimizer, cfg.training
    try:
        result = train(
            model,
            data,
            validation=validation,
            validation_fraction=cfg.validation.fraction,
            epochs=t.epochs,
            batch_size=t.batch_size,
            max_atoms=t.max_atoms,
            weights=cfg.loss.model_dump(),
            optimizer=o.name,
            learning_rate=o.learning_rate,
            schedule=o.schedule,
            warmup_epochs=o.warmup_epochs,
            final_learning_rate=o.final_learning_rate,
            weight_decay=o.weight_decay,
            clip_norm=o.clip_norm,
            plateau_factor=o.plateau_factor,
            plateau_patience=o.plateau_patience,
            patience=t.patience,
            min_delta=t.min_delta,
            seed=cfg.seed,
            dtype=cfg.dtype,
            energy_key=cfg.data.energy_key,
            forces_key=cfg.data.forces_key,
            stress_key=cfg.data.stress_key,
            output_dir=out,
            overwrite=overwrite,
            progress=progress,
        )
    except FileExistsError as exc:
        raise TrainConfigError(f"output_dir: {exc}") from None
    except ValueError as exc:  # data or model problems found before training
        raise TrainConfigError(f"{exc}") from None
    best = result.best_metrics
    # the metrics that selected the model: validation, else the training set after the epoch
    split = "validation" if best["validation"] else "train_end"
    m = best[split]
    echo(
        f"trained {len(result.history)} epochs (best: epoch {result.best_epoch}"
        f"{', stopped early' if result.stopped_early else ''}); {split}: energy MAE "
        f"{m['energy_mae_per_atom']:.3g} eV/atom, force RMSE {m['force_rmse']:.3g} eV/Å, "
        f"stress RMSE {m['stress_rmse']:.3g} eV/Å³"
    )
    for name, p in result.files.items():
        echo(f"wrote {os.fspath(p)}  ({name})")
    return result
