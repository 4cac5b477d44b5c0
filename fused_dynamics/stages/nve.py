"""Velocity Verlet (NVE)."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from .. import validation as v
from ..batch import Batch
from .base import Stage, fs_to_ase_time

__all__ = ["NVE"]


class NVE(Stage):
    """Velocity Verlet, as ``ase.md.verlet.VelocityVerlet``.

    Parameters
    ----------
    model : Model
    dt : float or Array of shape (S,)
        Time step in fs, finite and > 0 (per system if an array: one value per occupied system
        or one per slot).
    n_steps, convergence_hook
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).
    """

    per_system_parameters: ClassVar[tuple[str, ...]] = ("dt",)

    dt: float | jax.Array

    def __check_init__(self):
        v.check_stage(self)
        v.check_real(type(self).__name__, "dt", self.dt, v.positive(), unit="fs", per_system=True)

    def init_state(self, batch: Batch) -> tuple:
        v.check_fits(self, batch.max_systems)
        return ()

    def _dt_atoms(self, batch: Batch) -> jax.Array:
        dt = jnp.broadcast_to(
            jnp.asarray(fs_to_ase_time(self.dt), batch.dtype), (batch.max_systems,)
        )
        return batch.to_atoms_axis(dt)[:, None]

    def _kick(self, batch: Batch) -> Batch:
        half = 0.5 * self._dt_atoms(batch)
        return batch.replace(
            velocities=batch.velocities + half * batch.forces / batch.masses[:, None]
        )

    def first_half(self, batch, state):
        batch = self._kick(batch)
        return batch.replace(
            positions=batch.positions + self._dt_atoms(batch) * batch.velocities
        ), state

    def second_half(self, batch, state):
        return self._kick(batch), state
