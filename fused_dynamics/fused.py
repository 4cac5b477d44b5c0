"""FusedStage: a chain of sub-stages run as one compiled step with one model evaluation.

Every system slot carries a ``status``; the sub-stage whose code equals it updates the system.
One step (see ``shared/SEMANTICS.md``)::

    BEFORE_STEP hooks
    for each sub-stage: BEFORE_PRE_UPDATE hooks, first half on its systems
    ONE model evaluation on the whole batch; AFTER_COMPUTE hooks
    for each sub-stage: second half on its systems, AFTER_POST_UPDATE hooks
    AFTER_STEP hooks
    step counters, finite-or-failed check, budgets -> migration, convergence -> migration,
    ON_CONVERGE hooks

The set of systems a sub-stage updates is fixed by the status at the start of the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import constraints, observables, validation
from .batch import Batch
from .convergence import ConvergenceHook
from .hooks import DynamicsStage, ExitReason, Failure, Hook, HookContext, fire_hooks
from .models.neighbors import NeighborList
from .stages.base import Stage

__all__ = ["FusedStage", "StepReport"]


class StepReport(eqx.Module):
    """What one fused step reports besides the new batch.

    Attributes
    ----------
    graduated : Array, shape (S,) bool
        Systems that reached ``exit_status`` during this step, by convergence or by budget.
    converged : Array, shape (S,) bool
        Systems whose stage criterion held this step (they migrated).
    budget_spent : Array, shape (S,) bool
        Systems that used up their stage's step budget this step (they migrated).
    """

    graduated: jax.Array
    converged: jax.Array
    budget_spent: jax.Array


class FusedStage(eqx.Module):
    """Sub-stages sharing one batch and one model evaluation per step.

    Parameters
    ----------
    sub_stages : sequence of (int, Stage)
        ``(status_code, stage)`` pairs, in the order systems move through them.
    entry_status : int, default 0
        Status a newly loaded system gets.
    exit_status : int, default -1
        Status of a graduated system; -1 means ``len(sub_stages)``.
    compile_step : bool, default True
        ``jax.jit`` the run loop and the step.
    compile_kwargs : dict, optional
        Forwarded to ``jax.jit``.
    init_fn : callable, optional
        ``init_fn(batch) -> batch`` applied to a batch before its first step (and to each batch
        of refilled systems in inflight runs), for example to draw velocities.
    hooks : sequence of Hook, optional
        Fused-level hooks (see :meth:`register_fused_hook`).
    max_force : float or None, default 1e4
        eV/Å. A system whose largest atomic force exceeds it fails (``Failure.MAX_FORCE``) before
        it can blow up; ``None`` checks finiteness only. The default is far above any force of
        a structure that relaxes or simulates sensibly (bonds break at O(10) eV/Å).
    max_displacement : float or None, default 2.0
        Å per step. A system in a dynamics sub-stage that moves an atom farther in one step fails
        (``Failure.DISPLACEMENT``): the time step is far too large for it (a cluster flying
        apart keeps finite numbers and a plausible 0 eV). Thermal motion moves atoms ~0.01-0.1 Å
        per step. ``None``: no bound.
    max_temperature : float or None, default 1e5
        K. A system in a dynamics (not optimizer) sub-stage whose kinetic temperature exceeds it
        fails (``Failure.TEMPERATURE``): its dynamics blew up (a time step far too large, a
        collision), even while every number is still finite and its energy a plausible 0 eV.
        ``None``: no bound.
    always_stress : bool, default False
        Compute the stress at every evaluation even when nothing in the run reads it, so that
        every output carries it (see :attr:`needs_stress`).

    Notes
    -----
    Finite or failed: after the first evaluation and after every step, each running system is
    checked (one per-system reduction): a non-finite energy, forces, stress (where computed),
    positions, velocities or cell, a force above ``max_force``, a step longer than
    ``max_displacement`` or a temperature above ``max_temperature`` (both in dynamics
    sub-stages), or a fault the model reports
    (:meth:`~fused_dynamics.models.base.Model.system_faults`), moves the system out of the
    run with ``info["exit_reason"] == ExitReason.FAILED``, ``info["failure"]`` (a
    :class:`~fused_dynamics.Failure` bit set naming the quantities) and ``info["failure_step"]``
    (the steps it had taken, 0 for the first evaluation). It is never reported converged, and
    no other system's arithmetic sees its values.

    Examples
    --------
    >>> fused = fd.FIRE(model) + fd.NVE(model, dt=2.0, n_steps=100)
    >>> final = fused.run(batch)
    """

    stages: tuple[Stage, ...]
    codes: tuple[int, ...] = eqx.field(static=True)
    entry_status: int = eqx.field(static=True)
    exit_status: int = eqx.field(static=True)
    compile_step: bool = eqx.field(static=True)
    compile_options: tuple = eqx.field(static=True)
    init_fn: Callable | None = eqx.field(static=True)
    hooks: tuple[Hook, ...]
    max_force: float | None = eqx.field(static=True)
    max_temperature: float | None = eqx.field(static=True)
    max_displacement: float | None = eqx.field(static=True)
    always_stress: bool = eqx.field(static=True)

    def __init__(
        self,
        sub_stages: Sequence[tuple[int, Stage]],
        *,
        entry_status: int = 0,
        exit_status: int = -1,
        compile_step: bool = True,
        compile_kwargs: dict | None = None,
        init_fn: Callable | None = None,
        hooks: Sequence[Hook] = (),
        max_force: float | None = 1e4,
        max_temperature: float | None = 1e5,
        max_displacement: float | None = 2.0,
        always_stress: bool = False,
    ):
        for name, value, unit in (
            ("max_force", max_force, "eV/Å"),
            ("max_temperature", max_temperature, "K"),
            ("max_displacement", max_displacement, "Å"),
        ):
            validation.check_real(
                "FusedStage", name, value, validation.positive(), unit=unit, allow_none=True
            )
        pairs = []
        for i, item in enumerate(sub_stages):
            if isinstance(item, Stage):
                item = (i, item)
            code, stage = item
            if not isinstance(stage, Stage):
                raise TypeError(f"sub-stage {i}: expected a Stage, got {type(stage).__name__}.")
            pairs.append((int(code), stage))
        if not pairs:
            raise ValueError("FusedStage needs at least one sub-stage.")
        codes = [c for c, _ in pairs]
        if len(set(codes)) != len(codes):
            raise ValueError(f"FusedStage: status codes must be distinct, got {codes}.")
        exit_status = len(pairs) if exit_status == -1 else int(exit_status)
        if exit_status in codes:
            raise ValueError(f"FusedStage: exit_status {exit_status} is also a sub-stage code.")
        if int(entry_status) not in codes:
            raise ValueError(
                f"FusedStage: entry_status {entry_status} is not one of the codes {codes}."
            )
        model0 = pairs[0][1].model
        for i, (_, stage) in enumerate(pairs[1:], start=1):
            if not _same_model(model0, stage.model):
                raise ValueError(
                    f"FusedStage: sub-stage {i} ({type(stage).__name__}) holds a different model "
                    "from sub-stage 0; all sub-stages must share one model (one evaluation per "
                    "step)."
                )
        devices = {i: _devices(stage) for i, (_, stage) in enumerate(pairs)}
        if len({d for d in devices.values() if d}) > 1:
            raise ValueError(
                f"FusedStage: sub-stages hold arrays on different devices {devices}; put them on "
                "one device (a fused step runs on one device, [S3])."
            )
        self.stages = tuple(stage for _, stage in pairs)
        self.codes = tuple(codes)
        self.entry_status = int(entry_status)
        self.exit_status = exit_status
        self.compile_step = bool(compile_step)
        self.compile_options = tuple(sorted((compile_kwargs or {}).items()))
        self.init_fn = init_fn
        for h in hooks:
            if not isinstance(h, Hook):
                raise TypeError(f"FusedStage hooks must be Hook instances, got {type(h).__name__}.")
        self.hooks = tuple(hooks)
        self.max_force = None if max_force is None else float(max_force)
        self.max_temperature = None if max_temperature is None else float(max_temperature)
        self.max_displacement = None if max_displacement is None else float(max_displacement)
        self.always_stress = bool(always_stress)

    # ------------------------------------------------------------------ composition
    def __add__(self, other: Stage | FusedStage) -> FusedStage:
        """Append a sub-stage (or every sub-stage of another fused stage) with the next codes."""
        extra = [s for _, s in other.sub_stages] if isinstance(other, FusedStage) else [other]
        stages = [s for _, s in self.sub_stages] + extra
        fused = isinstance(other, FusedStage)
        return self._with(
            sub_stages=list(enumerate(stages)),
            exit_status=-1,  # after the new last code
            hooks=self.hooks + (other.hooks if fused else ()),
            always_stress=self.always_stress or (fused and other.always_stress),
        )

    def _with(self, **changes) -> FusedStage:
        """A new fused stage with this one's options except ``changes`` (checked anew)."""
        options = dict(
            sub_stages=self.sub_stages,
            entry_status=self.entry_status,
            exit_status=self.exit_status,
            compile_step=self.compile_step,
            compile_kwargs=self.compile_kwargs,
            init_fn=self.init_fn,
            hooks=self.hooks,
            max_force=self.max_force,
            max_temperature=self.max_temperature,
            max_displacement=self.max_displacement,
            always_stress=self.always_stress,
        )
        options.update(changes)
        return FusedStage(options.pop("sub_stages"), **options)

    def __repr__(self) -> str:
        lines = [f"FusedStage(entry_status={self.entry_status}, exit_status={self.exit_status},"]
        for code, stage in self.sub_stages:
            budget = f", n_steps={stage.n_steps}" if stage.n_steps is not None else ""
            lines.append(f"  {code}: {type(stage).__name__}{budget},")
        lines.append(f"  hooks={len(self.hooks)})")
        return "\n".join(lines)

    def register_fused_hook(self, hook: Hook, stage: DynamicsStage | None = None) -> FusedStage:
        """A new fused stage with ``hook`` added at the fused level (inputs untouched).

        Fused-level hooks fire at every one of the nine points, BEFORE_COMPUTE included (the
        place for a neighbor-list refresh).
        """
        if stage is not None:
            hook = dataclasses.replace(hook, stage=stage)
        return self._with(hooks=self.hooks + (hook,))

    @property
    def compile_kwargs(self) -> dict:
        """Keyword arguments forwarded to ``jax.jit``."""
        return dict(self.compile_options)

    # ------------------------------------------------------------------ properties
    @property
    def model(self):
        return self.sub_stages[0][1].model

    @property
    def sub_stages(self) -> tuple[tuple[int, Stage], ...]:
        """The ``(status_code, stage)`` pairs."""
        return tuple(zip(self.codes, self.stages, strict=True))

    def next_code(self, i: int) -> int:
        """Status a system leaving sub-stage ``i`` moves to."""
        return self.sub_stages[i + 1][0] if i + 1 < len(self.sub_stages) else self.exit_status

    def migration_rule(self, i: int) -> ConvergenceHook | None:
        """The convergence criterion of sub-stage ``i`` ([S10]), with its codes filled in."""
        code, stage = self.sub_stages[i]
        hook = stage.convergence_hook
        last = i == len(self.sub_stages) - 1
        # [S10]: a non-final stage without a criterion gets fmax <= 0.05 eV/Å, so no system is
        # stuck in it forever. A stage with a budget already moves systems on: it keeps its
        # budget alone (an NVT equilibration must not end early because forces happen to be
        # small).
        if hook is None and not last and stage.n_steps is None:
            hook = ConvergenceHook()
        if hook is None:
            return None
        return ConvergenceHook(
            hook.criteria,
            source_status=code if hook.source_status is None else hook.source_status,
            target_status=self.next_code(i) if hook.target_status is None else hook.target_status,
            custom_op=hook.custom_op,
        )

    def graduates(self) -> bool:
        """Whether the final sub-stage can ever send a system to ``exit_status``."""
        _, last = self.sub_stages[-1]
        return last.convergence_hook is not None or last.n_steps is not None

    # ------------------------------------------------------------------ state
    def init(self, batch: Batch) -> Batch:
        """Prepare a batch for this fused stage: status, stage state, bookkeeping, forces.

        Occupied slots get ``entry_status``; each sub-stage's state is created; the model is
        evaluated once to prime energy, forces and stress ([S6]). ``init_fn`` is applied first.
        Called eagerly it is compiled (once per shape); while tracing it is traced inline.
        """
        if isinstance(batch.positions, jax.core.Tracer):
            return _init_impl(self, batch)
        return _init(self, batch)

    def all_hooks(self) -> list[Hook]:
        """Fused-level hooks and every sub-stage's hooks."""
        return list(self.hooks) + [h for _, st in self.sub_stages for h in st.hooks]

    def fields(self, batch: Batch) -> dict[str, jax.Array]:
        """Per-system observables, each system's from the sub-stage whose code it has.

        Keys present in only some sub-stages (``conserved_energy``) are NaN for systems in the
        others.
        """
        per_stage = [
            stage.observables(batch, state)
            for (_, stage), state in zip(self.sub_stages, batch.stage_state, strict=True)
        ]
        keys = dict.fromkeys(k for f in per_stage for k in f)
        out = {}
        for k in keys:
            value = None
            for (code, _), f in zip(self.sub_stages, per_stage, strict=True):
                v = f.get(k, jnp.full(batch.max_systems, jnp.nan, batch.dtype))
                value = v if value is None else jnp.where(batch.status == code, v, value)
            out[k] = value
        return out

    def is_initialized(self, batch: Batch) -> bool:
        return len(batch.stage_state) == len(self.sub_stages) and "stage_steps" in batch.info

    def with_stress(self) -> FusedStage:
        """A copy that computes the stress at every evaluation (``always_stress=True``)."""
        return self._with(always_stress=True)

    @property
    def needs_stress(self) -> bool:
        """Whether the stress is computed: ``always_stress``, or a sub-stage, criterion or hook
        reads it. When it is not, ``batch.stress`` is NaN and outputs leave it out."""
        uses = [self.always_stress] + [st.needs_stress for st in self.stages]
        for st in self.stages:
            if st.convergence_hook is not None:
                uses += [c.key == "stress" for c in st.convergence_hook.criteria]
                uses.append(st.convergence_hook.custom_op is not None)
        uses += [
            "stress" in h.fields or getattr(h, "needs_stress", False) for h in self.all_hooks()
        ]
        return any(uses)

    def evaluate(self, batch: Batch) -> Batch:
        """Evaluate the model once and write energy, forces and stress into the batch.

        The stress is computed only when something reads it (:attr:`needs_stress`); else it is
        NaN ("not computed"), and ``to_atoms`` and the sinks leave it out rather than report a
        wrong number.

        A batch carrying a :class:`~fused_dynamics.NeighborList` has it refreshed first and
        stored, so that an overflow always reaches the run loop (which regrows the list and
        repeats the work). Forces come out with the constraints applied
        (:func:`fused_dynamics.constraints.project_forces`).
        """
        if isinstance(batch.neighbors, NeighborList):
            batch = batch.replace(neighbors=batch.neighbors.update(batch))
        out = self.model(batch, stress=self.needs_stress)
        forces = constraints.project_forces(batch, out.forces)
        return batch.replace(energy=out.energy, forces=forces, stress=out.stress)

    def failures(self, batch: Batch, displacement: jax.Array | None = None) -> jax.Array:
        """Failure code of every slot (0: healthy); see :class:`Failure`.

        Per-system reductions only, so one system's values never decide another's code.

        Parameters
        ----------
        batch : Batch
        displacement : Array, shape (N, 3), optional
            How far the sub-stages moved each atom in this step (Å), checked against
            ``max_displacement`` for systems in dynamics sub-stages.

        Returns
        -------
        Array, shape (S,) int32
        """
        dynamics = [c for c, st in self.sub_stages if not st.is_optimizer]
        in_dynamics = jnp.isin(batch.status, jnp.asarray(dynamics or [self.exit_status]))
        in_dynamics = in_dynamics & bool(dynamics)

        def bad_rows(x):
            return ~jnp.all(jnp.isfinite(x), axis=-1)

        f = jnp.where(jnp.isfinite(batch.forces), batch.forces, 0.0)
        too_big = (
            jnp.sum(f * f, axis=-1) > self.max_force**2
            if self.max_force is not None
            else jnp.zeros_like(batch.atom_mask)
        )
        far = jnp.zeros_like(batch.atom_mask)
        if displacement is not None and self.max_displacement is not None:
            far = jnp.sum(displacement**2, axis=-1) > self.max_displacement**2
            far = far & batch.to_atoms_axis(in_dynamics)
        per_atom = (
            (bad_rows(batch.forces), Failure.FORCES),
            (bad_rows(batch.positions), Failure.POSITIONS),
            (bad_rows(batch.velocities), Failure.VELOCITIES),
            (too_big, Failure.MAX_FORCE),
            (far, Failure.DISPLACEMENT),
        )
        # one per-system reduction for every per-atom check
        flags = jnp.stack([bad for bad, _ in per_atom], axis=-1) & batch.atom_mask[:, None]
        counts = batch.sum_atoms(flags.astype(jnp.int32))  # (S, 5)
        checks = [(counts[:, k] > 0, bit) for k, (_, bit) in enumerate(per_atom)]
        checks += [
            (~jnp.isfinite(batch.energy), Failure.ENERGY),
            (~jnp.all(jnp.isfinite(batch.cell), axis=(-2, -1)), Failure.CELL),
        ]
        if self.needs_stress:
            checks.append((~jnp.all(jnp.isfinite(batch.stress), axis=(-2, -1)), Failure.STRESS))
        if self.max_temperature is not None:
            hot = in_dynamics & ~(observables.temperature(batch) <= self.max_temperature)
            checks.append((hot, Failure.TEMPERATURE))
        checks.append((self.model.system_faults(batch), None))
        if isinstance(batch.neighbors, NeighborList):
            # Pairs were dropped: every result since is suspect. A concrete run regrows the list
            # and repeats the work from its last good state (discarding this); a traced one (vmap,
            # grad, a caller's jit) cannot, and its systems end FAILED instead of wrong.
            overflow = jnp.broadcast_to(batch.neighbors.overflow, batch.energy.shape)
            checks.append((overflow, Failure.NEIGHBOR_OVERFLOW))
        code = jnp.zeros(batch.energy.shape, jnp.int32)
        for bad, bit in checks:
            code = code | (bad if bit is None else jnp.where(bad, int(bit), 0))
        return jnp.where(batch.system_mask, code, 0)

    # ------------------------------------------------------------------ the step
    def step(self, batch: Batch, step_count: jax.Array | int = 0) -> tuple[Batch, StepReport]:
        """One fused step on an initialized batch (see the module docstring for the order).

        Parameters
        ----------
        batch : Batch
            Prepared by :meth:`init` (or returned by a previous step).
        step_count : int or Array
            The fused step number, used by hook frequencies ([S8]).

        Returns
        -------
        batch : Batch
        report : StepReport
        """
        step_count = jnp.asarray(step_count, jnp.int32)
        ctx = HookContext(step=step_count, exit_status=self.exit_status, fields=self.fields)
        status0 = batch.status
        masks = [batch.system_mask & (status0 == code) for code, _ in self.sub_stages]
        states = list(batch.stage_state)

        every = range(len(self.sub_stages))
        last = len(self.sub_stages) - 1
        batch = self._fire(DynamicsStage.BEFORE_STEP, batch, ctx, True, every)
        moved = jnp.zeros_like(batch.positions)  # by the sub-stages (not by hooks) this step
        for i, (_, stage) in enumerate(self.sub_stages):
            batch = self._fire(DynamicsStage.BEFORE_PRE_UPDATE, batch, ctx, i == 0, [i])
            before = batch.positions
            batch, states[i] = stage.pre_update(batch, states[i], masks[i])
            moved = moved + (batch.positions - before)
        batch = self._fire(DynamicsStage.AFTER_PRE_UPDATE, batch, ctx, True, [])
        batch = self._fire(DynamicsStage.BEFORE_COMPUTE, batch, ctx, True, [])
        batch = self.evaluate(batch)
        batch = self._fire(DynamicsStage.AFTER_COMPUTE, batch, ctx, True, every)
        batch = self._fire(DynamicsStage.BEFORE_POST_UPDATE, batch, ctx, True, [])
        for i, (_, stage) in enumerate(self.sub_stages):
            batch, states[i] = stage.post_update(batch, states[i], masks[i])
            batch = self._fire(DynamicsStage.AFTER_POST_UPDATE, batch, ctx, i == last, [i])
        batch = batch.replace(stage_state=tuple(states))
        batch = self._fire(DynamicsStage.AFTER_STEP, batch, ctx, True, every)

        # ---- bookkeeping and migration ([S5], [S10]-[S12])
        info = dict(batch.info)
        in_stage = jnp.stack(masks, axis=-1)  # (S, n_sub)
        stage_steps = info["stage_steps"] + in_stage.astype(jnp.int32)
        info["stage_steps"] = stage_steps
        # hooks (a failure detector) may already have moved systems out: start from their status
        status = batch.status
        # finite or failed: checked before any criterion, so a failed system never converges
        running = batch.system_mask & (status != self.exit_status)
        steps = jnp.sum(stage_steps, axis=-1)
        status, info = _fail(self, batch, info, status, running, steps, moved)
        batch = batch.replace(info=info)  # criteria (custom_op) see this step's counts
        energy_change = jnp.abs(batch.energy - info["prev_energy"])
        still = [m & (status == code) for m, (code, _) in zip(masks, self.sub_stages, strict=True)]
        budget_spent = jnp.zeros_like(batch.system_mask)
        converged = jnp.zeros_like(batch.system_mask)
        for i, (_, stage) in enumerate(self.sub_stages):
            if stage.n_steps is not None:
                spent = still[i] & (stage_steps[:, i] >= stage.n_steps)
                budget_spent = budget_spent | spent
                status = jnp.where(spent, self.next_code(i), status)
        for i, (_, stage) in enumerate(self.sub_stages):
            rule = self.migration_rule(i)
            if rule is None:
                continue
            fields = dict(stage.observables(batch, states[i]))
            fields["energy_change"] = energy_change
            conv = still[i] & (status0 == rule.source_status) & rule.converged(batch, fields)
            converged = converged | conv
            status = jnp.where(conv, rule.target_status, status)
        moved = status != status0
        graduated = moved & (status == self.exit_status) & batch.system_mask
        # an optimizer's velocities are its own bookkeeping (FIRE's are mass-free), not
        # physical ones: a system leaving an optimizer starts the next stage at rest
        left_optimizer = jnp.zeros_like(moved)
        for i, (_, stage) in enumerate(self.sub_stages):
            if stage.is_optimizer:
                left_optimizer = left_optimizer | (masks[i] & moved)
        at_rest = batch.to_atoms_axis(left_optimizer)[:, None]
        batch = batch.replace(velocities=jnp.where(at_rest, 0.0, batch.velocities))
        reason = jnp.where(
            graduated & converged,
            ExitReason.CONVERGED,
            jnp.where(graduated & budget_spent, ExitReason.BUDGET, info["exit_reason"]),
        )
        info["prev_energy"] = jnp.where(moved, jnp.inf, batch.energy)
        info["exit_reason"] = reason.astype(jnp.int32)
        batch = batch.replace(status=status.astype(jnp.int32), info=info)
        report = StepReport(graduated=graduated, converged=converged, budget_spent=budget_spent)
        ctx = HookContext(
            step=step_count, exit_status=self.exit_status, fields=self.fields, report=report
        )
        batch = self._fire(DynamicsStage.ON_CONVERGE, batch, ctx, True, every)
        return batch, report

    def _fire(self, when, batch, ctx, fused_level, sub_indices):
        """Fire the hooks due at ``when``: fused-level first, then the listed sub-stages'.

        Sub-stage hooks never fire at BEFORE_COMPUTE, AFTER_PRE_UPDATE or BEFORE_POST_UPDATE
        (the callers pass no sub-stage there, [S7]); fused-level hooks fire at all nine points,
        BEFORE_PRE_UPDATE before the first sub-stage and AFTER_POST_UPDATE after the last.
        """
        hooks = [h for h in self.hooks if h.stage == when] if fused_level else []
        for i in sub_indices:
            hooks += [h for h in self.sub_stages[i][1].hooks if h.stage == when]
        if not hooks:
            return batch
        return fire_hooks(hooks, batch, ctx)

    # ------------------------------------------------------------------ the run loop
    def prepare_for_cells(self, cells, pbc) -> FusedStage:
        """A copy whose model has the static choices (periodic image range) these cells need.

        Host-side; a model without a ``with_images_for`` method, or whose image range is set
        explicitly, is kept as it is.
        """
        model = self.model
        if getattr(model, "images", 0) is not None or not hasattr(model, "with_images_for"):
            return self
        fitted = model.with_images_for(cells, pbc)
        return eqx.tree_at(
            lambda f: [st.model for st in f.stages], self, [fitted] * len(self.stages)
        )

    def fit_per_system(self, batch: Batch) -> FusedStage:
        """A copy whose per-system parameters fit ``batch`` (host-side, before compiling).

        A per-system parameter (a sub-stage's ``per_system_parameters``) may be a scalar, one
        value per occupied system (spread over the occupied slots in slot order) or one per
        slot; anything else raises a ``ValueError`` naming the parameter and the accepted
        lengths (:func:`fused_dynamics.validation.fit_per_system`).
        """
        stages = tuple(validation.fit_per_system(st, batch) for st in self.stages)
        if all(a is b for a, b in zip(stages, self.stages, strict=True)):
            return self
        return eqx.tree_at(lambda f: f.stages, self, stages)

    def run(
        self,
        batch: Batch | None = None,
        n_steps: int | None = None,
        *,
        sampler=None,
        refill_frequency: int = 50,
        sinks=(),
        resume: bool = False,
        differentiable: bool = False,
        dtype=None,
        stats=None,
    ) -> Batch | None:
        """Run until every occupied slot has graduated, or for at most ``n_steps`` steps.

        The loop is a ``lax.while_loop`` inside one ``jax.jit`` (no Python per step); it
        compiles once per fused-stage structure, capacity and dtype. It works under
        ``jax.vmap`` (a leading ensemble axis on the batch or on stage parameters).

        Parameters
        ----------
        batch : Batch, optional
            A batch from :meth:`Batch.from_atoms`. It is initialized first (:meth:`init`:
            statuses set to ``entry_status``, fresh stage state and bookkeeping, forces primed
            by one evaluation) unless ``resume``. Omit it in inflight mode.
        n_steps : int, optional
            Maximum number of steps. Required when the final sub-stage never graduates.
        sampler : SizeAwareSampler, optional
            Inflight mode ([S14]): the batch comes from the sampler, graduated systems are
            written to ``sinks`` and their slots refilled every ``refill_frequency`` steps,
            until the sampler is exhausted and nothing is in flight. Returns ``None``.
        refill_frequency : int, default 50
            Steps per compiled chunk between host visits (inflight, or a batch with sinks).
        sinks : sequence of sinks
            Where graduated systems are written, each to the first with room ([S15]). With a
            batch, systems are streamed out as they graduate.
        resume : bool, default False
            Continue a batch returned by an earlier run of this fused stage where it stopped.
        differentiable : bool, default False
            Use a checkpointed loop of at most ``n_steps`` steps that supports reverse-mode
            ``jax.grad`` (``n_steps`` required).
        dtype : float dtype, optional
            Inflight mode: dtype of the batch built from the sampler.
        stats : RunStats, optional
            Filled in by inflight and streaming runs (steps, utilisation, compilations).

        Returns
        -------
        Batch or None
            The final batch, with ``info["exit_reason"]`` (:class:`ExitReason`) and
            ``info["stage_steps"]`` (steps each system spent in each sub-stage); ``None`` in
            inflight mode.
        """
        if n_steps is None and not self.graduates():
            raise ValueError(
                "FusedStage.run: the final sub-stage has neither a convergence_hook nor n_steps, "
                "so systems never graduate; give run(..., n_steps=...) or a budget/criterion."
            )
        if sampler is not None:
            if batch is not None:
                raise ValueError("FusedStage.run: give either a batch or a sampler, not both.")
            if n_steps is not None:
                raise ValueError("FusedStage.run: n_steps is not used in inflight mode.")
            from .inflight import run_inflight

            run_inflight(self, sampler, refill_frequency, list(sinks), dtype=dtype, stats=stats)
            return None
        if batch is None:
            raise ValueError("FusedStage.run: give a batch (or a sampler for inflight mode).")
        if differentiable and n_steps is None:
            raise ValueError("FusedStage.run(differentiable=True) needs n_steps.")
        if resume and not self.is_initialized(batch):
            raise ValueError(
                "FusedStage.run(resume=True): the batch was not prepared by this fused stage "
                "(stage state or bookkeeping missing); run it without resume first."
            )
        fused = self
        if not isinstance(batch.cell, jax.core.Tracer):
            self.model.check_batch(batch)
            fused = self.prepare_for_cells(
                batch.cell[batch.system_mask], batch.pbc[batch.system_mask]
            ).fit_per_system(batch)
        if sinks:
            from .inflight import run_streaming

            return run_streaming(
                fused, batch, n_steps, refill_frequency, list(sinks), resume, stats
            )
        limit = jnp.iinfo(jnp.int32).max if n_steps is None else int(n_steps)
        max_steps = int(n_steps) if differentiable else None
        fn = _run_loop
        if self.compile_step:
            fn = _compiled_run(self.compile_kwargs)
        while True:
            out = fn(fused, batch, jnp.asarray(limit, jnp.int32), bool(resume), max_steps)
            if not overflowed(out):
                return out
            batch = grow_neighbors(batch, out)  # and run again from the same start


def overflowed(batch: Batch) -> bool:
    """Whether a concrete batch's neighbor list overflowed during a run (host-side)."""
    nl = batch.neighbors
    if nl is None or isinstance(nl.overflow, jax.core.Tracer):
        return False
    return bool(np.any(np.asarray(nl.overflow)))


def grow_neighbors(batch: Batch, out: Batch | None = None) -> Batch:
    """The batch with a larger neighbor list (one recompilation), with a warning.

    ``out`` is the batch the overflowing run returned: its list recorded what was needed.
    """
    import warnings

    grown = batch.neighbors.grown(seen=None if out is None else out.neighbors)
    warnings.warn(
        f"fused_dynamics: the neighbor list overflowed its capacity; grown to "
        f"{grown.capacity} pairs and re-run from the last good state (one recompilation).",
        RuntimeWarning,
        stacklevel=3,
    )
    return batch.replace(neighbors=grown)


def run_steps(fused: FusedStage, batch: Batch, limit, start=0, max_steps=None):
    """At most ``limit`` steps numbered from ``start``, stopping early when all graduated.

    Returns
    -------
    batch : Batch
    taken : Array
        Steps taken.
    active : Array
        Sum over the steps of the slots holding a system not yet graduated.
    """

    def pending(batch):
        return batch.system_mask & (batch.status != fused.exit_status)

    def cond(carry):
        batch, k, _ = carry
        return (k < limit) & jnp.any(pending(batch))

    def body(carry):
        batch, k, active = carry
        active = active + jnp.sum(pending(batch), dtype=jnp.int32)
        batch, _ = fused.step(batch, start + k)
        return batch, k + 1, active

    zero = jnp.zeros((), jnp.int32)
    init = (batch, zero, zero)
    if max_steps is None:
        batch, taken, active = jax.lax.while_loop(cond, body, init)
    else:
        import equinox.internal as eqxi

        loop = eqxi.while_loop(cond, body, init, max_steps=max_steps, kind="checkpointed")
        batch, taken, active = loop
    return output_stress(fused, batch), taken, active


def output_stress(fused: FusedStage, batch: Batch) -> Batch:
    """The batch with the stress of its final positions, for outputs (one evaluation).

    A run whose steps do not read the stress skips it at every step (it costs about as much as
    the forces); what leaves the run still carries it, computed once here.
    """
    if fused.needs_stress:
        return batch
    return batch.replace(stress=fused.model(batch, stress=True).stress)


def _run_loop(
    fused: FusedStage, batch: Batch, limit: jax.Array, resume: bool, max_steps: int | None
) -> Batch:
    if not resume:
        batch = fused.init(batch)
    return run_steps(fused, batch, limit, 0, max_steps)[0]


def _fail(fused, batch, info, status, running, steps, displacement=None):
    """Move the ``running`` systems whose :meth:`FusedStage.failures` code is set out of the run.

    Returns the new status and info (``exit_reason`` FAILED, ``failure``, ``failure_step``).
    """
    code = jnp.where(running, fused.failures(batch, displacement), 0)
    failed = code != 0
    info = dict(info)
    info["exit_reason"] = jnp.where(failed, int(ExitReason.FAILED), info["exit_reason"])
    info["failure"] = jnp.where(failed, code, info["failure"]).astype(jnp.int32)
    info["failure_step"] = jnp.where(failed, steps, info["failure_step"]).astype(jnp.int32)
    status = jnp.where(failed, fused.exit_status, status).astype(jnp.int32)
    return status, info


def _init_impl(fused, batch: Batch) -> Batch:
    """The body of :meth:`FusedStage.init`."""
    if fused.init_fn is not None:
        batch = fused.init_fn(batch)
    s = batch.max_systems
    status = jnp.where(batch.system_mask, fused.entry_status, fused.exit_status).astype(jnp.int32)
    info = fresh_info(s, len(fused.sub_stages), batch.dtype)
    for hook in fused.all_hooks():
        info.update(hook.init_info(batch))
    batch = batch.replace(
        status=status,
        stage_state=tuple(stage.init_state(batch) for _, stage in fused.sub_stages),
        info=info,
    )
    for hook in fused.all_hooks():
        batch = hook.constrain(batch)
    if batch.neighbors is not None and not isinstance(batch.neighbors, NeighborList):
        batch = batch.replace(neighbors=batch.neighbors.update(batch))
    batch = fused.evaluate(batch)  # a NeighborList is refreshed (and kept) there
    status, info = _fail(fused, batch, batch.info, batch.status, batch.system_mask, 0)
    return batch.replace(status=status, info=info)


_init = eqx.filter_jit(_init_impl)

_COMPILED: dict = {}


def _compiled_run(compile_kwargs: dict):
    key = tuple(sorted((k, repr(v)) for k, v in compile_kwargs.items()))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(_run_loop, static_argnums=(3, 4), **compile_kwargs)
    return _COMPILED[key]


def fresh_info(num_systems: int, num_sub_stages: int, dtype) -> dict[str, jax.Array]:
    """Per-system bookkeeping of a fresh batch (every leaf has leading axis S)."""
    return {
        "stage_steps": jnp.zeros((num_systems, num_sub_stages), jnp.int32),
        "prev_energy": jnp.full((num_systems,), jnp.inf, dtype),
        "exit_reason": jnp.zeros((num_systems,), jnp.int32),  # ExitReason.RUNNING
        "failure": jnp.zeros((num_systems,), jnp.int32),  # Failure.NONE
        "failure_step": jnp.full((num_systems,), -1, jnp.int32),
    }


def _devices(tree: Any) -> frozenset:
    """Devices of the concrete arrays in ``tree`` (empty for tracers and Python numbers)."""
    out = set()
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            out |= set(leaf.devices())
    return frozenset(out)


def _same_model(a: Any, b: Any) -> bool:
    if a is b:
        return True
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        if x is y:
            continue
        if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
            return False
        if np.shape(x) != np.shape(y) or not np.all(np.asarray(x) == np.asarray(y)):
            return False
    return True
