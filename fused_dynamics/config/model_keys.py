"""Schema of ``[model]``: a pair potential and the elements its parameters are for, or a model
file (an EAM potential, a trained model).

See "Keys of the model" in :mod:`fused_dynamics.config`.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

from ase.data import atomic_numbers
from pydantic import (
    AfterValidator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .base import _key_part, _Section

__all__ = [
    "NEIGHBOR_CHOICES",
    "EAMConfig",
    "FILE_MODEL_TYPES",
    "TrainedModelConfig",
    "MIXING_RULES",
    "MODEL_TYPES",
    "LennardJonesConfig",
    "LennardJonesPair",
    "ModelConfig",
    "MorseConfig",
    "MorsePair",
    "PairKey",
    "SoftSphereConfig",
    "SoftSpherePair",
    "parse_pair_key",
]


def _element_symbol(value: Any, what: str) -> str:
    """A chemical symbol as ASE spells it ("Ar"); ValueError saying how to write it otherwise."""
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


NEIGHBOR_CHOICES = ("auto", "dense", "list")


class _PathKeys(_Section):
    """Keys choosing how the pairs are found: dense pairs or a neighbor list (every model type).

    The rule of ``"auto"`` is :func:`fused_dynamics.models.path_choice.path_choice`
    (docs/models.md, "Dense pairs or a neighbor list").
    """

    neighbors: Literal["auto", "dense", "list"] = Field(
        "auto",
        description="how pairs are found: auto (a neighbor list when the structures are large "
        "enough for it to pay, from their sizes, cells, density and the cutoff; the run says "
        "which and why), dense (every pair of each system; the reference), list (a Verlet "
        "neighbor list, rebuilt when an atom moved more than skin/2; pair potentials only)",
    )
    skin: NonNegativeFloat = Field(
        1.0,
        description="Å: Verlet skin of the neighbor list (pairs kept within cutoff + skin); "
        "used when the list is chosen",
    )


class _SpeciesKeys(_PathKeys):
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
        out = {}
        for key, entry in (self.pairs or {}).items():
            a, b = sorted(parse_pair_key(key), key=atomic_numbers.__getitem__)
            out[(a, b)] = {k: v for k, v in entry.model_dump().items() if v is not None}
        return out

    def elements(self) -> list[str] | None:
        """The elements the model has parameters for (None: any one element, implied later)."""
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

    cutoff: PositiveFloat = Field(description="Å: pairs farther apart do not interact")
    switch_onset: PositiveFloat | None = Field(
        None,
        description="Å: the energy is smoothly switched to zero between switch_onset and "
        "cutoff (below the cutoff; default: no switch)",
    )
    shift: bool = Field(True, description="shift the energy to zero at the cutoff")

    @model_validator(mode="after")
    def _switch_below_cutoff(self):
        if self.switch_onset is not None and self.switch_onset >= self.cutoff:
            raise ValueError(
                f"@switch_onset: {self.switch_onset} must be smaller than model.cutoff = "
                f"{self.cutoff}: lower switch_onset below {self.cutoff}, raise cutoff, or remove "
                "switch_onset (no switch)"
            )
        return self

    images: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = Field(
        None,
        strict=False,  # a TOML/YAML array is a list; its items stay strict integers
        description="periodic image shifts along each cell vector (default: from the first "
        "cells; give it for variable-cell runs whose cells shrink)",
    )


class LennardJonesConfig(_CutoffPairConfig):
    type: Literal["lennard_jones"] = Field(description="Lennard-Jones 12-6 pair potential")
    sigma: PositiveFloat | None = Field(None, description="Å (scalar form)")
    epsilon: PositiveFloat | None = Field(None, description="eV (scalar form)")
    pairs: dict[PairKey, LennardJonesPair] | None = Field(
        None, description="per species pair: 'Ar' or 'Ar-Kr' = {sigma (Å), epsilon (eV)}"
    )

    _scalar: ClassVar[tuple[str, ...]] = ("sigma", "epsilon")
    _units: ClassVar[dict[str, str]] = {"sigma": "Å", "epsilon": "eV"}


class MorseConfig(_CutoffPairConfig):
    type: Literal["morse"] = Field(description="Morse pair potential")
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
    type: Literal["soft_sphere"] = Field(description="soft sphere repulsion")
    sigma: PositiveFloat | None = Field(None, description="Å (also the cutoff; scalar form)")
    epsilon: PositiveFloat = Field(1.0, description="eV")
    alpha: PositiveFloat = Field(2.0, description="exponent")
    images: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = Field(
        None,
        strict=False,  # a TOML/YAML array is a list; its items stay strict integers
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


class _FileModelConfig(_PathKeys):
    """A model read from a file (the file says which elements it has parameters for)."""

    file: str = Field(description="path, relative to the configuration file")
    images: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = Field(
        None,
        strict=False,  # a TOML/YAML array is a list; its items stay strict integers
        description="periodic image shifts along each cell vector (default: from the first "
        "cells; give it for variable-cell runs whose cells shrink)",
    )

    @field_validator("file")
    @classmethod
    def _file_exists(cls, v: str, info: ValidationInfo) -> str:
        base = os.fspath((info.context or {}).get("base_dir", "."))
        path = os.path.abspath(os.path.join(base, os.path.expanduser(v)))
        if not os.path.isfile(path):
            raise ValueError(f"no such file {v!r} (looked for {path!r})")
        return path  # absolute: the model is built away from the configuration's folder


class EAMConfig(_FileModelConfig):
    """``type = "eam"``: an embedded-atom potential file (setfl ``.alloy``, funcfl ``.eam``,
    Finnis-Sinclair ``.fs``), read as ASE reads it."""

    type: Literal["eam"] = Field(description="embedded-atom potential read from model.file")


class TrainedModelConfig(_FileModelConfig):
    """``type = "trained"``: a model file written by ``fused-dynamics train`` or
    ``fused_dynamics.save_model`` (an equivariant network, a fitted potential)."""

    type: Literal["trained"] = Field(
        description="a model file written by fused-dynamics train or save_model"
    )


MODEL_TYPES = ("lennard_jones", "morse", "soft_sphere", "eam", "trained")
FILE_MODEL_TYPES = ("eam", "trained")
ModelConfig = Annotated[
    LennardJonesConfig | MorseConfig | SoftSphereConfig | EAMConfig | TrainedModelConfig,
    Field(discriminator="type"),
]
