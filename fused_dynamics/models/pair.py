"""Pair potentials: a dense all-pairs-within-system path and a neighbor-list path.

The dense path pairs every atom with every atom of its own system (the ``max_atoms_per_system``
block of the batch) and with their periodic images: ``O(N * A * K)`` work for N atom slots, A atoms
per system and K image shifts. It is exact for any cell (triclinic, mixed periodicity, cells
smaller than twice the cutoff) and is the reference for the neighbor-list path.

The neighbor-list path (``model.with_neighbors(skin=...)``) sums the same ``pair_energy`` over
the pairs of ``batch.neighbors`` (a :class:`~fused_dynamics.models.neighbors.NeighborList`):
``O(N)`` work per step. Displacements are ``r_j - r_i + shift @ cell`` with the batch's (strained)
cell, so forces and stress come from the same autodiff pass as on the dense path.

Several species: every parameter of :class:`LennardJones`, :class:`Morse` and
:class:`SoftSphere` is either a scalar (the same for all pairs) or a symmetric (K, K) matrix whose
rows and columns are the elements ``species=(Z1, ..., ZK)`` (atomic numbers or symbols);
``from_pairs`` builds such a model from a table keyed by element pairs, with optional mixing rules.
Each atom's atomic number is mapped to its row through a static lookup table, and the pair's
parameters are gathered for the pair's two species on both paths.

Every parameter is checked when the model is built (``__check_init__``): a wrong value raises a
:class:`ValueError` naming the class, the parameter, the value and the rule. Traced parameters
(under ``jax.vmap``, ``jax.grad``) have their shapes checked, not their values.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers as _Z_OF_SYMBOL
from ase.data import chemical_symbols as _SYMBOLS

from .. import segment
from ..batch import Batch
from ..status import Failure
from ..validation import (
    Rule,
    check_bool,
    check_integer,
    check_order,
    check_real,
    is_traced,
    non_negative,
    positive,
)
from .base import Model
from .neighbors import NeighborList

__all__ = ["PairPotential", "LennardJones", "Morse", "SoftSphere", "required_images"]


def required_images(cell: jax.Array, pbc: jax.Array, cutoff: float) -> jax.Array:
    """Image shifts needed along each lattice vector so that every pair within ``cutoff`` is seen.

    Displacements are first wrapped to the nearest image in fractional coordinates (each component
    in [-1/2, 1/2]), so along lattice vector k the shifts ``-n..n`` with
    ``n = floor(cutoff / d_k + 1/2)`` suffice, where ``d_k`` is the spacing of the lattice planes
    normal to the reciprocal vector ``b_k``.

    Returns
    -------
    Array, shape (S, 3) int32 (0 along non-periodic directions).
    """
    recip = jnp.linalg.inv(cell)  # columns are reciprocal vectors b_k (without 2π)
    spacing = 1.0 / jnp.linalg.norm(recip, axis=-2)
    n = jnp.floor(cutoff / spacing + 0.5).astype(jnp.int32)
    return jnp.where(pbc, n, 0)


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
            f"{self.owner} ({_symbols(self.species)}): give parameters for it (species=... with "
            "(K, K) matrices, or from_pairs) or leave such systems out."
        )


def _mix(rule: str, a, b):
    if rule == "arithmetic":
        return 0.5 * (a + b)
    return np.sqrt(a * b)


class PairPotential(Model):
    """Base class of isotropic pair potentials ``E = 1/2 Σ_i Σ_j φ(r_ij)`` within each system.

    Subclasses give :meth:`pair_energy` (``φ(r)`` for ``r < cutoff``), ``cutoff`` (a static
    float field, or a property) and the class attribute ``_parameters`` (name: (rule, unit) of
    each potential parameter, checked at construction and allowed per species pair).

    Parameters
    ----------
    images : tuple of 3 int, optional
        Static number of periodic image shifts to include along each lattice vector. ``None``
        means: computed from the cells when called on a concrete batch, else ``(1, 1, 1)``. A cell
        too small for the images given gets NaN energy, forces and stress, and a run fails that
        system with ``Failure.CELL_TOO_SMALL`` (never silently wrong forces, never a run-wide
        error). Dense path only.
    skin : float, optional
        Verlet skin in Å. When given, the energy is summed over ``batch.neighbors`` (a
        :class:`~fused_dynamics.models.neighbors.NeighborList`, which the batch must then carry)
        instead of the dense all-pairs block; see :meth:`with_neighbors`.
    auto_refresh : bool, default True
        Neighbor-list path: the evaluation itself rebuilds (under ``lax.cond``, without storing
        the result) a list that is stale or out of date, so results are right even without a
        :class:`~fused_dynamics.models.neighbors.NeighborListHook` (which is what stores the
        refreshed list and makes rebuilds rare). If such an unstored rebuild overflows, the
        energies, forces and stress are NaN (the overflow flag could not reach the run loop;
        inside a fused run the engine stores the refreshed list, so this cannot happen there).
        Under ``jax.vmap`` this check becomes a select that builds on every evaluation: turn it
        off there when the hook and the run loop keep the list fresh.
    species : sequence of str or int, optional
        The elements (symbols such as ``"Ar"`` or atomic numbers) that name the rows and columns
        of the parameters given as symmetric (K, K) matrices, in that order; stored as a tuple
        of atomic numbers. Each parameter is then a scalar (the same for every pair) or such a
        matrix. An atom of an element not in ``species`` is an error that names the element
        and the system slot: a :class:`ValueError` when the model is called eagerly on a
        concrete batch (:meth:`check_species`), an ``EquinoxRuntimeError`` (a
        :class:`RuntimeError`) inside ``jax.jit`` and fused runs.

        Without ``species``, matrices are allowed only for an eager call on a concrete batch
        whose occupied atoms have exactly K distinct elements: the rows are then those elements
        in increasing atomic number, with a warning that says so. This is never done under
        ``jax.jit``, ``jax.vmap`` or in a fused run (which compile before seeing the elements
        of every system): there a matrix without ``species`` is a :class:`ValueError` asking
        for ``species=``. Give ``species`` (or use :meth:`from_pairs`) in anything but a quick
        check.

    Raises
    ------
    ValueError
        At construction, for a parameter outside its rule (the message names the class, the
        parameter, the value and the rule): ``cutoff`` finite and > 0 (Å); ``switch_onset``
        finite, >= 0 and < ``cutoff``; ``skin`` finite and >= 0; ``images`` three integers >= 0;
        ``species`` distinct elements; each potential parameter as documented by its class,
        for every entry of a matrix, and matrices symmetric with one row per species. Values of
        traced parameters (under ``jax.vmap`` or ``jax.grad``) are not checked, their shapes are.
    """

    # ``cutoff`` (Å) is given by each subclass, as a static field or a property; it is not declared
    # here because a base-class field would come first in every subclass's positional signature.
    images: tuple[int, int, int] | None = eqx.field(static=True, default=None, kw_only=True)
    skin: float | None = eqx.field(static=True, default=None, kw_only=True)
    auto_refresh: bool = eqx.field(static=True, default=True, kw_only=True)
    species: tuple[int, ...] | None = eqx.field(
        static=True, default=None, kw_only=True, converter=_species_converter
    )

    # name -> (rule, unit) of each potential parameter (scalar or per species pair)
    _parameters: ClassVar[dict[str, tuple[Rule, str]]] = {}
    # mixing rule -> {parameter: "arithmetic" | "geometric"}, for from_pairs(mixing=...)
    _mixing: ClassVar[dict[str, dict[str, str]]] = {}

    def __check_init__(self):
        owner = type(self).__name__
        names = {f.name for f in dataclasses.fields(self)}
        if "cutoff" in names:
            check_real(owner, "cutoff", self.cutoff, positive(), unit="Å")
        if "switch_onset" in names:
            onset = self.switch_onset
            check_real(owner, "switch_onset", onset, non_negative(), unit="Å", allow_none=True)
            check_order(owner, "switch_onset", onset, "cutoff", self.cutoff, strict=True)
        if "shift" in names:
            check_bool(owner, "shift", self.shift)
        check_bool(owner, "auto_refresh", self.auto_refresh)
        check_real(owner, "skin", self.skin, non_negative(), unit="Å", allow_none=True)
        if self.images is not None:
            if not isinstance(self.images, (tuple, list)) or len(self.images) != 3:
                raise ValueError(
                    f"{owner}: images must be None or 3 integers >= 0 (image shifts along each "
                    f"lattice vector), got {self.images!r}."
                )
            for k, n in enumerate(self.images):
                check_integer(owner, f"images[{k}]", n, 0)
        species = self.species
        if species is not None:
            if not isinstance(species, tuple) or not species:
                raise ValueError(
                    f"{owner}: species must be a non-empty sequence of element symbols or atomic "
                    f"numbers, got {species!r}."
                )
            for z in species:
                if not isinstance(z, int) or isinstance(z, bool) or not 1 <= z < len(_SYMBOLS):
                    raise ValueError(
                        f"{owner}: species entry {z!r} is not an element (give symbols such as "
                        f"'Ar' or atomic numbers 1-{len(_SYMBOLS) - 1})."
                    )
            if len(set(species)) != len(species):
                raise ValueError(
                    f"{owner}: species must name each element once, got ({_symbols(species)})."
                )
        sizes = {}
        for name, (rule, unit) in self._parameters.items():
            value = getattr(self, name)
            _check_parameter(owner, name, value, rule, unit, species)
            if _ndim(value) == 2:
                sizes[name] = int(value.shape[0]) if hasattr(value, "shape") else len(value)
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"{n} {k}x{k}" for n, k in sizes.items())
            raise ValueError(
                f"{owner}: per-pair parameter matrices must all have one row per species, got "
                f"{shown}."
            )

    # ------------------------------------------------------------------ species
    @property
    def per_pair(self) -> bool:
        """Whether parameters depend on the species (``species`` given or a matrix parameter)."""
        return self.species is not None or any(
            _ndim(getattr(self, n)) == 2 for n in self._parameters
        )

    def _n_species(self) -> int:
        for name in self._parameters:
            value = getattr(self, name)
            if _ndim(value) == 2:
                return int(value.shape[0]) if hasattr(value, "shape") else len(value)
        return 0 if self.species is None else len(self.species)

    def _matrix_names(self) -> str:
        return ", ".join(n for n in self._parameters if _ndim(getattr(self, n)) == 2)

    def with_species_of(self, batch: Batch) -> PairPotential:
        """A copy with ``species`` taken from a concrete batch, for matrices given without it.

        The rows are the distinct elements of the occupied atoms in increasing atomic number;
        there must be exactly K of them. Returns ``self`` when ``species`` is set or no
        parameter is a matrix. Host-side.

        Raises
        ------
        ValueError
            The batch has another number of distinct elements than the matrices have rows.
        """
        if self.species is not None or not self.per_pair:
            return self
        owner = type(self).__name__
        z = np.asarray(batch.atomic_numbers)[np.asarray(batch.atom_mask)]
        present = tuple(int(x) for x in np.unique(z))
        k = self._n_species()
        if len(present) != k:
            raise ValueError(
                f"{owner}: {self._matrix_names()} given as {k}x{k} matrices without species=; "
                f"the batch has {len(present)} elements ({_symbols(present)}), so the rows "
                f"cannot be named: give species=(...) with the element of each row."
            )
        warnings.warn(
            f"{owner}: {self._matrix_names()} given as {k}x{k} matrices without species=; rows "
            f"taken as ({_symbols(present)}), the batch's elements in increasing atomic number. "
            f"Give species={tuple(_SYMBOLS[z] for z in present)!r} (or your order) to say so; "
            "this guess is never made under jit or in a fused run.",
            UserWarning,
            stacklevel=6,
        )
        return dataclasses.replace(self, species=present)

    def check_batch(self, batch: Batch) -> None:
        """Host-side checks of a concrete batch before compiling (:meth:`check_species`)."""
        self.check_species(batch)

    def check_species(self, batch: Batch) -> None:
        """Host-side: every occupied atom of a concrete batch is of one of ``species``.

        Raises
        ------
        ValueError
            Naming the unknown elements and the system slots (and ``system_id``) holding them.
        """
        if self.species is None:
            return
        z = np.asarray(batch.atomic_numbers)
        mask = np.asarray(batch.atom_mask) & ~np.isin(z, self.species)
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
            f"{type(self).__name__}: the batch has atoms of elements without parameters: "
            f"{'; '.join(parts)}{more}. The model's species are ({_symbols(self.species)}); "
            "give parameters for every element present (species=... with (K, K) matrices, or "
            "from_pairs)."
        )

    def _atom_species(self, batch: Batch) -> tuple[Batch, jax.Array]:
        """Each atom's species index (row of the parameter matrices), shape (N,) int32.

        Unknown elements among the occupied atoms stop the run with an error naming the element
        and the system slot; padding atoms get index 0 (finite parameters, masked anyway).
        """
        owner = type(self).__name__
        if self.species is None:
            raise ValueError(
                f"{owner}: {self._matrix_names()} given as (K, K) matrices need species=(...) "
                "naming the element of each row (or use from_pairs). Without it the rows are "
                "guessed only for an eager call on a concrete batch, never under jit, vmap or "
                "in a fused run."
            )
        table = np.full(_N_Z, -1, np.int32)
        table[list(self.species)] = np.arange(len(self.species), dtype=np.int32)
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
            _UnknownSpeciesMessages(owner, self.species, s),
        )
        return batch.replace(positions=positions), jnp.maximum(index, 0)

    @classmethod
    def from_pairs(
        cls, table: Mapping[Any, Any], *, mixing: str | None = None, **kwargs
    ) -> PairPotential:
        """A model with per-species-pair parameters from a table keyed by element pairs.

        Parameters
        ----------
        table : mapping
            Keys are element pairs ``("Ar", "Kr")`` (symbols or atomic numbers; the order in a
            pair does not matter) or single elements ``"Ar"`` (the same as ``("Ar", "Ar")``).
            Values are the class's per-pair parameters not given in ``kwargs``, in the order of
            its signature (``LennardJones``: ``(sigma, epsilon)``; ``Morse``:
            ``(D, alpha, r0)``; ``SoftSphere``: ``(sigma, epsilon, alpha)``), as a tuple, or a
            mapping from their names. One value alone may be given bare.
        mixing : {"lorentz_berthelot", "geometric"}, optional
            Fill every unlisted pair of two different elements from the two elements' own
            entries (pairs listed explicitly are kept). ``"lorentz_berthelot"``: ``σ_ij =
            (σ_i + σ_j) / 2``, ``ε_ij = sqrt(ε_i ε_j)`` (H. A. Lorentz, Ann. Phys. 248, 127
            (1881); D. Berthelot, C. R. Acad. Sci. 126, 1703 (1898)); ``"geometric"``: ``σ_ij =
            sqrt(σ_i σ_j)``, ``ε_ij = sqrt(ε_i ε_j)`` (the OPLS convention, W. L. Jorgensen et
            al., J. Am. Chem. Soc. 106, 6638 (1984); LAMMPS ``pair_modify mix geometric``).
            For ``LennardJones`` and ``SoftSphere`` only; ``SoftSphere``'s ``alpha`` is not
            mixed (give it as a scalar keyword). Without ``mixing`` every pair must be listed.
        **kwargs
            The other constructor arguments (``cutoff``, ``switch_onset``, a scalar parameter
            shared by all pairs, ...).

        Returns
        -------
        PairPotential
            With ``species`` the listed elements in increasing atomic number and each table
            parameter a symmetric (K, K) matrix.

        Raises
        ------
        ValueError
            An unknown element, a value of the wrong length, a pair given twice with different
            values, a pair missing (named), or an unknown mixing rule.
        """
        owner = f"{cls.__name__}.from_pairs"
        names = [n for n in cls._parameters if n not in kwargs]
        if not names:
            raise ValueError(
                f"{owner}: every parameter is given as a keyword; the table is unused."
            )
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

    def pair_energy(
        self, r: jax.Array, si: jax.Array | None = None, sj: jax.Array | None = None
    ) -> jax.Array:
        """``φ(r)`` in eV for pair distances ``r`` (Å) below the cutoff.

        ``si``, ``sj``: species indices (rows of the parameter matrices) of the two atoms of each
        pair, broadcastable with ``r``; None when the parameters are the same for every pair.
        """
        raise NotImplementedError

    def prepare(self, batch: Batch) -> PairPotential:
        model = self
        if self.per_pair and not isinstance(batch.atomic_numbers, jax.core.Tracer):
            model = self.with_species_of(batch)
            model.check_species(batch)
        if model.images is not None or isinstance(batch.cell, jax.core.Tracer):
            return model
        if model.skin is not None:  # the neighbor-list path needs no image range
            return model
        return model.with_images(batch)

    # ------------------------------------------------------------------ neighbor lists
    def with_neighbors(self, skin: float = 1.0, auto_refresh: bool = True) -> PairPotential:
        """A copy that sums over ``batch.neighbors`` instead of the dense all-pairs block.

        The batch must carry a :class:`~fused_dynamics.models.neighbors.NeighborList` with
        ``cutoff >= self.cutoff`` (:meth:`attach_neighbors` makes one); register a
        :class:`~fused_dynamics.models.neighbors.NeighborListHook` on the fused stage so that it
        is refreshed before each evaluation.
        """
        if not float(skin) >= 0.0:
            raise ValueError(
                f"{type(self).__name__}.with_neighbors: skin must be >= 0, got {skin}."
            )
        return dataclasses.replace(self, skin=float(skin), auto_refresh=bool(auto_refresh))

    def neighbor_list(self, batch: Batch, capacity: int | None = None, **kwargs) -> NeighborList:
        """A neighbor list for this model's cutoff and skin, sized and built on ``batch``.

        ``kwargs`` go to :meth:`NeighborList.allocate` (``half`` defaults to True here: a pair
        potential needs each pair once).
        """
        skin = kwargs.pop("skin", self.skin if self.skin is not None else 1.0)
        kwargs.setdefault("half", True)
        return NeighborList.allocate(batch, self.cutoff, skin, capacity, **kwargs)

    def attach_neighbors(self, batch: Batch, capacity: int | None = None, **kwargs) -> Batch:
        """``batch`` with ``neighbors`` set to :meth:`neighbor_list` (host-side)."""
        return batch.replace(neighbors=self.neighbor_list(batch, capacity, **kwargs))

    def _neighbor_energy(self, batch: Batch, species: jax.Array | None = None) -> jax.Array:
        nl = batch.neighbors
        if not isinstance(nl, NeighborList):
            raise TypeError(
                f"{type(self).__name__} was configured for neighbor lists (skin={self.skin}) but "
                f"batch.neighbors is {type(nl).__name__}: give the batch one with "
                "model.attach_neighbors(batch) (or NeighborList.allocate), or use the dense "
                "path (a model without with_neighbors)."
            )
        if nl.cutoff < self.cutoff:
            raise ValueError(
                f"{type(self).__name__}: batch.neighbors has cutoff {nl.cutoff} < the model's "
                f"cutoff {self.cutoff}; allocate the list with the model's cutoff."
            )
        if self.auto_refresh:
            nl = nl.update(batch)
        # A list that overflowed (sticky: at any build since its allocation) misses pairs. Inside
        # a run the engine has stored it and the run loop regrows it and repeats the work; called
        # on its own the model cannot, so it is loud (NaN) instead of silently missing pairs.
        lost = nl.overflow
        s = batch.max_systems
        d = nl.displacements(batch.positions, batch.cell, batch.system_idx)
        r2 = jnp.sum(d * d, axis=-1)
        ok = nl.mask & (r2 < self.cutoff**2)
        # masked pairs at r = cutoff / 2, as on the dense path (finite φ and derivatives)
        r = jnp.sqrt(jnp.where(ok, r2, 0.25 * self.cutoff**2))
        if species is None:
            phi = self.pair_energy(r)
        else:  # the parameters of each pair's two species (unused slots: species 0, masked)
            n = batch.max_atoms
            i, j = jnp.minimum(nl.senders, n - 1), jnp.minimum(nl.receivers, n - 1)
            phi = self.pair_energy(r, species[i], species[j])
        phi = jnp.where(ok, phi, 0.0)
        weight = 1.0 if nl.half else 0.5
        energy = segment.segment_sum(weight * phi, nl.pair_system(batch.system_idx, s), s)
        # Not a select: forces and stress (derivatives) must be NaN too, never the zeros that
        # d/dx where(lost, nan, e) gives; the second term reaches atoms that have no stored pair.
        # Without an overflow it adds 0 * (a finite sum of the system's own coordinates).
        poison = jnp.where(lost, jnp.nan, 0.0)
        coords = jnp.where(batch.atom_mask, jnp.sum(batch.positions, axis=-1), 0.0)
        return energy * jnp.where(lost, jnp.nan, 1.0) + poison * batch.sum_atoms(coords)

    def with_images(self, batch: Batch) -> PairPotential:
        """A copy whose static image range covers every system of ``batch`` (host-side)."""
        mask = np.asarray(batch.system_mask)
        return self.with_images_for(np.asarray(batch.cell)[mask], np.asarray(batch.pbc)[mask])

    def with_images_for(self, cells, pbc) -> PairPotential:
        """A copy whose static image range covers cells (n, 3, 3) with periodicity (n, 3).

        Used by :meth:`FusedStage.run` on the cells of a batch or of a whole dataset before
        compiling, so that large cells evaluate with the minimum image alone.
        """
        cells = np.asarray(cells, np.float64).reshape(-1, 3, 3)
        pbc = np.asarray(pbc, bool).reshape(-1, 3)
        if not len(cells):
            return dataclasses.replace(self, images=(0, 0, 0))
        need = np.asarray(required_images(cells, pbc, self.cutoff))
        return dataclasses.replace(self, images=tuple(int(n) for n in need.max(axis=0)))

    def energy(self, batch: Batch) -> jax.Array:
        species = None
        if self.per_pair:
            batch, species = self._atom_species(batch)
        if self.skin is not None:
            return self._neighbor_energy(batch, species)
        return self._dense_energy(batch, species)

    def _dense_energy(self, batch: Batch, species: jax.Array | None = None) -> jax.Array:
        n_img = (1, 1, 1) if self.images is None else tuple(self.images)
        too_small = self._cell_too_small(batch)
        cell = batch.cell
        shifts = jnp.asarray(
            list(itertools.product(*(range(-n, n + 1) for n in n_img))), dtype=batch.dtype
        )  # (K, 3) in units of the lattice vectors

        index, valid = batch.system_view_index()  # (S, A)
        sys = jnp.minimum(batch.system_idx, batch.max_systems - 1)
        pair_ok = valid[sys] & batch.atom_mask[:, None]
        # An invalid pair's partner index points anywhere, possibly into another system: it is
        # redirected to the atom itself before the gather, so another system's NaN can never
        # reach this system's arithmetic (not even as 0 * NaN in the backward pass).
        atoms = jnp.arange(batch.max_atoms, dtype=index.dtype)[:, None]
        j = jnp.where(pair_ok, index[sys], atoms)  # (N, A)
        inv_cell = jnp.linalg.inv(cell)
        pbc = batch.pbc[sys]  # (N, 3)
        ds = jnp.einsum(
            "nai,nij->naj", batch.positions[j] - batch.positions[:, None], inv_cell[sys]
        )
        ds = ds - jnp.where(pbc[:, None], jnp.round(ds), 0.0)
        # shifts along non-periodic directions are not images
        shift_ok = jnp.all((shifts[None] == 0) | pbc[:, None], axis=-1)  # (N, K)
        frac = ds[:, :, None, :] + shifts[None, None]  # (N, A, K, 3)
        d = jnp.einsum("nakj,njl->nakl", frac, cell[sys])
        self_pair = (j == jnp.arange(batch.max_atoms)[:, None])[:, :, None] & jnp.all(
            shifts == 0, axis=-1
        )[None, None]
        ok = pair_ok[:, :, None] & shift_ok[:, None, :] & ~self_pair
        r2 = jnp.sum(d * d, axis=-1)
        ok = ok & (r2 < self.cutoff**2)
        # Masked pairs are evaluated at r = cutoff / 2, where every φ here is finite with finite
        # derivatives (r = 1 is not: (1 - r/σ)^α is NaN for σ < 1 and non-integer α, and a NaN
        # in the unused branch of `where` poisons gradients with respect to the parameters).
        r = jnp.sqrt(jnp.where(ok, r2, 0.25 * self.cutoff**2))
        if species is None:
            phi = self.pair_energy(r)
        else:  # (N, 1, 1) and (N, A, 1): j of an invalid pair is some atom, masked below
            phi = self.pair_energy(r, species[:, None, None], species[j][:, :, None])
        phi = jnp.where(ok, phi, 0.0)
        atom_energy = 0.5 * jnp.sum(phi, axis=(1, 2))
        energy = batch.sum_atoms(atom_energy)
        # A cell too small for the static image range would miss pairs: that system's energy,
        # forces and stress are NaN (a factor and a term in its own coordinates, so that the
        # derivatives are NaN too), and a run reports it FAILED with Failure.CELL_TOO_SMALL.
        # Other systems are untouched: it is not a run-wide error.
        coords = jnp.where(batch.atom_mask, jnp.sum(batch.positions, axis=-1), 0.0)
        poison = jnp.where(too_small, jnp.nan, 0.0)
        return energy * jnp.where(too_small, jnp.nan, 1.0) + poison * batch.sum_atoms(coords)

    def _cell_too_small(self, batch: Batch) -> jax.Array:
        """Systems whose cell needs more periodic images than the static range, (S,) bool."""
        n_img = (1, 1, 1) if self.images is None else tuple(self.images)
        need = required_images(batch.cell, batch.pbc, self.cutoff)
        finite = jnp.all(jnp.isfinite(batch.cell), axis=(-2, -1))  # non-finite: its own failure
        return batch.system_mask & finite & jnp.any(need > jnp.asarray(n_img), axis=-1)

    def system_faults(self, batch: Batch) -> jax.Array:
        """``Failure.CELL_TOO_SMALL`` for systems the dense path cannot evaluate, (S,) int32.

        The image range is static (``images``, or fitted by :meth:`with_images` to the cells a
        run starts from); a cell that shrinks below it during a run (a barostat, a cell filter)
        fails that system instead of missing pairs. Build the model with ``images=...`` large
        enough for the smallest cell expected (:func:`required_images`).
        """
        if self.skin is not None:
            return jnp.zeros(batch.max_systems, jnp.int32)
        bad = self._cell_too_small(batch)
        return jnp.where(bad, int(Failure.CELL_TOO_SMALL), 0).astype(jnp.int32)


def _switch_r2(r: jax.Array, cutoff: float, onset: float) -> jax.Array:
    """ASE's (and JAX-MD's) C¹ switch in r²: 1 below ``onset``, 0 at ``cutoff``."""
    r2, rc2, ro2 = r * r, cutoff**2, onset**2
    s = (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r2 < ro2, 1.0, s)


def _switch_quintic(r: jax.Array, cutoff: float, onset: float) -> jax.Array:
    """ASE's ``MorsePotential`` C² switch: 1 below ``onset``, 0 at ``cutoff``."""
    s = 1.0 - (r - onset) / (cutoff - onset)
    return jnp.where(s >= 1.0, 1.0, 6.0 * s**5 - 15.0 * s**4 + 10.0 * s**3)


_LJ_MIXING = {
    "lorentz_berthelot": {"sigma": "arithmetic", "epsilon": "geometric"},
    "geometric": {"sigma": "geometric", "epsilon": "geometric"},
}


class LennardJones(PairPotential):
    """Lennard-Jones ``φ(r) = 4ε[(σ/r)^12 - (σ/r)^6]``.

    Parameters
    ----------
    sigma : float or (K, K) array
        Å, finite and > 0. A matrix gives one value per species pair (with ``species``).
    epsilon : float or (K, K) array
        Well depth in eV, finite and >= 0 (0: the pair does not interact). A negative ε is
        refused: it turns the well into a barrier and the core into an attraction that diverges
        to -∞ at r -> 0, which no relaxation or dynamics survives (for a purely repulsive
        model use :class:`SoftSphere`).
    cutoff : float
        Å, finite and > 0; pairs at ``r >= cutoff`` do not interact.
    shift : bool, default True
        Shift ``φ`` to zero at the cutoff (ASE's ``LennardJones(smooth=False)``), for each
        species pair with its own parameters. Ignored when ``switch_onset`` is given.
    switch_onset : float, optional
        Å, finite, >= 0 and < ``cutoff``. Multiply ``φ`` by the C¹ switch of ASE's
        ``LennardJones(smooth=True, ro=switch_onset)`` (the same form as JAX-MD's
        ``multiplicative_isotropic_cutoff``).
    species : sequence of str or int, optional
        Elements naming the rows of ``sigma`` / ``epsilon`` given as symmetric (K, K) matrices
        (see :class:`PairPotential`). :meth:`~PairPotential.from_pairs` builds them from a table
        keyed by element pairs, optionally with Lorentz–Berthelot or geometric mixing::

            LennardJones.from_pairs(
                {"Ar": (3.405, 0.0104), "Kr": (3.65, 0.014)},
                mixing="lorentz_berthelot", cutoff=8.5,
            )
    """

    sigma: float | jax.Array = eqx.field(converter=_matrix_converter)
    epsilon: float | jax.Array = eqx.field(converter=_matrix_converter)
    cutoff: float = eqx.field(static=True)
    shift: bool = eqx.field(static=True, default=True)
    switch_onset: float | None = eqx.field(static=True, default=None)

    _parameters: ClassVar[dict[str, tuple[Rule, str]]] = {
        "sigma": (positive(), "Å"),
        "epsilon": (non_negative(), "eV"),
    }
    _mixing: ClassVar[dict[str, dict[str, str]]] = _LJ_MIXING

    def pair_energy(self, r, si=None, sj=None):
        sigma, epsilon = _gather(self.sigma, si, sj), _gather(self.epsilon, si, sj)

        def lj(r):
            c6 = (sigma / r) ** 6
            return 4.0 * epsilon * (c6 * c6 - c6)

        if self.switch_onset is not None:
            return lj(r) * _switch_r2(r, self.cutoff, self.switch_onset)
        if self.shift:
            return lj(r) - lj(jnp.asarray(self.cutoff, r.dtype))
        return lj(r)


class Morse(PairPotential):
    """Morse ``φ(r) = D[e^{-2α(r - r0)} - 2e^{-α(r - r0)}]``.

    Parameters
    ----------
    D : float or (K, K) array
        Well depth in eV, finite and >= 0 (a negative D turns the well into a barrier and is
        refused, as LennardJones's negative ε).
    alpha : float or (K, K) array
        Stiffness in 1/Å, finite and > 0.
    r0 : float or (K, K) array
        Equilibrium distance in Å, finite and > 0. ASE's ``MorsePotential`` has
        ``epsilon = D`` and ``rho0 = alpha * r0``.
    cutoff : float
        Å, finite and > 0.
    shift : bool, default True
        Shift ``φ`` to zero at the cutoff, per species pair (ignored when ``switch_onset`` is
        given).
    switch_onset : float, optional
        Å, finite, >= 0 and < ``cutoff``. Multiply ``φ`` by ASE's quintic switch between
        ``switch_onset`` and ``cutoff`` (``MorsePotential(rcut1=switch_onset / r0,
        rcut2=cutoff / r0)``).
    species : sequence of str or int, optional
        Elements naming the rows of parameters given as symmetric (K, K) matrices (see
        :class:`PairPotential`; :meth:`~PairPotential.from_pairs` takes ``(D, alpha, r0)`` per
        pair; Morse has no mixing rule).
    """

    D: float | jax.Array = eqx.field(converter=_matrix_converter)
    alpha: float | jax.Array = eqx.field(converter=_matrix_converter)
    r0: float | jax.Array = eqx.field(converter=_matrix_converter)
    cutoff: float = eqx.field(static=True)
    shift: bool = eqx.field(static=True, default=True)
    switch_onset: float | None = eqx.field(static=True, default=None)

    _parameters: ClassVar[dict[str, tuple[Rule, str]]] = {
        "D": (non_negative(), "eV"),
        "alpha": (positive(), "1/Å"),
        "r0": (positive(), "Å"),
    }

    def pair_energy(self, r, si=None, sj=None):
        d, alpha, r0 = (_gather(p, si, sj) for p in (self.D, self.alpha, self.r0))

        def morse(r):
            e = jnp.exp(-alpha * (r - r0))
            return d * e * (e - 2.0)

        if self.switch_onset is not None:
            return morse(r) * _switch_quintic(r, self.cutoff, self.switch_onset)
        if self.shift:
            return morse(r) - morse(jnp.asarray(self.cutoff, r.dtype))
        return morse(r)


class SoftSphere(PairPotential):
    """Soft sphere ``φ(r) = ε/α (1 - r/σ)^α`` for ``r < σ`` (JAX-MD's ``soft_sphere``).

    Parameters
    ----------
    sigma : float or (K, K) array
        Contact distance in Å, finite and > 0; also the cutoff (the largest entry for a
        matrix). Static: it cannot be traced (vmap over ``epsilon`` or ``alpha`` instead).
    epsilon : float or (K, K) array
        eV, finite and >= 0 (a negative ε would make the core attractive).
    alpha : float or (K, K) array, default 2.0
        Exponent, finite and > 0.
    species : sequence of str or int, optional
        Elements naming the rows of parameters given as symmetric (K, K) matrices (see
        :class:`PairPotential`); :meth:`~PairPotential.from_pairs` takes
        ``(sigma, epsilon, alpha)`` per pair, or ``(sigma, epsilon)`` with ``alpha=`` a
        keyword, and mixes ``sigma`` and ``epsilon`` as :class:`LennardJones` does.
    """

    sigma: float | tuple[tuple[float, ...], ...] = eqx.field(
        static=True, converter=_static_matrix_converter
    )
    epsilon: float | jax.Array = eqx.field(default=1.0, converter=_matrix_converter)
    alpha: float | jax.Array = eqx.field(default=2.0, converter=_matrix_converter)

    _parameters: ClassVar[dict[str, tuple[Rule, str]]] = {
        "sigma": (positive(), "Å"),
        "epsilon": (non_negative(), "eV"),
        "alpha": (positive(), "dimensionless"),
    }
    _mixing: ClassVar[dict[str, dict[str, str]]] = _LJ_MIXING

    def __check_init__(self):
        if is_traced(self.sigma):
            raise ValueError(
                "SoftSphere: sigma sets the cutoff and is static, so it cannot be traced "
                "(jax.vmap/jax.grad over epsilon or alpha instead)."
            )

    @property
    def cutoff(self) -> float:
        if _ndim(self.sigma) == 2:
            return float(np.max(self.sigma))
        return float(self.sigma)

    def pair_energy(self, r, si=None, sj=None):
        epsilon, alpha = _gather(self.epsilon, si, sj), _gather(self.alpha, si, sj)
        if _ndim(self.sigma) == 0:
            return epsilon / alpha * (1.0 - r / self.sigma) ** alpha
        # per-pair contact distances below the cutoff (the largest one): zero beyond σ_ij, and
        # a safe base there so that (1 - r/σ)^α and its derivatives stay finite
        sigma = _gather(self.sigma, si, sj)
        inside = r < sigma
        x = jnp.where(inside, 1.0 - r / sigma, 1.0)
        return jnp.where(inside, epsilon / alpha * x**alpha, 0.0)
