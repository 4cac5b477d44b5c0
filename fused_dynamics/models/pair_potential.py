"""The base class of the pair potentials: parameters, checks, species and the two sums.

:class:`PairPotential` holds what every pair potential shares: the validated fields (cutoff,
switch, images, skin, species), the per-species-pair machinery (:mod:`.species`), the choice
between the dense and the neighbor-list sums (:mod:`.pair_sums`) and the image range of the dense
path. The potentials themselves are in :mod:`.potentials`; :mod:`fused_dynamics.models.pair`
gathers them all.

Every parameter is checked when the model is built (``__check_init__``): a wrong value raises a
:class:`ValueError` naming the class, the parameter, the value and the rule. Traced parameters
(under ``jax.vmap``, ``jax.grad``) have their shapes checked, not their values.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..batch import Batch
from ..compiled import TREE_REDUCTION_WIDTH, library_products_only
from ..status import Failure
from ..validation import (
    Rule,
    check_bool,
    check_integer,
    check_order,
    check_real,
    non_negative,
    positive,
)
from .base import Model
from .blocked import bucket_slots, fit_size_buckets
from .neighbors import NeighborList
from .pair_sums import (
    cell_too_small,
    dense_energy,
    dense_sum_width,
    neighbor_energy,
    neighbor_rows_output,
    required_images_host,
)
from .species import (
    _SYMBOLS,
    _check_parameter,
    _ndim,
    _species_converter,
    _symbols,
    atom_species,
    build_from_pairs,
    check_batch_species,
)

__all__ = ["PairPotential"]


def _host_sizes(batch: Batch) -> np.ndarray | None:
    """Atoms of each occupied system, in NumPy (None when the layout is traced).

    NumPy, not ``batch.n_atoms``: under an outer ``jax.jit`` every ``jnp`` operation is staged
    out, even on concrete inputs (a differentiable run traces the positions, not the layout).
    """
    if isinstance(batch.system_idx, jax.core.Tracer) or isinstance(
        batch.system_mask, jax.core.Tracer
    ):
        return None
    idx = np.asarray(batch.system_idx)
    counts = np.bincount(idx[idx < batch.max_systems], minlength=batch.max_systems)
    return counts[np.asarray(batch.system_mask)]


def _buckets_converter(value):
    """``size_buckets`` as a tuple of (atoms, slots) tuples (``None`` kept); checked later."""
    if value is None:
        return None
    try:
        return tuple(tuple(entry) for entry in value)
    except TypeError:
        return value


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
    size_buckets : tuple of (int, int), optional
        Dense path, blocked layout: split the system slots into size buckets ``(atoms, slots)``
        (ascending ``atoms``), each holding up to ``slots`` systems of at most ``atoms`` atoms
        and paired on the tiles its size fills, so that in a batch of mixed sizes the small
        systems do not pay for the largest (docs/models.md, "Size buckets"). A system belongs
        to the first bucket it fits by its own size. ``None`` (default): one bucket; a fixed
        batch's run fits them to its systems (:meth:`with_size_buckets`) when that saves a
        quarter of the pairs. ``()``: one bucket, never fitted. A system with no place in its
        bucket gets NaN energy, forces and stress (``Failure.SIZE_BUCKET_FULL`` in a run). Not
        used with neighbor lists, nor in inflight runs (refused: refills bring any size).
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
    size_buckets: tuple[tuple[int, int], ...] | None = eqx.field(
        static=True, default=None, kw_only=True, converter=_buckets_converter
    )
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
        if self.size_buckets is not None:
            buckets = self.size_buckets
            if not isinstance(buckets, tuple) or any(
                not isinstance(e, tuple) or len(e) != 2 for e in buckets
            ):
                raise ValueError(
                    f"{owner}: size_buckets must be None or a sequence of (atoms, slots) "
                    f"pairs, got {buckets!r}."
                )
            previous = 0
            for k, (atoms, slots) in enumerate(self.size_buckets):
                check_integer(owner, f"size_buckets[{k}] atoms", atoms, 1)
                check_integer(owner, f"size_buckets[{k}] slots", slots, 1)
                if atoms <= previous:
                    raise ValueError(
                        f"{owner}: size_buckets must be (atoms, slots) pairs in increasing "
                        f"atoms; entry {k} has {atoms} atoms after {previous}."
                    )
                previous = atoms
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
        """Host-side checks of a concrete batch before compiling (:meth:`check_species`, and
        that every system has a place in ``size_buckets``).

        Raises
        ------
        ValueError
            Naming the unknown elements, or the systems without a place in the size buckets.
        """
        self.check_species(batch)
        sizes = _host_sizes(batch)
        if not self.size_buckets or self.skin is not None or sizes is None:
            return
        owner = type(self).__name__
        bounds = np.asarray([atoms for atoms, _ in self.size_buckets])
        which = np.searchsorted(bounds, sizes, side="left")
        if (which == len(bounds)).any():
            raise ValueError(
                f"{owner}: size_buckets={self.size_buckets} hold systems of at most "
                f"{bounds[-1]} atoms; the batch has one of {int(sizes.max())}."
            )
        for k, (atoms, slots) in enumerate(self.size_buckets):
            held = int(np.sum(which == k))
            if held > slots:
                raise ValueError(
                    f"{owner}: size_buckets[{k}] = ({atoms}, {slots}) holds {slots} systems; "
                    f"the batch has {held} of its sizes. Fit them with "
                    "model.with_size_buckets(batch), or give more slots."
                )

    def with_size_buckets(self, batch: Batch, **options) -> PairPotential:
        """A copy with size buckets fitted to a concrete batch's systems (host-side).

        :func:`.blocked.fit_size_buckets` of the occupied systems' sizes (``options``:
        ``max_buckets``, ``min_saving``); ``size_buckets`` stays ``None`` where buckets would
        save less than ``min_saving`` of the pairs. Returns ``self`` on the neighbor-list path
        and where the layout of the batch is traced (under ``jax.jit``, ``jax.vmap``).
        """
        sizes = _host_sizes(batch)
        if self.skin is not None or sizes is None or not len(sizes):
            return self
        buckets = fit_size_buckets(sizes, batch.max_atoms_per_system, **options)
        return dataclasses.replace(self, size_buckets=buckets)

    def check_species(self, batch: Batch) -> None:
        """Host-side: every occupied atom of a concrete batch is of one of ``species``.

        Raises
        ------
        ValueError
            Naming the unknown elements and the system slots (and ``system_id``) holding them.
        """
        check_batch_species(self, batch)

    def _atom_species(self, batch: Batch) -> tuple[Batch, jax.Array]:
        """Each atom's species index (row of the parameter matrices), shape (N,) int32.

        Unknown elements among the occupied atoms stop the run with an error naming the element
        and the system slot; padding atoms get index 0 (finite parameters, masked anyway).
        """
        return atom_species(self, batch)

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
        return build_from_pairs(cls, table, mixing=mixing, **kwargs)

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
        return neighbor_energy(self, batch, species)

    def explicit_output(self, batch: Batch, stress: bool):
        """On a neighbor list with per-atom rows (``max_neighbors > 0``, what
        :meth:`neighbor_list` allocates): energy, forces and stress summed along each atom's row
        (:func:`~fused_dynamics.models.pair_sums.neighbor_rows_output`, about 2.5x faster on
        CPU than differentiating the half list, whose pair forces are scatter-added onto both
        atoms). Otherwise None: :meth:`energy` is differentiated."""
        nl = batch.neighbors
        if (
            self.skin is None
            or not isinstance(nl, NeighborList)
            or nl.max_neighbors == 0
            or nl.cutoff < self.cutoff
        ):
            return None  # energy() raises for a list it cannot use
        species = None
        if self.per_pair:
            batch, species = self._atom_species(batch)
        return neighbor_rows_output(self, batch, species, stress)

    def with_images(self, batch: Batch) -> PairPotential:
        """A copy whose static image range covers every system of ``batch`` (host-side)."""
        mask = np.asarray(batch.system_mask)
        return self.with_images_for(np.asarray(batch.cell)[mask], np.asarray(batch.pbc)[mask])

    def with_images_for(self, cells, pbc) -> PairPotential:
        """A copy whose static image range covers cells (n, 3, 3) with periodicity (n, 3).

        Used by :meth:`FusedStage.run` on the cells of a batch or of a whole dataset before
        compiling, so that large cells evaluate with the minimum image alone.
        """
        images = required_images_host(cells, pbc, float(self.cutoff))
        return dataclasses.replace(self, images=images)

    def compiler_options(self, batch: Batch) -> dict:
        """On the dense path in float32, where the innermost sums (a tile's atoms in the blocks
        layout, a system's atom slots along a row in the rows layout) are wider than XLA:CPU's
        tree-reduction width and not a multiple of it (108 atoms): keep the YNNPACK library
        for matrix products only (:func:`fused_dynamics.compiled.library_products_only`). The
        reduce-windows of those sums ran slower in the library than the whole step XLA emits
        without it. Float32 NVE steps, LJ argon, XLA's default against this (ms): 8 x 108
        blocks 0.84 / 0.40 (float64 0.41); rows of 108 slots 7.06 / 2.37 (float64 3.12); where
        the width is a multiple of 32 the library's plain reductions are as fast or faster
        (32-atom tiles of 4 x 256: 0.98 / 1.45; rows of 128 slots: 4.47 / 5.24), so those keep
        XLA's default. See docs/models.md, "float32 on the CPU".

        Parameters
        ----------
        batch : Batch
            Its capacities and dtype decide (the image range is this model's).

        Returns
        -------
        dict
            :func:`~fused_dynamics.compiled.library_products_only`, or empty.
        """
        if self.skin is not None or np.dtype(batch.dtype) != np.float32:
            return {}
        width = dense_sum_width(self, batch)
        if width <= TREE_REDUCTION_WIDTH or width % TREE_REDUCTION_WIDTH == 0:
            return {}
        return library_products_only()

    def energy(self, batch: Batch) -> jax.Array:
        species = None
        if self.per_pair:
            batch, species = self._atom_species(batch)
        if self.skin is not None:
            return self._neighbor_energy(batch, species)
        return self._dense_energy(batch, species)

    def _dense_energy(self, batch: Batch, species: jax.Array | None = None) -> jax.Array:
        return dense_energy(self, batch, species)

    def _cell_too_small(self, batch: Batch) -> jax.Array:
        """Systems whose cell needs more periodic images than the static range, (S,) bool."""
        n_img = (1, 1, 1) if self.images is None else tuple(self.images)
        return cell_too_small(batch, self.cutoff, n_img)

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
        faults = jnp.where(bad, int(Failure.CELL_TOO_SMALL), 0).astype(jnp.int32)
        if self.size_buckets:
            _, placed = bucket_slots(batch, self.size_buckets)
            full = batch.system_mask & ~placed
            faults = faults | jnp.where(full, int(Failure.SIZE_BUCKET_FULL), 0).astype(jnp.int32)
        return faults
