"""Any JAX energy function of one system as a batched :class:`~fused_dynamics.models.base.Model`.

:class:`EnergyFunctionModel` wraps a function written for a single system,
``energy_fn(positions, numbers, mask, cell, pbc) -> scalar eV``, and evaluates it on every
system of a padded :class:`~fused_dynamics.batch.Batch` with ``jax.vmap``. Forces and stress
come from :class:`~fused_dynamics.models.base.Model`'s one reverse pass: the per-system blocks
are gathered from the (strained) batch inside the differentiated function, so nothing but the
energy has to be written.

Two helpers make JAX-MD energy functions (Schoenholz & Cubuk, "JAX, M.D.: A Framework for
Differentiable Physics", NeurIPS 2020; https://github.com/jax-md/jax-md) a few lines each:
:func:`periodic_box` (a box for JAX-MD's minimum-image ``space.periodic_general`` that never
wraps along non-periodic directions) and :func:`real_space_fractional` (fractional coordinates
with the derivative convention of ``periodic_general(box, fractional_coordinates=True)``). See
:class:`EnergyFunctionModel` for complete wrappers of JAX-MD's soft spheres, Lennard-Jones and
EAM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

import jax
import jax.numpy as jnp
import numpy as np

from ..batch import Batch
from .base import Model

__all__ = [
    "EnergyFunctionModel",
    "periodic_box",
    "real_space_fractional",
    "system_blocks",
    "PADDING_OFFSET",
]

#: Padded atoms of a system block sit at ``PADDING_OFFSET + 10 Å * k * (1, √2, √3)`` (k: the
#: index of the slot in the block): distinct points, far from a cluster near the origin.
PADDING_OFFSET = 1000.0
_PADDING_STEP = 10.0 * np.array([1.0, np.sqrt(2.0), np.sqrt(3.0)])


@final
class EnergyFunctionModel(Model):
    """A model from a JAX energy function of one system, vmapped over a padded batch.

    Parameters
    ----------
    energy_fn : callable
        ``energy_fn(positions, numbers, mask, cell, pbc) -> energy``, evaluated once per system
        slot under ``jax.vmap`` (so written for one system, with these shapes and units):

        - ``positions`` (A, 3) float, Cartesian, Å. ``A`` is the batch's
          ``max_atoms_per_system``; a system of ``n < A`` atoms has them in rows ``0..n-1``.
        - ``numbers`` (A,) int32 atomic numbers (0 for padded rows).
        - ``mask`` (A,) bool: True for the system's real atoms. Padded rows (``mask`` False)
          sit at distinct points ``PADDING_OFFSET + 10 Å k (1, √2, √3)`` (k: row index), which
          for a periodic cell may wrap anywhere, close to real atoms: the function must ignore
          them (no energy of their own, no pair with a real atom), typically with
          ``jnp.where`` on per-atom and per-pair terms. Padded rows are constants: nothing
          flows from them into forces or stress.
        - ``cell`` (3, 3) float, Å, **rows are lattice vectors** (ASE's convention; JAX-MD's
          ``box`` is its transpose, columns are lattice vectors). Always invertible: a
          direction the input left without a cell vector (a cluster with a zero cell, a slab
          without vacuum) holds a unit vector orthogonal to the given rows (the identity for a
          cluster without any cell; see ``Batch.virtual_cell``), which is not a period. A
          non-periodic direction with a cell vector given keeps it.
        - ``pbc`` (3,) bool: periodicity along each row of ``cell``. A function must wrap
          displacements along periodic rows only (:func:`periodic_box` does that for JAX-MD).

        It returns the potential energy of that system in eV: a scalar (shape ``()``). It may
        be any JAX-traceable callable: a plain function (static for ``jax.jit``; constants it
        closes over are baked into the compiled program), or a callable pytree (an
        ``equinox.Module``, a ``jax.tree_util.Partial``) whose array leaves are parameters:
        ``jax.grad`` of the model's outputs with respect to them works (the model is an
        Equinox module with ``energy_fn`` as its field).

    Notes
    -----
    The function sees the batch's strained positions and cells (the base class applies the
    strain ``r -> r (1 + ε)``, ``cell -> cell (1 + ε)`` to the batch before calling
    :meth:`energy`), so stress is ``(1/V) dE/dε`` of the function as written, with ``V`` the
    batch's cell volume (1 Å³ for a cluster without a cell: its stress is not physical). A
    function must therefore compute everything, wrapping included, from ``positions`` and
    ``cell`` as given (not from constants captured at construction).

    An empty slot is evaluated on a copy of the first occupied system's block (constants, cut
    off from gradients) and its result is replaced by 0, so no NaN from an all-padded input
    reaches the energies, forces, stress or parameter gradients. A system whose energy is not
    finite gets NaN forces and stress, and a run fails it as for any model.

    Raises
    ------
    TypeError
        At construction, if ``energy_fn`` is not callable.
    ValueError
        At the first call (when traced), if ``energy_fn`` returns anything but a scalar; the
        message gives the shape it returned.

    Examples
    --------
    JAX-MD's soft spheres for two species, periodic (any triclinic cell whose lattice-plane
    spacings exceed twice ``sigma``: ``periodic_general`` is minimum-image) or not. Padded atoms
    get the species index 2, which no parameter row has, so JAX-MD's dynamic-species sum
    drops them::

        import jax.numpy as jnp
        from jax_md import energy, space
        from fused_dynamics.models.energy_function import (
            EnergyFunctionModel, periodic_box, real_space_fractional)

        SPECIES = jnp.zeros(119, jnp.int32).at[36].set(1)  # atomic number -> row (Ar 0, Kr 1)
        SIGMA = jnp.array([[3.4, 3.5], [3.5, 3.6]])        # Å
        EPSILON = jnp.array([[0.01, 0.012], [0.012, 0.014]])  # eV

        def soft_spheres(positions, numbers, mask, cell, pbc):
            box = periodic_box(cell, pbc, positions, mask)   # rows: lattice vectors
            frac = real_space_fractional(positions, box)     # JAX-MD's derivative convention
            displacement, _ = space.periodic_general(box.T, fractional_coordinates=True)
            species = jnp.where(mask, SPECIES[numbers], 2)   # padded rows: no parameters
            fn = energy.soft_sphere_pair(displacement, species=2, sigma=SIGMA, epsilon=EPSILON)
            return fn(frac, species)

        model = EnergyFunctionModel(soft_spheres)
        out = model(batch)   # energy (S,) eV, forces (N, 3) eV/Å, stress (S, 3, 3) eV/Å³

    Give JAX-MD's parameters as jnp arrays: its wrappers pass them through
    ``util.maybe_downcast``, which makes Python floats and NumPy arrays **float32** even with
    ``jax_enable_x64`` (results then agree with float64 references to ~1e-7 only).
    Lennard-Jones is the same with ``energy.lennard_jones_pair(displacement, species=2,
    sigma=SIGMA, epsilon=EPSILON, r_onset=jnp.asarray(2.0), r_cutoff=jnp.asarray(2.5))``
    (JAX-MD scales ``r_onset`` and ``r_cutoff`` by the largest sigma and multiplies the energy
    by a C¹ switch in r² between them).
    JAX-MD's EAM takes the density, embedding and pair functions; close them over the mask::

        def eam(positions, numbers, mask, cell, pbc):
            box = periodic_box(cell, pbc, positions, mask)
            frac = real_space_fractional(positions, box)
            displacement, _ = space.periodic_general(box.T, fractional_coordinates=True)
            pair = mask[:, None] & mask[None, :]
            density = lambda r: jnp.where(pair, rho(r), 0.0)
            pairwise = lambda r: jnp.where(pair, phi(r), 0.0)
            # a padded atom has density 0; keep F and its derivative away from it
            embedding = lambda d: jnp.where(mask, F(jnp.where(mask, d, 1.0)), 0.0)
            return energy.eam(displacement, density, embedding, pairwise)(frac)

    (JAX-MD's ``eam`` adds ``rho(0)``, the self term of the diagonal, to every atom's
    density; the wrapper keeps that convention.)
    """

    energy_fn: Callable

    def __check_init__(self):
        if not callable(self.energy_fn):
            raise TypeError(
                "EnergyFunctionModel: energy_fn must be callable as energy_fn(positions (A, 3), "
                "numbers (A,), mask (A,), cell (3, 3), pbc (3,)) -> scalar energy in eV, got "
                f"{type(self.energy_fn).__name__}."
            )

    def energy(self, batch: Batch) -> jax.Array:
        """Potential energy of each system in eV, shape (S,) (0 for empty slots)."""
        positions, numbers, mask, cell, pbc = system_blocks(batch)
        energies = jax.vmap(self.energy_fn)(positions, numbers, mask, cell, pbc)
        shape = tuple(energies.shape[1:])
        if shape != ():
            raise ValueError(
                f"EnergyFunctionModel: energy_fn must return a scalar energy (eV) per system, "
                f"got an array of shape {shape} (per system). Sum per-atom energies over the "
                "real atoms (mask) before returning."
            )
        energies = jnp.asarray(energies, batch.dtype)
        return jnp.where(batch.system_mask, energies, 0.0)


def system_blocks(batch: Batch):
    """The per-system blocks that :class:`EnergyFunctionModel` passes to its function.

    Returns
    -------
    positions : Array, shape (S, A, 3)
        Å; padded rows at the fixed points described in :class:`EnergyFunctionModel`.
    numbers : Array, shape (S, A) int32
        0 in padded rows.
    mask : Array, shape (S, A) bool
    cell : Array, shape (S, 3, 3)
        Rows are lattice vectors.
    pbc : Array, shape (S, 3) bool

    Empty slots hold a copy of the first occupied slot's block, cut off from gradients (all
    padded, and the batch's own cell and pbc, when no slot is occupied).
    """
    s, a = batch.max_systems, batch.max_atoms_per_system
    index, valid = batch.system_view_index()  # (S, A)
    occupied = batch.system_mask
    donor = jnp.argmax(occupied)  # the first occupied slot (0 if none)
    real = occupied[:, None]
    source = jnp.where(occupied, jnp.arange(s), donor)  # (S,)
    index, valid = index[source], valid[source]

    k = jnp.arange(a, dtype=batch.dtype)[:, None]
    padding = PADDING_OFFSET + k * jnp.asarray(_PADDING_STEP, batch.dtype)  # (A, 3)
    gathered = batch.positions[index]  # (S, A, 3): strained positions (differentiated)
    own = jnp.where(valid[..., None], gathered, padding)
    copied = jax.lax.stop_gradient(own)
    positions = jnp.where(real[..., None], own, copied)

    numbers = jnp.where(valid, batch.atomic_numbers[index], 0).astype(jnp.int32)
    cell = jnp.where(
        real[..., None], batch.cell, jax.lax.stop_gradient(batch.cell[source])
    )  # (S, 3, 3)
    pbc = batch.pbc[source]
    return positions, numbers, valid, cell, pbc


def periodic_box(
    cell: jax.Array, pbc: jax.Array, positions: jax.Array, mask: jax.Array
) -> jax.Array:
    """A box for a minimum-image periodic space that never wraps along non-periodic rows.

    JAX-MD's ``space.periodic_general`` wraps every fractional coordinate; a cluster or a slab
    evaluated by the same function as bulk systems needs a box whose non-periodic rows are long
    enough that no displacement between real atoms is wrapped along them. Each non-periodic row
    is stretched along its direction so that its lattice-plane spacing becomes
    ``spacing + 2 * span``, where ``span`` bounds the distance between any two real atoms
    (twice the largest distance from the first one). Periodic rows are unchanged. Not longer:
    JAX-MD wraps with ``mod(ds + 1/2, 1) - 1/2``, which rounds a fractional displacement to the
    absolute precision of 1/2, so a box ``L`` Å long costs ``~1e-16 * L / |d|`` relative
    precision (1e-12 for a 1e4 Å box).

    The stretch factors are constants for differentiation (``stop_gradient``): a function uses
    the returned box both for the fractional coordinates (:func:`real_space_fractional`) and
    for the space, so the displacements, and their derivatives with respect to the strained
    positions and cell, are exact whatever the factors.

    Parameters
    ----------
    cell : Array, shape (3, 3)
        Rows are lattice vectors, Å (invertible, as :class:`EnergyFunctionModel` passes it).
    pbc : Array, shape (3,) bool
    positions : Array, shape (A, 3)
        Cartesian, Å.
    mask : Array, shape (A,) bool
        The real atoms (padded rows are ignored, and may be wrapped anywhere).

    Returns
    -------
    Array, shape (3, 3)
        Rows are lattice vectors (transpose it for JAX-MD's ``box``).
    """
    first = positions[jnp.argmax(mask)]
    reach = jnp.where(mask, jnp.linalg.norm(positions - first, axis=-1), 0.0)
    span = 2.0 * jnp.max(reach)
    spacing = 1.0 / jnp.linalg.norm(jnp.linalg.inv(cell), axis=-2)  # of the planes of each row
    factor = jax.lax.stop_gradient(1.0 + 2.0 * span / spacing)
    return jnp.where(pbc[..., None], cell, cell * factor[..., None])


@jax.custom_jvp
def real_space_fractional(positions: jax.Array, cell: jax.Array) -> jax.Array:
    """Fractional coordinates ``positions @ inv(cell)`` with JAX-MD's derivative convention.

    JAX-MD's ``space.periodic_general(box, fractional_coordinates=True)`` maps fractional
    displacements to real space with ``space.transform``, whose custom JVP passes the tangent
    of the fractional coordinates through unchanged: it treats it as a real-space (Å)
    tangent, so that ``jax.grad`` with respect to fractional positions returns ``dE/dr``. Plain
    ``positions @ inv(cell)`` would then give wrong forces (off by ``inv(cell)``) and a wrong
    stress. This function has the same value, and the tangent JAX-MD expects: the real-space
    displacement ``dr - s @ dcell``, which the ``dcell`` term of ``transform`` completes to the
    exact derivative of ``r_j - r_i + n @ cell`` in both positions and cell.

    Parameters
    ----------
    positions : Array, shape (A, 3)
        Cartesian, Å.
    cell : Array, shape (3, 3)
        Rows are lattice vectors, Å (the same matrix, transposed, as JAX-MD's ``box``).

    Returns
    -------
    Array, shape (A, 3)
        Fractional coordinates, not wrapped.
    """
    return positions @ jnp.linalg.inv(cell)


@real_space_fractional.defjvp
def _real_space_fractional_jvp(primals, tangents):
    positions, cell = primals
    d_positions, d_cell = tangents
    frac = real_space_fractional(positions, cell)
    return frac, d_positions - frac @ d_cell
