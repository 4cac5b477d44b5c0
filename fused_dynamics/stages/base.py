"""The sub-stage interface: pure, per-system-masked half-updates around one model evaluation.

A sub-stage (an integrator or an optimizer) is an ``equinox.Module`` holding its
hyper-parameters and its model. It never calls the model: the fused step owns the one evaluation
and writes ``energy``, ``forces`` and ``stress`` into the batch between the two halves::

    batch, state = stage.pre_update(batch, state, mask)    # e.g. v += ½ dt F/m; r += dt v
    batch = batch with model(batch) written in              # by the fused step, once
    batch, state = stage.post_update(batch, state, mask)   # e.g. v += ½ dt F/m

Subclasses implement :meth:`first_half` and :meth:`second_half` (abstract: a stage that leaves
one out cannot be built) for the whole batch, unmasked; the base class selects the result per
system with ``jnp.where`` so that systems outside ``mask`` are bit-for-bit untouched, and applies
the batch's constraints (fixed atoms or directions, fixed centre of mass;
:mod:`fused_dynamics.constraints`) to the result, so no sub-stage handles them.
Per-system stage state (FIRE's dt and alpha, thermostat chains, random step counters, ...) is
a pytree whose leaves all have a leading axis of length S; it is created by :meth:`init_state`
and lives in ``batch.stage_state``.

Entering a stage is the engine's business, not the stage's: whenever systems enter sub-stage
``i`` (the entry stage when a run starts, a migration during a step, an inflight admission) the
engine replaces their slice of that stage's state with ``stage.init_state(batch)``, computed from
the batch as it is at entry, and sets their velocities to zero when the stage is an optimizer
(:attr:`Stage.is_optimizer`). A stage therefore keeps no "first step" flag: its first step is
recognisable from its fresh state (FIRE: ``n_iter == 0``).

Every stage class is abstract or final (Equinox's pattern): :class:`Stage` and the abstract bases
of families (:class:`~fused_dynamics.stages.fire.AbstractFIRE`,
:class:`~fused_dynamics.stages.npt.AbstractMTK`) declare what a subclass must give
(``abc.abstractmethod``, ``equinox.AbstractVar``); the concrete stages are never subclassed.

Updates are computed for every slot, selected or not, so they must stay finite on empty slots and
padding (divide by ``max(n, 1)``, never by a count that can be zero), or gradients through the
``where`` turn into NaN.

Shared pieces: :func:`per_system` (a per-system parameter as one value per slot), the
velocity-Verlet :func:`~fused_dynamics.stages.verlet.kick` and
:func:`~fused_dynamics.stages.verlet.drift`, and the Nosé–Hoover chain of
:mod:`fused_dynamics.stages.chains`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from ase import units

from .. import constraints
from .. import observables as obs
from .. import validation as v
from ..batch import Batch
from ..hooks import Hook, check_hook
from ..models.base import Model
from ..parameters import per_system

__all__ = [
    "Stage",
    "masked_update",
    "select_batch",
    "select_state",
    "fs_to_ase_time",
    "per_system",
    "safe_sqrt",
]

# fields of Batch that a sub-stage may change, by axis
_ATOM_FIELDS = ("positions", "velocities")
_SYSTEM_FIELDS = ("cell",)


def fs_to_ase_time(dt_fs):
    """Convert a time step in fs to ASE's internal time unit (Å·sqrt(amu/eV))."""
    return dt_fs * units.fs


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x > 0``, else 0, with a finite gradient everywhere (also at 0).

    For norms and noise amplitudes that vanish on padding, empty slots, zero friction or zero
    temperature: a plain ``sqrt`` there would make gradients through the ``where`` NaN.
    """
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


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


def masked_update(
    half, batch: Batch, state: Any, mask: jax.Array, *, skip_empty: bool = True
) -> tuple[Batch, Any]:
    """``half(batch, state)`` applied to the systems in ``mask`` (S,) bool, others untouched.

    With ``skip_empty``, on steps where ``mask`` holds no system the half is not computed (a
    ``lax.cond`` on CPU; under ``vmap`` both branches are computed and selected, with the same
    result): batch and state are returned as they are. Otherwise the half runs on every slot
    and its result is selected per system (:func:`select_batch`, :func:`select_state`), then
    constrained (:func:`fused_dynamics.constraints.constrain_update`).

    ``skip_empty=False`` (a fused stage of one sub-stage, whose mask is rarely empty: on the
    priming pass, or on a device of a sharded run whose systems have all finished while others
    run) leaves the ``lax.cond`` out: on XLA:CPU the cond costs more than it saves there,
    about 10 % of a one-stage FIRE or NVE step on 16 systems of 108 LJ atoms (measured against
    ``benchmarks/bench_fused_overhead.py``'s bare loop, 15 interleaved rounds). Both
    forms give the same bits (``where(False, new, old)`` is ``old``;
    ``tests/test_gpu_paths.py``).

    The select stays when every slot is in ``mask``: XLA:CPU compiles the half's arithmetic
    differently (1 ulp in float64) with and without the select fused after it, so dropping it
    there would make a system's update depend on whether its neighbours share its sub-stage
    (docs/semantics.md §21: a system's arithmetic does not depend on its slot or neighbours);
    the select costs two passes over the atom rows.
    """

    def some(args):
        b, s = args
        new_batch, new_state = half(b, s)
        new_batch = constraints.constrain_update(b, select_batch(mask, new_batch, b), mask)
        return new_batch, select_state(mask, new_state, s)

    if not skip_empty or jax.default_backend() != "cpu":
        # A GPU reads the predicate of a `lax.cond` back to the host (a synchronisation per
        # step); the select alone gives the same bits (`where(False, new, old)` is `old`).
        return some((batch, state))
    return jax.lax.cond(jnp.any(mask), some, lambda args: args, (batch, state))


class Stage(eqx.Module):
    """Abstract base class of sub-stages: implement :meth:`first_half` and :meth:`second_half`.

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
    hooks: tuple[Hook, ...] = eqx.field(default=(), kw_only=True)

    def __check_init__(self):
        # Equinox runs this after the subclass's own __check_init__ (every class of the MRO)
        v.check_stage(self)
        owner = type(self).__name__
        if not isinstance(self.hooks, (tuple, list)):
            raise TypeError(
                f"{owner}: hooks must be a tuple of fused_dynamics.Hook, got "
                f"{type(self.hooks).__name__}."
            )
        for hook in self.hooks:
            check_hook(f"{owner}: hooks", hook)

    def register_hook(self, hook: Hook, stage=None) -> Stage:
        """A copy of this stage with ``hook`` added (at ``stage``, default ``hook.stage``).

        Inside a fused step only BEFORE_STEP, BEFORE_PRE_UPDATE, AFTER_COMPUTE,
        AFTER_POST_UPDATE, AFTER_STEP and ON_CONVERGE hooks of a sub-stage fire
        (docs/semantics.md §7).

        Raises
        ------
        TypeError
            ``hook`` is not a :class:`fused_dynamics.Hook` instance.
        """
        check_hook(f"{type(self).__name__}.register_hook", hook)
        if stage is not None:
            hook = dataclasses.replace(hook, stage=stage)
        return dataclasses.replace(self, hooks=tuple(self.hooks) + (hook,))

    # ----------------------------------------------------------- to implement
    def init_state(self, batch: Batch) -> Any:
        """Fresh per-system state for every slot (leaves with leading axis S).

        Computed from ``batch`` as it is when systems enter the stage: the engine selects it
        for the entering systems (see the module docstring). The default, for stages without
        state, is ``()`` after checking that the per-system parameters fit the batch's slots
        (:func:`fused_dynamics.validation.check_fits`).
        """
        v.check_fits(self, batch.max_systems)
        return ()

    @abc.abstractmethod
    def first_half(self, batch: Batch, state: Any) -> tuple[Batch, Any]:
        """Update before the force evaluation (uses ``batch.forces`` of the previous step).

        Computed for every slot, unmasked; returns the new batch and stage state.
        """

    @abc.abstractmethod
    def second_half(self, batch: Batch, state: Any) -> tuple[Batch, Any]:
        """Update after the force evaluation (``batch.forces`` are new).

        Computed for every slot, unmasked; a stage with nothing to do returns
        ``(batch, state)``.
        """

    def observables(self, batch: Batch, state: Any) -> dict[str, jax.Array]:
        """Per-system quantities (shape (S,)) for convergence criteria and logging.

        The base gives ``fmax``, ``energy``, ``kinetic_energy`` and ``temperature``; stages add
        their own (a conserved quantity, a cell-filter fmax).
        """
        return {
            "fmax": obs.fmax(batch),
            "energy": batch.energy,
            "kinetic_energy": obs.kinetic_energy(batch),
            "temperature": obs.temperature(batch),
        }

    #: Whether :meth:`first_half` or :meth:`second_half` may read ``batch.energy``. True for
    #: a stage this project does not know (a subclass written elsewhere); the built-in stages
    #: read forces, never the energy, and say False, so that a run whose criteria and hooks do
    #: not read it either evaluates forces only at every step (docs/semantics.md §6).
    reads_energy: ClassVar[bool] = True

    @property
    def needs_stress(self) -> bool:
        """Whether the stage reads ``batch.stress`` (barostats, cell filters)."""
        return False

    @property
    def is_optimizer(self) -> bool:
        """Whether the stage relaxes (and so converges by default when not last)."""
        return False

    # ----------------------------------------------------------- masked updates
    def pre_update(
        self, batch: Batch, state: Any, mask: jax.Array, *, skip_empty: bool = True
    ) -> tuple[Batch, Any]:
        """First half on the systems where ``mask`` (S,) is True; others untouched.

        With ``skip_empty``, skipped (a ``lax.cond`` on CPU) on steps where ``mask`` holds no
        system (:func:`masked_update`).
        """
        return masked_update(self.first_half, batch, state, mask, skip_empty=skip_empty)

    def post_update(
        self, batch: Batch, state: Any, mask: jax.Array, *, skip_empty: bool = True
    ) -> tuple[Batch, Any]:
        """Second half on the systems where ``mask`` (S,) is True; others untouched (see
        :meth:`pre_update`)."""
        return masked_update(self.second_half, batch, state, mask, skip_empty=skip_empty)

    # ----------------------------------------------------------- composition
    # The one documented upward edge of the package's import graph: composing (``a + b``,
    # ``a | b``) and running a single stage build a FusedStage, which imports this module, so
    # the engine is imported here, inside these methods. No other function-level import exists
    # in stages.
    def __add__(self, other):
        from ..fused import FusedStage  # the documented upward edge (see above)

        return FusedStage([(0, self)]) + other

    def __or__(self, other):
        """``self | other``: a :class:`~fused_dynamics.pipeline.DistributedPipeline` (each
        stage on its own devices, docs/semantics.md §16)."""
        from ..fused import FusedStage  # the documented upward edge (see __add__)

        return FusedStage([(0, self)]) | other

    def __ror__(self, other):
        """``pipeline | self``: this stage appended to a pipeline."""
        from ..fused import FusedStage  # the documented upward edge (see __add__)

        return other | FusedStage([(0, self)])

    def run(self, batch: Batch | None = None, n_steps: int | None = None, **kwargs):
        """Run this stage alone: a one-stage :class:`~fused_dynamics.FusedStage` (same engine).

        Takes the arguments of :meth:`FusedStage.run`.
        """
        from ..fused import FusedStage  # the documented upward edge (see __add__)

        return FusedStage([(0, self)]).run(batch, n_steps=n_steps, **kwargs)
