"""Per-system observables: kinetic energy, temperature, fmax, pressure; initial velocities.

Temperature convention: ``T = 2 KE / (n_dof k_B)`` with ``n_dof = 3 n_atoms`` per system minus
what the constraints remove (fixed components, 3 for a fixed centre of mass), as
``ase.Atoms.get_temperature`` (no degrees of freedom removed for the centre of mass otherwise).
Padding atoms never count.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from ase import units

from . import constraints, segment
from . import validation as v
from .batch import Batch

__all__ = [
    "kinetic_energy",
    "temperature",
    "fmax",
    "pressure",
    "initialize_velocities",
    "degrees_of_freedom",
]


def kinetic_energy(batch: Batch) -> jax.Array:
    """Kinetic energy ``Σ ½ m v²`` of each system in eV, shape (S,)."""
    ke_atom = 0.5 * batch.masses * jnp.sum(batch.velocities**2, axis=-1)
    return batch.sum_atoms(jnp.where(batch.atom_mask, ke_atom, 0.0))


def degrees_of_freedom(batch: Batch) -> jax.Array:
    """``3 n_atoms`` minus the constrained components per system, shape (S,), float dtype.

    ASE's convention (``Atoms.get_temperature``): each fixed Cartesian component removes one, a
    fixed centre of mass three (:func:`fused_dynamics.constraints.removed_dof`).
    """
    return (3 * batch.n_atoms - constraints.removed_dof(batch)).astype(batch.dtype)


def temperature(batch: Batch) -> jax.Array:
    """Instantaneous temperature of each system in K, shape (S,) (0 for empty slots)."""
    dof = degrees_of_freedom(batch)
    return 2.0 * kinetic_energy(batch) / (jnp.maximum(dof, 1.0) * units.kB)


def fmax(batch: Batch, forces: jax.Array | None = None) -> jax.Array:
    """Largest atomic force norm of each system in eV/Å, shape (S,) (0 for empty slots)."""
    f = batch.forces if forces is None else forces
    norm = jnp.where(batch.atom_mask, jnp.linalg.norm(f, axis=-1), 0.0)
    return jnp.maximum(batch.max_atoms_of(norm), 0.0)


def pressure(batch: Batch, include_kinetic: bool = True) -> jax.Array:
    """Pressure of each system in eV/Å³, shape (S,): ``-tr(σ)/3 + 2 KE / (3 V)``."""
    p = -jnp.trace(batch.stress, axis1=-2, axis2=-1) / 3.0
    if include_kinetic:
        volume = jnp.where(batch.system_mask, batch.volume, 1.0)
        p = p + 2.0 * kinetic_energy(batch) / (3.0 * volume)
    return jnp.where(batch.system_mask, p, 0.0)


def initialize_velocities(
    batch: Batch,
    temperature: float | jax.Array,
    key: jax.Array,
    remove_com: bool = True,
    rescale: bool = True,
) -> Batch:
    """Draw Maxwell–Boltzmann velocities for every occupied system.

    Parameters
    ----------
    batch : Batch
    temperature : float or Array of shape (S,)
        Target temperature in K, finite and >= 0; per slot if an array (``S`` =
        ``batch.max_systems``).
    key : PRNG key
        Folded with each system's ``system_id`` and the atom's index inside its system, so a
        system draws the same velocities whatever slot it occupies.
    remove_com : bool, default True
        Subtract each system's centre-of-mass velocity (zero total momentum).
    rescale : bool, default True
        Rescale each system to exactly ``temperature`` (ASE's convention, ``3 n_atoms`` dof).
        A one-atom system with ``remove_com`` has no motion left and keeps zero velocity.
        Fixed components (``batch.fixed``) get zero velocity, and a system with fixed atoms keeps
        its centre-of-mass velocity (its momentum is not conserved anyway), unless it has
        ``FixCom`` (``batch.fix_com``), which holds its momentum at zero: the free components
        then carry the correction, per axis and weighted by mass, as the constraint does. The
        rescale uses the constrained degrees of freedom (:func:`degrees_of_freedom`).

    Returns
    -------
    Batch
        With new velocities; padding atoms keep zero velocity.

    Raises
    ------
    ValueError
        ``temperature`` negative, NaN or infinite, or an array that is not one value per slot
        (checked where the values are known, outside a trace).
    """
    v.check_real(
        "initialize_velocities",
        "temperature",
        temperature,
        v.non_negative(),
        unit="K",
        per_system=True,
    )
    shape = jnp.shape(temperature)
    if shape not in ((), (1,), (batch.max_systems,)):
        raise ValueError(
            f"initialize_velocities: temperature must be one value or one per slot "
            f"({batch.max_systems} slots), got shape {shape}."
        )
    t = jnp.broadcast_to(jnp.asarray(temperature, batch.dtype), (batch.max_systems,))
    # Called eagerly, compile (one compilation per shape instead of op-by-op dispatch); called
    # while tracing, trace inline.
    tracing = isinstance(batch.positions, jax.core.Tracer)
    impl = _initialize_velocities if tracing else _initialize_velocities_jit
    return impl(batch, t, key, bool(remove_com), bool(rescale))


def _initialize_velocities(
    batch: Batch, t: jax.Array, key: jax.Array, remove_com: bool, rescale: bool
) -> Batch:
    s = batch.max_systems
    local = segment.local_index(batch.system_idx, s)
    sid = batch.to_atoms_axis(batch.system_id)

    def draw(sid, i):
        k = jax.random.fold_in(jax.random.fold_in(key, sid), i)
        return jax.random.normal(k, (3,), batch.dtype)

    z = jax.vmap(draw)(sid, local)
    kt = batch.to_atoms_axis(t * units.kB)
    v = z * jnp.sqrt(kt / batch.masses)[:, None]
    v = jnp.where(batch.atom_mask[:, None] & ~batch.fixed, v, 0.0)
    v0 = v
    # the momentum of a system with fixed atoms is not conserved: its centre of mass is left alone
    pinned = batch.sum_atoms(jnp.any(batch.fixed, axis=-1).astype(jnp.int32)) > 0
    if remove_com:
        p = batch.sum_atoms(batch.masses[:, None] * v)
        m = batch.sum_atoms(jnp.where(batch.atom_mask, batch.masses, 0.0))
        v_com = p / jnp.maximum(m, 1e-30)[:, None]
        # A one-atom system has only centre-of-mass motion: set it to exactly zero, since
        # v - p/m leaves a rounding residue that the rescale below would blow up to full speed.
        keep = batch.atom_mask & (batch.to_atoms_axis(batch.n_atoms) > 1)
        v = jnp.where(keep[:, None], v - batch.to_atoms_axis(v_com), 0.0)
        v = jnp.where(batch.to_atoms_axis(pinned)[:, None], v0, v)
    # FixCom holds the momentum at zero whatever remove_com says; with fixed components too,
    # over the free ones per axis, as the constraint does (constraints.constrain_update)
    held = batch.fix_com & (pinned | (not remove_com))
    m_free = constraints.free_masses(batch)
    shift = batch.sum_atoms(m_free * v) / jnp.maximum(batch.sum_atoms(m_free), 1e-30)
    move = batch.to_atoms_axis(held)[:, None] & (m_free > 0)
    v = jnp.where(move, v - batch.to_atoms_axis(shift), v)
    new = batch.replace(velocities=v)
    if rescale:
        current = temperature(new)
        factor = jnp.where(current > 0, jnp.sqrt(t / jnp.where(current > 0, current, 1.0)), 0.0)
        new = new.replace(velocities=v * batch.to_atoms_axis(factor)[:, None])
    return new


_initialize_velocities_jit = eqx.filter_jit(_initialize_velocities)
