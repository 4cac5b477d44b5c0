"""Cell-list construction of a :class:`~fused_dynamics.models.neighbors.NeighborList`.

Construction (``NeighborList.build``) is a cell list per system, all systems at once with static
shapes:

1. each system's cell is cut into ``n_d`` bins along each lattice vector, of thickness (the
   distance between bin planes) at least ``(cutoff + skin) / stencil``; along non-periodic
   directions the bins span the atoms' extent. A system of ``n`` atoms gets at most
   ``max(1, 2 n)`` bins (coarser bins are still correct: a sparse system or an evaporating
   cluster costs memory in proportion to its atoms, not its volume), so the bins of all systems
   fit a table of ``2 N + S`` rows with ``bin_capacity`` atom slots each, a contiguous range per
   system;
2. atoms are sorted by bin (their rank in the bin is their column in the table);
3. for each of the ``(2 stencil + 1)^3`` bin offsets (about half of them for a half list: the
   reverse of a pair met through offset ``o`` is met through ``-o``), every atom reads the
   ``bin_capacity`` atoms of the offset bin (wrapped with an image shift along periodic
   directions, so a cell smaller than the cutoff is seen through several images), keeps those
   within ``cutoff + skin`` and appends them to the list at the running count (a cumulative sum
   and one scatter of an int32 code per candidate; atoms and shifts are decoded at the end).

Work and memory are ``O(N (2 stencil + 1)^3 bin_capacity + N log N + P)`` (the log from sorting
atoms by bin): linear in the number of atoms for a fixed density. Every capacity is static;
whatever does not fit (pairs, atoms per bin, a cell too thin for the stencil) sets the sticky
``overflow`` flag instead of being dropped silently, and records what was needed so that
:meth:`NeighborList.grown` can size the next try. The run loops (``FusedStage.run``, inflight
chunks) see the flag after a run, call ``grown()``, warn, and run again from the same start.
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
from ..linalg3 import inv3, matvec3, plane_spacing

#: ``NeighborList.needed`` holds, in this order, the largest values seen by the builds since the
#: allocation up to the first overflow: pairs, atoms in one bin, bins used (never more than the
#: table holds), stencil half-width, and the most neighbors of one atom (both directions; what
#: the per-atom rows of a half list need).
NEEDED_FIELDS = ("pairs", "bin_occupancy", "bins", "stencil", "neighbors_per_atom")
_PAIRS, _OCCUPANCY, _BINS, _STENCIL, _ROWS = range(5)
# Bins of a system of n atoms are capped at max(1, BINS_PER_ATOM * n): coarser bins are always
# correct, and the table then has a static number of rows (BINS_PER_ATOM * N + S).
BINS_PER_ATOM = 2
_MAX_STENCIL = 64
#: Å. A periodic cell whose lattice planes are closer than this puts every atom within that
#: distance of its own image, closer than any bond: neither the dense image range nor the
#: neighbor list's stencil is sized for it, and its system fails ``CELL_TOO_SMALL``
#: (:func:`thin_systems`) instead of costing every system of the batch (a 1e-3 Å cell asked
#: thousands of image shifts, or a stencil of 64 bins, of all of them).
MIN_PERIODIC_SPACING = 0.5
#: Pair codes ``(offset, i, column)`` of a build are int32: the bin offsets of the stencil,
#: times the atoms, times the atoms per bin must stay below this.
PAIR_CODE_LIMIT = 2**31 - 1


# ============================================================================ construction
def _check_range(cutoff, skin):
    if not (float(cutoff) > 0.0) or not (float(skin) >= 0.0):
        raise ValueError(f"NeighborList: need cutoff > 0 and skin >= 0, got {cutoff}, {skin}.")


def _ceil(x) -> int:
    return int(math.ceil(float(x)))


def _max_occupancy(global_bin: np.ndarray) -> int:
    real = global_bin[global_bin >= 0]
    return int(np.bincount(real).max()) if real.size else 0


def periodic_spacing_host(cells, pbc) -> tuple[np.ndarray, np.ndarray]:
    """Host-side (NumPy) distances between lattice planes of ``cells`` (n, 3, 3), and which
    cells size a range (n,) bool: every periodic axis at least :data:`MIN_PERIODIC_SPACING`
    apart, the cell finite and not singular. The spacing of the others is 1 (a placeholder).

    NumPy, not ``jnp``: it sizes static ranges before compiling, possibly while an outer
    ``jax.jit`` is tracing (where every ``jnp`` operation is staged out).
    """
    cells = np.asarray(cells, np.float64).reshape(-1, 3, 3)
    pbc = np.asarray(pbc, bool).reshape(-1, 3)
    with np.errstate(all="ignore"):
        det = np.linalg.det(np.where(np.isfinite(cells), cells, 0.0))
        regular = np.all(np.isfinite(cells), axis=(-2, -1)) & np.isfinite(det) & (det != 0)
        inv = np.linalg.inv(np.where(regular[:, None, None], cells, np.eye(3)))
        spacing = 1.0 / np.linalg.norm(inv, axis=-2)
    wide = np.isfinite(spacing) & (spacing >= MIN_PERIODIC_SPACING)
    sized = regular & np.all(np.where(pbc, wide, True), axis=-1)
    return np.where(sized[:, None], spacing, 1.0), sized


def thin_systems(batch, spacing: jax.Array | None = None) -> jax.Array:
    """Systems with a finite cell thinner than :data:`MIN_PERIODIC_SPACING` along a periodic
    axis, or singular, shape (S,) bool (traced). The neighbor-list build leaves their atoms out
    and the run fails them ``CELL_TOO_SMALL`` (:func:`fused_dynamics.health.system_failures`);
    non-finite cells are a failure of their own. ``spacing``: the cells'
    :func:`~fused_dynamics.linalg3.plane_spacing`, where the caller has it."""
    spacing = plane_spacing(batch.cell) if spacing is None else spacing
    thin = jnp.any(batch.pbc & ~(spacing >= MIN_PERIODIC_SPACING), axis=-1)
    finite = jnp.all(jnp.isfinite(batch.cell), axis=(-2, -1))
    return batch.system_mask & finite & thin


def _geometry_inputs(batch, nl=None) -> dict:
    # atoms of a system with non-finite positions or cell, or a thin cell, are left out of the
    # build: they would crowd one bin (or ask a huge stencil) and overflow the list for everyone;
    # so are those the list excludes (``nl.excluded``: no int32 pair codes for them)
    built = batch.finite_systems() & ~thin_systems(batch)
    if nl is not None:
        built = built & ~nl.excluded(batch)
    return {
        "positions": batch.positions,
        "cell": batch.cell,
        "pbc": batch.pbc,
        "system_idx": batch.system_idx,
        "atom_mask": batch.atom_mask & batch.to_atoms_axis(built),
        "system_mask": batch.system_mask & built,
    }


def _bin_geometry(g: dict, rc: float, stencil: int) -> dict:
    """Bins of every system and the bin of every atom (traced; no capacity involved).

    Returns a dict with ``frac`` (N, 3) fractional positions, ``image`` (N, 3) int32 (the whole
    cells wrapped away along periodic directions), ``coord`` (N, 3) int32 bin coordinates,
    ``n_bins`` (S, 3) int32, ``offset`` (S,) int32 first global bin of each system,
    ``global_bin`` (N,) int32 (-1 for padding), ``bins_total`` and ``stencil_needed`` (scalars),
    ``system_stencil`` (S,) int32 (the stencil each system needs).
    """
    pos = jax.lax.stop_gradient(g["positions"])
    cell = jax.lax.stop_gradient(g["cell"])
    pbc, system_idx = g["pbc"], g["system_idx"]
    s = cell.shape[0]
    sys = jnp.minimum(system_idx, s - 1)
    real = g["atom_mask"] & (system_idx < s)
    inv = inv3(cell)
    spacing = 1.0 / jnp.linalg.norm(inv, axis=-2)  # (S, 3) distance between lattice planes
    frac = matvec3(pos, inv[sys])
    per = pbc[sys]
    image = jnp.where(per, jnp.floor(frac), 0.0)
    w = frac - image
    # extent of non-periodic directions from the atoms; periodic ones span [0, 1)
    lo = segment.segment_min(jnp.where(real[:, None], w, jnp.inf), system_idx, s)
    hi = segment.segment_max(jnp.where(real[:, None], w, -jnp.inf), system_idx, s)
    ok = jnp.isfinite(lo) & jnp.isfinite(hi)
    lo = jnp.where(pbc | ~ok, 0.0, lo)
    extent = jnp.where(pbc, 1.0, jnp.where(ok, hi - lo, 0.0))
    thickness = extent * spacing
    n = jnp.floor(stencil * thickness / rc)
    cap = jnp.maximum(BINS_PER_ATOM * segment.segment_count(system_idx, s), 1).astype(n.dtype)
    n = jnp.where(jnp.isfinite(n), jnp.clip(n, 1.0, cap[:, None]), 1.0)
    n = _cap_bins(n, cap).astype(jnp.int32)
    bins = jnp.where(g["system_mask"], jnp.prod(n, axis=-1, dtype=jnp.int32), 0)
    offset = jnp.cumsum(bins, dtype=jnp.int32) - bins
    bins_total = jnp.sum(bins.astype(jnp.float32))
    need = jnp.where(pbc & g["system_mask"][:, None], jnp.ceil(rc / spacing), 1.0)
    need = jnp.where(jnp.isfinite(need), jnp.clip(need, 1.0, _MAX_STENCIL), _MAX_STENCIL)
    stencil_needed = jnp.max(need, initial=1.0).astype(jnp.int32)
    system_stencil = jnp.max(need, axis=-1).astype(jnp.int32)

    n_atom = n[sys]
    u = jnp.where(extent[sys] > 0, (w - lo[sys]) / jnp.where(extent[sys] > 0, extent[sys], 1), 0)
    coord = jnp.floor(u * n_atom)
    coord = jnp.where(jnp.isfinite(coord), coord, 0.0)
    coord = jnp.clip(coord, 0, n_atom - 1).astype(jnp.int32)
    linear = (coord[:, 0] * n_atom[:, 1] + coord[:, 1]) * n_atom[:, 2] + coord[:, 2]
    global_bin = jnp.where(real, offset[sys] + linear, -1)
    return {
        "frac": frac,
        "image": jnp.where(jnp.isfinite(image), image, 0.0).astype(jnp.int32),
        "coord": coord,
        "n_bins": n,
        "offset": offset,
        "global_bin": global_bin,
        "bins_total": jnp.minimum(bins_total, 2.0**31 - 1).astype(jnp.int32),
        "stencil_needed": stencil_needed,
        "system_stencil": system_stencil,
    }


_bin_geometry_jit = jax.jit(_bin_geometry, static_argnums=(1, 2))


def _cap_bins(n, cap):
    """Bin counts (S, 3) coarsened so that each system has at most ``cap`` (S,) bins."""
    for _ in range(3):  # scale the directions that still have more than one bin
        total = jnp.prod(n, axis=-1)
        free = jnp.sum(n > 1, axis=-1).astype(n.dtype)
        f = jnp.where(total > cap, (cap / total) ** (1.0 / jnp.maximum(free, 1.0)), 1.0)
        n = jnp.where(n > 1, jnp.maximum(jnp.floor(n * f[:, None]), 1.0), n)
    # what rounding left over (rare): one bin, always correct
    return jnp.where((jnp.prod(n, axis=-1) > cap)[:, None], 1.0, n)


def stencil_for_cells(cells, pbc, interaction_range: float) -> int:
    """Stencil half-width that periodic ``cells`` (n, 3, 3) with ``pbc`` (n, 3) need (host-side)."""
    if cells is None:
        return 1
    cells = np.asarray(cells, np.float64).reshape(-1, 3, 3)
    pbc = np.ones(cells.shape[:2], bool) if pbc is None else np.asarray(pbc, bool).reshape(-1, 3)
    spacing, sized = periodic_spacing_host(cells, pbc)  # thin cells fail, and size nothing
    keep = pbc.any(axis=1) & sized
    if not keep.any():
        return 1
    need = np.where(pbc[keep], np.ceil(interaction_range / spacing[keep]), 1.0)
    return int(min(max(need.max(), 1.0), _MAX_STENCIL))


def stencil_size(k: int, half: bool) -> int:
    """Number of bin offsets a stencil of half-width ``k`` searches (:func:`_stencil`)."""
    full = (2 * k + 1) ** 3
    return full // 2 + 1 if half else full


def crowding_systems(nl, batch, candidates=None) -> np.ndarray:
    """Host-side: the systems to fail when ``nl`` (already grown) has no int32 pair codes.

    The demand of each of the ``candidates`` (S,) bool (default: the occupied slots) is
    measured on ``batch``: the stencil its cell needs and the most atoms in one of its bins (at
    ``nl``'s stencil). The candidates whose demand alone leaves no int32 codes (as
    :func:`pair_codes_fit`) are returned; when none does alone, the one of largest ``stencil
    size x occupancy``. Shape (S,) bool.
    """
    n, s = batch.max_atoms, batch.max_systems
    geo = _bin_geometry_jit(_geometry_inputs(batch, nl), nl.interaction_range, nl.stencil)
    gb = np.asarray(geo["global_bin"])
    counts = np.bincount(gb[gb >= 0], minlength=1)
    per_atom = np.where(gb >= 0, counts[np.maximum(gb, 0)], 0)
    occupancy = np.zeros(s + 1, np.int64)
    np.maximum.at(occupancy, np.minimum(np.asarray(batch.system_idx), s), per_atom)
    occupancy = occupancy[:s]
    stencil = np.asarray(geo["system_stencil"])
    size = np.array([stencil_size(int(k), nl.half) for k in stencil], np.int64)
    bins = np.ceil(nl.margin * occupancy).astype(np.int64) + 2
    occupied = np.asarray(batch.system_mask if candidates is None else candidates)
    occupied = occupied & (occupancy > 0)  # excluded systems are not binned: occupancy 0
    alone = occupied & (size * n * bins >= PAIR_CODE_LIMIT)
    if alone.any():
        return alone
    worst = np.zeros(s, bool)
    if occupied.any():
        worst[np.argmax(np.where(occupied, size * occupancy, -1))] = True
    return worst


def pair_codes_fit(nl, n_atoms: int) -> bool:
    """Whether a build of ``nl``'s static sizes on ``n_atoms`` atom slots has int32 pair codes
    (:data:`PAIR_CODE_LIMIT`)."""
    return stencil_size(nl.stencil, nl.half) * n_atoms * nl.bin_capacity < PAIR_CODE_LIMIT


def _bin_table(global_bin, n_atoms: int, max_bins: int, bin_capacity: int):
    """Table (max_bins + 1, bin_capacity) of atom indices per bin (N = empty) and max occupancy.

    The last row is the empty bin that out-of-range lookups read.
    """
    b = max_bins
    gb = jnp.where((global_bin >= 0) & (global_bin < b), global_bin, b)
    counts = jax.ops.segment_sum(jnp.ones_like(gb), gb, num_segments=b + 1)
    order = jnp.argsort(gb, stable=True)
    start = jnp.cumsum(counts, dtype=jnp.int32) - counts
    rank_sorted = jnp.arange(n_atoms, dtype=jnp.int32) - start[gb[order]]
    rank = jnp.zeros(n_atoms, jnp.int32).at[order].set(rank_sorted)
    row = jnp.where(gb < b, gb, b + 1)  # padding is dropped, the empty row stays empty
    table = jnp.full((b + 1, bin_capacity), n_atoms, jnp.int32)
    table = table.at[row, rank].set(jnp.arange(n_atoms, dtype=jnp.int32), mode="drop")
    occupancy = jnp.max(counts[:b], initial=0)
    return table, occupancy


def _positive_shift(t):
    """Whether integer shifts (..., 3) are lexicographically positive."""
    t0, t1, t2 = t[..., 0], t[..., 1], t[..., 2]
    return (t0 > 0) | ((t0 == 0) & ((t1 > 0) | ((t1 == 0) & (t2 > 0))))


def _stencil(k: int, half: bool) -> np.ndarray:
    """Bin offsets searched, (n, 3) int32. A half list needs the zero offset and the
    lexicographically positive ones: the reverse of a pair found through offset ``o`` is found
    through ``-o``, so each unordered pair is met exactly once (from the zero offset: ``i < j``).
    """
    offsets = np.array(list(itertools.product(range(-k, k + 1), repeat=3)), np.int32)
    if half:
        offsets = offsets[_positive_shift(offsets) | np.all(offsets == 0, axis=-1)]
    return offsets


def _canonical_order(senders, receivers, shifts, half: bool, n_atoms: int):
    """Pairs in a canonical direction (half lists) and sorted by ``(i, j, S)``; unused last.

    The order in which the cell list met the pairs depends on the bins at the build; sorting makes
    every sum over the list (energies, scatter-added forces) independent of when it was built.
    ``n_atoms`` is the atom capacity N (the sentinel of unused slots).
    """
    if half:  # (j, i, -S) is the same unordered pair as (i, j, S)
        swap = (receivers < senders) | ((receivers == senders) & ~_positive_shift(shifts))
        senders, receivers = (
            jnp.where(swap, receivers, senders),
            jnp.where(swap, senders, receivers),
        )
        shifts = jnp.where(swap[:, None], -shifts, shifts)

    def by_keys(_):
        # Two int32 keys (an argsort and three gathers) cost half of a five-key sort on CPU:
        # (i, j) packed when (N + 1)^2 fits in int32, the shift with 10 bits per component
        # (image shifts beyond +-511 cells share a key and keep the build's order among
        # themselves).
        c = jnp.clip(shifts, -511, 511) + 512
        shift_key = (c[:, 0] * 1024 + c[:, 1]) * 1024 + c[:, 2]
        if (n_atoms + 1) ** 2 < 2**31:
            order = jnp.lexsort((shift_key, senders * (n_atoms + 1) + receivers))
        else:
            order = jnp.lexsort((shift_key, receivers, senders))
        return senders[order], receivers[order], shifts[order]

    layout = _packed_layout(n_atoms)
    if layout is None:
        return by_keys(None)
    atom_bits, shift_bits = layout
    bias = 1 << (shift_bits - 1)  # shift components in [-bias, bias) fit their field

    def packed(_):
        # the whole pair in one int64, (i, j, shift) from the most significant bits down, so
        # that one sort of one operand gives the order of the keys above: on XLA:CPU (jax
        # 0.10) sorting one int64 operand takes about 1/8 of the time of a sort that carries
        # a permutation (92 ms against 715 ms for 1.4 million pairs; docs/models.md)
        c = shifts.astype(jnp.int64) + bias
        key = (senders.astype(jnp.int64) << (atom_bits + 3 * shift_bits)) | (
            receivers.astype(jnp.int64) << (3 * shift_bits)
        )
        key = key | (c[:, 0] << (2 * shift_bits)) | (c[:, 1] << shift_bits) | c[:, 2]
        key = jnp.sort(key)
        field = (1 << shift_bits) - 1
        i = key >> (atom_bits + 3 * shift_bits)
        j = (key >> (3 * shift_bits)) & ((1 << atom_bits) - 1)
        s = jnp.stack([key >> (2 * shift_bits), key >> shift_bits, key], axis=-1) & field
        as_int32 = lambda x: x.astype(jnp.int32)  # noqa: E731
        return as_int32(i), as_int32(j), as_int32(s - bias)

    # where a shift is beyond +-511 the sort by keys (which clips there) decides, so that both
    # sorts give one order for every list: a system's order never depends on another's shifts
    edge = min(bias, 512)
    fits = jnp.all((shifts >= -edge) & (shifts < edge) & (shifts > -512))
    return jax.lax.cond(fits, packed, by_keys, None)


def _packed_layout(n_atoms: int) -> tuple[int, int] | None:
    """Bits of an atom index and of a shift component when a pair fits one int64 key.

    Needs ``jax_enable_x64`` (without it JAX has no int64) and at least 8 bits per shift
    component (shifts of +-128 cells; a list whose shifts do not fit uses the sort by keys).
    Atom indices run to ``n_atoms`` (the sentinel of unused slots).
    """
    if not jax.config.jax_enable_x64:
        return None
    atom_bits = max(int(n_atoms).bit_length(), 1)
    shift_bits = min((63 - 2 * atom_bits) // 3, 16)
    return (atom_bits, shift_bits) if shift_bits >= 8 else None


def _row_order_key(rows: jax.Array, n_atoms: int) -> jax.Array:
    """The order that groups entries by ``rows`` (values ``0..n_atoms``) and keeps the list
    order inside a group (a stable sort), as a permutation.

    On XLA:CPU a sort of one packed integer operand is several times faster than a sort that
    carries a permutation (see :func:`_canonical_order`): the key is ``row * P + position``.
    """
    p = rows.shape[0]
    position = jnp.arange(p, dtype=jnp.int32)
    if (n_atoms + 1) * max(p, 1) < 2**31:
        key = jnp.sort(rows * p + position)
        return key % max(p, 1)
    if jax.config.jax_enable_x64:
        key = jnp.sort(rows.astype(jnp.int64) * p + position)
        return (key % p).astype(jnp.int32)
    return jnp.argsort(rows, stable=True).astype(jnp.int32)


def neighbor_rows(senders, receivers, shifts, n_atoms: int, width: int):
    """Per-atom rows of a sorted half list: every neighbor of each atom, both directions.

    Row ``i`` holds first the pairs ``(j, i, S)`` of the half list (``j`` before ``i``, as
    ``(i, j, -S)``), then its pairs ``(i, j, S)``, each group in the list's ``(i, j, S)``
    order: the order depends only on which pairs exist, so a sum along a row is the same bit
    for bit whenever the list was rebuilt and whatever its capacities.

    Parameters
    ----------
    senders, receivers : Array, shape (P,) int32
        The half list (``n_atoms`` in unused slots), sorted by ``(i, j, S)``.
    shifts : Array, shape (P, 3) int32
    n_atoms : int
        Atom capacity N (the sentinel).
    width : int
        Row width M; neighbors beyond it are not stored (the caller flags the overflow).

    Returns
    -------
    row_receivers : Array, shape (N, M) int32
        Neighbor ``j`` of each row entry (``N`` in unused entries).
    row_shifts : Array, shape (N, M, 3) int32
        ``d = r_j - r_i + S @ cell`` for row ``i`` (zero in unused entries).
    counts : Array, shape (N,) int32
        Neighbors of each atom (may exceed ``M``).
    """
    n, p = n_atoms, senders.shape[0]
    fwd = jnp.zeros((n + 1,), jnp.int32).at[senders].add(1)[:n]
    rev = jnp.zeros((n + 1,), jnp.int32).at[receivers].add(1)[:n]
    out_j = jnp.full((n, width), n, jnp.int32)
    out_s = jnp.zeros((n, width, 3), jnp.int32)
    if width > 0 and p > 0:
        # forward pairs: the list is grouped by sender already
        fwd_start = jnp.cumsum(fwd) - fwd
        i = jnp.minimum(senders, n - 1)
        col = rev[i] + jnp.arange(p, dtype=jnp.int32) - fwd_start[i]
        row = jnp.where(senders < n, senders, n)  # out of range: dropped
        out_j = out_j.at[row, col].set(receivers, mode="drop")
        out_s = out_s.at[row, col].set(shifts, mode="drop")
        # reversed pairs, grouped by receiver in list order
        order = _row_order_key(receivers, n)
        r = receivers[order]
        rev_start = jnp.cumsum(rev) - rev
        col = jnp.arange(p, dtype=jnp.int32) - rev_start[jnp.minimum(r, n - 1)]
        row = jnp.where(r < n, r, n)
        out_j = out_j.at[row, col].set(senders[order], mode="drop")
        out_s = out_s.at[row, col].set(-shifts[order], mode="drop")
    return out_j, out_s, fwd + rev


def _floor_divide(ub: jax.Array, na: jax.Array, in_float32: bool) -> jax.Array:
    """``floor(ub / na)`` of int32 arrays (``na >= 1``), as ``jnp.floor_divide``.

    ``in_float32`` (static): as ``floor((ub + 1/2) / na)`` in float32, vectorised where an
    int32 division is not on x86 (a 32,000-atom rebuild went from 345 to 282 ms, measured
    once). Exact while ``|ub| + na < 2**21`` (the caller checks that bound statically) for a
    division whose relative error is below ``1 / (2 |ub| + 1)``, at least ``2**-22``: a
    correctly rounded one (XLA's default) or a multiplication by the reciprocal. Then
    ``ub + 1/2`` and ``na`` are exact in float32 and the quotient ``(2 ub + 1) / (2 na)`` is
    at least ``1 / (2 na)`` from an integer.
    """
    if not in_float32:
        return jnp.floor_divide(ub, na)
    quotient = (ub.astype(jnp.float32) + 0.5) / na.astype(jnp.float32)
    return jnp.floor(quotient).astype(ub.dtype)


def _build(nl, batch, per_system: bool = False):
    """Rebuild ``nl`` (a :class:`~fused_dynamics.models.neighbors.NeighborList`) on ``batch``
    with its static capacities (see the module docstring). With ``per_system`` (static) it
    returns ``(list, pairs)``: also the pairs each system has, shape (S,) int32, whether or not
    they fit the capacity (a count pass with capacity 0 measures them without storing any; its
    ``needed`` then also holds the most neighbors of one atom, counted from the candidates).
    A half list with ``max_neighbors > 0`` also gets its per-atom rows (:func:`neighbor_rows`).

    The loop over bin offsets stores one int32 code per pair, ``(offset, i, column)``, with one
    scatter, and returns a table of each (offset, atom)'s bin row and image shift (7 bytes per
    entry: 100 MB for 10^6 atoms and the 14 offsets of a half list); the pairs' atoms and
    shifts are decoded from the codes afterwards with gathers of size P (from that table: no
    bin arithmetic per pair). Distances use the positions wrapped into the cell,
    ``x = r - image @ C``, so that a candidate costs one gather: ``d = x_j - x_i + wrap @ C``,
    ``wrap`` being the image shift of the offset bin (the same for the whole row).
    """
    n, s = batch.max_atoms, batch.max_systems
    k, p, m, b = nl.stencil, nl.capacity, nl.bin_capacity, nl.max_bins
    rc = nl.interaction_range
    geo = _bin_geometry(_geometry_inputs(batch, nl), rc, k)
    pos = jax.lax.stop_gradient(batch.positions)
    cell = jax.lax.stop_gradient(batch.cell)
    system_idx = batch.system_idx
    sys = jnp.minimum(system_idx, s - 1)
    real = (system_idx < s) & (geo["global_bin"] >= 0)
    table, occupancy = _bin_table(geo["global_bin"], n, b, m)
    n_atom = geo["n_bins"][sys]  # (N, 3)
    per = batch.pbc[sys]
    image = geo["image"]
    coord = geo["coord"]
    first_bin = geo["offset"][sys]
    cell_i = cell[sys]  # (N, 3, 3)
    x = pos - matvec3(image.astype(pos.dtype), cell_i)  # wrapped (N, 3)
    atoms = jnp.arange(n, dtype=jnp.int32)
    offsets = _stencil(k, nl.half)
    n_off = len(offsets)
    rc2 = rc * rc
    upto = jnp.asarray(np.triu(np.ones((m, m), np.float32))) if m <= 64 else None  # a <= b
    float_floor = 2 * b + k < 2**21  # bins per axis <= b, |bin coordinate + offset| < b + k
    # the image shift of an offset bin is within -k..k: int8 in the (offset, atom) table
    wrap_dtype = jnp.int8 if k <= 127 else jnp.int32
    if not pair_codes_fit(nl, n):
        raise ValueError(
            f"NeighborList: {n_off} bin offsets x {n} atoms x {m} atoms per bin do not fit int32 "
            "pair codes; use a smaller stencil or split the batch."
        )

    def rows(i, o):
        """Table row of bin offset ``o`` from atom ``i`` and its image shift (any shape)."""
        na = n_atom[i]
        ub = coord[i] + o  # unwrapped bin coordinates
        wrap = jnp.where(per[i], _floor_divide(ub, na, float_floor), 0)
        wrapped = ub - wrap * na
        inside = jnp.all(per[i] | ((ub >= 0) & (ub < na)), axis=-1)
        linear = (wrapped[..., 0] * na[..., 1] + wrapped[..., 1]) * na[..., 2] + wrapped[..., 2]
        row = jnp.where(real[i] & inside, first_bin[i] + linear, b)
        return jnp.where((row >= 0) & (row < b), row, b), wrap

    def body(carry, index):
        code, count = carry[:2]
        o = jnp.asarray(offsets)[index]
        row, wrap = rows(atoms, o)
        cand = table[row]  # (N, M)
        jc = jnp.minimum(cand, n - 1)
        here = x - matvec3(wrap.astype(pos.dtype), cell_i)
        d = x[jc] - here[:, None, :]
        keep = (cand < n) & (jnp.sum(d * d, axis=-1) < rc2)
        zero = jnp.all(o == 0)
        i = atoms[:, None]
        # from the zero offset: no self pair; a half list keeps i < j (the other offsets, which
        # hold the self-images, each meet a pair from one side only)
        keep = keep & ~(zero & ((i >= jc) if nl.half else (i == jc)))
        # each kept candidate's slot, row by row: the rows' start (a cumulative sum over N) plus
        # its rank in the row (the kept count up to it, a product with a triangle of ones:
        # small integers, exact in float32). The same slots as one cumulative sum over N x M,
        # in half the time on XLA:CPU.
        per_atom = jnp.sum(keep, axis=1, dtype=jnp.int32)
        start = jnp.cumsum(per_atom, dtype=jnp.int32) - per_atom
        if upto is None:  # wide bins: the product would cost N M^2
            rank = jnp.cumsum(keep, axis=1, dtype=jnp.int32)
        else:
            rank = jnp.matmul(
                keep.astype(jnp.float32), upto, precision=jax.lax.Precision.HIGHEST
            ).astype(jnp.int32)
        slot = (count + start[:, None] + rank - 1).reshape(-1)
        flat = keep.reshape(-1)
        slot = jnp.where(flat & (slot < p), slot, p)  # out of range: dropped
        value = (index * n + i) * m + jnp.arange(m, dtype=jnp.int32)[None, :]
        code = code.at[slot].set(value.reshape(-1), mode="drop")
        out = (code, count + jnp.sum(per_atom, dtype=jnp.int32))
        if per_system:  # pairs per sender, and neighbors per atom (both ends of a pair)
            ends = carry[3] + per_atom
            ends = ends.at[jc.reshape(-1)].add(keep.reshape(-1).astype(jnp.int32))
            out += (carry[2] + per_atom, ends)
        # what the decoding needs of (offset, atom): the bin row and the image shift
        return out, (row, wrap.astype(wrap_dtype))

    init = (jnp.full((p,), -1, jnp.int32), jnp.zeros((), jnp.int32))
    if per_system:
        init += (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32))
    carry, looked_up = jax.lax.scan(body, init, jnp.arange(n_off, dtype=jnp.int32))
    code, count = carry[:2]
    # decode the pairs: gathers from the (offset, atom) table instead of the bins again
    mask = code >= 0
    c = jnp.maximum(code, 0)
    index, rest = c // (n * m), c % (n * m)
    i, column = rest // m, rest % m
    row_of, wrap_of = looked_up  # (n_off, N), (n_off, N, 3): 7 bytes per (offset, atom)
    j = table[row_of[index, i], column]
    j_ok = jnp.minimum(j, n - 1)
    wrap = wrap_of[index, i].astype(jnp.int32)
    shifts = jnp.where(mask[:, None], wrap + image[i] - image[j_ok], 0).astype(jnp.int32)
    senders = jnp.where(mask, i, n).astype(jnp.int32)
    receivers = jnp.where(mask, j, n).astype(jnp.int32)
    senders, receivers, shifts = _canonical_order(senders, receivers, shifts, nl.half, n)
    mask = senders < n
    width = nl.max_neighbors
    row_receivers, row_shifts, per_atom = neighbor_rows(senders, receivers, shifts, n, width)
    most = jnp.max(per_atom, initial=0) if nl.half else jnp.zeros((), jnp.int32)
    if per_system:  # counted from the candidates: the pairs need not fit the capacity
        most = jnp.max(carry[3], initial=0) if nl.half else most
    now = jnp.stack([count, occupancy, geo["bins_total"], geo["stencil_needed"], most])
    # bins_total <= b always (per-system caps); checked anyway so that nothing is dropped silently
    over = (count > p) | (occupancy > m) | (geo["bins_total"] > b) | (geo["stencil_needed"] > k)
    over = over | ((width > 0) & (most > width))
    # needs are recorded up to the first overflow: after it, the dynamics is no longer trusted
    needed = jnp.where(nl.overflow, nl.needed, jnp.maximum(nl.needed, now))
    built = dataclasses.replace(
        nl,
        senders=senders,
        receivers=receivers,
        shifts=shifts,
        mask=mask,
        row_receivers=row_receivers,
        row_shifts=row_shifts,
        reference_positions=pos.astype(nl.reference_positions.dtype),
        reference_cell=cell.astype(nl.reference_cell.dtype),
        reference_system_idx=system_idx,
        reference_pbc=batch.pbc,
        overflow=nl.overflow | over,
        stale=jnp.zeros((), bool),
        rebuilds=nl.rebuilds + 1,
        n_pairs=count,
        needed=needed.astype(jnp.int32),
    )
    if not per_system:
        return built
    # padding atoms (system_idx == S) find no candidates and land in no system
    pairs = jnp.zeros((s,), jnp.int32).at[system_idx].add(carry[2], mode="drop")
    return built, pairs


_build_jit = eqx.filter_jit(_build)
