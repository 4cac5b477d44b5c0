"""FusedStage: a chain of sub-stages run as one compiled step with one model evaluation.

Every system slot carries a ``status``; the sub-stage whose code equals it updates the system.
One step (docs/semantics.md §4)::

    BEFORE_STEP hooks
    for each sub-stage: BEFORE_PRE_UPDATE hooks, first half on its systems
    ONE model evaluation on the whole batch; AFTER_COMPUTE hooks
    for each sub-stage: second half on its systems, AFTER_POST_UPDATE hooks
    AFTER_STEP hooks
    step counters, finite-or-failed check, budgets -> migration, convergence -> migration,
    fresh state for the systems that entered a sub-stage, ON_CONVERGE hooks

The set of systems a sub-stage updates is fixed by the status at the start of the step.
This module holds the structure (validation, composition) and the pure step; control flow
(the loop over steps, chunks, refill, sinks, checkpoints) lives in :mod:`fused_dynamics.driver`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from . import composition, constraints, driver, health, migration, recording, validation
from .batch import Batch
from .compiled import filter_compile, model_options
from .convergence import ConvergenceHook, unreachable_criterion
from .hooks import DynamicsStage, Hook, HookContext, check_hook, fire_hooks
from .linalg3 import inv3, matvec3
from .migration import StepReport
from .models.neighbors import NeighborList
from .parameters import resolve_info
from .pipeline import DistributedPipeline
from .stages.base import Stage
from .status import fresh_info

__all__ = ["FusedStage", "StepReport"]


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
        Compile the run loop (:func:`~fused_dynamics.compiled.filter_compile`: array leaves
        traced, any other leaf of a model or hook static, so any Equinox module runs).
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
        Å per step. A system whose sub-stage moves an atom farther in one step fails
        (``Failure.DISPLACEMENT``): the time step (or an optimizer's step) is far too large for
        it (a cluster flying apart keeps finite numbers and a plausible 0 eV, and an optimizer
        would report its zero forces converged). Thermal motion moves atoms ~0.01-0.1 Å per
        step, ASE's optimizers at most 0.2 Å. A variable-cell step (a barostat, a cell filter)
        is measured net of the cell's change (docs/semantics.md §17). ``None``: no bound.
    max_temperature : float or None, default 1e5
        K. A system in a dynamics (not optimizer) sub-stage whose kinetic temperature exceeds it
        fails (``Failure.TEMPERATURE``): its dynamics blew up (a time step far too large, a
        collision), even while every number is still finite and its energy a plausible 0 eV.
        ``None``: no bound.
    always_stress : bool, default False
        Compute the stress at every evaluation even when nothing in the run reads it, so that
        every output carries it (see :attr:`needs_stress`).
    output_stress : bool, default True
        When nothing in the run reads the stress, compute it once for what the run returns
        (docs/semantics.md §6), in one evaluation with the final energy where the steps skip
        that too (:attr:`needs_energy`). ``False`` skips the stress there: what the run
        returns has NaN stress ("not computed") and outputs leave it out. The strain
        derivative costs about 2.7 force evaluations for a pair potential on CPU and about a
        third of a relaxation program's compile time (docs/semantics.md §6), so a relaxation
        whose stress nobody reads runs and compiles faster without it. No effect when
        something reads the stress (a barostat, a cell filter, ``always_stress``): then it is
        computed at every step.
    convergence_every : int, default 1
        Test the sub-stages' convergence criteria (docs/semantics.md §10) on a system only
        after every ``convergence_every``-th step it spends in a sub-stage
        (``info["stage_steps"]`` divisible by it), instead of after every step; an integer
        >= 1. The default 1 tests after every step, as docs/semantics.md §10 states. With
        ``k > 1`` the observables of the criteria (``fmax`` ...) are computed only on steps
        where some system is due, and a system whose criterion first holds between two tests
        migrates at the next test (at most ``k - 1`` steps later): a relaxation takes up to
        ``k - 1`` more steps, never fewer. The test depends only on the system's own step
        count, so a system migrates at the same step whatever its slot, its neighbours or the
        step at which it was loaded. Budgets (§11), the finite-or-failed check (§17) and
        ``energy_change`` (the change since the previous step) are unaffected.

    Notes
    -----
    Finite or failed: after the first evaluation and after every step, each running system is
    checked (one per-system reduction): a non-finite energy, forces, stress (where computed),
    positions, velocities or cell, a force above ``max_force``, a step longer than
    ``max_displacement``, a temperature above ``max_temperature`` (in dynamics sub-stages),
    or a fault the model reports
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
    output_stress: bool = eqx.field(static=True)
    convergence_every: int = eqx.field(static=True)

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
        output_stress: bool = True,
        convergence_every: int = 1,
    ):
        validation.check_integer(
            "FusedStage", "convergence_every", convergence_every, 1, validation.MAX_STEPS
        )
        for name, value, unit in (
            ("max_force", max_force, "eV/Å"),
            ("max_temperature", max_temperature, "K"),
            ("max_displacement", max_displacement, "Å"),
        ):
            validation.check_real(
                "FusedStage", name, value, validation.positive(), unit=unit, allow_none=True
            )
        pairs, codes, exit_status = composition.checked_sub_stages(
            sub_stages, entry_status, exit_status
        )
        validation.check_total_budget([stage for _, stage in pairs])
        self.stages = tuple(stage for _, stage in pairs)
        self.codes = tuple(codes)
        self.entry_status = int(entry_status)
        self.exit_status = exit_status
        self.compile_step = bool(compile_step)
        self.compile_options = tuple(sorted((compile_kwargs or {}).items()))
        self.init_fn = init_fn
        for h in hooks:
            check_hook("FusedStage: hooks", h)
        self.hooks = tuple(hooks)
        self.max_force = None if max_force is None else float(max_force)
        self.max_temperature = None if max_temperature is None else float(max_temperature)
        self.max_displacement = None if max_displacement is None else float(max_displacement)
        self.always_stress = bool(always_stress)
        validation.check_bool("FusedStage", "output_stress", output_stress)
        self.output_stress = bool(output_stress)
        self.convergence_every = int(convergence_every)

    # ------------------------------------------------------------------ composition
    def __add__(self, other: Stage | FusedStage) -> FusedStage:
        """Append a sub-stage (or every sub-stage of another fused stage) with the next codes.

        The options are this fused stage's; ``convergence_every`` is the other fused stage's
        where this one has the default 1 (so ``stage + FusedStage(..., convergence_every=k)``
        keeps ``k``); ``always_stress`` holds when either part has it, ``output_stress`` only
        when both do (either part's ``output_stress=False`` opts the whole chain out).
        """
        extra = [s for _, s in other.sub_stages] if isinstance(other, FusedStage) else [other]
        stages = [s for _, s in self.sub_stages] + extra
        fused = isinstance(other, FusedStage)
        every = self.convergence_every
        if fused and every == 1:
            every = other.convergence_every
        return self._with(
            sub_stages=list(enumerate(stages)),
            exit_status=-1,  # after the new last code
            hooks=self.hooks + (other.hooks if fused else ()),
            always_stress=self.always_stress or (fused and other.always_stress),
            output_stress=self.output_stress and (not fused or other.output_stress),
            convergence_every=every,
        )

    def __or__(self, other):
        """``self | other``: a :class:`~fused_dynamics.pipeline.DistributedPipeline` whose
        stages run on their own device groups (docs/semantics.md §16)."""
        if isinstance(other, Stage):
            other = FusedStage([(0, other)])
        return DistributedPipeline([self]) | other

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
            output_stress=self.output_stress,
            convergence_every=self.convergence_every,
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
        check_hook("FusedStage.register_fused_hook", hook)
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
        """The convergence criterion of sub-stage ``i`` (docs/semantics.md §10), codes filled."""
        code, stage = self.sub_stages[i]
        hook = stage.convergence_hook
        last = i == len(self.sub_stages) - 1
        # docs/semantics.md §10: a non-final stage without a criterion gets fmax <= 0.05 eV/Å,
        # so no system is stuck in it forever. A stage with a budget already moves systems on:
        # it keeps its budget alone (an NVT equilibration must not end early because forces
        # happen to be small).
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
        """Whether systems can ever reach ``exit_status`` (:meth:`why_never_graduates`)."""
        return self.why_never_graduates() is None

    def why_never_graduates(self) -> str | None:
        """Why no system could ever reach ``exit_status`` without a run's ``n_steps``, or None.

        The final sub-stage has neither a convergence hook nor ``n_steps``; or a sub-stage
        without ``n_steps`` has a criterion that can never hold (a negative threshold on a
        quantity that is never negative, ``fmax`` say: a way to keep systems in a stage for a
        budget, never an end). A run without ``n_steps`` would then never end, so
        :meth:`run` refuses it.
        """
        _, last = self.sub_stages[-1]
        if last.convergence_hook is None and last.n_steps is None:
            return (
                f"the final sub-stage ({type(last).__name__}) has neither a convergence_hook "
                "nor n_steps, so systems never graduate"
            )
        for i, (_, stage) in enumerate(self.sub_stages):
            if stage.n_steps is not None or stage.convergence_hook is None:
                continue
            never = unreachable_criterion(stage.convergence_hook)
            if never is not None:
                return (
                    f"sub-stage {i} ({type(stage).__name__}) has no n_steps and {never}, so "
                    "its systems never leave it"
                )
        return None

    def check_ends(self) -> None:
        """Raise ``ValueError`` (:meth:`why_never_graduates`) for a run without ``n_steps``
        that would never end; what :meth:`run` and :meth:`start` check first."""
        never = self.why_never_graduates()
        if never is not None:
            raise ValueError(
                f"FusedStage.run: {never}; give run(..., n_steps=...) or a budget/criterion."
            )

    # ------------------------------------------------------------------ state
    def init(self, batch: Batch) -> Batch:
        """Prepare a batch for this fused stage: status, stage state, bookkeeping, forces.

        Occupied slots get ``entry_status``; each sub-stage's state is created; the step count
        is set to 0; the model is evaluated once to prime energy, forces and stress
        (docs/semantics.md §6). ``init_fn`` is applied first. Called eagerly it is compiled
        (once per shape); while tracing it is traced inline.
        """
        if isinstance(batch.positions, jax.core.Tracer):
            return _init_impl(self, batch)
        return _init(self, batch)

    def _prepare(self, batch: Batch) -> Batch:
        """:meth:`init` without its model evaluation, traced inline (never compiled alone).

        Parameters
        ----------
        batch : Batch

        Returns
        -------
        Batch
            Statuses, stage state, bookkeeping and step count of :meth:`init`; energy, forces
            and stress as given. The run loop's first iteration (the priming pass,
            :func:`fused_dynamics.loop.run_steps`) evaluates the model.
        """
        return _prepare_impl(self, batch)

    def fresh_info(self, batch: Batch) -> dict[str, jax.Array]:
        """Per-system bookkeeping of a fresh batch: :func:`~fused_dynamics.status.fresh_info`
        and every hook's ``init_info`` (leaves with leading axis S)."""
        info = fresh_info(batch.max_systems, len(self.stages), batch.dtype)
        for hook in self.all_hooks():
            info.update(hook.init_info(batch))
        return info

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

    @property
    def needs_energy(self) -> bool:
        """Whether the steps of a run must evaluate the energy: a sub-stage's update may read
        it (:attr:`Stage.reads_energy <fused_dynamics.stages.base.Stage.reads_energy>`), a
        convergence criterion reads an energy (any key naming one but ``kinetic_energy``) or is
        custom (``custom_op``), or the run has a hook (a hook may read any field). When it
        is not, a run evaluates forces only at every step and the energy of the final
        positions once, at its end or at the end of each chunk (docs/semantics.md §6)."""
        if self.all_hooks():
            return True
        for st in self.stages:
            if st.reads_energy:
                return True
            rule = st.convergence_hook
            if rule is None:
                continue
            if rule.custom_op is not None:
                return True
            if any("energy" in c.key and c.key != "kinetic_energy" for c in rule.criteria):
                return True
        return False

    @property
    def computes_exit_stress(self) -> bool:
        """Whether a run computes the stress once for what it returns: ``output_stress`` and
        nothing reads it at every step (docs/semantics.md §6)."""
        return self.output_stress and not self.needs_stress

    def evaluate(self, batch: Batch, energy: bool = True) -> Batch:
        """Evaluate the model once and write energy, forces and stress into the batch.

        The stress is computed only when something reads it (:attr:`needs_stress`); else it is
        NaN ("not computed"), and ``to_atoms`` and the sinks leave it out rather than report a
        wrong number. ``energy=False`` (static; a run's steps when nothing reads the energy,
        :attr:`needs_energy`): the energy is NaN ("not computed") and XLA drops its sum, so
        the evaluation costs the forces alone (on the W1 relaxation's dense pairs the energy
        adds about 45 % to them).

        A batch carrying a :class:`~fused_dynamics.NeighborList` has it refreshed first and
        stored, so that an overflow always reaches the run loop (which regrows the list and
        repeats the work). The model gets that list marked ``refreshed``, so that a model that
        refreshes its list itself does not check (and compile) the rebuild a second time. Forces
        come out with the constraints applied
        (:func:`fused_dynamics.constraints.project_forces`).
        """
        given = batch
        if isinstance(batch.neighbors, NeighborList):
            fresh = batch.neighbors.update(batch)
            batch = batch.replace(neighbors=fresh)
            given = batch.replace(neighbors=dataclasses.replace(fresh, refreshed=True))
        out = self.model(given, stress=self.needs_stress)
        forces = constraints.project_forces(batch, out.forces)
        e = out.energy if energy else jnp.full_like(out.energy, jnp.nan)
        return batch.replace(energy=e, forces=forces, stress=out.stress)

    def failures(self, batch: Batch, displacement: jax.Array | None = None) -> jax.Array:
        """Failure code of every slot, shape (S,) int32 (0: healthy); see
        :func:`fused_dynamics.health.system_failures`."""
        return health.system_failures(self, batch, displacement)

    # ------------------------------------------------------------------ the step
    def step(self, batch: Batch, step_count: jax.Array | int | None = None, *, records=None):
        """One fused step on an initialized batch (see the module docstring for the order).

        Parameters
        ----------
        batch : Batch
            Prepared by :meth:`init` (or returned by a previous step).
        step_count : int or Array, optional
            The fused step number hook frequencies count (docs/semantics.md §8); default
            ``batch.step_count``. The returned batch's ``step_count`` is this plus one.
        records : Recorder, optional
            Record mode (:mod:`fused_dynamics.recording`, what a run in chunks passes): host
            hooks leave their payloads in ``records`` instead of calling back to the host.

        Returns
        -------
        batch : Batch
        report : StepReport
        """
        return self._step(batch, step_count, records, priming=None)

    def _step(
        self, batch: Batch, step_count, records, priming, slots=None, energy=True, fresh=None
    ):
        """One fused step (:meth:`step`), or the priming pass of a prepared batch.

        Parameters
        ----------
        batch : Batch
            Initialized, or prepared only (:meth:`_prepare`) when ``priming`` is true.
        step_count : int or Array or None
            The step this is (hooks' schedules); None: ``batch.step_count``.
        records : dict or None
            Record mode's device buffers (:mod:`fused_dynamics.recording`), or None.
        priming : Array or None
            A traced bool scalar from the run loop (:func:`fused_dynamics.loop.run_steps`):
            when true this is the priming pass: no sub-stage moves a system and no hook is due,
            the model is evaluated, failures are checked and the step count is kept, so the
            result is that of :meth:`init`. None: an ordinary step.
        slots : Array or None, shape (S,) bool
            With ``priming``: the pass primes only these slots (refills admitted by a chunk);
            the others keep their energy, forces and stress bit for bit.
        energy : bool
            Static. False: forces only (:meth:`evaluate`), the energy NaN and not checked;
            a run loop that does so computes it at its end (:func:`fused_dynamics.loop.run_steps`).
        fresh : Array or None, shape (S,) bool
            An ordinary step (``priming`` false) that also primes these slots (refills a chunk
            admitted while other systems are running): they take no step (no sub-stage
            updates them, no budget or criterion is checked), their evaluation is their first,
            and their failure check is that of a priming pass.

        Returns
        -------
        batch : Batch
        report : StepReport
            The systems that graduated, converged or spent their budget this step.
        """
        self = resolve_info(self, batch)  # from_info parameters: the batch's values (§14a)
        if step_count is None:
            step_count = 0 if batch.step_count is None else batch.step_count
        step_count = jnp.asarray(step_count, jnp.int32)
        ctx = HookContext(
            step=step_count, exit_status=self.exit_status, fields=self.fields, priming=priming
        )
        status0 = batch.status
        masks = [batch.system_mask & (status0 == code) for code in self.codes]
        if priming is not None:
            masks = [m & ~priming for m in masks]
        if fresh is not None:
            masks = [m & ~fresh for m in masks]
        states = list(batch.stage_state)
        every = range(len(self.sub_stages))
        last = len(self.sub_stages) - 1
        several = last > 0  # one sub-stage: its mask is rarely empty (the priming pass)
        fire = functools.partial(self._fire, records=records)
        batch = fire(DynamicsStage.BEFORE_STEP, batch, ctx, True, every)
        moved = jnp.zeros_like(batch.positions)  # by the sub-stages (not by hooks) this step
        for i, (_, stage) in enumerate(self.sub_stages):
            batch = fire(DynamicsStage.BEFORE_PRE_UPDATE, batch, ctx, i == 0, [i])
            before, cell = batch.positions, batch.cell
            batch, states[i] = stage.pre_update(batch, states[i], masks[i], skip_empty=several)
            if stage.needs_stress:  # a variable-cell step: the move net of the cell's own
                # (the affine move of atoms far from the origin is no blow-up; docs/semantics.md
                # §17): the old positions carried by the strain C_old^-1 C_new
                strain = batch.to_atoms_axis(jnp.matmul(inv3(cell), batch.cell))
                before = matvec3(before, strain)
            moved = moved + (batch.positions - before)
        batch = fire(DynamicsStage.AFTER_PRE_UPDATE, batch, ctx, True, [])
        batch = fire(DynamicsStage.BEFORE_COMPUTE, batch, ctx, True, [])
        unevaluated = batch
        batch = self.evaluate(batch, energy)
        if slots is not None:  # a priming pass of some slots: the others keep their values
            keep = priming & ~slots
            batch = batch.replace(
                energy=jnp.where(keep, unevaluated.energy, batch.energy),
                stress=jnp.where(keep[:, None, None], unevaluated.stress, batch.stress),
                forces=constraints.keep_fixed(
                    batch.to_atoms_axis(keep)[:, None], unevaluated.forces, batch.forces
                ),
            )
        batch = fire(DynamicsStage.AFTER_COMPUTE, batch, ctx, True, every)
        batch = fire(DynamicsStage.BEFORE_POST_UPDATE, batch, ctx, True, [])
        for i, (_, stage) in enumerate(self.sub_stages):
            batch, states[i] = stage.post_update(batch, states[i], masks[i], skip_empty=several)
            batch = fire(DynamicsStage.AFTER_POST_UPDATE, batch, ctx, i == last, [i])
        batch = batch.replace(stage_state=tuple(states))
        batch = fire(DynamicsStage.AFTER_STEP, batch, ctx, True, every)
        batch, report = migration.migrate(
            self, batch, status0, masks, moved, priming, slots, energy=energy, fresh=fresh
        )
        batch = self._fire_on_converge(batch, ctx, report, masks, records)
        advance = 1 if priming is None else jnp.where(priming, 0, 1)
        return batch.replace(step_count=step_count + advance), report

    def _fire_on_converge(self, batch, ctx, report, masks, records=None):
        """ON_CONVERGE hooks: fused-level ones on steps where some system left a sub-stage,
        a sub-stage's on steps where some of its systems did, each with the report of which
        (docs/semantics.md §7). In record mode the cond also returns the host hooks' payloads
        (zeros on steps where the group does not fire)."""
        left = report.converged | report.budget_spent
        keys = self._hook_keys()
        groups = [(0, left, report)]
        for i in range(len(self.sub_stages)):
            groups.append((i + 1, left & masks[i], report.restricted(masks[i])))
        for g, which, rep in groups:
            keyed = [(k, h) for k, h in keys[g] if h.stage == DynamicsStage.ON_CONVERGE]
            if not keyed:
                continue
            sub = dataclasses.replace(ctx, report=rep)

            def fire(b, keyed=keyed, c=sub):
                inner = None if records is None else recording.Recorder()
                b = fire_hooks([h for _, h in keyed], b, c, inner, [k for k, _ in keyed])
                return b, ({} if inner is None else inner.entries)

            idle = {}  # the recorded payloads of a step where the group does not fire: zeros
            if records is not None:
                idle = recording.zeros_like_shapes(jax.eval_shape(fire, batch)[1])
            fires = jnp.any(which) if records is None else records.any(which)
            batch, entries = jax.lax.cond(fires, fire, lambda b, i=idle: (b, i), batch)
            if records is not None:
                records.entries.update(entries)  # a group's keys ascend in firing order
        return batch

    def _hook_keys(self) -> list[list[tuple[int, Hook]]]:
        """The hooks with their positions in :meth:`all_hooks`: fused-level first, then each
        sub-stage's."""
        groups, k = [], 0
        for hooks in [self.hooks] + [st.hooks for _, st in self.sub_stages]:
            groups.append([(k + j, h) for j, h in enumerate(hooks)])
            k += len(hooks)
        return groups

    def _fire(self, when, batch, ctx, fused_level, sub_indices, records=None):
        """Fire the hooks due at ``when``: fused-level first, then the listed sub-stages'.

        Sub-stage hooks never fire at BEFORE_COMPUTE, AFTER_PRE_UPDATE or BEFORE_POST_UPDATE
        (the callers pass no sub-stage there, docs/semantics.md §7); fused-level hooks fire at
        all nine points, BEFORE_PRE_UPDATE before the first sub-stage and AFTER_POST_UPDATE
        after the last.
        """
        keys = self._hook_keys()
        groups = ([0] if fused_level else []) + [i + 1 for i in sub_indices]
        keyed = [(k, h) for g in groups for k, h in keys[g] if h.stage == when]
        if not keyed:
            return batch
        return fire_hooks([h for _, h in keyed], batch, ctx, records, [k for k, _ in keyed])

    # ------------------------------------------------------------------ the run loop
    def prepare_for_cells(self, cells, pbc) -> FusedStage:
        """A copy whose model has the static choices (periodic image range) these cells need.

        Host-side; a model without a ``with_images_for`` method, or whose image range is set
        explicitly, is kept as it is.
        """
        model = self.model
        if getattr(model, "images", 0) is not None or not hasattr(model, "with_images_for"):
            return self
        return self.with_model(model.with_images_for(cells, pbc))

    def fit_size_buckets(self, batch: Batch) -> FusedStage:
        """A copy whose model has size buckets fitted to a fixed batch (host-side).

        For a model with ``with_size_buckets`` (the pair potentials) whose ``size_buckets`` is
        not set: see :meth:`~fused_dynamics.models.PairPotential.with_size_buckets` (``None``
        again where buckets would save little). Other models are kept as they are.
        """
        model = self.model
        if getattr(model, "size_buckets", 0) is not None or not hasattr(model, "with_size_buckets"):
            return self
        fitted = model.with_size_buckets(batch)
        return self if fitted.size_buckets is None else self.with_model(fitted)

    def with_model(self, model) -> FusedStage:
        """A copy whose sub-stages all hold ``model`` (host-side; the structure is kept)."""
        return eqx.tree_at(
            lambda f: [st.model for st in f.stages], self, [model] * len(self.stages)
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

    def run(self, batch: Batch | None = None, n_steps: int | None = None, **options):
        """Run until every occupied slot has graduated, or for at most ``n_steps`` steps.

        A fixed batch runs in one compiled ``lax.while_loop`` (no Python per step); with a
        sampler (inflight) or sinks the run goes in compiled chunks with host visits between
        them. See :func:`fused_dynamics.driver.run` for every option (``sampler``, ``sinks``,
        ``refill_frequency``, ``resume``, ``checkpoint``, ``checkpoint_every``,
        ``differentiable``, ``dtype``, ``mesh``) and :meth:`start` to drive an inflight run
        chunk by chunk.

        Returns
        -------
        Batch or RunStats
            The final batch for a fixed-batch run (``info["exit_reason"]``,
            ``info["stage_steps"]``, ``step_count``); the run's statistics
            (:class:`~fused_dynamics.RunStats`) for an inflight run.
        """
        return driver.run(self, batch, n_steps, **options)

    def start(self, batch: Batch | None = None, **options) -> driver.Run:
        """A live run to drive by hand (the original's inflight control); see
        :class:`fused_dynamics.driver.Run`. With ``mesh=`` the systems are spread over the
        mesh's devices (:class:`fused_dynamics.sharding.ShardedRun`)."""
        return driver.start(self, batch, **options)


def _init_impl(fused: FusedStage, batch: Batch) -> Batch:
    """The body of :meth:`FusedStage.init`: :func:`_prepare_impl`, then the priming evaluation
    and the failure check."""
    batch = _prepare_impl(fused, batch)
    fused = resolve_info(fused, batch)
    batch = fused.evaluate(batch)  # a NeighborList is refreshed (and kept) there
    status, info = health.fail_failed(fused, batch, batch.info, batch.status, batch.system_mask, 0)
    return batch.replace(status=status, info=info)


def _prepare_impl(fused: FusedStage, batch: Batch) -> Batch:
    """:meth:`FusedStage.init` up to its model evaluation: ``init_fn``, statuses, stage
    state, bookkeeping, step count 0, an optimizer's systems at rest, the hooks' constraints
    and a neighbor structure other than a :class:`NeighborList` refreshed. A run's loop makes
    the priming evaluation itself (:func:`fused_dynamics.loop.run_steps`), so that its program
    holds one copy of the model."""
    if fused.init_fn is not None:
        batch = fused.init_fn(batch)
    fused = resolve_info(fused, batch)
    status = jnp.where(batch.system_mask, fused.entry_status, fused.exit_status).astype(jnp.int32)
    info = fused.fresh_info(batch)
    batch = batch.replace(
        status=status,
        stage_state=tuple(stage.init_state(batch) for stage in fused.stages),
        info=info,
        step_count=jnp.zeros((), jnp.int32),
    )
    entry = fused.stages[fused.codes.index(fused.entry_status)]
    if entry.is_optimizer:  # see _enter
        rest = batch.to_atoms_axis(batch.system_mask)[:, None]
        batch = batch.replace(velocities=jnp.where(rest, 0.0, batch.velocities))
    for hook in fused.all_hooks():
        batch = hook.constrain(batch)
    if batch.neighbors is not None and not isinstance(batch.neighbors, NeighborList):
        batch = batch.replace(neighbors=batch.neighbors.update(batch))
    return batch


_init = filter_compile(_init_impl, options_for=model_options)
