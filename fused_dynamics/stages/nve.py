"""Velocity Verlet (NVE)."""

from __future__ import annotations

from typing import ClassVar

import jax

from .. import validation as v
from ..batch import Batch
from .base import Stage, fs_to_ase_time, per_system
from .verlet import drift, kick

__all__ = ["NVE"]


class NVE(Stage):
    """Velocity Verlet, as ``ase.md.verlet.VelocityVerlet``.

    One step is ``v += ½ dt F/m; r += dt v`` (:meth:`first_half`), the model evaluation, then
    ``v += ½ dt F/m`` (:meth:`second_half`).

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
    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)

    dt: float | jax.Array

    def __check_init__(self):
        v.check_real(type(self).__name__, "dt", self.dt, v.positive(), unit="fs", per_system=True)

    def _dt(self, batch: Batch) -> jax.Array:
        """Time step per system in ASE's time unit, shape (S,)."""
        return per_system(batch, fs_to_ase_time(self.dt))

    def first_half(self, batch, state):
        dt = self._dt(batch)
        return drift(kick(batch, 0.5 * dt), dt), state

    def second_half(self, batch, state):
        return kick(batch, 0.5 * self._dt(batch)), state
