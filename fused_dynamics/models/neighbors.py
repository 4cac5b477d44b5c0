"""Batched neighbor lists: O(N) cell lists for a padded multi-system batch, with a Verlet skin.

A :class:`NeighborList` lives in ``batch.neighbors``. It is a flat list of ``P`` directed pairs
(``P``, the capacity, is a static array size) over the whole batch::

    d_p = positions[receivers[p]] - positions[senders[p]] + shifts[p] @ cell[system of senders[p]]

with ``mask[p]`` marking real pairs. This is ASE's ``neighbor_list("ijS")`` convention (``i =
senders``, ``j = receivers``, ``S = shifts``): integer image shifts, applied to the positions as
they are stored (not wrapped), so a pair's displacement is continuous while atoms move and, for
the stress, depends on the (strained) cell. Pairs never cross systems. Unused slots hold
``senders == receivers == N`` (the atom capacity, a sentinel that ``segment_sum(...,
num_segments=N)`` drops) and zero shifts. With ``half=True`` each unordered pair is stored once
(``i < j``, or a positive shift for an atom's own image; pair potentials sum it with weight 1).
The full list (both directions) is what message-passing models consume. Pairs are sorted by
``(i, j, S)``: the stored order depends only on which pairs exist, not on where atoms sat in the
bins when the list was built, so a system's sums are the same bit for bit whenever (and however
often, for whatever other system) the list was rebuilt.

A half list can also keep per-atom rows (``row_receivers`` (N, M), ``row_shifts`` (N, M, 3),
``M = max_neighbors``): every neighbor of each atom, each pair in the rows of both its atoms, in
an order fixed by the pairs (:func:`~fused_dynamics.models.cell_list.neighbor_rows`). The pair
potentials sum their pair forces along the rows, without scatter-adds (docs/models.md, "Forces
along per-atom rows"); the lists they allocate keep rows by default.

Construction (``build``) is a cell list per system, all systems at once with static shapes: see
:mod:`fused_dynamics.models.cell_list` (the bins, the bin offsets searched, the cost, and the
sticky ``overflow`` flag with the needs from which :meth:`NeighborList.grown` sizes the next
try).

Rebuild criterion (:meth:`NeighborList.needs_rebuild`): a pair within ``cutoff`` now was within
``cutoff + skin`` at the last build if, for every system,

    2 max_i |r_i C^-1 C_ref - r_ref,i| + cutoff ||C^-1 C_ref - 1||_F <= skin

where ``C`` is the current cell and ``C_ref`` the cell at the last build (for a fixed cell this
is the usual "no atom moved more than half the skin"). Otherwise, or when the list is marked
stale (:meth:`NeighborList.invalidated`, :meth:`NeighborList.grown`), or when the atoms' systems or
the periodicity changed, the whole list is rebuilt. :meth:`NeighborList.update` does that under
``lax.cond``, so a step without rebuild costs one ``O(N)`` check; :class:`NeighborListHook` calls
it at ``BEFORE_COMPUTE``, the fused-level point just before the one model evaluation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import segment
from ..hooks import DynamicsStage, Hook
from ..linalg3 import matvec3
from .cell_list import (
    _OCCUPANCY,
    _PAIRS,
    _ROWS,
    _STENCIL,
    BINS_PER_ATOM,
    NEEDED_FIELDS,
    _bin_geometry_jit,
    _build,
    _build_jit,
    _ceil,
    _check_range,
    _geometry_inputs,
    _max_occupancy,
    crowding_systems,
    pair_codes_fit,
    stencil_for_cells,
)

__all__ = ["NeighborList", "NeighborListHook", "refresh_neighbors", "NO_SYSTEM"]

#: ``NeighborList.excluded_ids`` where no system is excluded (no batch's ``system_id``).
NO_SYSTEM = np.iinfo(np.int32).min


def _check_width(max_neighbors, half: bool) -> int:
    width = int(max_neighbors)
    if width < 0 or (width > 0 and not half):
        raise ValueError(
            f"NeighborList: max_neighbors must be >= 0, and 0 for a full list (per-atom rows "
            f"are made from a half list); got {max_neighbors} with half={half}."
        )
    return width


class NeighborList(eqx.Module):
    """A fixed-capacity pair list for every system of a padded batch (see the module docstring).

    Create one with :meth:`allocate` (host-side, sizes the capacities from a batch) and keep it
    in ``batch.neighbors``; refresh it with :meth:`update` (under ``jit``) or
    :class:`NeighborListHook`.

    Attributes
    ----------
    senders, receivers : Array, shape (P,) int32
        Atoms ``i`` and ``j`` of each pair (``N`` in unused slots).
    shifts : Array, shape (P, 3) int32
        Image shift ``S`` of each pair: ``d = r_j - r_i + S @ cell``.
    mask : Array, shape (P,) bool
        Real pairs: within ``cutoff + skin`` at the last build.
    row_receivers : Array, shape (N, M) int32
        Per-atom rows of a half list (``M = max_neighbors``, 0 when not kept): every neighbor
        ``j`` of atom ``i``, both directions of each pair, ``N`` in unused entries (order:
        :func:`~fused_dynamics.models.cell_list.neighbor_rows`). A pair potential sums a row
        without scatter-adds: the forces of atom ``i`` are the sum of its row's pair forces.
    row_shifts : Array, shape (N, M, 3) int32
        Image shift of each row entry: ``d = r_j - r_i + S @ cell``.
    reference_positions : Array, shape (N, 3)
        Positions at the last build.
    reference_cell : Array, shape (S, 3, 3)
        Cells at the last build.
    reference_system_idx : Array, shape (N,) int32
        ``system_idx`` at the last build (a re-packed batch is rebuilt even if not invalidated).
    reference_pbc : Array, shape (S, 3) bool
    overflow : Array, shape () bool
        Sticky: some build needed more than a capacity. Pairs beyond the capacity were not stored,
        so results since then are wrong and the run must be repeated with :meth:`grown`.
    stale : Array, shape () bool
        The next :meth:`update` rebuilds whatever the displacements.
    rebuilds : Array, shape () int32
        Number of builds since :meth:`allocate` (the allocation's own build included).
    n_pairs : Array, shape () int32
        Pairs found by the last build (may exceed the capacity when it overflowed).
    needed : Array, shape (5,) int32
        Largest pairs, bin occupancy, bins, stencil and neighbors of one atom needed by the
        builds so far (up to the first overflow), see ``NEEDED_FIELDS``; used by :meth:`grown`.
    excluded_ids : Array, shape (S,) int32
        Per slot, the ``system_id`` of the system left out of the builds (``NO_SYSTEM``, the
        smallest int32, where none), so that a list that
        would have no int32 pair codes for them does not stop the others: a run fails them
        ``NEIGHBOR_OVERFLOW`` (:meth:`excluded`, :func:`fused_dynamics.compiled.grow_neighbors`).
    cutoff, skin : float
        Static. Pairs are stored within ``cutoff + skin``.
    half : bool
        Static. Each unordered pair once instead of both directions.
    stencil : int
        Static. Bin offsets ``-stencil..stencil`` are searched; bins are at least
        ``(cutoff + skin) / stencil`` thick.
    bin_capacity : int
        Static. Atom slots per bin.
    margin : float
        Static. Head room :meth:`allocate` and :meth:`grown` give over a measured need.
    blind_growths : int
        Static. Growths in a row that no recorded need explained (see :meth:`grown`).
    refreshed : bool
        Static, default False. Set on the list the fused step hands to the model right after
        refreshing it for the same positions (:meth:`FusedStage.evaluate`): :meth:`update` then
        returns it as it is, so that a compiled step checks (and holds the code of) one rebuild,
        not one more per model that refreshes its list itself.
    """

    senders: jax.Array
    receivers: jax.Array
    shifts: jax.Array
    mask: jax.Array
    row_receivers: jax.Array
    row_shifts: jax.Array
    reference_positions: jax.Array
    reference_cell: jax.Array
    reference_system_idx: jax.Array
    reference_pbc: jax.Array
    overflow: jax.Array
    stale: jax.Array
    rebuilds: jax.Array
    n_pairs: jax.Array
    needed: jax.Array
    excluded_ids: jax.Array
    cutoff: float = eqx.field(static=True)
    skin: float = eqx.field(static=True)
    half: bool = eqx.field(static=True, default=False)
    stencil: int = eqx.field(static=True, default=1)
    bin_capacity: int = eqx.field(static=True, default=8)
    margin: float = eqx.field(static=True, default=1.15)
    blind_growths: int = eqx.field(static=True, default=0)
    refreshed: bool = eqx.field(static=True, default=False)

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        """Pair capacity P (the static length of the pair arrays)."""
        return int(self.senders.shape[-1])

    @property
    def max_neighbors(self) -> int:
        """Width M of the per-atom rows (0: the list keeps none)."""
        return int(self.row_receivers.shape[-1])

    @property
    def max_bins(self) -> int:
        """Rows of the bin table: ``2 N + S`` (no system ever needs more, see the module doc)."""
        n = int(self.reference_positions.shape[-2])
        s = int(self.reference_cell.shape[-3])
        return BINS_PER_ATOM * n + s

    @property
    def interaction_range(self) -> float:
        """``cutoff + skin``: the range within which pairs are stored."""
        return float(self.cutoff) + float(self.skin)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(
        cls,
        batch,
        cutoff: float,
        skin: float,
        capacity: int,
        *,
        half: bool = False,
        stencil: int = 1,
        bin_capacity: int = 8,
        margin: float = 1.15,
        max_neighbors: int = 0,
    ) -> NeighborList:
        """A stale list of the given static capacities (built on its first :meth:`update`).

        Works under ``jit``: nothing here looks at values. ``max_neighbors`` > 0 (half lists
        only) keeps per-atom rows of that width.
        """
        _check_range(cutoff, skin)
        n, s = batch.max_atoms, batch.max_systems
        width = _check_width(max_neighbors, half)
        return cls(
            senders=jnp.full((int(capacity),), n, jnp.int32),
            receivers=jnp.full((int(capacity),), n, jnp.int32),
            shifts=jnp.zeros((int(capacity), 3), jnp.int32),
            mask=jnp.zeros((int(capacity),), bool),
            row_receivers=jnp.full((n, width), n, jnp.int32),
            row_shifts=jnp.zeros((n, width, 3), jnp.int32),
            reference_positions=jax.lax.stop_gradient(batch.positions),
            reference_cell=jax.lax.stop_gradient(batch.cell),
            reference_system_idx=batch.system_idx,
            reference_pbc=batch.pbc,
            overflow=jnp.zeros((), bool),
            stale=jnp.ones((), bool),
            rebuilds=jnp.zeros((), jnp.int32),
            n_pairs=jnp.zeros((), jnp.int32),
            needed=jnp.zeros((len(NEEDED_FIELDS),), jnp.int32),
            excluded_ids=jnp.full((s,), NO_SYSTEM, jnp.int32),
            cutoff=float(cutoff),
            skin=float(skin),
            half=bool(half),
            stencil=int(stencil),
            bin_capacity=int(bin_capacity),
            margin=float(margin),
        )._checked(n, s)

    def _checked(self, n, s):
        if self.stencil < 1 or self.bin_capacity < 1 or self.capacity < 0:
            raise ValueError(
                f"NeighborList: stencil and bin_capacity must be >= 1 and capacity >= 0 "
                f"(got {self.stencil}, {self.bin_capacity}, {self.capacity})."
            )
        if self.margin < 1.0:
            raise ValueError(f"NeighborList: margin must be >= 1, got {self.margin}.")
        return self

    @classmethod
    def allocate(
        cls,
        batch,
        cutoff: float,
        skin: float = 1.0,
        capacity: int | None = None,
        *,
        half: bool = False,
        margin: float = 1.15,
        stencil: int | None = None,
        bin_capacity: int | None = None,
        cells=None,
        pbc=None,
        more_batches=None,
        max_neighbors: int | None = None,
    ) -> NeighborList:
        """A list sized for ``batch`` and built on it (host-side, eager).

        Parameters
        ----------
        batch : Batch
            Concrete (not traced). The capacities are measured on it.
        cutoff : float
            Å; the largest cutoff of the model(s) that will use the list.
        skin : float, default 1.0
            Å; pairs are kept within ``cutoff + skin`` and the list is rebuilt only when some atom
            moved more than ``skin / 2`` (see the module docstring).
        capacity : int, optional
            Pair capacity P. Default: ``ceil(margin * pairs) + 16`` for the pairs of ``batch``.
        half : bool, default False
            Store each unordered pair once (pair potentials); the default stores both directions.
        margin : float, default 1.15
            Head room over measured needs (pairs, bin occupancy, bins).
        stencil : int, optional
            Bin-offset half-width (default 1, raised to what the thinnest periodic cell of the
            batch, and of ``cells``, needs: ``ceil((cutoff + skin) / plane spacing)``).
        bin_capacity : int, optional
            Atom slots per bin (default: measured, with the margin, plus 2).
        cells, pbc : array (n, 3, 3) and (n, 3), optional
            More cells the list must serve without growing its stencil (the cells of a dataset
            that an inflight run will load).
        more_batches : sequence of Batch, or a callable returning an iterable of them, optional
            The other systems the list must serve, packed in batches of ``batch``'s shapes (an
            inflight run's dataset: :meth:`SizeAwareSampler.preview_batches`; a callable is
            called twice and streamed, so the batches are never all in memory). The default
            capacities then hold *any* batch of these systems and ``batch``'s: atoms per bin
            and stencil are needs of each system alone, so their largest over all systems
            bounds every mix; pairs are bounded by the smaller of the ``S`` largest per-system
            pair counts summed and ``N`` times the most pairs per atom (``S``, ``N``: the
            batch's capacities), with ``margin``. A denser structure arriving with a refill
            then fits instead of overflowing the list and recompiling the run. The counts
            come from a count pass compiled once for these shapes (``cell_list._build`` with
            ``per_system=True``). Bounds follow the structures as given; a system that
            becomes denser during a run can still overflow the list (it is then grown).
        max_neighbors : int, optional
            Width M of the per-atom rows (``row_receivers``; half lists only, 0 keeps none).
            Default: measured for a half list, ``ceil(margin * most) + 2`` for the most
            neighbors of one atom in ``batch`` and ``more_batches``; 0 for a full list.

        Returns
        -------
        NeighborList
            Built on ``batch``: ``rebuilds == 1``; ``overflow`` is already true if an explicit
            capacity is too small (the run loop then grows it before going on).

        Notes
        -----
        Compiles the binning and the build for the batch's shapes (a count pass with no pair
        storage when ``capacity`` is not given, then the build with the chosen capacity).
        """
        if isinstance(batch.positions, jax.core.Tracer):
            raise TypeError(
                "NeighborList.allocate measures a concrete batch; under jit use "
                "NeighborList.empty(batch, cutoff, skin, capacity, stencil=..., bin_capacity=...) "
                "followed by .update(batch)."
            )
        _check_range(cutoff, skin)
        rc = float(cutoff) + float(skin)
        if more_batches is None:
            every = lambda: [batch]  # noqa: E731
        elif callable(more_batches):
            every = lambda: itertools.chain([batch], more_batches())  # noqa: E731
        else:
            items = [batch, *more_batches]
            every = lambda: items  # noqa: E731
        k = max(int(stencil or 1), stencil_for_cells(cells, pbc, rc))
        occupancy = 0
        for b in every():  # a batch's stencil need can raise k: then measured again at k
            geo = _bin_geometry_jit(_geometry_inputs(b), rc, k)
            if int(geo["stencil_needed"]) > k:
                k = int(geo["stencil_needed"])
                geo = _bin_geometry_jit(_geometry_inputs(b), rc, k)
            # bins measured at a smaller k are thicker: their occupancy bounds the thinner ones'
            occupancy = max(occupancy, _max_occupancy(np.asarray(geo["global_bin"])))
        if bin_capacity is None:
            bin_capacity = max(int(math.ceil(margin * occupancy)) + 2, 4)
        kw = dict(half=half, stencil=k, bin_capacity=bin_capacity, margin=margin)
        empty = cls.empty(batch, cutoff, skin, 0, **kw)
        measure_rows = max_neighbors is None and half
        most = 0  # neighbors of one atom, from the count passes (both ends of each pair)
        if capacity is None and more_batches is None:  # this batch's pairs
            counted = _build_jit(empty, batch, per_system=measure_rows)
            counted = counted[0] if measure_rows else counted
            most = int(counted.needed[_ROWS])
            capacity = int(math.ceil(margin * int(counted.n_pairs))) + 16
        elif capacity is None:  # any batch of these systems: per-system counts
            pairs, sizes = [], []
            for b in every():
                counted, per = _build_jit(empty, b, per_system=True)
                most = max(most, int(counted.needed[_ROWS]))
                per = np.asarray(per)
                real = np.asarray(b.system_mask)
                pairs.append(per[real])
                sizes.append(np.bincount(np.asarray(b.system_idx), minlength=len(real) + 1)[:-1])
                sizes[-1] = sizes[-1][real]
            pairs, sizes = np.concatenate(pairs), np.maximum(np.concatenate(sizes), 1)
            top = np.sort(pairs)[::-1][: batch.max_systems].sum()
            densest = batch.max_atoms * np.max(pairs / sizes, initial=0.0)
            capacity = int(math.ceil(margin * min(top, densest))) + 16
        elif measure_rows:  # a given capacity: count the rows' need alone
            for b in every():
                counted = _build_jit(empty, b, per_system=True)[0]
                most = max(most, int(counted.needed[_ROWS]))
        if measure_rows:
            max_neighbors = int(math.ceil(margin * most)) + 2
        kw["max_neighbors"] = int(max_neighbors or 0)
        return _build_jit(cls.empty(batch, cutoff, skin, int(capacity), **kw), batch)

    # ------------------------------------------------------------------ state changes
    def codes_fit(self, n_atoms: int) -> bool:
        """Whether a build of this list's static sizes on ``n_atoms`` atom slots has int32 pair
        codes (bin offsets x atoms x atoms per bin below 2**31 - 1; host-side)."""
        return pair_codes_fit(self, n_atoms)

    def excluded(self, batch) -> jax.Array:
        """Occupied systems of ``batch`` this list leaves out, (S,) bool: per slot, the one
        whose ``system_id`` is that slot's ``excluded_ids`` entry (a slot refilled with another
        system is built again; a replica sharing the id in another slot is not concerned)."""
        return batch.system_mask & (batch.system_id == self.excluded_ids)

    def excluding(self, batch, crowded) -> NeighborList:
        """Host-side: the same capacities, stale, also leaving out the systems of ``batch`` in
        the slots ``crowded`` (S,) bool (each slot keeps the ``system_id`` it leaves out)."""
        out = np.asarray(crowded) | np.asarray(self.excluded(batch))
        kept = np.where(out, np.asarray(batch.system_id), NO_SYSTEM).astype(np.int32)
        return dataclasses.replace(
            self, excluded_ids=jnp.asarray(kept), stale=jnp.ones_like(self.stale)
        )

    def crowding_systems(self, batch, candidates=None) -> np.ndarray:
        """Host-side: the ``candidates`` of ``batch`` (S,) bool (default: every occupied
        slot) whose own stencil and bin occupancy leave this list no int32 pair codes (or,
        when none does alone, the most demanding one), shape (S,) bool: what a run fails
        ``NEIGHBOR_OVERFLOW`` instead of growing the list for every system
        (:func:`~fused_dynamics.models.cell_list.crowding_systems`)."""
        return crowding_systems(self, batch, candidates)

    def invalidated(self) -> NeighborList:
        """The same list marked stale: the next :meth:`update` rebuilds it.

        Call it when atoms were moved on the atom axis or systems replaced (inflight refill).
        """
        return dataclasses.replace(self, stale=jnp.ones_like(self.stale))

    def grown(self, factor: float = 2.0, seen: NeighborList | None = None) -> NeighborList:
        """A larger, stale, non-overflowed copy (host-side; one recompilation follows).

        - pair capacity: ``max(ceil(factor * capacity), ceil(margin * pairs needed))``;
        - atoms per bin: ``ceil(margin * needed) + 2`` when a build needed more than
          ``bin_capacity``;
        - stencil: what the thinnest cell needed, when that was more;
        - per-atom rows (a list that keeps them): ``ceil(margin * needed) + 2`` when a build
          found an atom with more than ``max_neighbors`` neighbors;
        - when no recorded need explains the overflow (it happened in a run started from this
          list, whose own builds were fine, and ``seen`` is not given), the atoms per bin and
          the rows grow by ``factor`` too, and from the second such blind growth in a row on,
          the stencil by one (a cell that became thinner than the stencil allows is the
          remaining cause, so that repeated growth always ends).

        Every other field is kept (the rebuild counter continues).

        Parameters
        ----------
        factor : float, default 2.0
            Least growth of the pair capacity.
        seen : NeighborList, optional
            The list at the end of the run that overflowed (``out.neighbors``): its recorded
            needs (up to the first overflow) size the new capacities exactly. Without it only
            this list's own needs are known.
        """
        if factor <= 1.0:
            raise ValueError(f"NeighborList.grown: factor must be > 1, got {factor}.")
        lists = [self] if seen is None else [self, seen]
        if any(isinstance(nl.needed, jax.core.Tracer) for nl in lists):
            raise TypeError("NeighborList.grown is host-side: call it on a concrete list.")
        width = len(NEEDED_FIELDS)
        needed = np.max([np.asarray(nl.needed).reshape(-1, width).max(axis=0) for nl in lists], 0)
        m = self.margin
        capacity = max(_ceil(factor * max(self.capacity, 1)), _ceil(m * needed[_PAIRS]))
        occ = self.bin_capacity
        rows = self.max_neighbors
        rows_short = rows > 0 and needed[_ROWS] > rows
        known = (
            needed[_PAIRS] > self.capacity
            or needed[_OCCUPANCY] > occ
            or needed[_STENCIL] > self.stencil
            or rows_short
        )
        if rows_short:
            rows = max(_ceil(m * needed[_ROWS]) + 2, rows + 1)
        blind = 0 if known else self.blind_growths + 1
        if needed[_OCCUPANCY] > occ:
            occ = max(_ceil(m * needed[_OCCUPANCY]) + 2, occ + 1)
        elif not known:
            occ = _ceil(factor * occ)
            rows = _ceil(factor * rows)
        stencil = max(self.stencil + (blind >= 2), int(needed[_STENCIL]))
        lead = self.senders.shape[:-1]
        n = int(self.reference_positions.shape[-2])
        return dataclasses.replace(
            self,
            senders=jnp.full(lead + (capacity,), n, jnp.int32),
            receivers=jnp.full(lead + (capacity,), n, jnp.int32),
            shifts=jnp.zeros(lead + (capacity, 3), jnp.int32),
            mask=jnp.zeros(lead + (capacity,), bool),
            row_receivers=jnp.full(lead + (n, rows), n, jnp.int32),
            row_shifts=jnp.zeros(lead + (n, rows, 3), jnp.int32),
            overflow=jnp.zeros_like(self.overflow),
            stale=jnp.ones_like(self.stale),
            stencil=stencil,
            bin_capacity=occ,
            blind_growths=blind,
        )

    # ------------------------------------------------------------------ refresh
    def needs_rebuild(self, batch) -> jax.Array:
        """Per-system criterion of the module docstring, shape (S,) bool (traced, no gradient).

        True for a system whose atoms moved too far since the last build (relative to its cell,
        which may have changed too). Staleness and a changed layout are not included (see
        :meth:`must_rebuild`).
        """
        pos = jax.lax.stop_gradient(batch.positions)
        cell = jax.lax.stop_gradient(batch.cell)
        s = batch.max_systems
        sys = jnp.minimum(batch.system_idx, s - 1)
        # A = C^-1 C_ref maps positions into the frame of the reference cell
        a = jnp.linalg.solve(cell, self.reference_cell.astype(cell.dtype))
        moved = matvec3(pos, a[sys]) - self.reference_positions.astype(pos.dtype)
        d2 = jnp.where(batch.atom_mask, jnp.sum(moved * moved, axis=-1), 0.0)
        max_d = jnp.sqrt(jnp.maximum(segment.segment_max(d2, batch.system_idx, s), 0.0))
        strain = jnp.sqrt(jnp.sum((a - jnp.eye(3, dtype=a.dtype)) ** 2, axis=(-2, -1)))
        # a system with non-finite positions or cell has failed: it has no pairs and never asks
        # for a rebuild (it would ask on every step)
        moved_far = ~(2.0 * max_d + self.cutoff * strain <= self.skin)
        return batch.system_mask & batch.finite_systems() & moved_far

    def must_rebuild(self, batch) -> jax.Array:
        """Whether :meth:`update` would rebuild: stale, re-packed, or moved (scalar bool)."""
        layout = jnp.any(batch.system_idx != self.reference_system_idx) | jnp.any(
            batch.pbc != self.reference_pbc
        )
        return self.stale | layout | jnp.any(self.needs_rebuild(batch))

    def update(self, batch) -> NeighborList:
        """Rebuild if :meth:`must_rebuild`, else return the list as it is (``lax.cond``).

        Under ``jax.vmap`` with a batched criterion ``lax.cond`` becomes a select and the build
        runs on every call (results are the same; only the cost differs). A list marked
        ``refreshed`` is returned unchanged.
        """
        if self.refreshed:
            return self
        return jax.lax.cond(self.must_rebuild(batch), _build, lambda nl, b: nl, self, batch)

    def build(self, batch) -> NeighborList:
        """Rebuild now on ``batch`` (traced; same capacities)."""
        return _build(self, batch)

    # ------------------------------------------------------------------ consumers
    def displacements(self, positions, cell, system_idx) -> jax.Array:
        """``r_j - r_i + S @ cell`` of every pair, shape (P, 3) (zero for unused slots).

        Differentiable in ``positions`` and ``cell`` (give the strained cell for the stress).
        """
        n = positions.shape[0]
        s = cell.shape[0]
        i = jnp.minimum(self.senders, n - 1)
        j = jnp.minimum(self.receivers, n - 1)
        sys = jnp.minimum(system_idx[i], s - 1)
        image = matvec3(self.shifts.astype(positions.dtype), cell[sys])
        d = positions[j] - positions[i] + image
        return jnp.where(self.mask[:, None], d, 0.0)

    def pair_system(self, system_idx, num_systems: int) -> jax.Array:
        """System slot of each pair, shape (P,) (``num_systems`` for unused slots)."""
        sys = jnp.take(system_idx, self.senders, mode="fill", fill_value=num_systems)
        return jnp.where(self.mask, sys, num_systems)


# ============================================================================ hook
def refresh_neighbors(batch):
    """``batch`` with its neighbor list refreshed (:meth:`NeighborList.update`), traced."""
    if not isinstance(batch.neighbors, NeighborList):
        raise TypeError(
            "refresh_neighbors: batch.neighbors is not a NeighborList; create one with "
            "batch.replace(neighbors=NeighborList.allocate(batch, cutoff, skin)) or "
            "model.attach_neighbors(batch)."
        )
    return batch.replace(neighbors=batch.neighbors.update(batch))


class NeighborListHook(Hook):
    """Refresh ``batch.neighbors`` just before the model evaluation (``BEFORE_COMPUTE``).

    Register it at the fused level: ``fused.register_fused_hook(NeighborListHook())`` or
    ``FusedStage(..., hooks=[NeighborListHook()])``. Each step it checks the rebuild criterion
    (``O(N)``) and rebuilds under ``lax.cond`` when needed.
    """

    stage: DynamicsStage = eqx.field(
        static=True, default=DynamicsStage.BEFORE_COMPUTE, kw_only=True
    )

    def apply(self, batch, ctx):
        return refresh_neighbors(batch)
