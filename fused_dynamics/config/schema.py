"""Schema of a run configuration: structures, stages, capacity, outputs, report, the run.

:class:`RunConfig` is the whole run; the model's keys are in
:mod:`fused_dynamics.config.model_keys`.
"""

from __future__ import annotations

import glob
import os
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..parameters import from_info
from ..validation import MAX_STEPS, SEED_LIMIT
from .base import ConfigError, _Section, output_format
from .model_keys import ModelConfig

__all__ = [
    "STAGE_TYPES",
    "CapacityConfig",
    "CriterionConfig",
    "FIRE2Config",
    "InfoValue",
    "FIREConfig",
    "GradientDescentConfig",
    "NPHConfig",
    "NPTConfig",
    "NVEConfig",
    "NVTLangevinConfig",
    "NVTNoseHooverConfig",
    "OutputConfig",
    "ReportConfig",
    "RunConfig",
    "StageConfig",
    "StructuresConfig",
    "entry_temperature",
    "info_or_value",
    "resolve_structure_files",
]


class InfoValue(_Section):
    """A value each structure carries: ``{info = "T"}`` reads ``atoms.info["T"]`` of every
    structure (``fd.from_info``, docs/semantics.md §14a). A structure without a valid value
    is REJECTED, with a reason naming the key."""

    info: str = Field(description="the atoms.info key of each structure")

    @field_validator("info")
    @classmethod
    def _key(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"the atoms.info key of each structure; got {v!r}, which names none")
        if v != v.strip():
            raise ValueError(
                f"an atoms.info key without leading or trailing spaces, got {v!r} "
                f"(did you mean {v.strip()!r}?)"
            )
        return v


#: A number, or ``{info = "KEY"}`` (:class:`InfoValue`).
_PER = " (or {info = KEY}: each structure's own atoms.info value)"


class CriterionConfig(_Section):
    """One convergence criterion: ``reduce(key) <= threshold``."""

    key: str = Field(
        description="the quantity: fmax, energy, energy_change, temperature, forces, ..."
    )
    threshold: float = Field(
        description="in the key's unit: eV/Å (fmax, forces), eV (energy, energy_change), K "
        "(temperature); converged when the reduced value is <= this"
    )
    reduce_op: Literal["min", "max", "norm", "mean", "sum"] | None = Field(
        None, description="per-atom reduction of a per-atom key (default: the absolute maximum)"
    )


# a stage's step budget: the step counters are int32 (validation.MAX_STEPS, 2**31 - 1)
StepBudget = Annotated[int, Field(gt=0, le=MAX_STEPS)]


class _StageBase(_Section):
    n_steps: StepBudget | InfoValue | None = Field(
        None, description="steps: the step budget of each system in this stage" + _PER
    )
    fmax: PositiveFloat | InfoValue | None = Field(
        None, description="eV/Å: converged when fmax <= this" + _PER
    )
    criteria: list[CriterionConfig] | None = Field(
        None,
        description="convergence criteria, all must hold (AND), combined with fmax; e.g. "
        '[{key = "energy_change", threshold = 1e-6}]',
    )
    entry_velocities: Literal["auto", "keep", "thermal"] = Field(
        "auto",
        description="velocities of a system entering this stage from the previous one: "
        "'thermal' draws Maxwell-Boltzmann velocities at entry_temperature (default: the "
        "stage's temperature); 'keep' keeps them; 'auto' is 'thermal' after an optimizer "
        "(FIRE's velocities are not physical ones) for a stage with a temperature, else 'keep'",
    )
    entry_temperature: NonNegativeFloat | InfoValue | None = Field(
        None, description="K, for entry_velocities = 'thermal'" + _PER
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
        return {
            k: info_or_value(getattr(self, k))
            for k in type(self).model_fields
            if k not in skip and getattr(self, k) is not None
        }


def info_or_value(value):
    """``fd.from_info(key)`` for an :class:`InfoValue`, else the value as it is."""
    return from_info(value.info) if isinstance(value, InfoValue) else value


_ASE_TIME = "ASE time unit Å·sqrt(amu/eV) (about 10.18 fs), as ase.optimize.FIRE; not fs"
_CELL_FILTER = "relax the cell too (ASE's FrechetCellFilter); none: fixed cell"


class FIREConfig(_StageBase):
    """FIRE (Bitzek et al., PRL 97, 170201 (2006)), ASE's or the velocity Verlet form."""

    type: Literal["fire"] = Field(description="FIRE optimizer")
    dt: PositiveFloat | None = Field(
        None,
        description=f"initial time step; flavor 'ase': {_ASE_TIME} (default 0.1); flavor "
        "'vv': fs (default 1.0)",
    )
    maxstep: PositiveFloat = Field(0.2, description="Å: largest step of a system per iteration")
    dtmax: PositiveFloat | None = Field(
        None, description="largest time step, unit of dt (default 1.0 for 'ase', 10.0 fs for 'vv')"
    )
    Nmin: PositiveInt = Field(5, description="steps with v·F > 0 before dt may grow")
    finc: PositiveFloat = Field(1.1, description="growth factor of dt, >= 1")
    fdec: PositiveFloat = Field(0.5, description="shrink factor of dt, in (0, 1]")
    astart: PositiveFloat = Field(0.1, description="initial mixing coefficient alpha, in [0, 1]")
    fa: PositiveFloat = Field(0.99, description="decay factor of alpha, in (0, 1]")
    flavor: Literal["ase", "vv"] = Field(
        "ase",
        description="'ase': ase.optimize.FIRE step for step; 'vv': mass-weighted, on velocity "
        "Verlet",
    )
    cell_filter: Literal["frechet"] | None = Field(None, description=_CELL_FILTER)
    scalar_pressure: float = Field(0.0, description="eV/Å³: external pressure of the cell filter")


class FIRE2Config(_StageBase):
    """FIRE 2.0 (Guénolé et al., Comput. Mater. Sci. 175, 109584 (2020)), as ASE's FIRE2."""

    type: Literal["fire2"] = Field(description="FIRE 2.0 optimizer")
    dt: PositiveFloat = Field(0.1, description=f"initial time step, {_ASE_TIME}")
    maxstep: PositiveFloat = Field(0.2, description="Å: largest step of a system per iteration")
    dtmax: PositiveFloat = Field(1.0, description="largest time step, unit of dt")
    dtmin: PositiveFloat = Field(2e-3, description="smallest time step, unit of dt")
    Nmin: PositiveInt = Field(20, description="N_delay: steps before dt may grow")
    finc: PositiveFloat = Field(1.1, description="growth factor of dt, >= 1")
    fdec: PositiveFloat = Field(0.5, description="shrink factor of dt, in (0, 1]")
    astart: PositiveFloat = Field(0.25, description="initial mixing coefficient alpha, in [0, 1]")
    fa: PositiveFloat = Field(0.99, description="decay factor of alpha, in (0, 1]")
    Npneg_max: PositiveInt | None = Field(
        2000, description="stop a system after this many steps in a row with v·F <= 0"
    )
    initialdelay: bool = Field(
        True, description="no dt shrink or alpha reset during a system's first Nmin steps"
    )
    cell_filter: Literal["frechet"] | None = Field(None, description=_CELL_FILTER)
    scalar_pressure: float = Field(0.0, description="eV/Å³: external pressure of the cell filter")


class GradientDescentConfig(_StageBase):
    """Steepest descent: positions move by step_size times the forces."""

    type: Literal["gradient_descent"] = Field(description="gradient descent optimizer")
    step_size: PositiveFloat = Field(description="Å²/eV: step per unit force")
    maxstep: PositiveFloat | None = Field(
        None, description="Å: largest displacement of an atom per step (default: none)"
    )


class NVEConfig(_StageBase):
    """Velocity Verlet (microcanonical)."""

    type: Literal["nve"] = Field(description="velocity Verlet, constant energy")
    dt: PositiveFloat | InfoValue = Field(description="fs: time step" + _PER)


class NVTLangevinConfig(_StageBase):
    """Langevin dynamics (BAOAB, Leimkuhler & Matthews, AMRX 2013, 34 (2013))."""

    type: Literal["nvt_langevin"] = Field(description="Langevin thermostat")
    dt: PositiveFloat | InfoValue = Field(description="fs: time step" + _PER)
    temperature: NonNegativeFloat | InfoValue = Field(description="K: target temperature" + _PER)
    friction: NonNegativeFloat | InfoValue = Field(description="1/fs: friction coefficient" + _PER)
    seed: int | None = Field(
        None, description="noise seed (default: the run's seed plus the stage index)"
    )


class NVTNoseHooverConfig(_StageBase):
    """Nosé-Hoover chain thermostat (Martyna, Klein & Tuckerman, JCP 97, 2635 (1992))."""

    type: Literal["nvt_nose_hoover"] = Field(description="Nosé-Hoover chain thermostat")
    dt: PositiveFloat | InfoValue = Field(description="fs: time step" + _PER)
    temperature: PositiveFloat | InfoValue = Field(description="K: target temperature" + _PER)
    tdamp: PositiveFloat | InfoValue = Field(
        description="fs: thermostat time scale (about 100 dt)" + _PER
    )
    chain_length: PositiveInt = Field(3, description="thermostats in the chain")
    chain_steps: PositiveInt = Field(2, description="multiple time steps of the chain")
    sy_order: Literal[1, 3, 5, 7] = Field(3, description="Suzuki-Yoshida order of the chain")


class NPTConfig(_StageBase):
    """Isothermal-isobaric MTK dynamics (Martyna, Tobias & Klein, JCP 101, 4177 (1994))."""

    type: Literal["npt"] = Field(description="MTK barostat with a Nosé-Hoover chain")
    dt: PositiveFloat | InfoValue = Field(description="fs: time step" + _PER)
    temperature: PositiveFloat | InfoValue = Field(description="K: target temperature" + _PER)
    pressure: float | InfoValue = Field(
        description="eV/Å³: target pressure (1 GPa = ase.units.GPa = 0.00624 eV/Å³)" + _PER
    )
    tdamp: PositiveFloat | InfoValue = Field(description="fs: thermostat time scale" + _PER)
    pdamp: PositiveFloat | InfoValue = Field(description="fs: barostat time scale" + _PER)
    coupling: Literal["isotropic", "anisotropic", "triclinic"] = Field(
        "isotropic", description="which cell degrees of freedom move"
    )
    chain_length: PositiveInt = Field(3, description="thermostats in the chain")


class NPHConfig(_StageBase):
    """Isenthalpic MTK dynamics (the NPT stage without a thermostat)."""

    type: Literal["nph"] = Field(description="MTK barostat, no thermostat")
    dt: PositiveFloat | InfoValue = Field(description="fs: time step" + _PER)
    pressure: float | InfoValue = Field(description="eV/Å³: target pressure" + _PER)
    pdamp: PositiveFloat | InfoValue = Field(description="fs: barostat time scale" + _PER)
    coupling: Literal["isotropic", "anisotropic", "triclinic"] = Field(
        "isotropic", description="which cell degrees of freedom move"
    )
    mass_temperature: PositiveFloat | None = Field(
        None,
        description="K: T_m of the barostat mass (default: each system's temperature on entry, "
        "at least 1 K)",
    )


_STAGE_CONFIGS: list[type[_StageBase]] = [
    FIREConfig,
    FIRE2Config,
    GradientDescentConfig,
    NVEConfig,
    NVTLangevinConfig,
    NVTNoseHooverConfig,
    NPTConfig,
    NPHConfig,
]

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


class StructuresConfig(_Section):
    """Either ``path`` (files or globs read by ase.io) or ``generate`` (a built-in set)."""

    path: str | list[str] | None = Field(
        None,
        description="your own structures: a file, a glob, or a list of files and globs, e.g. "
        '["relaxed.extxyz", "POSCAR", "cifs/*.cif"], relative to this file; any format '
        "ase.io.read reads (extxyz, cif, POSCAR, ...), every frame of a multi-frame file. Read "
        "in the listed order, each file's frames in file order, a glob's matches sorted by "
        "name; system_id i is the i-th structure so read",
    )
    index: str = Field(
        ":", description="which frames of each file, as ase.io.read's index (':' all, '-1' last)"
    )
    format: str | None = Field(
        None, description="ase.io format of every file, when the suffix does not say"
    )
    generate: Literal["argon"] | None = Field(
        None,
        description="a built-in set instead of path; argon: perturbed LJ clusters and crystals",
    )
    count: PositiveInt = Field(200, description="generate: number of structures")
    rattle: float = Field(0.15, ge=0, description="Å: generate: Gaussian noise on positions")
    max_size: PositiveInt = Field(32, description="atoms: generate: largest structure")
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
                "give exactly one of 'path' (a file, a glob or a list of them: your own "
                "structures) or 'generate' (allowed: 'argon')"
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

    @field_validator("path", mode="before")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError(
                    "an empty list names no structure; give a file, a glob or a list of them"
                )
            bad = [x for x in v if not isinstance(x, str) or not x]
            if bad:
                raise ValueError(
                    f"every entry must be a file name or a glob (a non-empty string), got "
                    f"{bad[0]!r}"
                )
        elif v is not None and not isinstance(v, str):
            raise ValueError(
                f"a file, a glob or a list of them (strings), e.g. ['a.cif', 'b/*.extxyz'], "
                f"got {v!r}"
            )
        return v

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | list[str] | None, info: ValidationInfo) -> Any:
        if v is None:
            return v
        try:
            resolve_structure_files(v, _base_dir(info))
        except ConfigError as exc:  # reported under the key by the validation error
            raise ValueError(str(exc).removeprefix("structures.path: ")) from None
        return v

    def patterns(self) -> list[str]:
        """``path`` as a list of patterns (one for a single string)."""
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def files(self, base_dir: str | os.PathLike) -> list[str]:
        """The files ``path`` names, in reading order (see :func:`resolve_structure_files`)."""
        return resolve_structure_files(self.path, base_dir) if self.path else []


class CapacityConfig(_Section):
    """The batch: how many atoms and systems one compiled step holds."""

    max_atoms: PositiveInt = Field(
        description="atoms: atom capacity N of the batch; at least the largest structure"
    )
    max_systems: PositiveInt = Field(description="systems: system capacity S of the batch")
    max_atoms_per_system: PositiveInt | None = Field(
        None,
        description="atoms: largest structure admitted (default: the largest structure that "
        "fits max_atoms)",
    )
    sort_by_size: bool = Field(
        False, description="admit the largest structures first (better packing)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> CapacityConfig:
        if self.max_atoms_per_system is not None and self.max_atoms_per_system > self.max_atoms:
            raise ValueError(
                f"@max_atoms_per_system: {self.max_atoms_per_system} is larger than "
                f"capacity.max_atoms = {self.max_atoms}; lower it to at most "
                f"{self.max_atoms}, or raise capacity.max_atoms"
            )
        return self


class OutputConfig(_Section):
    """One output; every output receives every system that leaves the run."""

    type: Literal["extxyz", "zarr"] = Field(description="file format")
    path: str = Field(
        description="file (extxyz) or store (zarr, a folder), relative to this file; refused "
        "if it exists, unless --overwrite or --resume"
    )
    capacity: PositiveInt | None = Field(None, description="systems: most this output takes")
    stress: bool = Field(False, description="always compute the stress and write it")
    order: Literal["completion", "input"] = Field(
        "completion",
        description="order systems are written in: 'completion' (as they leave the run) or "
        "'input' (the order the structures were read; a system that finishes before an "
        "earlier one waits in a side file beside the output, e.g. run.pending.extxyz, and "
        "moves in when its turn comes)",
    )


class ReportConfig(_Section):
    """What the run reports besides its outputs."""

    plot: str | None = Field(None, description="PNG figure of the run (needs matplotlib)")
    record: str | None = Field(None, description="CSV of the per-step record")
    record_every: PositiveInt = Field(5, description="steps between recorded samples")
    progress: bool = Field(True, description="tqdm progress bar on stderr")
    summary: bool = Field(True, description="print the summary table")


class RunConfig(_Section):
    """The whole run; see the package docstring (:mod:`fused_dynamics.config`) for an example."""

    structures: StructuresConfig = Field(description="the structures to run")
    model: ModelConfig = Field(description="the energy model")
    stages: list[StageConfig] = Field(
        min_length=1, description="the chain of stages every system goes through, in order"
    )
    capacity: CapacityConfig = Field(description="the batch")
    outputs: list[OutputConfig] = Field(
        min_length=1, description="where every system is written when it leaves the run"
    )
    report: ReportConfig = Field(ReportConfig(), description="figure, record and summary")
    refill_frequency: StepBudget = Field(
        20, description="steps per compiled chunk between host visits (writes and refills)"
    )
    convergence_every: StepBudget = Field(
        1,
        description="steps (of each system in its stage) between tests of the stages' "
        "criteria (fmax, ...); 1 tests every step; k > 1 saves the observables' cost and lets "
        "a system migrate at most k - 1 steps late, never early; budgets and the failure "
        "check still apply every step",
    )
    checkpoint_every: int = Field(
        1000,
        description="steps between checkpoints of the run, written next to the first output "
        "as '<outputs[0].path>.ckpt' so that a killed run continues with --resume; each costs "
        "one copy of the batch from the device and one file write (about the size of the "
        "batch); a chunk is cut short to end at a checkpoint step; 0: no checkpoints",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=SEED_LIMIT,
        description="seed of every random stream (velocities, Langevin noise); the streams "
        "derived from it wrap around 2**32",
    )
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="precision of the batch and the model"
    )
    device: Literal["auto", "cpu", "gpu", "cuda", "rocm", "tpu"] = Field(
        "auto", description="where the run goes ('auto': JAX's default device)"
    )
    initial_temperature: float | None = Field(
        None, ge=0, description="K: draw Maxwell-Boltzmann velocities at this temperature"
    )
    compilation_cache: bool | str = Field(
        True,
        description="keep the compiled programs on disk so that a later run of the same "
        "shapes loads them instead of compiling (JAX's persistent compilation cache): true: "
        "in $FUSED_DYNAMICS_CACHE_DIR, else the folder JAX is set to use "
        "($JAX_COMPILATION_CACHE_DIR), else $XDG_CACHE_HOME/fused_dynamics/jax/<host>, else "
        "~/.cache/fused_dynamics/jax/<host>, one folder per kind of processor (when that "
        "folder cannot be used, a warning and no cache); a path: that folder (relative to "
        "this file), refused if it cannot be used; "
        "false: compile every time",
    )

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_steps(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"a whole number of steps >= 1, or 0 for no checkpoints (got {v!r})")
        return v

    @field_validator("compilation_cache")
    @classmethod
    def _cache_folder(cls, v: bool | str) -> bool | str:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("true, false or a folder; got an empty string")
            if v.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
                raise ValueError(
                    f"true, false or a folder; got the string {v!r}: write true or false "
                    "without quotes (a folder of that name: write './" + v.strip() + "')"
                )
            if v != v.strip():
                raise ValueError(f"a folder name without leading or trailing spaces, got {v!r}")
        return v

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
                "@stages[0].entry_velocities: systems enter the first stage "
                "from the structures; use the top-level 'initial_temperature' instead"
            )
        for i, st in enumerate(self.stages):
            if st.entry_velocities == "thermal" and entry_temperature(self, i) is None:
                raise ValueError(
                    f"@stages[{i}].entry_temperature: entry_velocities = 'thermal' needs a "
                    f"temperature and stage {st.type!r} has none; give entry_temperature (K)"
                )
        return self

    @model_validator(mode="after")
    def _final_stage_finishes(self) -> RunConfig:
        last = self.stages[-1]
        if last.n_steps is None and not last.has_criterion():
            raise ValueError(
                f"@stages[{len(self.stages) - 1}].n_steps: ({last.type}) the final stage needs "
                "'n_steps' or a convergence criterion ('fmax' or 'criteria'), or systems never "
                "finish"
            )
        return self


_OPTIMIZERS = ("fire", "fire2", "gradient_descent")


def entry_temperature(cfg: RunConfig, i: int) -> float | InfoValue | None:
    """Temperature (K) at which systems entering stage ``i`` get fresh velocities (an
    :class:`InfoValue` when each structure carries its own), or None."""
    st = cfg.stages[i]
    if i == 0 or st.entry_velocities == "keep":
        return None
    own = st.entry_temperature
    if own is None:
        own = getattr(st, "temperature", None)
    if own is not None and not isinstance(own, InfoValue):
        own = float(own)
    if st.entry_velocities == "thermal":
        return own
    # auto
    after_optimizer = cfg.stages[i - 1].type in _OPTIMIZERS
    return own if after_optimizer else None


def _base_dir(info: ValidationInfo) -> str:
    ctx = info.context or {}
    return os.fspath(ctx.get("base_dir", "."))


def resolve_structure_files(patterns: str | list[str], base_dir: str | os.PathLike) -> list[str]:
    """The files a ``structures.path`` names, in the order they are read.

    Each pattern in turn, in the listed order: a file itself, or the matches of a glob
    (``*``, ``?``, ``[...]``; ``**`` for any depth) sorted by name. A file named again by a
    later pattern is read once, where it first appears. Relative patterns are resolved
    against ``base_dir`` (the configuration file's folder); ``~`` is expanded.

    Parameters
    ----------
    patterns : str or list of str
    base_dir : path

    Returns
    -------
    list of str
        Absolute paths.

    Raises
    ------
    ConfigError
        A file that does not exist or a glob that matches no file, naming ``structures.path``,
        the pattern and where it was looked for.
    """
    seen: dict[str, None] = {}
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        matches = _matches(pattern, os.fspath(base_dir))
        if not matches:
            raise ConfigError(f"structures.path: {_no_match(pattern, patterns, base_dir)}")
        seen.update(dict.fromkeys(matches))
    return list(seen)


def _matches(pattern: str, base: str) -> list[str]:
    """Absolute paths of the files one pattern names (a glob's sorted by name)."""
    expanded = os.path.expanduser(pattern)
    full = os.path.abspath(os.path.join(base, expanded))
    if not glob.has_magic(expanded):
        return [full] if os.path.isfile(full) else []
    if os.path.isabs(expanded):
        found = glob.glob(expanded, recursive=True)
    else:
        found = [os.path.join(base, m) for m in glob.glob(expanded, root_dir=base, recursive=True)]
    return sorted(os.path.abspath(p) for p in found if os.path.isfile(p))


def _no_match(pattern: str, patterns, base_dir) -> str:
    """Why a pattern of ``structures.path`` names no file, and what to do."""
    full = os.path.abspath(os.path.join(os.fspath(base_dir), os.path.expanduser(pattern)))
    entry = "" if isinstance(patterns, str) else f" (entry {list(patterns).index(pattern)})"
    what = "glob" if glob.has_magic(pattern) else "file"
    hint = (
        "it is a folder: give a glob of its files, e.g. " + repr(os.path.join(pattern, "*.cif"))
        if os.path.isdir(full)
        else "relative paths are resolved against the configuration file's folder"
    )
    return f"no structure file matches the {what} {pattern!r}{entry} (looked for {full!r}); {hint}"
