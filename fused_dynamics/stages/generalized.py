"""Generalized vectors of the FIRE optimizers: atom rows plus, with a cell filter, cell rows.

A generalized vector (a velocity, a force, a step) is a pair ``(atoms, cell)``: the atom rows,
shape (N, 3), and the three cell rows of each system, shape (S, 3, 3), or None without a cell
filter (:class:`~fused_dynamics.stages.cell_filter.FrechetCellFilter`). Every reduction is per
system, over the system's atom rows and its cell rows together, so a padded batch of systems
relaxes exactly as each system alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..batch import Batch
from .base import safe_sqrt

__all__ = ["Dof", "map_dof", "vdot", "scale", "select", "cap_norm"]

# A generalized vector: (atom rows (N, 3), cell rows (S, 3, 3) or None without a cell filter).
Dof = tuple[jax.Array, jax.Array | None]


def map_dof(f, *xs: Dof) -> Dof:
    """Apply ``f`` row-block by row-block: to the atom rows, and to the cell rows if any."""
    atoms = f(*(x[0] for x in xs))
    cell = None if xs[0][1] is None else f(*(x[1] for x in xs))
    return atoms, cell


def vdot(batch: Batch, a: Dof, b: Dof) -> jax.Array:
    """Per-system dot product over atom rows and cell rows, shape (S,)."""
    atom_part = jnp.where(batch.atom_mask, jnp.sum(a[0] * b[0], axis=-1), 0.0)
    out = batch.sum_atoms(atom_part)
    if a[1] is not None:
        out = out + jnp.sum(a[1] * b[1], axis=(-2, -1))
    return out


def scale(batch: Batch, c: jax.Array, a: Dof) -> Dof:
    """Multiply each system's rows by the per-system scalar ``c`` (S,)."""
    atoms = batch.to_atoms_axis(c)[:, None] * a[0]
    cell = None if a[1] is None else c[:, None, None] * a[1]
    return atoms, cell


def select(batch: Batch, c: jax.Array, a: Dof, b: Dof) -> Dof:
    """Per-system ``where(c, a, b)`` on generalized vectors (``c`` bool (S,))."""
    atoms = jnp.where(batch.to_atoms_axis(c)[:, None], a[0], b[0])
    cell = None if a[1] is None else jnp.where(c[:, None, None], a[1], b[1])
    return atoms, cell


def cap_norm(batch: Batch, d: Dof, maxstep) -> Dof:
    """Scale each system's step so that its norm over all rows is at most ``maxstep`` (ASE)."""
    norm = safe_sqrt(vdot(batch, d, d))
    factor = jnp.where(norm > maxstep, maxstep / jnp.where(norm > 0, norm, 1.0), 1.0)
    return scale(batch, factor, d)
