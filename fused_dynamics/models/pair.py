"""Pair potentials: a dense all-pairs-within-system path and a neighbor-list path.

The dense path pairs every atom with every atom of its own system (the ``max_atoms_per_system``
block of the batch) and with their periodic images: ``O(N * A * K)`` work for N atom slots, A atoms
per system and K image shifts. It is exact for any cell (triclinic, mixed periodicity, cells
smaller than twice the cutoff) and is the reference for the neighbor-list path.

The neighbor-list path (``model.with_neighbors(skin=...)``) sums the same ``pair_energy`` over
the pairs of ``batch.neighbors`` (a :class:`~fused_dynamics.models.neighbors.NeighborList`):
``O(N)`` work per step. Displacements are ``r_j - r_i + shift @ cell`` with the batch's (strained)
cell, so forces and stress come from the same autodiff pass as on the dense path.
"""

from __future__ import annotations

import dataclasses
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import segment
from ..batch import Batch
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


class PairPotential(Model):
    """Base class of isotropic pair potentials ``E = 1/2 Σ_i Σ_j φ(r_ij)`` within each system.

    Subclasses give :meth:`pair_energy` (``φ(r)`` for ``r < cutoff``) and ``cutoff`` (a static
    float field, or a property).

    Parameters
    ----------
    images : tuple of 3 int, optional
        Static number of periodic image shifts to include along each lattice vector. ``None``
        means: computed from the cells when called on a concrete batch, else ``(1, 1, 1)``. A cell
        too small for the images given is caught at run time with an error that names the system
        (never silently wrong forces). Dense path only.
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
    """

    # ``cutoff`` (Å) is given by each subclass, as a static field or a property; it is not declared
    # here because a base-class field would come first in every subclass's positional signature.
    images: tuple[int, int, int] | None = eqx.field(static=True, default=None, kw_only=True)
    skin: float | None = eqx.field(static=True, default=None, kw_only=True)
    auto_refresh: bool = eqx.field(static=True, default=True, kw_only=True)

    def pair_energy(self, r: jax.Array) -> jax.Array:
        raise NotImplementedError

    def prepare(self, batch: Batch) -> PairPotential:
        if self.images is not None or isinstance(batch.cell, jax.core.Tracer):
            return self
        if self.skin is not None:  # the neighbor-list path needs no image range
            return self
        return self.with_images(batch)

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

    def _neighbor_energy(self, batch: Batch) -> jax.Array:
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
        lost = False
        if self.auto_refresh:
            fresh = nl.update(batch)
            # A rebuild here is not stored, so an overflow of it would never reach the run loop:
            # make it loud (NaN energies) instead of silently missing pairs.
            lost = fresh.overflow & ~nl.overflow
            nl = fresh
        s = batch.max_systems
        d = nl.displacements(batch.positions, batch.cell, batch.system_idx)
        r2 = jnp.sum(d * d, axis=-1)
        ok = nl.mask & (r2 < self.cutoff**2)
        # masked pairs at r = cutoff / 2, as on the dense path (finite φ and derivatives)
        r = jnp.sqrt(jnp.where(ok, r2, 0.25 * self.cutoff**2))
        phi = jnp.where(ok, self.pair_energy(r), 0.0)
        weight = 1.0 if nl.half else 0.5
        energy = segment.segment_sum(weight * phi, nl.pair_system(batch.system_idx, s), s)
        # a factor, not a select: forces and stress (its derivatives) must be NaN too, never the
        # zeros that d/dx where(lost, nan, e) would give
        return energy * jnp.where(lost, jnp.nan, 1.0)

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
        if self.skin is not None:
            return self._neighbor_energy(batch)
        return self._dense_energy(batch)

    def _dense_energy(self, batch: Batch) -> jax.Array:
        n_img = (1, 1, 1) if self.images is None else tuple(self.images)
        need = required_images(batch.cell, batch.pbc, self.cutoff)
        # a non-finite cell is that system's failure (reported by the run), not a run-wide error
        finite = jnp.all(jnp.isfinite(batch.cell), axis=(-2, -1))
        too_small = batch.system_mask & finite & jnp.any(need > jnp.asarray(n_img), axis=-1)
        # One static message per slot, so that the error names the offending system.
        cell = eqx.branched_error_if(
            batch.cell,
            jnp.any(too_small),
            jnp.argmax(too_small),
            [
                f"System slot {s}: its periodic cell is too small for cutoff {self.cutoff} with "
                f"the static image range {n_img} of {type(self).__name__}: build the model with "
                "images=... large enough (see fused_dynamics.models.required_images) or call "
                "model.with_images(batch)."
                for s in range(batch.max_systems)
            ],
        )
        shifts = jnp.asarray(
            list(itertools.product(*(range(-n, n + 1) for n in n_img))), dtype=batch.dtype
        )  # (K, 3) in units of the lattice vectors

        index, valid = batch.system_view_index()  # (S, A)
        sys = jnp.minimum(batch.system_idx, batch.max_systems - 1)
        j = index[sys]  # (N, A)
        pair_ok = valid[sys] & batch.atom_mask[:, None]
        inv_cell = jnp.linalg.inv(cell)
        pbc = batch.pbc[sys]  # (N, 3)
        # Gathered rows outside the atom's own system (j of an invalid pair points anywhere) are
        # replaced by the atom's own position before any arithmetic: another system's NaN would
        # otherwise reach this system through the backward pass (0 * NaN = NaN).
        own = batch.positions[:, None]
        pos_j = jnp.where(pair_ok[..., None], batch.positions[j], own)
        ds = jnp.einsum("nai,nij->naj", pos_j - own, inv_cell[sys])
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
        phi = jnp.where(ok, self.pair_energy(r), 0.0)
        atom_energy = 0.5 * jnp.sum(phi, axis=(1, 2))
        return batch.sum_atoms(atom_energy)


def _switch_r2(r: jax.Array, cutoff: float, onset: float) -> jax.Array:
    """ASE's (and JAX-MD's) C¹ switch in r²: 1 below ``onset``, 0 at ``cutoff``."""
    r2, rc2, ro2 = r * r, cutoff**2, onset**2
    s = (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r2 < ro2, 1.0, s)


def _switch_quintic(r: jax.Array, cutoff: float, onset: float) -> jax.Array:
    """ASE's ``MorsePotential`` C² switch: 1 below ``onset``, 0 at ``cutoff``."""
    s = 1.0 - (r - onset) / (cutoff - onset)
    return jnp.where(s >= 1.0, 1.0, 6.0 * s**5 - 15.0 * s**4 + 10.0 * s**3)


class LennardJones(PairPotential):
    """Lennard-Jones ``φ(r) = 4ε[(σ/r)^12 - (σ/r)^6]``.

    Parameters
    ----------
    sigma, epsilon : float
        Å and eV.
    cutoff : float
        Å; pairs at ``r >= cutoff`` do not interact.
    shift : bool, default True
        Shift ``φ`` to zero at the cutoff (ASE's ``LennardJones(smooth=False)``). Ignored when
        ``switch_onset`` is given.
    switch_onset : float, optional
        Multiply ``φ`` by the C¹ switch of ASE's ``LennardJones(smooth=True, ro=switch_onset)``
        (the same form as JAX-MD's ``multiplicative_isotropic_cutoff``).
    """

    sigma: float | jax.Array
    epsilon: float | jax.Array
    cutoff: float = eqx.field(static=True)
    shift: bool = eqx.field(static=True, default=True)
    switch_onset: float | None = eqx.field(static=True, default=None)

    def pair_energy(self, r):
        def lj(r):
            c6 = (self.sigma / r) ** 6
            return 4.0 * self.epsilon * (c6 * c6 - c6)

        if self.switch_onset is not None:
            return lj(r) * _switch_r2(r, self.cutoff, self.switch_onset)
        if self.shift:
            return lj(r) - lj(jnp.asarray(self.cutoff, r.dtype))
        return lj(r)


class Morse(PairPotential):
    """Morse ``φ(r) = D[e^{-2α(r - r0)} - 2e^{-α(r - r0)}]``.

    Parameters
    ----------
    D, alpha, r0 : float
        Well depth (eV), stiffness (1/Å), equilibrium distance (Å). ASE's ``MorsePotential``
        has ``epsilon = D`` and ``rho0 = alpha * r0``.
    cutoff : float
        Å.
    shift : bool, default True
        Shift ``φ`` to zero at the cutoff (ignored when ``switch_onset`` is given).
    switch_onset : float, optional
        Multiply ``φ`` by ASE's quintic switch between ``switch_onset`` and ``cutoff``
        (``MorsePotential(rcut1=switch_onset / r0, rcut2=cutoff / r0)``).
    """

    D: float | jax.Array
    alpha: float | jax.Array
    r0: float | jax.Array
    cutoff: float = eqx.field(static=True)
    shift: bool = eqx.field(static=True, default=True)
    switch_onset: float | None = eqx.field(static=True, default=None)

    def pair_energy(self, r):
        def morse(r):
            e = jnp.exp(-self.alpha * (r - self.r0))
            return self.D * e * (e - 2.0)

        if self.switch_onset is not None:
            return morse(r) * _switch_quintic(r, self.cutoff, self.switch_onset)
        if self.shift:
            return morse(r) - morse(jnp.asarray(self.cutoff, r.dtype))
        return morse(r)


class SoftSphere(PairPotential):
    """Soft sphere ``φ(r) = ε/α (1 - r/σ)^α`` for ``r < σ`` (JAX-MD's ``soft_sphere``).

    Parameters
    ----------
    sigma : float
        Contact distance in Å; also the cutoff.
    epsilon : float
        eV.
    alpha : float, default 2.0
    """

    sigma: float = eqx.field(static=True)
    epsilon: float | jax.Array = 1.0
    alpha: float | jax.Array = 2.0

    @property
    def cutoff(self) -> float:
        return float(self.sigma)

    def pair_energy(self, r):
        return self.epsilon / self.alpha * (1.0 - r / self.sigma) ** self.alpha
