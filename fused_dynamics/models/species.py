"""Per-species-pair parameters of the pair potentials: tables, checks and mixing rules.

Every parameter of :class:`~fused_dynamics.models.pair.LennardJones`,
:class:`~fused_dynamics.models.pair.Morse` and :class:`~fused_dynamics.models.pair.SoftSphere` is
either a scalar (the same for all pairs) or a symmetric (K, K) matrix whose rows and columns are
the elements ``species=(Z1, ..., ZK)`` (atomic numbers or symbols); ``from_pairs`` builds such a
model from a table keyed by element pairs, with optional mixing rules (:func:`build_from_pairs`).
Each atom's atomic number is mapped to its row through a static lookup table
(:func:`atom_species`), and the pair's parameters are gathered for the pair's two species on both
paths (``_gather``).

The functions taking ``model`` are the bodies of the
:class:`~fused_dynamics.models.pair.PairPotential` methods of the same purpose, which document
them.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers as _Z_OF_SYMBOL
from ase.data import chemical_symbols as _SYMBOLS

from ..batch import Batch
from ..validation import Rule, check_real, is_traced

__all__ = ["MIXING_RULES", "atom_species", "build_from_pairs", "check_batch_species"]


_N_Z = 119  # atomic numbers 0 (padding) .. 118
MIXING_RULES = ("lorentz_berthelot", "geometric")


def _element(z: int) -> str:
    """``Ar (Z=18)`` for an atomic number, ``atomic number 0`` where there is no element."""
    z = int(z)
    if 1 <= z < len(_SYMBOLS):
        return f"{_SYMBOLS[z]} (Z={z})"
    return f"atomic number {z}"


def _symbols(species: Sequence[int]) -> str:
    return ", ".join(_SYMBOLS[z] if 1 <= z < len(_SYMBOLS) else str(z) for z in species)


def _atomic_number(x: Any) -> Any:
    """An element symbol or atomic number as an int; anything else unchanged (refused later)."""
    if isinstance(x, (bool, np.bool_)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, str) and x in _Z_OF_SYMBOL and x != "X":
        return int(_Z_OF_SYMBOL[x])
    return x


def _species_converter(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (Sequence, np.ndarray)):
        return tuple(_atomic_number(v) for v in value)
    return value


def _matrix_converter(value: Any) -> Any:
    """Nested lists and tuples become NumPy arrays (one pytree leaf); everything else is kept."""
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=np.float64)
    return value


def _static_matrix_converter(value: Any) -> Any:
    """A concrete (K, K) matrix as a tuple of tuples of floats (hashable, for a static field)."""
    if isinstance(value, (list, tuple, np.ndarray, jax.Array)) and not is_traced(value):
        arr = np.asarray(value)
        if arr.ndim == 2 and arr.dtype.kind in "iuf":
            return tuple(tuple(float(x) for x in row) for row in arr)
    return value


def _ndim(value: Any) -> int:
    shape = getattr(value, "shape", None)
    return len(shape) if shape is not None else int(np.ndim(value))


def _gather(value: Any, si: jax.Array | None, sj: jax.Array | None) -> Any:
    """A parameter for pairs of species ``(si, sj)``: scalars as they are, matrices gathered."""
    if si is None or _ndim(value) == 0:
        return value
    return jnp.asarray(value)[si, sj]


def _check_parameter(owner: str, name: str, value: Any, rule: Rule, unit: str, species) -> None:
    """A scalar (``check_real``) or a symmetric (K, K) matrix, every entry by ``rule``."""
    if isinstance(value, (numbers.Number, np.bool_)) or _ndim(value) == 0:
        check_real(owner, name, value, rule, unit=unit)
        return
    shape = tuple(getattr(value, "shape", np.shape(value)))
    what = f"{rule.text} ({unit})"
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
        raise ValueError(
            f"{owner}: {name} must be a scalar or a symmetric (K, K) matrix of per-species-pair "
            f"values, {what}; got shape {shape}."
        )
    if species is not None and shape[0] != len(species):
        raise ValueError(
            f"{owner}: {name} has shape {shape} but species names {len(species)} elements "
            f"({_symbols(species)}); the matrix needs one row per species."
        )
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype
    if np.dtype(dtype).kind not in "iuf":
        raise ValueError(f"{owner}: {name} must be {what}, got an array of dtype {dtype}.")
    if is_traced(value):
        return
    arr = np.asarray(value, dtype=np.float64)

    def pair(a, b):
        if species is None:
            return f"entry [{a}, {b}]"
        return f"pair ({_SYMBOLS[species[a]]}, {_SYMBOLS[species[b]]})"

    bad = np.argwhere(~rule.holds(arr))
    if len(bad):
        a, b = (int(x) for x in bad[0])
        raise ValueError(
            f"{owner}: {name} must be {what} for every species pair, got {float(arr[a, b])!r} "
            f"for {pair(a, b)}."
        )
    asym = np.argwhere(arr != arr.T)
    if len(asym):
        a, b = (int(x) for x in asym[0])
        raise ValueError(
            f"{owner}: {name} must be a symmetric matrix (the pair (i, j) is the pair (j, i)), "
            f"got {float(arr[a, b])!r} for {pair(a, b)} and {float(arr[b, a])!r} for "
            f"{pair(b, a)}."
        )


@dataclasses.dataclass(frozen=True)
class _UnknownSpeciesMessages(Sequence):
    """The run-time error messages, one per (system slot, atomic number), made when needed."""

    owner: str
    species: tuple[int, ...]
    n_slots: int

    def __len__(self) -> int:
        return self.n_slots * _N_Z

    def __getitem__(self, index):
        slot, z = divmod(int(index), _N_Z)
        return (
            f"System slot {slot} contains {_element(z)}, which is not among the species of "
            f"{self.owner} ({_symbols(self.species)}): use a model with parameters for it (a "
            "pair potential: species=... with (K, K) matrices, or from_pairs; a potential "
            "file or a trained model that covers the element) or leave such systems out."
        )


def _mix(rule: str, a, b):
    if rule == "arithmetic":
        return 0.5 * (a + b)
    return np.sqrt(a * b)


def check_batch_species(model, batch: Batch) -> None:
    """Host-side: every occupied atom of a concrete batch is of one of ``model.species``.

    The body of :meth:`~fused_dynamics.models.pair.PairPotential.check_species` (documented there).
    """
    if model.species is None:
        return
    z = np.asarray(batch.atomic_numbers)
    mask = np.asarray(batch.atom_mask) & ~np.isin(z, model.species)
    if not mask.any():
        return
    slots = np.asarray(batch.system_idx)[mask]
    ids = np.asarray(batch.system_id)
    found = sorted({(int(s), int(e)) for s, e in zip(slots, z[mask], strict=True)})
    parts = []
    for s, e in found[:5]:
        sid = f", system_id {int(ids[s])}" if 0 <= s < len(ids) and ids[s] >= 0 else ""
        parts.append(f"{_element(e)} in system slot {s}{sid}")
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    raise ValueError(
        f"{type(model).__name__}: the batch has atoms of elements without parameters: "
        f"{'; '.join(parts)}{more}. The model's species are ({_symbols(model.species)}); "
        "give parameters for every element present (species=... with (K, K) matrices, or "
        "from_pairs)."
    )


def atom_species(model, batch: Batch) -> tuple[Batch, jax.Array]:
    """Each atom's species index (row of ``model``'s parameter matrices), shape (N,) int32.

    The body of ``PairPotential._atom_species``: also returns the batch whose positions carry
    the error that names an unknown element and its system slot.
    """
    owner = type(model).__name__
    if model.species is None:
        raise ValueError(
            f"{owner}: {model._matrix_names()} given as (K, K) matrices need species=(...) "
            "naming the element of each row (or use from_pairs). Without it the rows are "
            "guessed only for an eager call on a concrete batch, never under jit, vmap or "
            "in a fused run."
        )
    table = np.full(_N_Z, -1, np.int32)
    table[list(model.species)] = np.arange(len(model.species), dtype=np.int32)
    z = batch.atomic_numbers
    in_range = (z >= 0) & (z < _N_Z)
    index = jnp.where(in_range, jnp.asarray(table)[jnp.clip(z, 0, _N_Z - 1)], -1)
    unknown = batch.atom_mask & (index < 0)
    first = jnp.argmax(unknown)
    s = batch.max_systems
    slot = jnp.clip(batch.system_idx[first], 0, s - 1)
    code = slot * _N_Z + jnp.clip(z[first], 0, _N_Z - 1)
    positions = eqx.branched_error_if(
        batch.positions,
        jnp.any(unknown),
        code,
        _UnknownSpeciesMessages(owner, model.species, s),
    )
    return batch.replace(positions=positions), jnp.maximum(index, 0)


def build_from_pairs(cls, table: Mapping[Any, Any], *, mixing: str | None = None, **kwargs):
    """A ``cls`` model with per-species-pair parameters from a table keyed by element pairs.

    The body of :meth:`~fused_dynamics.models.pair.PairPotential.from_pairs` (documented there).
    """
    owner = f"{cls.__name__}.from_pairs"
    names = [n for n in cls._parameters if n not in kwargs]
    if not names:
        raise ValueError(f"{owner}: every parameter is given as a keyword; the table is unused.")
    if "species" in kwargs:
        raise ValueError(f"{owner}: species come from the table's keys; do not give species=.")
    if mixing is not None and mixing not in MIXING_RULES:
        raise ValueError(
            f"{owner}: mixing must be one of {MIXING_RULES!r} or None, got {mixing!r}."
        )
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{owner}: table must be a non-empty mapping, got {table!r}.")

    def element(x):
        z = _atomic_number(x)
        if not isinstance(z, int) or isinstance(z, bool) or not 1 <= z < len(_SYMBOLS):
            raise ValueError(f"{owner}: {x!r} in the table is not an element.")
        return z

    def values(key, value):
        if isinstance(value, Mapping):
            if set(value) != set(names):
                raise ValueError(
                    f"{owner}: entry {key!r} must give exactly {names}, got {sorted(value)}."
                )
            return tuple(value[n] for n in names)
        if isinstance(value, (tuple, list, np.ndarray)):
            if len(value) != len(names):
                raise ValueError(
                    f"{owner}: entry {key!r} must give {len(names)} values {tuple(names)}, "
                    f"got {len(value)}."
                )
            return tuple(value)
        if len(names) == 1:
            return (value,)
        raise ValueError(f"{owner}: entry {key!r} must give {tuple(names)}, got {value!r}.")

    entries = {}
    for key, value in table.items():
        pair = (key,) if isinstance(key, (str, numbers.Integral)) else tuple(key)
        if len(pair) == 1:
            pair = pair * 2
        if len(pair) != 2:
            raise ValueError(f"{owner}: key {key!r} must be an element or a pair of elements.")
        a, b = sorted(element(x) for x in pair)
        vals = tuple(float(v) for v in values(key, value))
        if (a, b) in entries and entries[(a, b)] != vals:
            raise ValueError(
                f"{owner}: pair ({_symbols((a, b))}) is given twice with different values, "
                f"{entries[(a, b)]} and {vals}."
            )
        entries[(a, b)] = vals
    species = tuple(sorted({z for pair in entries for z in pair}))
    row = {z: k for k, z in enumerate(species)}
    k = len(species)
    mats = {n: np.full((k, k), np.nan) for n in names}
    given = np.zeros((k, k), bool)
    for (a, b), vals in entries.items():
        for n, v in zip(names, vals, strict=True):
            mats[n][row[a], row[b]] = mats[n][row[b], row[a]] = v
        given[row[a], row[b]] = given[row[b], row[a]] = True
    if mixing is not None and not given.all():
        rules = cls._mixing.get(mixing)
        if rules is None:
            raise ValueError(
                f"{owner}: {cls.__name__} has no mixing rule; list every pair of elements."
            )
        unmixed = [n for n in names if n not in rules]
        if unmixed:
            raise ValueError(
                f"{owner}: {', '.join(unmixed)} has no {mixing} mixing rule; give it as a "
                "scalar keyword (the same for every pair) or list every pair."
            )
        for i, j in itertools.combinations(range(k), 2):
            if given[i, j] or not (given[i, i] and given[j, j]):
                continue
            for n in names:
                mats[n][i, j] = mats[n][j, i] = _mix(rules[n], mats[n][i, i], mats[n][j, j])
            given[i, j] = given[j, i] = True
    if not given.all():
        missing = [
            f"({_symbols((species[i], species[j]))})"
            for i, j in itertools.combinations_with_replacement(range(k), 2)
            if not given[i, j]
        ]
        hint = "" if mixing else " (or give mixing= to fill cross pairs)"
        raise ValueError(f"{owner}: no parameters for pair(s) {', '.join(missing)}{hint}.")
    return cls(**mats, species=species, **kwargs)
