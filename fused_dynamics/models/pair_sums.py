"""The two sums of a pair potential: the dense all-pairs-within-system block and a neighbor list.

The dense path pairs every atom with every atom of its own system (the ``max_atoms_per_system``
block of the batch) and with their periodic images, in one of two layouts chosen statically from
the capacities (:func:`.blocked.dense_layout`): per-system blocks, ``O(S * A * A / 2)`` pairs for
S system slots of A atoms (the tile pairs of :mod:`.blocked`), or one row per atom slot against
its system's block, ``O(N * A)`` for N atom slots (batches mostly of padding, and cells that
need image shifts); either times K image shifts. It is exact for any cell (triclinic, mixed
periodicity, cells smaller than twice the cutoff) and is the reference for the neighbor-list
path.

The neighbor-list path (``model.with_neighbors(skin=...)``) sums the same ``pair_energy`` over
the pairs of ``batch.neighbors`` (a :class:`~fused_dynamics.models.neighbors.NeighborList`):
``O(N)`` work per step. Displacements are ``r_j - r_i + shift @ cell`` with the batch's (strained)
cell, so forces and stress come from the same autodiff pass as on the dense path.

A cell too small for the dense path's static image range (:func:`required_images`) gives that
system NaN energy, forces and stress (``Failure.CELL_TOO_SMALL`` in a run); an overflowed neighbor
list gives NaN too. The functions taking ``model`` are the bodies of the
:class:`~fused_dynamics.models.pair.PairPotential` methods ``_dense_energy`` and
``_neighbor_energy``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import segment
from ..batch import Batch
from ..linalg3 import plane_spacing
from .blocked import (
    as_tiles,
    atom_rows,
    bucket_slots,
    dense_layout,
    fractional,
    image_shifts,
    matvec3,
    min_image,
    pair_tiles,
    system_blocks,
    tile_pairs,
)
from .cell_list import periodic_spacing_host, thin_systems
from .neighbors import NeighborList

__all__ = [
    "dense_sum_width",
    "required_images",
    "required_images_host",
    "cell_too_small",
    "poison_systems",
    "dense_energy",
    "neighbor_energy",
]


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
    return _images(plane_spacing(cell), pbc, cutoff)


def _images(spacing: jax.Array, pbc: jax.Array, cutoff: float) -> jax.Array:
    """:func:`required_images` from the cells' plane spacing (S, 3)."""
    n = jnp.floor(cutoff / spacing + 0.5).astype(jnp.int32)
    return jnp.where(pbc, n, 0)


def required_images_host(cells, pbc, cutoff: float) -> tuple[int, int, int]:
    """Host-side (NumPy) :func:`required_images` of cells (n, 3, 3), maximum over the cells.

    Cells whose lattice planes along a periodic axis are closer than
    :data:`~fused_dynamics.models.cell_list.MIN_PERIODIC_SPACING` (0.5 Å: every atom within
    that distance of its own image, closer than any bond) are left out, as are singular and
    non-finite ones: a run reports those systems ``CELL_TOO_SMALL`` (:func:`cell_too_small`)
    rather than compile a range of thousands of shifts for every system of the batch
    (:func:`~fused_dynamics.models.cell_list.periodic_spacing_host`).
    """
    spacing, sized = periodic_spacing_host(cells, pbc)
    pbc = np.asarray(pbc, bool).reshape(-1, 3)
    if not sized.any():
        return (0, 0, 0)
    need = np.where(pbc, np.floor(cutoff / spacing + 0.5), 0)
    return tuple(int(n) for n in need[sized].astype(int).max(axis=0))


def cell_too_small(batch: Batch, cutoff: float, n_img: tuple[int, int, int]) -> jax.Array:
    """Systems whose cell needs more periodic images than ``n_img``, or is thin or singular
    (:func:`~fused_dynamics.models.cell_list.thin_systems`), shape (S,) bool."""
    spacing = plane_spacing(batch.cell)
    need = _images(spacing, batch.pbc, cutoff)
    finite = jnp.all(jnp.isfinite(batch.cell), axis=(-2, -1))  # non-finite: its own failure
    more = batch.system_mask & finite & jnp.any(need > jnp.asarray(n_img), axis=-1)
    return more | thin_systems(batch, spacing)


def poison_systems(batch: Batch, energy: jax.Array, bad: jax.Array) -> jax.Array:
    """``energy`` (S,) with NaN energy, forces and stress for the systems ``bad`` (S,) bool.

    Not a select: the derivatives must be NaN too, never the zeros that
    ``d/dx where(bad, nan, e)`` gives; the second term (a sum of the system's own coordinates,
    times 0 where not bad) reaches atoms that have no pair. Other systems are untouched.
    """
    coords = jnp.where(batch.atom_mask, jnp.sum(batch.positions, axis=-1), 0.0)
    poison = jnp.where(bad, jnp.nan, 0.0)
    return energy * jnp.where(bad, jnp.nan, 1.0) + poison * batch.sum_atoms(coords)


def _pair_sum(model, d, ok, si, sj, axes) -> jax.Array:
    """Σ φ(|d|) over the pairs ``ok`` within the cutoff, summed over ``axes``.

    ``d``: the displacements (..., 3), or their three Cartesian components, each (...,).
    """
    x, y, z = d if isinstance(d, tuple) else (d[..., 0], d[..., 1], d[..., 2])
    r2 = x * x + y * y + z * z
    ok = ok & (r2 < model.cutoff**2)
    # Masked pairs are evaluated at r = cutoff / 2, where every φ here is finite with finite
    # derivatives (r = 1 is not: (1 - r/σ)^α is NaN for σ < 1 and non-integer α, and a NaN
    # in the unused branch of `where` poisons gradients with respect to the parameters).
    r = jnp.sqrt(jnp.where(ok, r2, 0.25 * model.cutoff**2))
    phi = model.pair_energy(r) if si is None else model.pair_energy(r, si, sj)
    return jnp.sum(jnp.where(ok, phi, 0.0), axis=axes)


def _shifted_sum(model, d, ok, si, sj, cell, pbc, shifts, axes, components=False) -> jax.Array:
    """Σ φ over the pair displacements ``d`` (..., 3) and, if ``shifts`` (K', 3) is given, over
    their images ``d + shift @ cell`` instead. ``cell`` (..., 3, 3) and ``pbc`` (..., 3) broadcast
    against ``d``'s leading axes; the sum runs over ``axes`` (and the shift axis).

    ``components``: the images formed component by component, with no pair-sized array with a
    trailing axis of 3 (several times faster on XLA:CPU). Only the atom rows use it: in the
    tiled blocks of a float32 fused FIRE + NVT run, XLA:CPU (jax 0.10.1) crashes compiling it.
    """
    if shifts is None:
        return _pair_sum(model, d, ok, si, sj, axes)
    image = matvec3(shifts, cell[..., None, :, :])  # (..., K', 3)
    shift_ok = jnp.all((shifts == 0) | pbc[..., None, :], axis=-1)  # (..., K')
    if components:
        d = tuple(d[..., k, None] + image[..., k] for k in range(3))
    else:
        d = d[..., None, :] + image
    ok = ok[..., None] & shift_ok
    if si is not None:
        si, sj = si[..., None], sj[..., None]
    return _pair_sum(model, d, ok, si, sj, (*axes, -1))


class _TileRows(NamedTuple):
    """The tile pairs of blocks flattened to P rows, one per (slot, tile pair).

    ``pi``/``pj`` (P, t, 3) positions, ``fi``/``fj`` their fractional coordinates (no
    derivative), ``vi``/``vj`` (P, t) validity, ``si``/``sj`` (P, t) species or None, ``cell``
    (P, 3, 3), ``pbc`` (P, 3), and host-side ``diagonal`` (P,) bool (a tile paired with itself)
    and ``weight`` (P,) (:class:`.blocked.TilePairs`).
    """

    pi: jax.Array
    pj: jax.Array
    fi: jax.Array
    fj: jax.Array
    vi: jax.Array
    vj: jax.Array
    si: jax.Array | None
    sj: jax.Array | None
    cell: jax.Array
    pbc: jax.Array
    diagonal: np.ndarray
    weight: np.ndarray


def _tile_rows(positions, valid, species, cell, pbc, plans) -> _TileRows:
    """:class:`_TileRows` of blocks (C, A, 3), their validity (C, A), species (C, A) or None,
    cells (C, 3, 3) and periodicity (C, 3).

    ``plans``: ``(count, TilePairs)`` per run of consecutive blocks, whose sum of counts is C
    (host-side, static): each block of a run is paired on the tile pairs of its plan, all
    with the tile size of :func:`.blocked.tile_pairs` of A. The rows come plan after plan,
    block after block, each block's in the order of its tile pairs. Every plan's rows are taken
    from the same tiles (:func:`.blocked.as_tiles`) by one gather per side (the size buckets,
    :func:`_bucketed_energy`, are rows of one kernel).
    """
    full = tile_pairs(positions.shape[1])
    offsets = np.cumsum([0] + [c for c, _ in plans])[:-1]
    sides = [pair_tiles(o + np.arange(c), tp) for o, (c, tp) in zip(offsets, plans, strict=True)]
    i_tile = np.concatenate([i for i, _ in sides])
    j_tile = np.concatenate([j for _, j in sides])
    block = i_tile // full.count  # the block of each row

    def two(x):  # (C, A, ...) -> the two sides of the rows, (P, size, ...)
        x = as_tiles(x, full)
        return x[i_tile], x[j_tile]

    pi, pj = two(positions)
    fi, fj = two(fractional(positions, cell))
    vi, vj = two(valid)
    si, sj = (None, None) if species is None else two(species)
    weight = np.concatenate([np.tile(tp.weight, c) for c, tp in plans])
    return _TileRows(
        pi, pj, fi, fj, vi, vj, si, sj, cell[block], pbc[block], i_tile == j_tile, weight
    )


def _tile_row_energy(model, rows: _TileRows, shifts=None) -> jax.Array:
    """``weight * Σ φ`` over the atom pairs of every row of :class:`_TileRows`, shape (P,):
    summed over a slot's rows, ``1/2 Σ_i Σ_j φ`` of the slot.

    ``shifts`` None: the minimum image (``i != j``); else the non-zero image shifts (K', 3) of
    every pair (``i == j`` included).
    """
    c, p = rows.cell[:, None, None], rows.pbc[:, None, None]
    d = min_image(
        rows.pi[:, :, None], rows.pj[:, None], rows.fi[:, :, None], rows.fj[:, None], c, p
    )
    ok = rows.vi[:, :, None] & rows.vj[:, None, :]  # (P, t, t)
    si = sj = None
    if rows.si is not None:
        si, sj = rows.si[:, :, None], rows.sj[:, None, :]
    if shifts is None:
        # the identity as a host constant: with jnp.eye's iota comparison inside this fusion
        # LLVM took 0.3 s to compile the one kernel (W1's relaxation, 104 rows of 36 x 36)
        eye = np.eye(ok.shape[-1], dtype=bool)
        ok = ok & ~(jnp.asarray(rows.diagonal)[:, None, None] & jnp.asarray(eye))
    per_tile = _shifted_sum(model, d, ok, si, sj, c, p, shifts, (1, 2))
    return per_tile * jnp.asarray(rows.weight, per_tile.dtype)


def _tiled_energy(model, positions, valid, species, cell, pbc, plans, shifts) -> jax.Array:
    """``1/2 Σ_i Σ_j φ`` of each block (C, A, 3) over the tile pairs of its plan (arguments of
    :func:`_tile_rows`), minimum image plus the non-zero image ``shifts`` (K - 1, 3) host
    array, each summed over the block's own rows in the order of its tile pairs. Returns (C,).
    """
    rows = _tile_rows(positions, valid, species, cell, pbc, plans)
    per_tile = [_tile_row_energy(model, rows)]
    if len(shifts):  # summed per block apart: + 0.0 for a block with no image pair, same bits
        per_tile.append(_tile_row_energy(model, rows, jnp.asarray(shifts)))
    energies, start = [], 0
    for c, tp in plans:
        m = len(tp.first)
        e = [jnp.sum(x[start : start + c * m].reshape(c, m), axis=-1) for x in per_tile]
        energies.append(e[0] if len(e) == 1 else e[0] + e[1])
        start += c * m
    return jnp.concatenate(energies)


def _row_energy(model, rows, species, shifts=None) -> jax.Array:
    """``1/2 Σ_j φ`` of every atom (N,) against the block of its own system (:class:`AtomRows`).

    ``shifts`` as in :func:`_tile_row_energy`.
    """
    ok = rows.valid[:, None] & rows.partners.valid  # (N, A)
    if shifts is None:
        atoms = jnp.arange(ok.shape[0], dtype=rows.partners.index.dtype)
        ok = ok & (rows.partners.index != atoms[:, None])
    si = sj = None
    if species is not None:
        si, sj = species[:, None], species[rows.partners.index]
    c, p = rows.cell[:, None], rows.pbc[:, None]
    d = rows.displacements()
    return 0.5 * _shifted_sum(model, d, ok, si, sj, c, p, shifts, (1,), components=True)


def dense_sum_width(model, batch: Batch) -> int:
    """Length of the innermost sums of the dense path for these capacities (host-side, static).

    Parameters
    ----------
    model : PairPotential
        Its image range and size buckets decide the layout (:func:`.blocked.dense_layout`).
    batch : Batch

    Returns
    -------
    int
        The atoms of a tile in the blocks layout; the atom slots of a system (the partners
        along a row) in the rows layout.
    """
    a = batch.max_atoms_per_system
    return tile_pairs(a).size if _dense_plan(model, batch)[2] == "blocks" else a


def _dense_plan(model, batch: Batch):
    """``(shifts (K - 1, 3) host array, size buckets or None, layout)`` of the dense path for
    these capacities (host-side, static): what :func:`dense_energy` evaluates, and what
    :func:`dense_sum_width` reports."""
    n_img = (1, 1, 1) if model.images is None else tuple(model.images)
    shifts = image_shifts(n_img, np.dtype(batch.dtype))
    buckets = getattr(model, "size_buckets", None)
    layout = dense_layout(
        batch.max_systems, batch.max_atoms, batch.max_atoms_per_system, len(shifts), buckets
    )
    return shifts, buckets, layout


def dense_energy(model, batch: Batch, species: jax.Array | None = None) -> jax.Array:
    """All pairs of each system's atom block and their periodic images (see the module doc).

    The minimum-image pairs plus the image shifts ``-images..images`` (zero for the slots whose
    cell needs none), in the layout :func:`dense_layout` picks for the capacities: the blocked
    kernel of :mod:`.blocked` (half-square tile pairs of every slot) or one row per atom slot.
    The version that evaluates one slot at a time (``lax.map``, a ``lax.switch`` on the tiles a
    slot fills and a ``lax.cond`` on its images) is about twice as fast but its transpose fails
    inside Equinox's checkpointed while loop of differentiable runs (jax 0.10); see the report
    of issue 13.
    """
    n_img = (1, 1, 1) if model.images is None else tuple(model.images)
    blocks = system_blocks(batch)
    shifts, buckets, layout = _dense_plan(model, batch)
    unplaced = jnp.zeros(batch.max_systems, bool)
    if buckets:  # a system without a place fails in either layout (the model's contract)
        slots, placed = bucket_slots(batch, buckets)
        unplaced = batch.system_mask & ~placed
    if layout == "blocks" and buckets:
        energy = _bucketed_energy(model, batch, blocks, species, buckets, slots, shifts)
    elif layout == "rows":
        rows = atom_rows(batch, blocks)
        atom_energy = _row_energy(model, rows, species)
        if len(shifts):
            atom_energy = atom_energy + _row_energy(model, rows, species, jnp.asarray(shifts))
        # each system's sum over its own block, in the same order whatever its neighbours
        energy = jnp.sum(jnp.where(blocks.valid, atom_energy[blocks.index], 0.0), axis=1)
    else:
        sp = None if species is None else species[blocks.index]  # (S, A); invalid: masked
        plans = [(batch.max_systems, tile_pairs(batch.max_atoms_per_system))]
        args = (blocks.positions, blocks.valid, sp, batch.cell, batch.pbc, plans, shifts)
        energy = _tiled_energy(model, *args)
    # A cell too small for the static image range would miss pairs: that system's energy,
    # forces and stress are NaN, and a run reports it FAILED with Failure.CELL_TOO_SMALL (or
    # SIZE_BUCKET_FULL: no place in its size bucket). Other systems are untouched: it is not a
    # run-wide error.
    bad = cell_too_small(batch, model.cutoff, n_img) | unplaced
    return poison_systems(batch, energy, bad)


def _bucketed_energy(model, batch, blocks, species, buckets, slots, shifts):
    """The blocked sum per size bucket (:func:`.blocked.fit_size_buckets`): each bucket's
    systems (``slots``, from :func:`.blocked.bucket_slots`) paired on the leading tiles their
    size fills.

    The buckets share one tile size, so the tile pairs of every bucket's slots are the rows of
    one kernel (:class:`_TileRows`): the slots of all the buckets are gathered once into blocks,
    then each slot's tile pairs taken by static indices. The program holds one copy of the pair
    arithmetic and of its derivative, not one per bucket (the W1 relaxation of
    ``benchmarks/bench_peers.py``, three buckets, reaches its first step in about a third less
    time, docs/models.md "Size buckets"). A slot's energy is the sum of its own rows in the
    order of its tiles; XLA:CPU may order the additions inside a row differently for another
    row count, so a system's last bits depend on the shapes of all the buckets (as they depend
    on the batch's capacities), and are the same alone as beside others under the same buckets
    (``tests/test_size_buckets.py``).

    Returns the energies (S,), 0 for a slot in no bucket.
    """
    full = tile_pairs(batch.max_atoms_per_system)
    plans = []  # per bucket: (its slots, its tile pairs)
    for (atoms, _), (index, _) in zip(buckets, slots, strict=True):
        used = min(-(-atoms // full.size), full.count)  # a bucket wider than A: all tiles
        plans.append((index.shape[0], tile_pairs(batch.max_atoms_per_system, used=used)))
    index = jnp.concatenate([index for index, _ in slots])
    ok = jnp.concatenate([ok for _, ok in slots])
    valid = blocks.valid[index] & ok[:, None]
    # a free place of a bucket reads some slot's atoms: zeros instead, as for padding atoms
    positions = jnp.where(valid[..., None], blocks.positions[index], 0.0)
    sp = None if species is None else species[blocks.index][index]
    args = (positions, valid, sp, batch.cell[index], batch.pbc[index], plans, shifts)
    energies = _tiled_energy(model, *args)
    target = jnp.where(ok, index, batch.max_systems)
    return jnp.zeros(batch.max_systems, batch.dtype).at[target].add(energies, mode="drop")


def neighbor_energy(model, batch: Batch, species: jax.Array | None = None) -> jax.Array:
    """The pairs of ``batch.neighbors`` (see the module doc)."""
    nl = batch.neighbors
    if not isinstance(nl, NeighborList):
        raise TypeError(
            f"{type(model).__name__} was configured for neighbor lists (skin={model.skin}) but "
            f"batch.neighbors is {type(nl).__name__}: give the batch one with "
            "model.attach_neighbors(batch) (or NeighborList.allocate), or use the dense "
            "path (a model without with_neighbors)."
        )
    if nl.cutoff < model.cutoff:
        raise ValueError(
            f"{type(model).__name__}: batch.neighbors has cutoff {nl.cutoff} < the model's "
            f"cutoff {model.cutoff}; allocate the list with the model's cutoff."
        )
    if model.auto_refresh:
        nl = nl.update(batch)
    # A list that overflowed (sticky: at any build since its allocation) misses pairs. Inside
    # a run the engine has stored it and the run loop regrows it and repeats the work; called
    # on its own the model cannot, so it is loud (NaN) instead of silently missing pairs.
    lost = nl.overflow
    s = batch.max_systems
    d = nl.displacements(batch.positions, batch.cell, batch.system_idx)
    r2 = jnp.sum(d * d, axis=-1)
    ok = nl.mask & (r2 < model.cutoff**2)
    # masked pairs at r = cutoff / 2, as on the dense path (finite φ and derivatives)
    r = jnp.sqrt(jnp.where(ok, r2, 0.25 * model.cutoff**2))
    if species is None:
        phi = model.pair_energy(r)
    else:  # the parameters of each pair's two species (unused slots: species 0, masked)
        n = batch.max_atoms
        i, j = jnp.minimum(nl.senders, n - 1), jnp.minimum(nl.receivers, n - 1)
        phi = model.pair_energy(r, species[i], species[j])
    phi = jnp.where(ok, phi, 0.0)
    weight = 1.0 if nl.half else 0.5
    energy = segment.segment_sum(weight * phi, nl.pair_system(batch.system_idx, s), s)
    return poison_systems(batch, energy, lost)


def row_sum(x: jax.Array) -> jax.Array:
    """Sum over axis 1 of ``x`` (N, M, ...) in an order fixed by column position.

    Columns are added left to right within blocks of 8, and the blocks left to right, so
    unused trailing columns (zeros) add exact zeros and a row's sum is the same bit for bit
    whatever the width ``M`` (a reduction's order in XLA depends on the shape).
    """
    n, m = x.shape[:2]
    block = 8
    pad = (-m) % block
    if pad:
        x = jnp.concatenate([x, jnp.zeros((n, pad) + x.shape[2:], x.dtype)], axis=1)
    x = x.reshape((n, (m + pad) // block, block) + x.shape[2:])
    partial = x[:, :, 0]
    for k in range(1, block):
        partial = partial + x[:, :, k]
    total = partial[:, 0]
    for k in range(1, partial.shape[1]):
        total = total + partial[:, k]
    return total


def neighbor_rows_output(model, batch: Batch, species: jax.Array | None, with_stress: bool):
    """Energy, forces and stress from the per-atom rows of ``batch.neighbors``, explicitly.

    Each row holds every neighbor ``j`` of atom ``i`` (both directions of each pair), so with
    ``d = r_j - r_i + S @ cell``, ``r = |d|`` and ``c = φ'(r) / r`` (``φ'`` by forward-mode
    differentiation of ``model.pair_energy``):

    - ``F_i = Σ_row c d`` (a row sum: no scatter-add of pair forces onto atoms);
    - ``E = ½ Σ_i Σ_row φ(r)`` per system;
    - stress ``(1/V) dE/dε = (1 / 2V) Σ_i Σ_row c d ⊗ d`` (ASE's sign: negative under
      compression).

    The same quantities as differentiating the half list's energy (:func:`neighbor_energy`),
    to rounding (the terms are added in another order); the half list is the path for
    ``jax.grad`` of the energy itself. Returns ``(energy (S,), forces (N, 3), stress (S, 3,
    3))``, NaN for every system when the list has overflowed (as :func:`neighbor_energy`).
    """
    nl = batch.neighbors
    if model.auto_refresh:
        nl = nl.update(batch)
    n, s = batch.max_atoms, batch.max_systems
    pos = batch.positions
    sys = jnp.minimum(batch.system_idx, s - 1)
    j = jnp.minimum(nl.row_receivers, n - 1)
    image = matvec3(nl.row_shifts.astype(pos.dtype), batch.cell[sys][:, None])
    d = pos[j] - pos[:, None, :] + image
    r2 = jnp.sum(d * d, axis=-1)
    ok = (nl.row_receivers < n) & (r2 < model.cutoff**2)
    # masked entries at r = cutoff / 2, as in _pair_sum (finite φ and derivatives)
    r = jnp.sqrt(jnp.where(ok, r2, 0.25 * model.cutoff**2))
    if species is None:
        pair = model.pair_energy
    else:
        si, sj = species[:, None], species[j]
        pair = lambda r: model.pair_energy(r, si, sj)  # noqa: E731
    phi, dphi = jax.jvp(pair, (r,), (jnp.ones_like(r),))
    phi = jnp.where(ok, phi, 0.0)
    c = jnp.where(ok, dphi / r, 0.0)
    forces = row_sum(c[..., None] * d)
    energy = segment.segment_sum(0.5 * row_sum(phi), batch.system_idx, s)
    lost = jnp.broadcast_to(nl.overflow, (s,))
    nan_atoms = batch.to_atoms_axis(lost)[:, None]
    if with_stress:
        w = c[..., None, None] * d[..., :, None] * d[..., None, :]
        virial = segment.segment_sum(0.5 * row_sum(w), batch.system_idx, s)
        volume = jnp.where(batch.system_mask, batch.volume, 1.0)
        stress = jnp.where(lost[:, None, None], jnp.nan, virial / volume[:, None, None])
    else:
        stress = jnp.full((s, 3, 3), jnp.nan, batch.dtype)
    return (
        jnp.where(lost, jnp.nan, energy),
        jnp.where(nan_atoms, jnp.nan, forces),
        stress,
    )
