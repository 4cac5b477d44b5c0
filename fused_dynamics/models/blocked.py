"""The blocked dense pair kernel: each system's atoms gathered once into an (S, A, 3) block.

The pairs of a system are formed by broadcasting its block against itself, so no pair-sized
gather is needed (nor its scatter-add in the backward pass), and each system's energy is the sum
over its own block (no segment sum over pairs). The 3x3 products (lattice translations, Cartesian
to fractional) are written out elementwise (:func:`matvec3`): as batched ``dot_general`` on
pair-sized arrays XLA:CPU sends them to a library as thousands of tiny matrix products.

Geometry of a pair ``(i, j)`` of one system (rows of ``cell`` are lattice vectors, ASE)::

    d_ij = r_j - r_i - round(f_j - f_i) @ cell     (the rounding along periodic directions only)
    d_ij(n) = d_ij + n @ cell                       (image shift n, integers, n != 0)

with ``f = r @ inv(cell)`` the fractional coordinates. The rounding is piecewise constant (no
derivative); forces and stress come from the autodiff of ``d`` in the positions and the cell.

A block is cut into tiles of about 32 atoms and each unordered pair of tiles is formed once
(:func:`tile_pairs`): about half the pairs of the full square
(:func:`fused_dynamics.models.pair_sums.dense_energy`). Each slot's sums run over its own block
in the same order whatever its neighbours, so a system's result does not depend on the other
slots (bitwise; ``tests/test_blocked.py``).

Background: docs/models.md (dense path, image range), docs/semantics.md (slot independence).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..batch import Batch
from ..linalg3 import inv3, matvec3

__all__ = [
    "SystemBlocks",
    "system_blocks",
    "matvec3",
    "min_image",
    "fractional",
    "min_image_vectors",
    "TilePairs",
    "tile_pairs",
    "as_tiles",
    "pair_tiles",
    "image_shifts",
    "AtomRows",
    "atom_rows",
    "dense_layout",
    "SizeBucket",
    "fit_size_buckets",
    "bucket_slots",
]


class SystemBlocks(NamedTuple):
    """The atoms of every system slot as a block.

    Attributes
    ----------
    index : Array, shape (S, A) int32
        Atom index of the k-th atom of each slot (clipped into range where invalid).
    valid : Array, shape (S, A) bool
        Whether that atom exists (occupied slot and ``k < n_atoms``).
    positions : Array, shape (S, A, 3)
        Their positions in Å; 0 where not valid, so that another system's (possibly NaN)
        atoms never enter this system's arithmetic, not even as ``0 * NaN`` in a gradient.
    """

    index: jax.Array
    valid: jax.Array
    positions: jax.Array


def system_blocks(batch: Batch) -> SystemBlocks:
    """Gather each system's atoms into an (S, A, 3) block (one gather of S * A rows)."""
    index, valid = batch.system_view_index()
    valid = valid & batch.system_mask[:, None]
    positions = jnp.where(valid[..., None], batch.positions[index], 0.0)
    return SystemBlocks(index, valid, positions)


def min_image(
    pi: jax.Array, pj: jax.Array, fi: jax.Array, fj: jax.Array, cell: jax.Array, pbc: jax.Array
) -> jax.Array:
    """Minimum-image displacements ``r_j - r_i``, wrapped along periodic directions.

    All arguments broadcast against each other (the caller lays out the pair axes).

    Parameters
    ----------
    pi, pj : Array, (..., 3)
        Positions of the two atoms of each pair, Å.
    fi, fj : Array, (..., 3)
        Their fractional coordinates ``r @ inv(cell)`` (only rounded: no derivative flows).
    cell : Array, (..., 3, 3)
        Rows are lattice vectors, Å.
    pbc : Array, (..., 3) bool

    Returns
    -------
    Array, (..., 3)
        ``r_j - r_i - round(f_j - f_i) @ cell`` with the rounding along periodic directions
        only: each fractional component wrapped into [-1/2, 1/2], in Cartesian Å.
    """
    lattice = jnp.where(pbc, jnp.round(jax.lax.stop_gradient(fj - fi)), 0.0)
    return (pj - pi) - matvec3(lattice, cell)


def fractional(positions: jax.Array, cell: jax.Array) -> jax.Array:
    """Fractional coordinates of blocks (S, A, 3) in cells (S, 3, 3), without a derivative."""
    return jax.lax.stop_gradient(matvec3(positions, inv3(cell)[:, None]))


def min_image_vectors(positions: jax.Array, cell: jax.Array, pbc: jax.Array) -> jax.Array:
    """Minimum-image displacements ``d[s, i, j] = r_j - r_i`` of every pair of each block.

    Parameters
    ----------
    positions : Array, shape (S, A, 3)
        Blocks of :func:`system_blocks`, Å.
    cell : Array, shape (S, 3, 3)
        Rows are lattice vectors, Å.
    pbc : Array, shape (S, 3) bool

    Returns
    -------
    Array, shape (S, A, A, 3)
        See :func:`min_image`.
    """
    frac = fractional(positions, cell)
    return min_image(
        positions[:, :, None],
        positions[:, None, :],
        frac[:, :, None],
        frac[:, None, :],
        cell[:, None, None],
        pbc[:, None, None],
    )


class TilePairs(NamedTuple):
    """The unordered pairs of the first ``used`` tiles of a block (host-side, static).

    A block of A atoms is cut into ``count`` tiles of ``size`` atoms (padded to
    ``count * size``); every unordered pair of tiles ``first <= second`` among the first
    ``used`` is formed once. A pair of atoms in two different tiles appears once (``weight``
    1), a pair inside one tile twice, as ``(i, j)`` and ``(j, i)`` (``weight`` 1/2): the sum over
    tile pairs of ``weight * φ`` is the energy ``1/2 Σ_i Σ_j φ(r_ij)`` of the atoms in those
    tiles, for about ``(used + 1) / (2 used)`` of the work of the full square.
    """

    first: np.ndarray  # (M,) int: tile of the i atoms
    second: np.ndarray  # (M,) int: tile of the j atoms
    weight: np.ndarray  # (M,) float: 1/2 on the diagonal, 1 off it
    size: int
    count: int
    used: int


def tile_pairs(n_atoms: int, tile: int = 32, used: int | None = None) -> TilePairs:
    """:class:`TilePairs` of a block of ``n_atoms`` with tiles of about ``tile`` atoms.

    ``used``: the number of leading tiles paired (default all ``count``); a system of ``n``
    atoms needs ``ceil(n / size)``.
    """
    count = max(1, round(n_atoms / tile))
    size = -(-n_atoms // count)
    used = count if used is None else int(used)
    first, second = np.triu_indices(used)
    weight = np.where(first == second, 0.5, 1.0)
    return TilePairs(first, second, weight, size, count, used)


def as_tiles(x: jax.Array, tiles: TilePairs) -> jax.Array:
    """Per-atom block data (C, A, ...) cut into tiles, flattened: (C * count, size, ...).

    Tile ``k`` of block ``b`` is row ``b * count + k``; padding atoms (beyond A) hold zeros
    (``False`` for masks).
    """
    pad = tiles.count * tiles.size - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0] * tiles.count, tiles.size, *x.shape[2:])


def pair_tiles(blocks: np.ndarray, tiles: TilePairs) -> tuple[np.ndarray, np.ndarray]:
    """Rows of :func:`as_tiles` on the two sides of every tile pair of each of ``blocks``.

    Returns two (len(blocks) * M,) int arrays, block by block, each block's pairs in the order
    of ``tiles`` (host-side, static): one gather of whole tiles per side, with a flat index
    (on XLA:CPU about 5 % faster per dense step of 4 x 256 atoms than indexing a block axis and
    a tile axis).
    """
    base = np.asarray(blocks)[:, None] * tiles.count
    return (base + tiles.first).ravel(), (base + tiles.second).ravel()


def image_shifts(n_img: tuple[int, int, int], dtype) -> np.ndarray:
    """The non-zero image shifts ``-n..n`` along each lattice vector, shape (K - 1, 3)."""
    shifts = [s for s in itertools.product(*(range(-n, n + 1) for n in n_img)) if any(s)]
    return np.asarray(shifts, dtype=dtype).reshape(-1, 3)


class AtomRows(NamedTuple):
    """Every atom slot as a row against the block of its own system: the sparse layout.

    Attributes
    ----------
    valid : Array, shape (N,) bool
        A real atom of an occupied slot.
    positions : Array, shape (N, 3)
        Its position, Å (0 where not valid).
    fractional : Array, shape (N, 3)
        ``positions @ inv(cell)`` of its system (no derivative).
    partners : SystemBlocks
        The block of its system: ``index`` and ``valid`` (N, A), ``positions`` (N, A, 3).
    partner_fractional : Array, shape (N, A, 3)
    cell : Array, shape (N, 3, 3)
        Its system's cell (per atom, not per pair).
    pbc : Array, shape (N, 3) bool
    system : Array, shape (N,) int32
        Its slot, clipped into range.
    """

    valid: jax.Array
    positions: jax.Array
    fractional: jax.Array
    partners: SystemBlocks
    partner_fractional: jax.Array
    cell: jax.Array
    pbc: jax.Array
    system: jax.Array

    def displacements(self) -> jax.Array:
        """Minimum-image ``r_partner - r_atom`` of every row, shape (N, A, 3)."""
        return min_image(
            self.positions[:, None],
            self.partners.positions,
            self.fractional[:, None],
            self.partner_fractional,
            self.cell[:, None],
            self.pbc[:, None],
        )


def atom_rows(batch: Batch, blocks: SystemBlocks) -> AtomRows:
    """:class:`AtomRows` of ``batch`` from its :func:`system_blocks` (gathers of N block rows)."""
    sys = jnp.minimum(batch.system_idx, batch.max_systems - 1)
    valid = batch.atom_mask & batch.system_mask[sys]
    cell, pbc = batch.cell[sys], batch.pbc[sys]
    positions = jnp.where(valid[:, None], batch.positions, 0.0)
    frac = jax.lax.stop_gradient(matvec3(positions, inv3(cell)))
    partners = SystemBlocks(blocks.index[sys], blocks.valid[sys], blocks.positions[sys])
    partner_frac = fractional(blocks.positions, batch.cell)[sys]
    return AtomRows(valid, positions, frac, partners, partner_frac, cell, pbc, sys)


# Relative cost of one pair in each layout, in units of a minimum-image pair of the blocks,
# measured on value and gradient of LJ (2 cores, load 3-9, interleaved, so rough): a row pair
# costs ~2.5 (its partner block is gathered per atom); an image pair ~1 in the blocks and ~0.3
# in the rows, which form images component by component (pair_sums._shifted_sum). 30 Nov 2026:
# 12 slots of 64 atoms holding 256 (26 shifts): rows 9 ms, blocks 81 ms; 16 x 32 atoms (26
# shifts): 9 and 43 ms; 16 x 108 (26 shifts): 116 and 127 ms; 8 x 256 (no shift): 132 and 30 ms.
_ROW_PAIR_COST = 2.5
_ROW_SHIFT_COST = 0.3


def dense_layout(
    max_systems: int,
    max_atoms: int,
    max_atoms_per_system: int,
    n_shifts: int,
    size_buckets: tuple[tuple[int, int], ...] | None = None,
) -> str:
    """The layout of the dense pairs for these capacities: ``"blocks"`` or ``"rows"``.

    ``"blocks"`` forms the tile pairs of every slot's block (:func:`tile_pairs`, about
    ``S * A * A / 2`` pairs), ``"rows"`` every atom slot against its system's block
    (:class:`AtomRows`, ``N * A`` pairs), each times ``1 + n_shifts`` with the image shifts,
    weighted by their measured costs. A batch whose slots are mostly padding (N well below
    S * A, as in an inflight run sized for its largest system) or whose cells need image shifts
    takes the rows; full slots without image shifts take the blocks. Static: chosen from the shapes
    before compiling, so the same capacities always give the same layout (and the same bits).
    With ``size_buckets`` (:func:`fit_size_buckets`) the blocks are counted per bucket.
    """
    tiles = tile_pairs(max_atoms_per_system)
    if size_buckets:
        tile_pairs_used = sum(
            slots * _half_square(_tiles_for(atoms, tiles)) for atoms, slots in size_buckets
        )
    else:
        tile_pairs_used = max_systems * len(tiles.first)
    blocks = tile_pairs_used * tiles.size**2 * (1 + n_shifts)
    rows = max_atoms * max_atoms_per_system * (_ROW_PAIR_COST + _ROW_SHIFT_COST * n_shifts)
    return "rows" if rows < blocks else "blocks"


# ---------------------------------------------------------------------- size buckets
SizeBucket = tuple[int, int]  # (atoms, slots): up to ``slots`` systems of at most ``atoms`` atoms


def _tiles_for(n_atoms, tiles: TilePairs):
    """Leading tiles a system of ``n_atoms`` fills (at least one)."""
    return np.maximum(1, -(-np.asarray(n_atoms) // tiles.size))


def _half_square(m):
    return m * (m + 1) // 2


def fit_size_buckets(
    sizes, max_atoms_per_system: int, max_buckets: int = 3, min_saving: float = 0.25
) -> tuple[SizeBucket, ...] | None:
    """Size buckets for a fixed set of systems, or ``None`` where one bucket costs about as much.

    The blocked kernel (:func:`tile_pairs`) forms every tile pair of every slot's block, so in a
    batch of mixed sizes a small system pays for the largest one. Size buckets split the slots
    into up to ``max_buckets`` groups, each evaluated on the leading tiles its systems fill:
    bucket ``(atoms, slots)`` holds up to ``slots`` systems of at most ``atoms`` atoms, and a
    system belongs to the first bucket (ascending ``atoms``) it fits, by its own size alone, so
    its arithmetic does not depend on the other systems. The grouping minimises the tile pairs
    formed (an exhaustive search over the contiguous groupings of the tile counts); buckets are
    used only when they save at least ``min_saving`` of the single bucket's pairs (each bucket
    adds index arithmetic to the compiled step; the pairs of every bucket are one kernel).

    Parameters
    ----------
    sizes : sequence of int
        Atoms of each system (occupied slots only).
    max_atoms_per_system : int
        The batch's capacity A (which sets the tiling).
    max_buckets : int, default 3
    min_saving : float, default 0.25

    Returns
    -------
    tuple of (atoms, slots) or None
        Ascending in ``atoms``; the slots of each bucket are the systems it holds.

    Raises
    ------
    ValueError
        A size outside ``1..max_atoms_per_system``, or ``max_buckets < 1``.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    a = int(max_atoms_per_system)
    if max_buckets < 1:
        raise ValueError(f"fit_size_buckets: max_buckets={max_buckets}; give at least 1.")
    if len(sizes) == 0 or sizes.min() < 1 or sizes.max() > a:
        raise ValueError(
            f"fit_size_buckets: sizes must lie in 1..max_atoms_per_system={a}; got "
            f"{sizes.min() if len(sizes) else 'none'}..{sizes.max() if len(sizes) else ''}."
        )
    tiles = tile_pairs(a)
    used = _tiles_for(sizes, tiles)
    values, counts = np.unique(used, return_counts=True)
    single = len(sizes) * _half_square(tiles.count)
    best, best_cost = None, single
    for k in range(1, min(max_buckets, len(values)) + 1):
        for cuts in itertools.combinations(range(1, len(values)), k - 1):
            edges = (0, *cuts, len(values))
            groups = [(values[e - 1], counts[s:e].sum()) for s, e in itertools.pairwise(edges)]
            cost = sum(int(n) * _half_square(int(m)) for m, n in groups)
            if cost < best_cost:
                best, best_cost = groups, cost
    if best is None or best_cost > (1.0 - min_saving) * single:
        return None
    return tuple((min(int(m) * tiles.size, a), int(n)) for m, n in best)


def bucket_slots(
    batch: Batch, size_buckets: tuple[SizeBucket, ...]
) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    """The slots of each size bucket, and which occupied systems found a place (traced).

    Returns
    -------
    slots : list of (index, ok), one per bucket
        ``index`` (slots,) int32: the bucket's systems in slot order (clipped into range where
        ``ok`` (slots,) bool is False: a free place of the bucket).
    placed : Array, shape (S,) bool
        Occupied systems that have a place: a system larger than the last bucket, or beyond its
        bucket's slots, has none (the model fails it, ``Failure.SIZE_BUCKET_FULL``).

    Notes
    -----
    One running count over the slots and one scatter for all the buckets (a rank within its
    bucket per system), not a ``jnp.nonzero`` per bucket: the places are the same, in a
    handful of kernels whatever the number of buckets, which the compile time of every program
    evaluating the model pays for.
    """
    s = batch.max_systems
    n_atoms = batch.n_atoms
    bounds = jnp.asarray([atoms for atoms, _ in size_buckets], n_atoms.dtype)
    which = jnp.searchsorted(bounds, n_atoms, side="left")  # first bucket with atoms >= n
    member = batch.system_mask[:, None] & (which[:, None] == jnp.arange(len(size_buckets)))
    rank = jnp.sum(jnp.where(member, jnp.cumsum(member, axis=0, dtype=jnp.int32) - 1, 0), axis=1)
    capacity = np.asarray([n for _, n in size_buckets], np.int32)
    offset = np.concatenate([[0], np.cumsum(capacity)]).astype(np.int32)
    bucket = jnp.minimum(which, len(size_buckets) - 1)
    placed = jnp.any(member, axis=1) & (rank < jnp.asarray(capacity)[bucket])
    total = int(offset[-1])
    place = jnp.where(placed, jnp.asarray(offset[:-1])[bucket] + rank, total)
    flat = jnp.full(total, s, jnp.int32).at[place].set(jnp.arange(s, dtype=jnp.int32), mode="drop")
    out = []
    for k in range(len(size_buckets)):
        index = flat[offset[k] : offset[k + 1]]
        out.append((jnp.minimum(index, s - 1), index < s))
    return out, placed
