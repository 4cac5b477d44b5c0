"""The velocity-Verlet kick and drift, shared by NVE, Nosé–Hoover and Langevin.

Both take a per-system time ``h`` (shape (S,), ASE's time unit Å·sqrt(amu/eV); see
:func:`~fused_dynamics.stages.base.fs_to_ase_time`) and update every atom slot, unmasked, as a
sub-stage's halves do (the base class selects per system). Padding atoms get ``h = 0``.
"""

from __future__ import annotations

import jax

from ..batch import Batch

__all__ = ["kick", "drift"]


def kick(batch: Batch, h: jax.Array) -> Batch:
    """``v += h F / m``: velocities advanced by the forces for a time ``h`` (S,)."""
    step = batch.to_atoms_axis(h)[:, None]
    return batch.replace(velocities=batch.velocities + step * batch.forces / batch.masses[:, None])


def drift(batch: Batch, h: jax.Array) -> Batch:
    """``r += h v``: positions advanced at constant velocity for a time ``h`` (S,)."""
    step = batch.to_atoms_axis(h)[:, None]
    return batch.replace(positions=batch.positions + step * batch.velocities)
