"""Constraints: atoms or Cartesian directions held fixed, and a fixed centre of mass.

A :class:`~fused_dynamics.Batch` carries two masks:

- ``fixed`` (N, 3) bool: direction ``k`` of atom ``i`` is held (ASE's ``FixAtoms`` holds all three
  directions of an atom, ``FixCartesian(a, mask)`` the directions where ``mask`` is True);
- ``fix_com`` (S,) bool: the system's centre of mass is held (ASE's ``FixCom``).

The engine enforces them for every sub-stage, so no integrator or optimizer has to know about
them (ASE's ``Atoms.set_positions`` / ``get_forces`` / ``set_momenta`` semantics):

- after the model evaluation, :func:`project_forces` zeroes the fixed components and removes the
  mass-weighted centre-of-mass force (ASE ``FixCom.adjust_forces``, Eqs. 3 and 7 of
  doi:10.1021/jp9722824);
- after each half-update, :func:`constrain_update` puts fixed components back at their old
  positions with zero velocity, and shifts a ``fix_com`` system back to its old centre of mass
  with zero centre-of-mass velocity (ASE ``adjust_positions`` / ``adjust_momenta``).

The number of degrees of freedom of a system is ``3 n_atoms`` minus the fixed components minus 3
for ``fix_com`` (ASE's ``get_removed_dof``); every temperature, thermostat and barostat uses it
(:func:`fused_dynamics.observables.degrees_of_freedom`).

Other ASE constraint types are refused by :func:`from_ase` with an error that names the type and
the system: a constraint silently dropped would let "fixed" atoms move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ase.constraints import FixAtoms, FixCartesian, FixCom

__all__ = [
    "from_ase",
    "to_ase",
    "project_forces",
    "constrain_update",
    "keep_fixed",
    "removed_dof",
    "free_masses",
]

SUPPORTED = (FixAtoms, FixCartesian, FixCom)


def from_ase(atoms, system: int) -> tuple[np.ndarray, bool]:
    """Masks of the constraints of one ``ase.Atoms``.

    Parameters
    ----------
    atoms : ase.Atoms
    system : int
        Index of the system in the caller's list (named in errors).

    Returns
    -------
    fixed : numpy.ndarray, shape (n_atoms, 3) bool
    fix_com : bool
        A ``FixCom`` constraint, or ``atoms.info["fix_com"]`` True: how an extxyz output of
        this package records ``FixCom``, which ASE's extxyz format cannot hold.

    Raises
    ------
    ValueError
        A constraint type other than ``FixAtoms``, ``FixCartesian`` and ``FixCom`` (named), or an
        atom index out of range.
    """
    n = len(atoms)
    fixed = np.zeros((n, 3), bool)
    flag = atoms.info.get("fix_com", False)
    fix_com = isinstance(flag, (bool, np.bool_)) and bool(flag)
    for c in atoms.constraints:
        if isinstance(c, FixCom):
            fix_com = True
            continue
        if not isinstance(c, FixAtoms | FixCartesian):
            raise ValueError(
                f"system {system}: constraint {type(c).__name__} is not supported (supported: "
                "FixAtoms, FixCartesian, FixCom); remove it or express it with those. It is "
                "refused rather than dropped, which would let the constrained atoms move."
            )
        index = np.asarray(c.get_indices(), int)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise ValueError(
                f"system {system}: {type(c).__name__} refers to atom {int(index.max())} of a "
                f"system of {n} atoms."
            )
        mask = np.asarray(getattr(c, "mask", (True, True, True)), bool)
        fixed[index] |= mask[None, :]
    return fixed, fix_com


def to_ase(fixed: np.ndarray, fix_com: bool) -> list:
    """ASE constraints equal to the masks of one system (inverse of :func:`from_ase`).

    Atoms with all three directions fixed become one ``FixAtoms``; the others one
    ``FixCartesian`` per distinct direction mask; ``fix_com`` adds ``FixCom``.
    """
    fixed = np.asarray(fixed, bool)
    out = []
    whole = np.all(fixed, axis=1)
    if whole.any():
        out.append(FixAtoms(indices=np.flatnonzero(whole)))
    partial = np.any(fixed, axis=1) & ~whole
    for mask in np.unique(fixed[partial], axis=0):
        atoms = np.flatnonzero(partial & np.all(fixed == mask, axis=1))
        out.append(FixCartesian(atoms, mask=tuple(bool(m) for m in mask)))
    if fix_com:
        out.append(FixCom())
    return out


def removed_dof(batch) -> jax.Array:
    """Degrees of freedom removed by the constraints of each system, shape (S,) int32."""
    per_atom = jnp.sum(batch.fixed & batch.atom_mask[:, None], axis=-1, dtype=jnp.int32)
    return batch.sum_atoms(per_atom) + 3 * batch.fix_com.astype(jnp.int32)


def _com_weights(batch) -> tuple[jax.Array, jax.Array]:
    """Per-atom masses (0 for padding) and per-atom ``fix_com`` of its system."""
    m = jnp.where(batch.atom_mask, batch.masses, 0.0)
    return m, batch.to_atoms_axis(batch.fix_com)


def _free_weights(batch, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per atom, whether its system has a fixed component, shape (N,); and the masses of the
    free components (0 where fixed), shape (N, 3): the weights of a ``fix_com`` system that
    also has fixed components."""
    fixed = batch.fixed & batch.atom_mask[:, None]
    partly = batch.to_atoms_axis(batch.sum_atoms(fixed.astype(jnp.int32)).sum(-1) > 0)
    return partly, jnp.where(fixed, 0.0, m[:, None])


def free_masses(batch) -> jax.Array:
    """Each atom's mass on its free components, 0 on fixed ones and on padding, shape (N, 3):
    the weights over which a ``fix_com`` system with fixed components holds its centre of mass
    and momentum (amu)."""
    return _free_weights(batch, _com_weights(batch)[0])[1]


def project_forces(batch, forces: jax.Array) -> jax.Array:
    """Forces with the constrained components removed, shape (N, 3).

    Fixed components become 0; in a ``fix_com`` system ``F_i - m_i (Σ m F) / Σ m²`` (ASE),
    the sums over the free components only (per axis) when it also has fixed ones. Systems
    without constraints are returned bit for bit.
    """

    def com_projection(forces):
        m, com = _com_weights(batch)
        mm = jnp.maximum(batch.sum_atoms(m * m), 1e-30)[:, None]
        lmd = batch.sum_atoms(m[:, None] * forces) / mm
        projected = forces - m[:, None] * batch.to_atoms_axis(lmd)
        # with fixed components too: the projection over the free components only (the
        # fixed ones' forces are removed, not part of what the centre of mass feels)
        partly, m_free = _free_weights(batch, m)
        mm_free = jnp.maximum(batch.sum_atoms(m_free * m_free), 1e-30)
        lmd_free = batch.sum_atoms(m_free * forces) / mm_free
        projected = jnp.where(
            partly[:, None], forces - m_free * batch.to_atoms_axis(lmd_free), projected
        )
        return jnp.where(com[:, None], projected, forces)

    # the per-system sums only when some system has FixCom (the common case has none); either
    # branch gives the same bits for the systems without it
    forces = jax.lax.cond(jnp.any(batch.fix_com), com_projection, lambda f: f, forces)
    return jnp.where(batch.fixed, 0.0, forces)


# the integer type of each float's width, for selecting floats by their bits
_SAME_WIDTH_INT = {
    jnp.dtype(jnp.float16): jnp.dtype(jnp.int16),
    jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.int16),
    jnp.dtype(jnp.float32): jnp.dtype(jnp.int32),
    jnp.dtype(jnp.float64): jnp.dtype(jnp.int64),
}


@jax.custom_jvp
def keep_fixed(fixed: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
    """``where(fixed, old, new)`` for (N, 3) arrays, bit for bit, written with bitwise ops.

    Parameters
    ----------
    fixed : Array, shape (N, 3) bool
        Components held fixed.
    old, new : Array, shape (N, 3)
        Values (positions, Å) before and after an update, float16, bfloat16, float32 or
        float64; other or mixed dtypes take ``jnp.where`` itself (the same result).

    Returns
    -------
    Array, shape (N, 3)
        ``old`` where ``fixed``, else ``new``.

    Notes
    -----
    XLA:CPU (jax 0.10.1) compiles a select whose three operands are (N, 3) arrays, when it is
    not fused with the arithmetic that produced them, to a kernel that goes row by row: about
    0.1 ms for 1,728 atoms, against 3 us for the same select as integer ``and``/``or`` of the
    floats' bits. The derivative is that of ``where`` (a custom JVP), so differentiable runs are
    unchanged.
    """
    dtype = jnp.dtype(old.dtype)
    if jnp.dtype(new.dtype) != dtype or dtype not in _SAME_WIDTH_INT:
        return jnp.where(fixed, old, new)  # mixed or unusual dtypes: the select itself
    bits = _SAME_WIDTH_INT[dtype]
    keep = -fixed.astype(bits)  # all ones where fixed, else zeros
    old_bits = jax.lax.bitcast_convert_type(old, bits)
    new_bits = jax.lax.bitcast_convert_type(new, bits)
    return jax.lax.bitcast_convert_type((old_bits & keep) | (new_bits & ~keep), old.dtype)


@keep_fixed.defjvp
def _keep_fixed_jvp(primals, tangents):
    fixed, old, new = primals
    _, d_old, d_new = tangents
    return keep_fixed(fixed, old, new), jnp.where(fixed, d_old, d_new)


def constrain_update(old, new, mask: jax.Array):
    """``new`` (a batch after a half-update of the systems in ``mask``) with constraints applied.

    Fixed components keep ``old`` positions and get zero velocity; a ``fix_com`` system in
    ``mask`` is shifted back to its old centre of mass and its centre-of-mass velocity removed
    (ASE's ``adjust_positions`` and ``adjust_momenta``), by its free components only when it
    also has fixed ones, so that both constraints hold together. Systems outside ``mask``
    (where ``new`` is ``old``, as :func:`~fused_dynamics.stages.base.select_batch` leaves them)
    and systems without constraints are returned bit for bit, fixed components' velocities included.
    """

    def com_shift(arrays):
        positions, velocities = arrays
        m, com = _com_weights(old)
        com = (com & old.to_atoms_axis(mask))[:, None]
        total = jnp.maximum(old.sum_atoms(m), 1e-30)[:, None]
        # A system that also has fixed components moves its free ones only, by the mass of
        # the free ones per axis, so that its centre of mass and momentum are held while the
        # fixed ones stay put (ASE applies FixAtoms and FixCom one after the other, and the
        # second undoes part of the first). Systems without fixed components: the plain shift.
        partly, m_free = _free_weights(old, m)
        free_total = jnp.maximum(old.sum_atoms(m_free), 1e-30)
        kept = jnp.where(old.fixed & old.atom_mask[:, None], old.positions, positions)
        shift = old.sum_atoms(m[:, None] * old.positions) - old.sum_atoms(m[:, None] * kept)
        momentum = old.sum_atoms(m_free * velocities)
        per_axis = jnp.where(
            partly[:, None], old.to_atoms_axis(free_total), old.to_atoms_axis(total)
        )
        return (
            jnp.where(com, positions + old.to_atoms_axis(shift) / per_axis, positions),
            jnp.where(com, velocities - old.to_atoms_axis(momentum) / per_axis, velocities),
        )

    arrays = (new.positions, new.velocities)
    positions, velocities = jax.lax.cond(
        jnp.any(old.fix_com & mask), com_shift, lambda a: a, arrays
    )
    # Only systems in ``mask`` lose the velocity of their fixed components: a system outside it
    # (the priming pass, or a branch computed anyway under vmap or on a GPU) keeps its own.
    stopped = old.fixed & old.to_atoms_axis(mask)[:, None]
    return new.replace(
        positions=keep_fixed(old.fixed, old.positions, positions),
        velocities=jnp.where(stopped, 0.0, velocities),
    )
