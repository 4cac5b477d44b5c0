"""Run configuration: a TOML or YAML file validated before anything is compiled.

A configuration names the structures, the model, the chain of stages, the batch capacity, the
outputs and a few run options. :func:`load_config` reads and validates a file; every problem is
reported with the key it concerns and, where there is a fixed set, the allowed values
(:class:`ConfigError`). :func:`build_model`, :func:`build_fused` and :func:`load_structures`
turn a validated :class:`RunConfig` into ``fused_dynamics`` objects.

Example (TOML)::

    seed = 0
    dtype = "float32"            # or "float64" (turns on jax_enable_x64 before any array)
    device = "cpu"               # "cpu", "gpu", "tpu" or "auto"
    refill_frequency = 20

    [structures]
    path = "structures/*.extxyz" # a file or a glob, read with ase.io.read(index=":")
    # or: generate = "argon", count = 256, rattle = 0.15, seed = 0

    [model]
    type = "lennard_jones"       # lennard_jones | morse | soft_sphere
    sigma = 3.405
    epsilon = 0.0104
    cutoff = 7.5
    switch_onset = 6.5

    [capacity]
    max_atoms = 384
    max_systems = 24

    [[stages]]
    type = "fire"                # fire | fire2 | gradient_descent | nve | nvt_langevin | ...
    fmax = 0.01                  # converged at fmax <= 0.01 eV/Å (or: criteria = [...])
    n_steps = 500                # step budget per system

    [[stages]]
    type = "nvt_langevin"
    dt = 5.0                     # fs
    temperature = 60.0           # K
    friction = 0.01              # 1/fs
    n_steps = 100

    [[outputs]]                  # every output receives every system
    type = "extxyz"              # extxyz | zarr
    path = "outputs/run.extxyz"
    # stress = true              # always compute the stress, so every system carries it

    [report]
    plot = "outputs/run.png"

Relative paths are resolved against the folder of the configuration file. Units are the
package's (ASE's): Å, eV, amu, fs, K, eV/Å³.

Keys about outputs and inputs
-----------------------------
``structures.id_key``
    Take each structure's ``system_id`` from ``atoms.info[id_key]`` (an integer, unique,
    ``0 <= id < 2**31 - 1``) instead of its position in the list of structures. Random
    streams (Langevin noise, Maxwell–Boltzmann velocities) are keyed by the ``system_id``, so
    with an ``id_key`` removing or reordering structures does not change the trajectories of
    the others. Only with ``path``.
``outputs[i].path``
    A file (extxyz) or a store (zarr, a directory). A path that exists is refused unless the
    command line says ``--overwrite`` (an extxyz file is replaced) or ``--resume`` (the
    systems already in it are skipped and the rest appended). A directory is never deleted or
    replaced, so a zarr store can be resumed but not overwritten. Every output folder is
    checked for writability (a probe file is created and removed) before anything compiles.
``outputs[i].stress``
    ``true``: compute the stress at every step so every written system carries it (it costs
    about as much as the forces). Without it the stress is written only when a stage, a
    criterion or a hook needs it (NPT, NPH, variable-cell FIRE), and left out otherwise.
``stages[i].write``
    A path (``.extxyz``/``.xyz``, or ``.zarr``): each system is written there as it leaves
    this stage, converged or out of budget, with its structure, energy and forces at that
    moment (``info["stage"] = i``; ``exit_reason`` says how it left the stage). For a chain
    that relaxes then simulates, ``write`` on the relaxation stage keeps the minima. The same
    rules as for ``outputs`` apply (refused if it exists, ``--overwrite``, ``--resume``).
``report.plot``, ``report.record``
    Refused if they exist, unless ``--overwrite``; with ``--resume`` an existing one is kept
    and not rewritten.

What every written system carries is described in :mod:`fused_dynamics.sinks` and
:mod:`fused_dynamics.provenance` (the input's ``info`` and per-atom arrays, ``source_file``,
``source_index``, ``system_id``, ``exit_reason`` and ``exit_reason_name``, ``failure`` and
``failure_step`` for failed systems, units, the package version and the configuration).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "ConfigError",
    "RunConfig",
    "STAGE_TYPES",
    "MODEL_TYPES",
    "load_config",
    "validate_config",
    "read_config_file",
    "build_model",
    "build_stages",
    "build_fused",
    "load_structures",
    "load_structures_with_sources",
    "output_format",
    "npt_classes",
    "ThermalizeOnEntryHook",
]


from .hooks import ThermalizeOnEntryHook


class ConfigError(ValueError):
    """A configuration (or its input files) cannot be used; the message says what to fix."""


# ============================================================================ schema helpers
class _Section(BaseModel):
    """A section of the configuration: unknown keys are errors that list the allowed keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            unknown = [k for k in data if k not in allowed]
            if unknown:
                import difflib

                hints = []
                for k in unknown:
                    close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                    hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                raise ValueError(
                    f"unknown key {', '.join(hints)}; allowed keys: {', '.join(sorted(allowed))}"
                )
        return data


class CriterionConfig(_Section):
    """One convergence criterion: ``reduce(key) <= threshold``."""

    key: str = Field(description="fmax, energy, energy_change, temperature, forces, ...")
    threshold: float
    reduce_op: Literal["min", "max", "norm", "mean", "sum"] | None = None


class _StageBase(_Section):
    n_steps: PositiveInt | None = Field(None, description="step budget of each system")
    fmax: PositiveFloat | None = Field(None, description="converged when fmax <= this (eV/Å)")
    criteria: list[CriterionConfig] | None = Field(
        None, description="convergence criteria, all must hold (AND); combined with fmax"
    )
    entry_velocities: Literal["auto", "keep", "thermal"] = Field(
        "auto",
        description="velocities of a system entering this stage from the previous one: "
        "'thermal' draws Maxwell-Boltzmann velocities at entry_temperature (default: the "
        "stage's temperature); 'keep' keeps them; 'auto' is 'thermal' after an optimizer "
        "(FIRE's velocities are not physical ones) for a stage with a temperature, else 'keep'",
    )
    entry_temperature: float | None = Field(
        None, ge=0, description="K, for entry_velocities = 'thermal'"
    )
    write: str | None = Field(
        None,
        description="write each system here as it leaves this stage (.extxyz, .xyz or .zarr)",
    )

    @field_validator("write")
    @classmethod
    def _write_format(cls, v: str | None) -> str | None:
        if v is not None:
            output_format(v)
        return v

    def has_criterion(self) -> bool:
        return self.fmax is not None or bool(self.criteria)

    def stage_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the stage class (everything but type and convergence keys)."""
        skip = {
            "type",
            "n_steps",
            "fmax",
            "criteria",
            "entry_velocities",
            "entry_temperature",
            "write",
        }
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


class FIREConfig(_StageBase):
    type: Literal["fire"]
    dt: PositiveFloat | None = None
    maxstep: PositiveFloat = 0.2
    dtmax: PositiveFloat | None = None
    Nmin: PositiveInt = 5
    finc: PositiveFloat = 1.1
    fdec: PositiveFloat = 0.5
    astart: PositiveFloat = 0.1
    fa: PositiveFloat = 0.99
    flavor: Literal["ase", "vv"] = "ase"
    cell_filter: Literal["frechet"] | None = None
    scalar_pressure: float = 0.0


class FIRE2Config(_StageBase):
    type: Literal["fire2"]
    dt: PositiveFloat = 0.1
    maxstep: PositiveFloat = 0.2
    dtmax: PositiveFloat = 1.0
    dtmin: PositiveFloat = 2e-3
    Nmin: PositiveInt = 20
    finc: PositiveFloat = 1.1
    fdec: PositiveFloat = 0.5
    astart: PositiveFloat = 0.25
    fa: PositiveFloat = 0.99
    Npneg_max: PositiveInt | None = 2000
    initialdelay: bool = True
    cell_filter: Literal["frechet"] | None = None
    scalar_pressure: float = 0.0


class GradientDescentConfig(_StageBase):
    type: Literal["gradient_descent"]
    step_size: PositiveFloat = Field(description="Å²/eV")
    maxstep: PositiveFloat | None = None


class NVEConfig(_StageBase):
    type: Literal["nve"]
    dt: PositiveFloat = Field(description="fs")


class NVTLangevinConfig(_StageBase):
    type: Literal["nvt_langevin"]
    dt: PositiveFloat = Field(description="fs")
    temperature: float = Field(ge=0, description="K")
    friction: float = Field(ge=0, description="1/fs")
    seed: int | None = Field(None, description="default: the run's seed plus the stage index")


class NVTNoseHooverConfig(_StageBase):
    type: Literal["nvt_nose_hoover"]
    dt: PositiveFloat
    temperature: PositiveFloat
    tdamp: PositiveFloat
    chain_length: PositiveInt = 3
    chain_steps: PositiveInt = 2
    sy_order: Literal[1, 3, 5, 7] = 3


class NPTConfig(_StageBase):
    type: Literal["npt"]
    dt: PositiveFloat
    temperature: PositiveFloat
    pressure: float = Field(description="eV/Å³ (1 GPa = ase.units.GPa = 0.00624 eV/Å³)")
    tdamp: PositiveFloat
    pdamp: PositiveFloat
    coupling: Literal["isotropic", "anisotropic", "triclinic"] = "isotropic"
    chain_length: PositiveInt = 3


class NPHConfig(_StageBase):
    type: Literal["nph"]
    dt: PositiveFloat
    pressure: float = Field(description="eV/Å³")
    pdamp: PositiveFloat
    coupling: Literal["isotropic", "anisotropic", "triclinic"] = "isotropic"
    mass_temperature: PositiveFloat | None = None


def npt_classes() -> tuple[type, type] | None:
    """``(NPT, NPH)`` when the package provides them, else None."""
    import fused_dynamics as fd

    npt, nph = getattr(fd, "NPT", None), getattr(fd, "NPH", None)
    if npt is None or nph is None:
        try:
            from fused_dynamics.stages import npt as _npt_module
        except Exception:  # being written; absent or broken means: not offered
            return None
        npt, nph = getattr(_npt_module, "NPT", None), getattr(_npt_module, "NPH", None)
    if npt is None or nph is None:
        return None
    return npt, nph


_STAGE_CONFIGS: list[type[_StageBase]] = [
    FIREConfig,
    FIRE2Config,
    GradientDescentConfig,
    NVEConfig,
    NVTLangevinConfig,
    NVTNoseHooverConfig,
]
if npt_classes() is not None:
    _STAGE_CONFIGS += [NPTConfig, NPHConfig]

STAGE_TYPES: tuple[str, ...] = tuple(
    c.model_fields["type"].annotation.__args__[0] for c in _STAGE_CONFIGS
)

StageConfig = Annotated[
    FIREConfig
    | FIRE2Config
    | GradientDescentConfig
    | NVEConfig
    | NVTLangevinConfig
    | NVTNoseHooverConfig
    | NPTConfig
    | NPHConfig,
    Field(discriminator="type"),
]


class _CutoffPairConfig(_Section):
    """Keys shared by the pair potentials with a cutoff."""

    cutoff: PositiveFloat = Field(description="Å")
    switch_onset: PositiveFloat | None = None
    shift: bool = True
    images: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = Field(
        None,
        description="periodic image shifts along each cell vector (default: from the first "
        "cells; give it for variable-cell runs whose cells shrink)",
    )


class LennardJonesConfig(_CutoffPairConfig):
    type: Literal["lennard_jones"]
    sigma: PositiveFloat = Field(description="Å")
    epsilon: PositiveFloat = Field(description="eV")


class MorseConfig(_CutoffPairConfig):
    type: Literal["morse"]
    D: PositiveFloat = Field(description="eV")
    alpha: PositiveFloat = Field(description="1/Å")
    r0: PositiveFloat = Field(description="Å")


class SoftSphereConfig(_Section):
    type: Literal["soft_sphere"]
    sigma: PositiveFloat = Field(description="Å (also the cutoff)")
    epsilon: PositiveFloat = 1.0
    alpha: PositiveFloat = 2.0
    images: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = Field(
        None,
        description="periodic image shifts along each cell vector (default: from the first "
        "cells; give it for variable-cell runs whose cells shrink)",
    )


MODEL_TYPES = ("lennard_jones", "morse", "soft_sphere")
ModelConfig = Annotated[
    LennardJonesConfig | MorseConfig | SoftSphereConfig, Field(discriminator="type")
]


class StructuresConfig(_Section):
    """Either ``path`` (a file or glob read by ase.io) or ``generate`` (a built-in set)."""

    path: str | None = Field(None, description="file or glob, read with ase.io.read(index=...)")
    index: str = Field(":", description="which frames of each file (ase.io.read's index)")
    format: str | None = Field(None, description="ase.io format, when the suffix does not say")
    generate: Literal["argon"] | None = Field(
        None, description="argon: perturbed LJ argon clusters and fcc crystals"
    )
    count: PositiveInt = Field(200, description="generate: number of structures")
    rattle: float = Field(0.15, ge=0, description="generate: Gaussian noise on positions (Å)")
    max_size: PositiveInt = Field(32, description="generate: largest structure (atoms)")
    seed: int | None = Field(None, description="generate: default is the run's seed")
    id_key: str | None = Field(
        None,
        description="path: take each system_id (and so its random stream) from "
        "atoms.info[id_key] instead of the structure's position",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StructuresConfig:
        if (self.path is None) == (self.generate is None):
            raise ValueError(
                "give exactly one of 'path' (a file or glob of structures) or "
                "'generate' (allowed: 'argon')"
            )
        misplaced = sorted(
            (self.model_fields_set & {"count", "rattle", "max_size", "seed"})
            if self.path is not None
            else (self.model_fields_set & {"index", "format", "id_key"})
        )
        if misplaced:
            other = "generate" if self.path is not None else "path"
            raise ValueError(f"{', '.join(misplaced)} only go with '{other}'")
        return self

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        files = resolve_structure_files(v, _base_dir(info))
        if not files:
            raise ValueError(f"no structure file matches {v!r} (looked for {_abs(v, info)!r})")
        return v

    def files(self, base_dir: str | os.PathLike) -> list[str]:
        return resolve_structure_files(self.path, base_dir) if self.path else []


class CapacityConfig(_Section):
    max_atoms: PositiveInt = Field(description="atom capacity N of the batch")
    max_systems: PositiveInt = Field(description="system capacity S of the batch")
    max_atoms_per_system: PositiveInt | None = None
    sort_by_size: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> CapacityConfig:
        if self.max_atoms_per_system is not None and self.max_atoms_per_system > self.max_atoms:
            raise ValueError(
                f"max_atoms_per_system={self.max_atoms_per_system} is larger than "
                f"max_atoms={self.max_atoms}"
            )
        return self


class OutputConfig(_Section):
    """One output; every output receives every system that leaves the run."""

    type: Literal["extxyz", "zarr"]
    path: str
    capacity: PositiveInt | None = None
    stress: bool = Field(False, description="always compute the stress and write it")


class ReportConfig(_Section):
    plot: str | None = Field(None, description="PNG figure of the run (needs matplotlib)")
    record: str | None = Field(None, description="CSV of the per-step record")
    record_every: PositiveInt = Field(5, description="steps between recorded samples")
    progress: bool = Field(True, description="tqdm progress bar on stderr")
    summary: bool = Field(True, description="print the summary table")


class RunConfig(_Section):
    """The whole run; see the module docstring for an example."""

    structures: StructuresConfig
    model: ModelConfig
    stages: list[StageConfig] = Field(min_length=1)
    capacity: CapacityConfig
    outputs: list[OutputConfig] = Field(min_length=1)
    report: ReportConfig = ReportConfig()
    refill_frequency: PositiveInt = 20
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "gpu", "cuda", "rocm", "tpu"] = "auto"
    initial_temperature: float | None = Field(
        None, ge=0, description="draw Maxwell-Boltzmann velocities at this temperature (K)"
    )

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list) -> list:
        for i, st in enumerate(stages):
            if st.type not in STAGE_TYPES:
                raise ValueError(
                    f"stages[{i}].type: stage {st.type!r} is not available in this version of "
                    f"fused_dynamics; allowed: {', '.join(STAGE_TYPES)}"
                )
        return stages

    @model_validator(mode="after")
    def _entry_velocities(self) -> RunConfig:
        first = self.stages[0]
        if first.entry_velocities == "thermal" or first.entry_temperature is not None:
            raise ValueError(
                "stages[0].entry_velocities/entry_temperature: systems enter the first stage "
                "from the structures; use the top-level 'initial_temperature' instead"
            )
        for i, st in enumerate(self.stages):
            if st.entry_velocities == "thermal" and entry_temperature(self, i) is None:
                raise ValueError(
                    f"stages[{i}].entry_temperature: entry_velocities = 'thermal' needs a "
                    f"temperature and stage {st.type!r} has none; give entry_temperature (K)"
                )
        return self

    @model_validator(mode="after")
    def _final_stage_finishes(self) -> RunConfig:
        last = self.stages[-1]
        if last.n_steps is None and not last.has_criterion():
            raise ValueError(
                f"stages[{len(self.stages) - 1}] ({last.type}): the final stage needs 'n_steps' "
                "or a convergence criterion ('fmax' or 'criteria'), or systems never finish"
            )
        return self


_OPTIMIZERS = ("fire", "fire2", "gradient_descent")


def entry_temperature(cfg: RunConfig, i: int) -> float | None:
    """Temperature (K) at which systems entering stage ``i`` get fresh velocities, or None."""
    st = cfg.stages[i]
    if i == 0 or st.entry_velocities == "keep":
        return None
    own = st.entry_temperature
    if own is None:
        own = getattr(st, "temperature", None)
    if st.entry_velocities == "thermal":
        return None if own is None else float(own)
    # auto
    after_optimizer = cfg.stages[i - 1].type in _OPTIMIZERS
    return float(own) if after_optimizer and own is not None else None


# ============================================================================ loading
def _base_dir(info: ValidationInfo) -> str:
    ctx = info.context or {}
    return os.fspath(ctx.get("base_dir", "."))


def _abs(path: str, info: ValidationInfo) -> str:
    return os.path.abspath(os.path.join(_base_dir(info), os.path.expanduser(path)))


def resolve_structure_files(pattern: str, base_dir: str | os.PathLike) -> list[str]:
    """Files a ``structures.path`` names: the file itself, or the sorted matches of a glob."""
    full = os.path.join(os.fspath(base_dir), os.path.expanduser(pattern))
    if glob.has_magic(full):
        return sorted(p for p in glob.glob(full, recursive=True) if os.path.isfile(p))
    return [full] if os.path.exists(full) else []


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file {os.fspath(p)!r} does not exist.")
    suffix = p.suffix.lower()
    text = p.read_text()
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    elif suffix in (".yaml", ".yml"):
        import yaml

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
        else:
            out += ("." if out else "") + str(part)
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
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


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


# ============================================================================ building
def load_structures(cfg: RunConfig, base_dir: str | os.PathLike = ".") -> list:
    """The structures a configuration names, as a list of ``ase.Atoms``.

    Raises :class:`ConfigError` when a file cannot be read or holds no structure.
    """
    return load_structures_with_sources(cfg, base_dir)[0]


def _frame_numbers(index: str, n: int) -> list[int]:
    """The frame numbers an ase.io ``index`` string selects from a file of ``n`` frames."""
    from ase.io.formats import string2index

    sel = string2index(index)
    frames = list(range(n))
    return [frames[sel]] if isinstance(sel, int) else frames[sel]


def load_structures_with_sources(
    cfg: RunConfig, base_dir: str | os.PathLike = "."
) -> tuple[list, list[tuple[str | None, int]]]:
    """The structures and, for each, ``(file, frame index in that file)``.

    Generated structures have no file: ``(None, i)``. The frame index counts every frame of
    the file, also those that ``structures.index`` leaves out.

    Raises
    ------
    ConfigError
        A file cannot be read, an index selects nothing valid, or no structure at all.
    """
    s = cfg.structures
    if s.generate is not None:
        from .demo import make_structures

        seed = cfg.seed if s.seed is None else s.seed
        made = make_structures(s.count, seed=seed, rattle=s.rattle, max_size=s.max_size)
        return made, [(None, i) for i in range(len(made))]
    import ase.io

    out, sources = [], []
    for f in s.files(base_dir):
        try:
            frames = ase.io.read(f, index=":", format=s.format)
        except Exception as exc:  # ase raises many kinds
            raise ConfigError(f"structures.path: cannot read {f!r} with ase.io: {exc}") from exc
        frames = frames if isinstance(frames, list) else [frames]
        try:
            keep = _frame_numbers(s.index, len(frames))
        except (ValueError, IndexError) as exc:
            raise ConfigError(
                f"structures.index: {s.index!r} does not select frames of {f!r} "
                f"({len(frames)} frames): {exc}"
            ) from None
        out.extend(frames[k] for k in keep)
        sources.extend((f, k) for k in keep)
    if not out:
        raise ConfigError(f"structures.path: {s.path!r} holds no structure.")
    return out, sources


def build_model(cfg: RunConfig):
    """The energy model of a configuration."""
    import fused_dynamics as fd

    m = cfg.model.model_dump()
    kind = m.pop("type")
    cls = {
        "lennard_jones": fd.models.LennardJones,
        "morse": fd.models.Morse,
        "soft_sphere": fd.models.SoftSphere,
    }[kind]
    if m.get("images") is None:
        m.pop("images", None)
    else:
        m["images"] = tuple(m["images"])
    if m.get("switch_onset") is None:
        m.pop("switch_onset", None)
    elif m["switch_onset"] >= m["cutoff"]:
        raise ConfigError(
            f"model.switch_onset: {m['switch_onset']} must be smaller than cutoff {m['cutoff']}"
        )
    return cls(**m)


def _stage_class(kind: str):
    import fused_dynamics as fd

    classes = {
        "fire": fd.FIRE,
        "fire2": fd.FIRE2,
        "gradient_descent": fd.GradientDescent,
        "nve": fd.NVE,
        "nvt_langevin": fd.NVTLangevin,
        "nvt_nose_hoover": fd.NVTNoseHoover,
    }
    pair = npt_classes()
    if pair is not None:
        classes["npt"], classes["nph"] = pair
    return classes[kind]


def build_stages(cfg: RunConfig, model=None) -> list:
    """The sub-stages of a configuration, in order, all sharing one model."""
    import fused_dynamics as fd

    model = build_model(cfg) if model is None else model
    stages = []
    for i, sc in enumerate(cfg.stages):
        kwargs = sc.stage_kwargs()
        if sc.type == "nvt_langevin" and "seed" not in kwargs:
            kwargs["seed"] = cfg.seed + i
        criteria = []
        if sc.fmax is not None:
            criteria.append({"key": "fmax", "threshold": sc.fmax})
        for c in sc.criteria or ():
            criteria.append(c.model_dump(exclude_none=True))
        hook = fd.ConvergenceHook(criteria) if criteria else None
        try:
            stage = _stage_class(sc.type)(
                model, n_steps=sc.n_steps, convergence_hook=hook, **kwargs
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"stages[{i}] ({sc.type}): {exc}") from exc
        stages.append(stage)
    return stages


def build_fused(cfg: RunConfig, model=None, hooks=(), first_hooks=()):
    """The :class:`~fused_dynamics.FusedStage` of a configuration.

    ``first_hooks`` are fused-level hooks placed before the ones the configuration makes
    (thermalisation on entry), ``hooks`` after them.
    """
    import jax

    import fused_dynamics as fd

    stages = build_stages(cfg, model)
    init_fn = None
    if cfg.initial_temperature is not None:
        key = jax.random.PRNGKey(cfg.seed)
        temperature = float(cfg.initial_temperature)

        def init_fn(batch, key=key, temperature=temperature):
            return fd.initialize_velocities(batch, temperature, key)

    entry = []
    for i in range(1, len(cfg.stages)):
        t = entry_temperature(cfg, i)
        if t is not None:
            entry.append(ThermalizeOnEntryHook(code=i, temperature=t, seed=cfg.seed + 1000 + i))
    return fd.FusedStage(
        list(enumerate(stages)),
        init_fn=init_fn,
        hooks=tuple(first_hooks) + tuple(entry) + tuple(hooks),
    )
