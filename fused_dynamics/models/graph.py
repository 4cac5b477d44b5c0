"""The neighbor graph a model sees, and :class:`GraphModel`, the base of models that consume it.

A :class:`Graph` is a flat, fixed-size list of ``E`` directed edges over the whole padded batch,
computed *inside* the differentiated energy function from the (strained) positions and cells, so
forces (``-dE/dr``) and stress (``(1/V) dE/dε``) of a graph model still come from the one reverse
pass of :class:`~fused_dynamics.models.base.Model`. The convention is jraph's and ASE's
``neighbor_list("ijD")``::

    vectors[e] = r[receivers[e]] - r[senders[e]] + shift[e] @ cell[system of senders[e]]

A message along edge ``e`` goes from ``senders[e]`` to ``receivers[e]``; the graph is *full*
(both directions of every pair are present), so summing edge terms over ``receivers`` or over
``senders`` sees every neighbor of an atom. Edges never cross systems. Unused edge slots hold
``senders == receivers == N`` (the atom capacity: ``jax.ops.segment_sum(..., num_segments=N)``
drops them), ``mask == False``, zero vectors and atomic number 0.

Two sources give the same edges (the dense one is the reference, see ``tests/test_graph.py``):

* **dense** (no neighbor list on the batch): every atom paired with every atom of its own system
  block and their periodic images ``-images..images`` along each periodic lattice vector
  (``E = S * A * A * K`` slots for ``S`` system slots, ``A`` atoms per system, ``K`` image
  shifts; the blocked geometry of :mod:`.blocked`; ``E = N * A * K`` for a batch of ``N`` atom
  slots whose system slots are mostly padding, ``N < S * A``),
  after wrapping each displacement to the nearest image. Exact for any cell that the static image
  range covers (:func:`~fused_dynamics.models.pair_sums.required_images`); a cell that needs more
  images is marked in ``Graph.invalid`` and its system fails with ``CELL_TOO_SMALL``.
* **neighbor list** (``batch.neighbors`` is a
  :class:`~fused_dynamics.models.neighbors.NeighborList` with ``cutoff >= model.cutoff``): its
  pairs (a half list is expanded to both directions), ``E = P`` (or ``2 P``), after
  :meth:`~fused_dynamics.models.neighbors.NeighborList.update` (rebuilt if atoms moved beyond
  its skin since it was built). An overflowed list
  marks every system invalid: its energy, forces and stress are NaN until the run regrows it.

Only edges shorter than the model's cutoff have ``mask == True``.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..batch import Batch
from ..status import Failure
from .base import Model
from .blocked import atom_rows, matvec3, min_image_vectors, system_blocks
from .neighbors import NeighborList
from .pair_sums import cell_too_small, poison_systems, required_images_host

__all__ = ["Graph", "GraphModel", "neighbor_graph"]


class Graph(eqx.Module):
    """Directed edges within ``cutoff`` of every system of a padded batch (module docstring).

    Attributes
    ----------
    senders, receivers : Array, shape (E,) int32
        Atom indices of the two ends (``N``, the atom capacity, in unused slots).
    vectors : Array, shape (E, 3)
        ``r_receiver - r_sender + shift @ cell`` in Å (zero in unused slots). Differentiable in
        the batch's positions and cell.
    mask : Array, shape (E,) bool
        Real edges no longer than ``cutoff``.
    sender_numbers, receiver_numbers : Array, shape (E,) int32
        Atomic numbers of the two ends (0 in unused slots).
    system : Array, shape (E,) int32
        System slot of each edge (``S`` in unused slots).
    invalid : Array, shape (S,) bool
        Systems whose edges are incomplete (cell too small for the dense image range, or an
        overflowed neighbor list). :class:`GraphModel` makes their results NaN.
    cutoff : float
        Static. Edge length bound in Å.
    """

    senders: jax.Array
    receivers: jax.Array
    vectors: jax.Array
    mask: jax.Array
    sender_numbers: jax.Array
    receiver_numbers: jax.Array
    system: jax.Array
    invalid: jax.Array
    cutoff: float = eqx.field(static=True)

    @property
    def num_edges(self) -> int:
        """The static edge capacity ``E``."""
        return self.senders.shape[0]

    @property
    def lengths(self) -> jax.Array:
        """Edge lengths in Å, shape (E,); unused edges read ``cutoff / 2``.

        The masked value keeps every radial function finite with a finite derivative, so no
        NaN from an unused edge (a zero vector) reaches the gradients.
        """
        r2 = jnp.sum(self.vectors * self.vectors, axis=-1)
        return jnp.sqrt(jnp.where(self.mask, r2, 0.25 * self.cutoff**2))

    @property
    def safe_vectors(self) -> jax.Array:
        """``vectors`` with unused edges replaced by a fixed vector of length ``cutoff / 2``.

        For direction-dependent terms (spherical harmonics of ``vectors / lengths``), whose
        derivative at a zero vector is NaN.
        """
        fill = jnp.asarray([0.0, 0.0, 0.5 * self.cutoff], self.vectors.dtype)
        return jnp.where(self.mask[:, None], self.vectors, fill)

    def sum_to_receivers(self, x: jax.Array, num_atoms: int) -> jax.Array:
        """Sum edge values (E, ...) over the edges arriving at each atom, shape (N, ...).

        Unused edges and masked edges contribute nothing.
        """
        x = jnp.where(self.mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
        return jax.ops.segment_sum(x, self.receivers, num_segments=num_atoms + 1)[:num_atoms]

    def sum_to_senders(self, x: jax.Array, num_atoms: int) -> jax.Array:
        """Sum edge values (E, ...) over the edges leaving each atom, shape (N, ...)."""
        x = jnp.where(self.mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
        return jax.ops.segment_sum(x, self.senders, num_segments=num_atoms + 1)[:num_atoms]


def neighbor_graph(batch: Batch, cutoff: float, images=None) -> Graph:
    """The :class:`Graph` of ``batch`` for edges up to ``cutoff`` Å (traced; differentiable).

    Parameters
    ----------
    batch : Batch
        A padded batch. With ``batch.neighbors`` a
        :class:`~fused_dynamics.models.neighbors.NeighborList` (``cutoff >= cutoff``), its pairs
        are the edges; otherwise the dense block of every system's atoms and images is used.
    cutoff : float
        Edge length bound in Å.
    images : tuple of 3 int, optional
        Dense path: the static image range along each lattice vector (default ``(1, 1, 1)``).
        Systems whose cell needs more are marked ``invalid``.

    Raises
    ------
    ValueError
        If ``batch.neighbors`` is a neighbor list with a smaller cutoff.
    """
    cutoff = float(cutoff)
    nl = batch.neighbors
    if isinstance(nl, NeighborList):
        if nl.cutoff < cutoff:
            raise ValueError(
                f"neighbor_graph: batch.neighbors has cutoff {nl.cutoff} Å < the model's cutoff "
                f"{cutoff} Å; allocate the list with the model's cutoff "
                "(NeighborList.allocate(batch, cutoff, skin, half=False))."
            )
        # refreshed like a pair potential's list (auto_refresh): a list built for other
        # positions is rebuilt here (one O(N) check when it is still valid, as in a run whose
        # NeighborListHook refreshed it just before), never used stale
        return _list_graph(batch, nl.update(batch), cutoff)
    return _dense_graph(batch, cutoff, (1, 1, 1) if images is None else tuple(images))


def _numbers(batch: Batch, index: jax.Array) -> jax.Array:
    z = jnp.take(batch.atomic_numbers, index, mode="fill", fill_value=0)
    return z.astype(jnp.int32)


def _list_graph(batch: Batch, nl: NeighborList, cutoff: float) -> Graph:
    n, s = batch.max_atoms, batch.max_systems
    d = nl.displacements(batch.positions, batch.cell, batch.system_idx)
    senders, receivers, mask = nl.senders, nl.receivers, nl.mask
    if nl.half:  # both directions: the reverse edge has the opposite vector
        senders = jnp.concatenate([senders, receivers])
        receivers = jnp.concatenate([nl.receivers, nl.senders])
        d = jnp.concatenate([d, -d])
        mask = jnp.concatenate([mask, mask])
    r2 = jnp.sum(d * d, axis=-1)
    mask = mask & (r2 < cutoff**2)
    system = jnp.where(mask, jnp.take(batch.system_idx, senders, mode="fill", fill_value=s), s)
    return Graph(
        senders=jnp.where(mask, senders, n).astype(jnp.int32),
        receivers=jnp.where(mask, receivers, n).astype(jnp.int32),
        vectors=jnp.where(mask[:, None], d, 0.0),
        mask=mask,
        sender_numbers=jnp.where(mask, _numbers(batch, senders), 0),
        receiver_numbers=jnp.where(mask, _numbers(batch, receivers), 0),
        system=system.astype(jnp.int32),
        invalid=batch.system_mask & nl.overflow,
        cutoff=cutoff,
    )


def _dense_graph(batch: Batch, cutoff: float, n_img: tuple[int, int, int]) -> Graph:
    """The edges of every system's block times the image shifts (:mod:`.blocked` geometry).

    Blocks (``E = S * A * A * K``): edge ``(s, i, j, k)`` goes from the i-th to the j-th atom
    of slot ``s`` along shift ``k`` of ``-images..images`` (itertools order). A batch whose slots
    are mostly padding (``N < S * A``) takes one row per atom slot instead (``E = N * A * K``):
    edge ``(n, j, k)`` goes from atom ``n`` to the j-th atom of its system.
    """
    n, s = batch.max_atoms, batch.max_systems
    blocks = system_blocks(batch)
    a = blocks.valid.shape[1]
    shifts = np.asarray(
        list(itertools.product(*(range(-m, m + 1) for m in n_img))), np.dtype(batch.dtype)
    )  # (K, 3), the zero shift included
    zero = jnp.asarray(np.all(shifts == 0, axis=-1))  # (K,)
    if n < s * a:  # rows (n, j): leading axis n, partner axis j
        rows = atom_rows(batch, blocks)
        d, cell, pbc = rows.displacements(), rows.cell, rows.pbc  # (N, A, 3), (N, 3, 3)
        pairs = rows.valid[:, None] & rows.partners.valid
        self_pair = rows.partners.index == jnp.arange(n, dtype=rows.partners.index.dtype)[:, None]
        lead = rows.system
        senders = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, a))
        receivers = rows.partners.index
    else:  # blocks (s, i, j): leading axes s, i, partner axis j
        d = min_image_vectors(blocks.positions, batch.cell, batch.pbc)  # (S, A, A, 3)
        cell, pbc = batch.cell[:, None], batch.pbc[:, None]  # broadcast over i
        pairs = blocks.valid[:, :, None] & blocks.valid[:, None, :]
        self_pair = jnp.eye(a, dtype=bool)[None]
        lead = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, a))
        senders = jnp.broadcast_to(blocks.index[:, :, None], (s, a, a))
        receivers = jnp.broadcast_to(blocks.index[:, None, :], (s, a, a))
    # the leading axes of the layout, then the partner j, then the shift k
    d = d[..., None, :] + matvec3(jnp.asarray(shifts), cell[..., None, None, :, :])
    shift_ok = jnp.all((shifts == 0) | pbc[..., None, None, :], axis=-1)  # (..., 1, K)
    ok = pairs[..., None] & shift_ok & ~(self_pair[..., None] & zero)
    r2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
    mask = (ok & (r2 < cutoff**2)).reshape(-1)
    shape = ok.shape
    senders = jnp.broadcast_to(senders[..., None], shape).reshape(-1)
    receivers = jnp.broadcast_to(receivers[..., None], shape).reshape(-1)
    sys = jnp.broadcast_to(lead[..., None, None], shape).reshape(-1)
    return Graph(
        senders=jnp.where(mask, senders, n).astype(jnp.int32),
        receivers=jnp.where(mask, receivers, n).astype(jnp.int32),
        vectors=jnp.where(mask[:, None], d.reshape(-1, 3), 0.0),
        mask=mask,
        sender_numbers=jnp.where(mask, _numbers(batch, senders), 0),
        receiver_numbers=jnp.where(mask, _numbers(batch, receivers), 0),
        system=jnp.where(mask, sys, s).astype(jnp.int32),
        invalid=cell_too_small(batch, cutoff, n_img),
        cutoff=cutoff,
    )


class GraphModel(Model):
    """Base of models whose energy is a function of the neighbor graph (module docstring).

    A subclass declares ``cutoff`` (Å; a field or a property) and implements
    :meth:`graph_energy`; the base builds the :class:`Graph` inside the differentiated function,
    so forces and stress come from the same reverse pass, and poisons (NaN) the results of a
    system whose graph is incomplete. Per-species properties come from
    ``graph.sender_numbers`` / ``receiver_numbers`` and ``batch.atomic_numbers``.

    Attributes
    ----------
    images : tuple of 3 int or None
        Static, keyword-only. Dense path: image shifts ``-images..images`` along each lattice
        vector. None: fitted to the cells of a run before compiling (:meth:`with_images_for`),
        or ``(1, 1, 1)`` when called under a transformation.

    Raises (of a call)
    ------------------
    ValueError
        From :func:`neighbor_graph`, for a neighbor list shorter than the cutoff.
    """

    cutoff: eqx.AbstractVar[float]
    images: tuple[int, int, int] | None = eqx.field(static=True, default=None, kw_only=True)

    @abc.abstractmethod
    def graph_energy(self, batch: Batch, graph: Graph) -> jax.Array:
        """Potential energy of each system in eV, shape (S,) (0 for empty slots).

        Parameters
        ----------
        batch : Batch
            The (strained) batch: ``atomic_numbers`` (N,), ``atom_mask`` (N,), ``system_idx``
            (N,), ``positions`` (N, 3) in Å, ``cell`` (S, 3, 3) in Å.
        graph : Graph
            Its edges within ``cutoff``.
        """

    def energy(self, batch: Batch) -> jax.Array:
        graph = neighbor_graph(batch, self.cutoff, self.images)
        return poison_systems(batch, self.graph_energy(batch, graph), graph.invalid)

    def prepare(self, batch: Batch) -> GraphModel:
        if self.images is not None or isinstance(batch.cell, jax.core.Tracer):
            return self
        if isinstance(batch.neighbors, NeighborList):
            return self
        mask = np.asarray(batch.system_mask)
        return self.with_images_for(np.asarray(batch.cell)[mask], np.asarray(batch.pbc)[mask])

    def with_images_for(self, cells, pbc) -> GraphModel:
        """A copy whose dense image range covers cells (n, 3, 3) with periodicity (n, 3)."""
        images = required_images_host(cells, pbc, float(self.cutoff))
        return dataclasses.replace(self, images=images)

    def system_faults(self, batch: Batch) -> jax.Array:
        """``Failure.CELL_TOO_SMALL`` for systems the dense image range cannot cover, (S,)."""
        if isinstance(batch.neighbors, NeighborList):
            return jnp.zeros(batch.max_systems, jnp.int32)
        n_img = (1, 1, 1) if self.images is None else tuple(self.images)
        bad = cell_too_small(batch, float(self.cutoff), n_img)
        return jnp.where(bad, int(Failure.CELL_TOO_SMALL), 0).astype(jnp.int32)
