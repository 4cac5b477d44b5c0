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
    sigma = 3.405                # Å
    epsilon = 0.0104             # eV
    cutoff = 7.5                 # Å
    switch_onset = 6.5           # Å
    # species = ["Ar"]           # the elements these parameters are for (see below)

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

Keys of the model
-----------------
``model.type``
    ``lennard_jones`` (``sigma`` Å, ``epsilon`` eV), ``morse`` (``D`` eV, ``alpha`` 1/Å,
    ``r0`` Å) or ``soft_sphere`` (``sigma`` Å, also the cutoff; ``epsilon`` eV, default 1;
    ``alpha``, an exponent, default 2). ``cutoff`` (Å), ``switch_onset`` (Å, below the
    cutoff), ``shift`` and ``images`` apply to every pair.
``model.species``
    A list of element symbols (``["Ar"]``): the elements the one set of parameters is for,
    the same for every pair of them. Without it the parameters are used only when all the
    structures together hold one element type (that element is implied and printed); with
    two or more elements the run is refused (exit 2) naming each element and the first
    structure (file and frame) holding it. A structure with an element not in ``species``
    is refused the same way. Every check is made before anything compiles, and by
    ``--validate-only``.
``model.pairs``
    Parameters per species pair instead of one set, a table keyed by an element (``Ar``: the
    Ar-Ar pair) or two elements joined by ``-`` (``Ar-Kr``, the same pair as ``Kr-Ar``;
    give it once). Each entry is a table of the model's parameters: ``{sigma, epsilon}``
    (Lennard-Jones; Å, eV), ``{D, alpha, r0}`` (Morse; eV, 1/Å, Å), ``{sigma, epsilon,
    alpha}`` (soft sphere; ``epsilon`` and ``alpha`` in every entry or in none, then
    ``model.epsilon`` / ``model.alpha`` for all pairs). ``epsilon`` or ``D`` = 0: the pair
    does not interact. Every pair of the listed elements must be given, unless
    ``model.mixing`` fills the cross pairs. The elements are the keys; a structure with
    another element is refused (exit 2). Excludes ``species`` and the scalar parameters::

        [model]
        type = "lennard_jones"
        cutoff = 7.5
        mixing = "lorentz_berthelot"     # optional
        [model.pairs]
        Ar = {sigma = 3.405, epsilon = 0.0104}
        Kr = {sigma = 3.65, epsilon = 0.014}
        "Ar-Kr" = {sigma = 3.5, epsilon = 0.012}   # optional with mixing

    In YAML, ``pairs: {Ar: {sigma: 3.405, epsilon: 0.0104}, ...}`` (quote ``"No"``, which
    YAML reads as false).
``model.mixing``
    With ``pairs``: ``"lorentz_berthelot"`` (``σ_ij = (σ_i + σ_j) / 2``, ``ε_ij = sqrt(ε_i
    ε_j)``) or ``"geometric"`` (``σ_ij = sqrt(σ_i σ_j)``, ``ε_ij = sqrt(ε_i ε_j)``) fills each
    unlisted pair of two different elements from their own entries; listed pairs are kept.
    Lennard-Jones and soft sphere only (soft sphere: ``alpha`` is not mixed).

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
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
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
    "check_structure_species",
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


# ---------------------------------------------------------------------------- model species
def _element_symbol(value: Any, what: str) -> str:
    """A chemical symbol as ASE spells it ("Ar"); ValueError saying how to write it otherwise."""
    from ase.data import atomic_numbers

    if isinstance(value, bool):
        raise ValueError(
            f"{what} {value!r} is not an element symbol; in YAML quote symbols that read as "
            'booleans ("No" is false, "On"/"Off"/"Y"... may be too): write "No"'
        )
    if not isinstance(value, str):
        raise ValueError(
            f"{what} {value!r} is not an element symbol; write it as a string, e.g. 'Ar'"
        )
    if value in atomic_numbers and value != "X":
        return value
    hint = ""
    fixed = value[:1].upper() + value[1:].lower()
    if fixed in atomic_numbers and fixed != "X":
        hint = f" (did you mean {fixed!r}?)"
    raise ValueError(
        f"{what} {value!r} is not an element symbol{hint}; write symbols as 'Ar', 'Kr'"
    )


def parse_pair_key(key: Any) -> tuple[str, str]:
    """``"Ar"`` -> ``("Ar", "Ar")``, ``"Ar-Kr"`` -> ``("Ar", "Kr")``; ValueError otherwise."""
    if isinstance(key, bool) or not isinstance(key, str):
        _element_symbol(key, "key")
    parts = key.split("-")
    if len(parts) == 1:
        sym = _element_symbol(parts[0].strip(), "key: element")
        return sym, sym
    if len(parts) == 2:
        a, b = (_element_symbol(x.strip(), "key: element") for x in parts)
        return a, b
    raise ValueError(
        f"key {key!r} must be one element ('Ar': the Ar-Ar pair) or two joined by '-' ('Ar-Kr')"
    )


def _check_pair_key(key: str) -> str:
    parse_pair_key(key)
    return key


PairKey = Annotated[str, AfterValidator(_check_pair_key)]
MIXING_RULES = ("lorentz_berthelot", "geometric")


class _PairEntry(_Section):
    """Parameters of one species pair in ``model.pairs`` (a table of them)."""

    @model_validator(mode="before")
    @classmethod
    def _a_table(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            keys = ", ".join(
                f"{k} = ... ({f.description})"
                for k, f in cls.model_fields.items()
                if f.is_required()
            )
            raise ValueError(f"must be a table of this pair's parameters {{{keys}}}, got {data!r}")
        return data


class LennardJonesPair(_PairEntry):
    sigma: PositiveFloat = Field(description="Å")
    epsilon: NonNegativeFloat = Field(description="eV; 0: the pair does not interact")


class MorsePair(_PairEntry):
    D: NonNegativeFloat = Field(description="eV; 0: the pair does not interact")
    alpha: PositiveFloat = Field(description="1/Å")
    r0: PositiveFloat = Field(description="Å")


class SoftSpherePair(_PairEntry):
    sigma: PositiveFloat = Field(description="Å")
    epsilon: NonNegativeFloat | None = Field(
        None, description="eV; in every entry or in none (then model.epsilon for all pairs)"
    )
    alpha: PositiveFloat | None = Field(
        None, description="exponent; in every entry or in none (then model.alpha for all pairs)"
    )


class _SpeciesKeys(_Section):
    """Keys saying which elements a model's parameters are for (every model type)."""

    species: list[str] | None = Field(
        None,
        description="scalar form: the elements these parameters are for (the same for every "
        "pair of them); structures with another element are refused",
    )
    mixing: Literal["lorentz_berthelot", "geometric"] | None = Field(
        None, description="with pairs: fill unlisted cross pairs from the two elements' entries"
    )
    # pairs: dict[PairKey, <Type>Pair] | None, declared by each model type

    # names of the per-pair parameters, the ones required in the scalar form
    _scalar: ClassVar[tuple[str, ...]] = ()
    _units: ClassVar[dict[str, str]] = {}
    _mixable: ClassVar[bool] = True

    @field_validator("species", mode="before")
    @classmethod
    def _species_symbols(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, str):
            raise ValueError(f"must be a list of element symbols, e.g. [{v!r}], got {v!r}")
        if not isinstance(v, list) or not v:
            raise ValueError(f"must be a non-empty list of element symbols, e.g. ['Ar'], got {v!r}")
        out = [_element_symbol(x, "element") for x in v]
        dup = sorted({x for x in out if out.count(x) > 1})
        if dup:
            raise ValueError(f"names {', '.join(dup)} more than once")
        return out

    @field_validator("pairs", mode="before", check_fields=False)
    @classmethod
    def _pairs_table(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict) or not v:
            raise ValueError(
                "must be a non-empty table keyed by element ('Ar') or pair ('Ar-Kr'), e.g. "
                + _pairs_example(cls._scalar)
            )
        for key in v:
            if isinstance(key, bool) or not isinstance(key, str):
                _element_symbol(key, "key")
        return v

    def pair_table(self) -> dict[tuple[str, str], dict[str, float]]:
        """``{(a, b): {parameter: value}}`` with ``a <= b`` in atomic number (pairs form)."""
        from ase.data import atomic_numbers

        out = {}
        for key, entry in (self.pairs or {}).items():
            a, b = sorted(parse_pair_key(key), key=atomic_numbers.__getitem__)
            out[(a, b)] = {k: v for k, v in entry.model_dump().items() if v is not None}
        return out

    def elements(self) -> list[str] | None:
        """The elements the model has parameters for (None: any one element, implied later)."""
        from ase.data import atomic_numbers

        if self.pairs is not None:
            return sorted({x for pair in self.pair_table() for x in pair}, key=atomic_numbers.get)
        return None if self.species is None else list(self.species)

    @model_validator(mode="after")
    def _one_form(self):
        given = sorted(n for n in self._scalar if getattr(self, n) is not None)
        units = ", ".join(f"{n} ({self._units[n]})" for n in self._scalar)
        if self.pairs is None:
            missing = [n for n in self._scalar if getattr(self, n) is None]
            if missing:
                raise ValueError(
                    f"missing {', '.join(missing)}: give {units} (the same for every pair, with "
                    "model.species naming the elements), or a per-species table model.pairs, "
                    "e.g. " + _pairs_example(self._scalar)
                )
            if self.mixing is not None:
                raise ValueError(
                    "@mixing: mixing goes with a per-species table model.pairs; with one set of "
                    "parameters there is nothing to mix: remove it"
                )
            return self
        if given:
            raise ValueError(
                f"@pairs: {', '.join(given)} and pairs exclude each other: give the "
                "parameters either once for every pair (then model.species names the "
                "elements) or per species pair in model.pairs"
            )
        if self.species is not None:
            raise ValueError(
                "@species: species and pairs exclude each other: with pairs the elements are "
                "the keys of the table; remove species"
            )
        self._check_pairs()
        return self

    def _check_pairs(self) -> None:
        """Each pair once; every pair of the listed elements given or mixed."""
        from ase.data import atomic_numbers

        seen: dict[tuple[str, str], str] = {}
        for key in self.pairs:
            a, b = sorted(parse_pair_key(key), key=atomic_numbers.__getitem__)
            if (a, b) in seen:
                raise ValueError(
                    f"@pairs.{_key_part(key)}: the same pair as "
                    f"model.pairs.{_key_part(seen[(a, b)])}; give it once"
                )
            seen[(a, b)] = key
        elements = self.elements()
        missing_self = [e for e in elements if (e, e) not in seen]
        cross = [
            (a, b) for i, a in enumerate(elements) for b in elements[i + 1 :] if (a, b) not in seen
        ]
        units = ", ".join(f"{n} ({self._units[n]})" for n in self._scalar)
        if self.mixing is not None and not self._mixable:
            raise ValueError(
                f"@mixing: {self.type} has no mixing rule; remove mixing and give every pair "
                "in model.pairs"
            )
        if self.mixing is not None:  # cross pairs with both own entries are filled
            cross = [(a, b) for a, b in cross if (a, a) not in seen or (b, b) not in seen]
        missing = [f"{e}" for e in missing_self] + [f"{a}-{b}" for a, b in cross]
        if not missing:
            return
        if self.mixing is None:
            hint = (
                ", or set model.mixing = 'lorentz_berthelot' or 'geometric' to fill cross pairs"
                if cross and self._mixable
                else ""
            )
        else:
            hint = (
                " (model.mixing fills a cross pair from the own entries of its two elements, "
                "and an element's own pair is never mixed)"
            )
        raise ValueError(
            "@pairs: no parameters for "
            + ", ".join(f'"{m}"' for m in missing)
            + f"; add them to model.pairs with {units}, e.g. "
            + _pairs_example(self._scalar, missing[0])
            + hint
        )


def _pairs_example(names: tuple[str, ...], key: str = "Ar") -> str:
    values = {"sigma": 3.405, "epsilon": 0.0104, "D": 0.0104, "alpha": 1.3, "r0": 3.82}
    inner = ", ".join(f"{n} = {values.get(n, 1.0)}" for n in names)
    return f"{_key_part(key)} = {{{inner}}}"


class _CutoffPairConfig(_SpeciesKeys):
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
    sigma: PositiveFloat | None = Field(None, description="Å (scalar form)")
    epsilon: PositiveFloat | None = Field(None, description="eV (scalar form)")
    pairs: dict[PairKey, LennardJonesPair] | None = Field(
        None, description="per species pair: 'Ar' or 'Ar-Kr' = {sigma (Å), epsilon (eV)}"
    )

    _scalar: ClassVar[tuple[str, ...]] = ("sigma", "epsilon")
    _units: ClassVar[dict[str, str]] = {"sigma": "Å", "epsilon": "eV"}


class MorseConfig(_CutoffPairConfig):
    type: Literal["morse"]
    D: PositiveFloat | None = Field(None, description="eV (scalar form)")
    alpha: PositiveFloat | None = Field(None, description="1/Å (scalar form)")
    r0: PositiveFloat | None = Field(None, description="Å (scalar form)")
    pairs: dict[PairKey, MorsePair] | None = Field(
        None, description="per species pair: 'Ar' or 'Ar-Kr' = {D (eV), alpha (1/Å), r0 (Å)}"
    )

    _scalar: ClassVar[tuple[str, ...]] = ("D", "alpha", "r0")
    _units: ClassVar[dict[str, str]] = {"D": "eV", "alpha": "1/Å", "r0": "Å"}
    _mixable: ClassVar[bool] = False


class SoftSphereConfig(_SpeciesKeys):
    type: Literal["soft_sphere"]
    sigma: PositiveFloat | None = Field(None, description="Å (also the cutoff; scalar form)")
    epsilon: PositiveFloat = Field(1.0, description="eV")
    alpha: PositiveFloat = Field(2.0, description="exponent")
    images: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = Field(
        None,
        description="periodic image shifts along each cell vector (default: from the first "
        "cells; give it for variable-cell runs whose cells shrink)",
    )
    pairs: dict[PairKey, SoftSpherePair] | None = Field(
        None,
        description="per species pair: 'Ar' or 'Ar-Kr' = {sigma (Å), epsilon (eV), alpha}; "
        "epsilon and alpha in every entry or in none (then model.epsilon / model.alpha)",
    )

    _scalar: ClassVar[tuple[str, ...]] = ("sigma",)
    _units: ClassVar[dict[str, str]] = {"sigma": "Å", "epsilon": "eV", "alpha": "exponent"}

    @model_validator(mode="after")
    def _shared_or_per_pair(self) -> SoftSphereConfig:
        if self.pairs is None:
            return self
        for name in ("epsilon", "alpha"):
            has = [k for k, e in self.pairs.items() if getattr(e, name) is not None]
            if not has:
                continue
            lacking = [k for k in self.pairs if k not in has]
            if lacking:
                raise ValueError(
                    f"@pairs.{_key_part(lacking[0])}.{name}: {name} is given"
                    f' in some entries ("{has[0]}") but not in this one; give it in every entry, '
                    f"or in none and once as model.{name} for all pairs"
                )
            if name in self.model_fields_set:
                raise ValueError(
                    f"@{name}: given both as model.{name} and in the entries of model.pairs; "
                    "keep one of them"
                )
            if name == "alpha" and self.mixing is not None:
                elements = self.elements()
                listed = {tuple(sorted(parse_pair_key(k), key=elements.index)) for k in self.pairs}
                for i, a in enumerate(elements):
                    for b in elements[i + 1 :]:
                        if (a, b) not in listed:
                            raise ValueError(
                                f'@pairs: alpha has no mixing rule, so the pair "{a}-{b}" needs '
                                f"its own entry with alpha; or give alpha once as model.alpha"
                            )
        return self


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
        elif part == "[key]":  # a key of a table (model.pairs) that is itself wrong
            continue
        else:
            out += ("." if out else "") + (_key_part(part) if out.endswith("pairs") else str(part))
    return out or "(top level)"


def _key_part(key: Any) -> str:
    """A table key as it is written in a dotted key: bare (``Ar``) or quoted (``"Ar-Kr"``)."""
    import json
    import re

    key = str(key)
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else json.dumps(key)


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


def _where(source: tuple[str | None, int]) -> str:
    f, k = source
    return f"generated structure {k}" if f is None else f"{f!r} frame {k}"


def check_structure_species(cfg: RunConfig, structures, sources=None) -> str:
    """Refuse structures with an element the model has no parameters for, before compiling.

    The elements with parameters are ``model.species`` (scalar form) or the keys of
    ``model.pairs``. A scalar model without ``species`` applies only when every structure,
    all together, holds one element type: that element is then implied.

    Parameters
    ----------
    cfg : RunConfig
    structures : list of ase.Atoms
    sources : list of (file or None, frame index), optional
        Where each structure comes from (:func:`load_structures_with_sources`), for the
        message.

    Returns
    -------
    str
        A line for the summary: the elements the model's parameters are used for, and why.

    Raises
    ------
    ConfigError
        Naming each element without parameters, the first structure holding it (file and
        frame), how many hold it, and the key to add.
    """
    import json

    import numpy as np
    from ase.data import chemical_symbols

    m = cfg.model
    sources = sources if sources is not None else [(None, i) for i in range(len(structures))]
    first: dict[int, tuple[str | None, int]] = {}
    count: dict[int, int] = {}
    for atoms, src in zip(structures, sources, strict=True):
        for z in np.unique(np.asarray(atoms.numbers, dtype=int)):
            z = int(z)
            first.setdefault(z, src)
            count[z] = count.get(z, 0) + 1

    def name(z: int) -> str:
        return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"

    def found(zs) -> str:
        parts = []
        for z in zs:
            others = count[z] - 1
            more = f" and {others} more structure(s)" if others else ""
            parts.append(f"{name(z)} (in {_where(first[z])}{more})")
        return "; ".join(parts)

    present = sorted(first)
    kind = {"lennard_jones": "LennardJones", "morse": "Morse", "soft_sphere": "SoftSphere"}[m.type]
    scalar = ", ".join(f"{n} ({m._units[n]})" for n in m._scalar)
    elements = m.elements()
    if elements is None:  # scalar form without species
        if len(present) <= 1:
            what = name(present[0]) if present else "no element"
            return (
                f"model: {kind} parameters for {what} (implied: the only element of the "
                "structures; model.species would say so)"
            )
        symbols = [name(z) for z in present]
        raise ConfigError(
            f"model: {scalar} are given once, without model.species, but the structures "
            f"hold {len(present)} elements: {found(present)}. One set of parameters is never "
            "applied to several elements unasked: give a per-species table "
            f"[model.pairs] ({', '.join(symbols)} and their cross pairs, or model.mixing), or "
            f"model.species = {json.dumps(symbols)} to use these parameters for every pair of them"
        )
    from ase.data import atomic_numbers

    known = {atomic_numbers[e] for e in elements}
    unknown = [z for z in present if z not in known]
    if unknown:
        symbols = [name(z) for z in unknown]
        if m.pairs is not None:
            entries = ", ".join(f"{e} = {{...}}" for e in symbols)
            crosses = ", ".join(f'"{a}-{b}"' for a in elements for b in symbols)
            how = (
                f"add {entries} to [model.pairs] ({scalar}) and the cross pairs {crosses}"
                + (" (or let model.mixing fill them)" if m._mixable else "")
                + ", or leave these structures out"
            )
            key = "model.pairs"
        else:
            how = (
                f"add {', '.join(repr(e) for e in symbols)} to model.species to use the same "
                "parameters for it, or give a per-species table [model.pairs], or leave these "
                "structures out"
            )
            key = "model.species"
        raise ConfigError(
            f"{key}: the model has parameters for {', '.join(elements)} only, but the "
            f"structures hold {found(unknown)}: {how}"
        )
    used = ", ".join(e for e in elements if atomic_numbers[e] in first)
    if m.pairs is None:
        return (
            f"model: {kind} parameters for {', '.join(elements)} (model.species); present: {used}"
        )
    mixed = ""
    if m.mixing is not None:
        listed = set(m.pair_table())
        filled = [
            f"{a}-{b}"
            for i, a in enumerate(elements)
            for b in elements[i + 1 :]
            if (a, b) not in listed
        ]
        if filled:
            mixed = f"; mixed ({m.mixing}): {', '.join(filled)}"
    return f"model: {kind} per species pair for {', '.join(elements)}{mixed}; present: {used}"


def build_model(cfg: RunConfig):
    """The energy model of a configuration.

    Scalar form: one set of parameters, with ``species=model.species`` when given (the model
    then refuses other elements itself). ``model.pairs``: ``cls.from_pairs`` with the table,
    ``mixing`` and the shared keys. Which structures a model applies to is checked by
    :func:`check_structure_species`.
    """
    import fused_dynamics as fd

    m = cfg.model
    cls = {
        "lennard_jones": fd.models.LennardJones,
        "morse": fd.models.Morse,
        "soft_sphere": fd.models.SoftSphere,
    }[m.type]
    kwargs: dict[str, Any] = {}
    if m.images is not None:
        kwargs["images"] = tuple(m.images)
    if m.type != "soft_sphere":
        kwargs.update(cutoff=m.cutoff, shift=m.shift)
        if m.switch_onset is not None:
            if m.switch_onset >= m.cutoff:
                raise ConfigError(
                    f"model.switch_onset: {m.switch_onset} must be smaller than cutoff {m.cutoff}"
                )
            kwargs["switch_onset"] = m.switch_onset
    try:
        if m.pairs is None:
            params = {n: getattr(m, n) for n in m._scalar}
            if m.type == "soft_sphere":
                params.update(epsilon=m.epsilon, alpha=m.alpha)
            if m.species is not None:
                kwargs["species"] = tuple(m.species)
            return cls(**params, **kwargs)
        table = m.pair_table()
        if m.type == "soft_sphere":
            for shared in ("epsilon", "alpha"):
                if not any(shared in v for v in table.values()):
                    kwargs[shared] = getattr(m, shared)
        return cls.from_pairs(table, mixing=m.mixing, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


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
