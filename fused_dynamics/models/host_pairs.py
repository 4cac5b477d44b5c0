"""Neighbor lists found on the host by ASE, for batches whose atoms do not move.

Evaluating a model on many fixed structures (training data, single points) needs each
structure's pairs once. The cell list of :class:`~fused_dynamics.models.neighbors.NeighborList`
exists to rebuild a list cheaply while atoms move; for fixed positions ASE's
``primitive_neighbor_list`` on the host finds the same pairs with no compilation, and
:func:`host_neighbor_list` stores them in a ``NeighborList`` of a chosen capacity (so batches of
one capacity share one compiled evaluation). The list is an ordinary ``NeighborList`` with skin 0:
under a :class:`~fused_dynamics.models.neighbors.NeighborListHook` in a run it is rebuilt by the
cell list as soon as an atom moves.
"""

from __future__ import annotations

import dataclasses

import ase
import jax.numpy as jnp
import numpy as np
from ase.neighborlist import primitive_neighbor_list

from ..batch import Batch
from .cell_list import _positive_shift, stencil_for_cells
from .neighbors import NeighborList

__all__ = ["host_neighbor_list", "count_pairs"]


def count_pairs(atoms: ase.Atoms, cutoff: float) -> int:
    """Directed pairs (both directions) of one structure within ``cutoff`` Å."""
    i = primitive_neighbor_list("i", atoms.pbc, atoms.cell, atoms.positions, float(cutoff))
    return int(len(i))


def host_neighbor_list(
    batch: Batch,
    cutoff: float,
    capacity: int | None = None,
    *,
    half: bool = False,
) -> NeighborList:
    """A :class:`NeighborList` of ``batch``'s pairs within ``cutoff`` Å, found by ASE.

    Parameters
    ----------
    batch : Batch
        Concrete (host values are read).
    cutoff : float
        Å. The list has skin 0: it is exact for these positions.
    capacity : int, optional
        Pair capacity P (default: the pairs found). A larger capacity leaves unused slots.
    half : bool, default False
        Each unordered pair once (pair potentials) instead of both directions.

    Returns
    -------
    NeighborList
        Pairs in the list's canonical order (sorted by ``(i, j, shift)``), not stale.

    Raises
    ------
    ValueError
        ``capacity`` is smaller than the number of pairs (naming both).
    """
    positions = np.asarray(batch.positions, np.float64)
    cells = np.asarray(batch.cell, np.float64)
    pbc = np.asarray(batch.pbc)
    system_idx = np.asarray(batch.system_idx)
    rows = []
    for s in np.flatnonzero(np.asarray(batch.system_mask)):
        atoms = np.flatnonzero((system_idx == s) & np.asarray(batch.atom_mask))
        # batch.cell has full rank (a zero non-periodic row is stored as a unit vector)
        i, j, shift = primitive_neighbor_list(
            "ijS", pbc[s], cells[s], positions[atoms], float(cutoff), self_interaction=False
        )
        pairs = np.column_stack([atoms[i], atoms[j], shift]).astype(np.int64)
        if half:
            keep = (pairs[:, 0] < pairs[:, 1]) | (
                (pairs[:, 0] == pairs[:, 1]) & _positive_shift(pairs[:, 2:])
            )
            pairs = pairs[keep]
        rows.append(pairs)
    pairs = np.concatenate(rows) if rows else np.zeros((0, 5), np.int64)
    pairs = pairs[np.lexsort((pairs[:, 4], pairs[:, 3], pairs[:, 2], pairs[:, 1], pairs[:, 0]))]
    n_pairs = len(pairs)
    capacity = n_pairs if capacity is None else int(capacity)
    if capacity < n_pairs:
        raise ValueError(
            f"host_neighbor_list: capacity {capacity} is smaller than the {n_pairs} pairs within "
            f"{cutoff} Å of the batch; give capacity >= {n_pairs}."
        )
    n = batch.max_atoms
    senders = np.full(capacity, n, np.int32)
    receivers = np.full(capacity, n, np.int32)
    shifts = np.zeros((capacity, 3), np.int32)
    mask = np.zeros(capacity, bool)
    senders[:n_pairs], receivers[:n_pairs] = pairs[:, 0], pairs[:, 1]
    shifts[:n_pairs], mask[:n_pairs] = pairs[:, 2:], True
    # statics a later rebuild by the cell list (a run's NeighborListHook) can work with: the
    # stencil the cells need, and as many atoms per bin as a system can have
    occupied = np.asarray(batch.system_mask)
    stencil = stencil_for_cells(cells[occupied], pbc[occupied], float(cutoff))
    empty = NeighborList.empty(
        batch,
        cutoff,
        0.0,
        capacity,
        half=half,
        stencil=stencil,
        bin_capacity=max(batch.max_atoms_per_system, 1),
    )
    return dataclasses.replace(
        empty,
        senders=jnp.asarray(senders),
        receivers=jnp.asarray(receivers),
        shifts=jnp.asarray(shifts),
        mask=jnp.asarray(mask),
        stale=jnp.zeros((), bool),
        rebuilds=jnp.ones((), jnp.int32),
        n_pairs=jnp.asarray(n_pairs, jnp.int32),
        needed=jnp.asarray([n_pairs, 0, 0, 0, 0], jnp.int32),
    )
