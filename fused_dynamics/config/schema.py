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
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .base import _Section, output_format
from .model_keys import ModelConfig

__all__ = [
    "STAGE_TYPES",
    "CapacityConfig",
    "CriterionConfig",
    "FIRE2Config",
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
    "resolve_structure_files",
]


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
    refill_frequency: PositiveInt = Field(
        20, description="steps per compiled chunk between host visits (writes and refills)"
    )
    checkpoint_every: int = Field(
        1000,
        description="steps between checkpoints of the run, written next to the first output "
        "as '<outputs[0].path>.ckpt' so that a killed run continues with --resume; each costs "
        "one copy of the batch from the device and one file write (about the size of the "
        "batch); a chunk is cut short to end at a checkpoint step; 0: no checkpoints",
    )
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "gpu", "cuda", "rocm", "tpu"] = "auto"
    initial_temperature: float | None = Field(
        None, ge=0, description="draw Maxwell-Boltzmann velocities at this temperature (K)"
    )

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_steps(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"a whole number of steps >= 1, or 0 for no checkpoints (got {v!r})")
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
