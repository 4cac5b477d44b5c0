"""Gradient descent and any optax transformation as per-system relaxation stages."""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .. import segment
from .. import validation as v
from ..batch import Batch
from .base import Stage, per_system

__all__ = ["GradientDescent", "OptaxRelax", "OptaxState", "cap_atom_step"]


def cap_atom_step(batch: Batch, d: jax.Array, maxstep) -> jax.Array:
    """Scale each system's step so that no atom moves more than ``maxstep`` Å (as ASE's BFGS)."""
    norm = jnp.where(batch.atom_mask, jnp.linalg.norm(d, axis=-1), 0.0)
    largest = jnp.maximum(batch.max_atoms_of(norm), 0.0)
    scale = jnp.where(largest > maxstep, maxstep / jnp.where(largest > 0, largest, 1.0), 1.0)
    return d * batch.to_atoms_axis(scale)[:, None]


class GradientDescent(Stage):
    """Steepest descent ``r += step_size * F``, per system.

    Parameters
    ----------
    model : Model
    step_size : float or Array of shape (S,)
        In Å²/eV, finite and > 0.
    maxstep : float or Array of shape (S,), optional
        Largest displacement of any atom per step, in Å, finite and > 0; a longer step of a
        system is scaled down as a whole. None: no cap.
    n_steps, convergence_hook
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).

    Notes
    -----
    ``step_size`` and ``maxstep`` are per system when arrays: one value per occupied system or
    one per slot (``per_system_parameters``).
    """

    per_system_parameters: ClassVar[tuple[str, ...]] = ("step_size", "maxstep")
    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)

    step_size: float | jax.Array
    maxstep: float | jax.Array | None = None

    def __check_init__(self):
        owner = type(self).__name__
        v.check_real(
            owner, "step_size", self.step_size, v.positive(), unit="Å²/eV", per_system=True
        )
        v.check_real(
            owner,
            "maxstep",
            self.maxstep,
            v.positive(),
            unit="Å",
            allow_none=True,
            per_system=True,
        )

    @property
    def is_optimizer(self) -> bool:
        return True

    def first_half(self, batch, state):
        step = per_system(batch, self.step_size)
        d = batch.to_atoms_axis(step)[:, None] * batch.forces
        if self.maxstep is not None:
            d = cap_atom_step(batch, d, self.maxstep)
        d = jnp.where(batch.atom_mask[:, None], d, 0.0)
        return batch.replace(positions=batch.positions + d), state

    def second_half(self, batch, state):
        # the step is made before the evaluation, with the forces of the previous one
        return batch, state


class OptaxState(eqx.Module):
    """Per-system state of :class:`OptaxRelax` (every leaf has leading axis S).

    Attributes
    ----------
    opt_state : optax.OptState
        The transformation's state, vmapped over systems: each leaf is (S, ...), with per-atom
        leaves in the per-system view (S, A, 3). A system that enters the stage gets
        ``optax_transform.init`` of its positions at entry (the engine selects
        :meth:`OptaxRelax.init_state` for it).
    """

    opt_state: Any


class OptaxRelax(Stage):
    """Relax positions with an ``optax.GradientTransformation``, one optimizer per system.

    The gradient is ``-forces``. Per-atom data is gathered into a per-system view (S, A, 3)
    (``A = batch.max_atoms_per_system``; padding rows are zero and their updates are dropped),
    the transformation's ``init``/``update`` are vmapped over the system axis so that every state
    leaf has leading axis S and is selected per system like any stage state, and the updates are
    scattered back to the atoms. A transformation that reduces over its parameters (global-norm
    clipping, ...) therefore reduces over one system's atoms only.

    Parameters
    ----------
    model : Model
    optax_transform : optax.GradientTransformation
        For example ``optax.adam(1e-2)`` (learning rates in Å per unit update). Transformations
        whose ``update`` needs extra arguments (line searches) are not supported.
    n_steps, convergence_hook
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).

    Raises
    ------
    ValueError
        At construction, when ``optax_transform`` has no callable ``init`` and ``update`` or
        ``n_steps`` / ``convergence_hook`` is invalid.
    """

    per_system_parameters: ClassVar[tuple[str, ...]] = ()
    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)

    optax_transform: optax.GradientTransformation = eqx.field(static=True)

    def __check_init__(self):
        t = self.optax_transform
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise ValueError(
                f"{type(self).__name__}: optax_transform must be an "
                f"optax.GradientTransformation (with init and update), e.g. optax.adam(1e-2), "
                f"got {t!r}."
            )

    @property
    def is_optimizer(self) -> bool:
        return True

    def _view(self, batch: Batch, x: jax.Array) -> jax.Array:
        index, valid = batch.system_view_index()
        return jnp.where(valid[..., None], x[index], 0.0)

    def _init(self, batch: Batch) -> Any:
        return jax.vmap(self.optax_transform.init)(self._view(batch, batch.positions))

    def init_state(self, batch: Batch) -> OptaxState:
        """The optimizer state of systems entering the stage: ``init`` of their positions."""
        return OptaxState(opt_state=self._init(batch))

    def first_half(self, batch, state):
        params = self._view(batch, batch.positions)
        grads = self._view(batch, -batch.forces)
        update = jax.vmap(self.optax_transform.update)
        updates, opt_state = update(grads, state.opt_state, params)
        _, valid = batch.system_view_index()
        updates = jnp.where(valid[..., None], updates, 0.0)
        # scatter back: atom i is row local_index[i] of its system's view
        s = batch.max_systems
        local = jnp.clip(
            segment.local_index(batch.system_idx, s), 0, batch.max_atoms_per_system - 1
        )
        sys = jnp.minimum(batch.system_idx, s - 1)
        d = jnp.where(batch.atom_mask[:, None], updates[sys, local], 0.0)
        batch = batch.replace(positions=batch.positions + d.astype(batch.dtype))
        return batch, OptaxState(opt_state=opt_state)

    def second_half(self, batch, state):
        # the step is made before the evaluation, with the forces of the previous one
        return batch, state
