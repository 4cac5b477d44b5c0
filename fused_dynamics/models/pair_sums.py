"""The two sums of a pair potential: the dense all-pairs-within-system block and a neighbor list.

The dense path pairs every atom with every atom of its own system (the ``max_atoms_per_system``
block of the batch) and with their periodic images: ``O(N * A * K)`` work for N atom slots, A atoms
per system and K image shifts. It is exact for any cell (triclinic, mixed periodicity, cells
smaller than twice the cutoff) and is the reference for the neighbor-list path.

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

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import segment
from ..batch import Batch
from .neighbors import NeighborList

__all__ = [
    "required_images",
    "required_images_host",
    "dense_block",
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
    recip = jnp.linalg.inv(cell)  # columns are reciprocal vectors b_k (without 2π)
    spacing = 1.0 / jnp.linalg.norm(recip, axis=-2)
    n = jnp.floor(cutoff / spacing + 0.5).astype(jnp.int32)
    return jnp.where(pbc, n, 0)


class DenseBlock(NamedTuple):
    """Every atom's partners in its system block and their images, shape (N, A, K)."""

    partners: jax.Array  # (N, A) int: atom index of each partner (the atom itself if none)
    vectors: jax.Array  # (N, A, K, 3): r_partner - r_atom + image, in Å
    r2: jax.Array  # (N, A, K): squared lengths
    ok: jax.Array  # (N, A, K) bool: a real pair within the cutoff
    too_small: jax.Array  # (S,) bool: the cell needs more images than the static range


def required_images_host(cells, pbc, cutoff: float) -> tuple[int, int, int]:
    """Host-side (NumPy) :func:`required_images` of cells (n, 3, 3), maximum over the cells.

    NumPy, not ``jnp``: it sizes a static image range before compiling, and may be called while
    an outer ``jax.jit`` is tracing (where every ``jnp`` operation is staged out, even on
    concrete inputs).
    """
    cells = np.asarray(cells, np.float64).reshape(-1, 3, 3)
    pbc = np.asarray(pbc, bool).reshape(-1, 3)
    if not len(cells):
        return (0, 0, 0)
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(cells), axis=-2)
    need = np.where(pbc, np.floor(cutoff / spacing + 0.5), 0).astype(int)
    return tuple(int(n) for n in need.max(axis=0))


def dense_block(batch: Batch, cutoff: float, n_img: tuple[int, int, int]) -> DenseBlock:
    """The dense pairs of every atom: its system block times the image shifts (module doc).

    Shared by the dense pair sums and the dense :class:`~fused_dynamics.models.graph.Graph`.
    """
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
    ds = jnp.einsum("nai,nij->naj", batch.positions[j] - batch.positions[:, None], inv_cell[sys])
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
    ok = ok & (r2 < cutoff**2)
    return DenseBlock(j, d, r2, ok, cell_too_small(batch, cutoff, n_img))


def cell_too_small(batch: Batch, cutoff: float, n_img: tuple[int, int, int]) -> jax.Array:
    """Systems whose cell needs more periodic images than ``n_img``, shape (S,) bool."""
    need = required_images(batch.cell, batch.pbc, cutoff)
    finite = jnp.all(jnp.isfinite(batch.cell), axis=(-2, -1))  # non-finite: its own failure
    return batch.system_mask & finite & jnp.any(need > jnp.asarray(n_img), axis=-1)


def poison_systems(batch: Batch, energy: jax.Array, bad: jax.Array) -> jax.Array:
    """``energy`` (S,) with NaN energy, forces and stress for the systems ``bad`` (S,) bool.

    Not a select: the derivatives must be NaN too, never the zeros that
    ``d/dx where(bad, nan, e)`` gives; the second term (a sum of the system's own coordinates,
    times 0 where not bad) reaches atoms that have no pair. Other systems are untouched.
    """
    coords = jnp.where(batch.atom_mask, jnp.sum(batch.positions, axis=-1), 0.0)
    poison = jnp.where(bad, jnp.nan, 0.0)
    return energy * jnp.where(bad, jnp.nan, 1.0) + poison * batch.sum_atoms(coords)


def dense_energy(model, batch: Batch, species: jax.Array | None = None) -> jax.Array:
    """All pairs of each system's atom block and their periodic images (see the module doc)."""
    n_img = (1, 1, 1) if model.images is None else tuple(model.images)
    block = dense_block(batch, model.cutoff, n_img)
    j, ok = block.partners, block.ok
    # Masked pairs are evaluated at r = cutoff / 2, where every φ here is finite with finite
    # derivatives (r = 1 is not: (1 - r/σ)^α is NaN for σ < 1 and non-integer α, and a NaN
    # in the unused branch of `where` poisons gradients with respect to the parameters).
    r = jnp.sqrt(jnp.where(ok, block.r2, 0.25 * model.cutoff**2))
    if species is None:
        phi = model.pair_energy(r)
    else:  # (N, 1, 1) and (N, A, 1): j of an invalid pair is some atom, masked below
        phi = model.pair_energy(r, species[:, None, None], species[j][:, :, None])
    phi = jnp.where(ok, phi, 0.0)
    atom_energy = 0.5 * jnp.sum(phi, axis=(1, 2))
    energy = batch.sum_atoms(atom_energy)
    # A cell too small for the static image range would miss pairs: that system's energy,
    # forces and stress are NaN, and a run reports it FAILED with Failure.CELL_TOO_SMALL.
    # Other systems are untouched: it is not a run-wide error.
    return poison_systems(batch, energy, block.too_small)


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
