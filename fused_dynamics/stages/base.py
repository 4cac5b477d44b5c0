"""The sub-stage interface: pure, per-system-masked half-updates around one model evaluation.

A sub-stage (an integrator or an optimizer) is an ``equinox.Module`` holding its
hyper-parameters and its model. It never calls the model: the fused step owns the one evaluation
and writes ``energy``, ``forces`` and ``stress`` into the batch between the two halves::

    batch, state = stage.pre_update(batch, state, mask)    # e.g. v += ½ dt F/m; r += dt v
    batch = batch with model(batch) written in              # by the fused step, once
    batch, state = stage.post_update(batch, state, mask)   # e.g. v += ½ dt F/m

Subclasses implement :meth:`first_half` and :meth:`second_half` for the whole batch, unmasked;
the base class selects the result per system with ``jnp.where`` so that systems outside ``mask``
are bit-for-bit untouched, and applies the batch's constraints (fixed atoms or directions, fixed
centre of mass; :mod:`fused_dynamics.constraints`) to the result, so no sub-stage handles them.
Per-system stage state (FIRE's dt and alpha, thermostat chains, random step counters, ...) is
a pytree whose leaves all have a leading axis of length S; it is created by :meth:`init_state`
and lives in ``batch.stage_state``.

Updates are computed for every slot, selected or not, so they must stay finite on empty slots and
padding (divide by ``max(n, 1)``, never by a count that can be zero), or gradients through the
``where`` turn into NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from ase import units

from .. import constraints
from ..batch import Batch
from ..models.base import Model

__all__ = ["Stage", "select_batch", "select_state", "fs_to_ase_time"]

# fields of Batch that a sub-stage may change, by axis
_ATOM_FIELDS = ("positions", "velocities")
_SYSTEM_FIELDS = ("cell",)


def fs_to_ase_time(dt_fs):
    """Convert a time step in fs to ASE's internal time unit (Å·sqrt(amu/eV))."""
    return dt_fs * units.fs


def select_batch(mask: jax.Array, new: Batch, old: Batch) -> Batch:
    """Per-system ``where(mask, new, old)`` over the fields a sub-stage may change."""
    atom_mask = old.to_atoms_axis(mask)
    changes = {}
    for name in _ATOM_FIELDS:
        a, b = getattr(new, name), getattr(old, name)
        changes[name] = jnp.where(atom_mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    for name in _SYSTEM_FIELDS:
        a, b = getattr(new, name), getattr(old, name)
        changes[name] = jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return old.replace(**changes)


def select_state(mask: jax.Array, new: Any, old: Any) -> Any:
    """Per-system ``where(mask, new, old)`` over a stage-state pytree (leading axis S)."""

    def pick(a, b):
        return jnp.where(mask.reshape((-1,) + (1,) * (jnp.ndim(a) - 1)), a, b)

    return jax.tree_util.tree_map(pick, new, old)


class Stage(eqx.Module):
    """Base class of sub-stages.

    Parameters
    ----------
    model : Model
        The energy model; every sub-stage of a fused run must hold the same one.
    hooks : tuple of Hook
        Hooks of this sub-stage (see :meth:`register_hook`).
    n_steps : int, optional
        Per-system step budget: a system moves on after this many steps in the stage.
    convergence_hook : ConvergenceHook, optional
        Criterion that moves a system on. Optimizers default to fmax ≤ 0.05 eV/Å when they are
        not the last stage.
    """

    model: Model
    n_steps: int | None = eqx.field(static=True, default=None, kw_only=True)
    convergence_hook: Any = eqx.field(default=None, kw_only=True)
    hooks: tuple = eqx.field(default=(), kw_only=True)

    def register_hook(self, hook, stage=None) -> Stage:
        """A copy of this stage with ``hook`` added (at ``stage``, default ``hook.stage``).

        Inside a fused step only BEFORE_STEP, BEFORE_PRE_UPDATE, AFTER_COMPUTE,
        AFTER_POST_UPDATE, AFTER_STEP and ON_CONVERGE hooks of a sub-stage fire (SEMANTICS [S7]).
        """
        if stage is not None:
            hook = dataclasses.replace(hook, stage=stage)
        return dataclasses.replace(self, hooks=tuple(self.hooks) + (hook,))

    # ----------------------------------------------------------- to implement
    def init_state(self, batch: Batch) -> Any:
        """Fresh per-system state for every slot (leaves with leading axis S)."""
        return ()

    def first_half(self, batch: Batch, state: Any) -> tuple[Batch, Any]:
        """Update before the force evaluation (uses ``batch.forces`` of the previous step)."""
        return batch, state

    def second_half(self, batch: Batch, state: Any) -> tuple[Batch, Any]:
        """Update after the force evaluation (``batch.forces`` are new)."""
        return batch, state

    def observables(self, batch: Batch, state: Any) -> dict[str, jax.Array]:
        """Per-system quantities (shape (S,)) for convergence criteria and logging.

        The base gives ``fmax``, ``energy``, ``kinetic_energy`` and ``temperature``; stages add
        their own (a conserved quantity, a cell-filter fmax).
        """
        from .. import observables as obs

        return {
            "fmax": obs.fmax(batch),
            "energy": batch.energy,
            "kinetic_energy": obs.kinetic_energy(batch),
            "temperature": obs.temperature(batch),
        }

    @property
    def needs_stress(self) -> bool:
        """Whether the stage reads ``batch.stress`` (barostats, cell filters)."""
        return False

    @property
    def is_optimizer(self) -> bool:
        """Whether the stage relaxes (and so converges by default when not last)."""
        return False

    # ----------------------------------------------------------- masked updates
    def pre_update(self, batch: Batch, state: Any, mask: jax.Array) -> tuple[Batch, Any]:
        """First half on the systems where ``mask`` (S,) is True; others untouched."""
        new_batch, new_state = self.first_half(batch, state)
        new_batch = constraints.constrain_update(batch, select_batch(mask, new_batch, batch), mask)
        return new_batch, select_state(mask, new_state, state)

    def post_update(self, batch: Batch, state: Any, mask: jax.Array) -> tuple[Batch, Any]:
        """Second half on the systems where ``mask`` (S,) is True; others untouched."""
        new_batch, new_state = self.second_half(batch, state)
        new_batch = constraints.constrain_update(batch, select_batch(mask, new_batch, batch), mask)
        return new_batch, select_state(mask, new_state, state)

    # ----------------------------------------------------------- composition
    def __add__(self, other):
        from ..fused import FusedStage

        return FusedStage([(0, self)]) + other

    def run(self, batch: Batch | None = None, n_steps: int | None = None, **kwargs):
        """Run this stage alone: a one-stage :class:`~fused_dynamics.FusedStage` (same engine).

        Takes the arguments of :meth:`FusedStage.run`.
        """
        from ..fused import FusedStage

        return FusedStage([(0, self)]).run(batch, n_steps=n_steps, **kwargs)
