"""Migration between sub-stages: step counters, the finite-or-failed check, budgets and
criteria, and fresh state for systems that entered a sub-stage (docs/semantics.md §10-§12,
§17, §18). Called by :meth:`FusedStage.step <fused_dynamics.FusedStage.step>`."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from . import health
from .batch import Batch
from .parameters import budget
from .stages.base import select_state
from .status import ExitReason

__all__ = ["StepReport", "migrate", "enter"]


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

    def restricted(self, mask: jax.Array) -> StepReport:
        """The report for the systems in ``mask`` (S,) bool only (one sub-stage's)."""
        return StepReport(*(x & mask for x in (self.graduated, self.converged, self.budget_spent)))


def migrate(
    fused, batch: Batch, status0, masks, moved, priming=None, slots=None, energy=True, fresh=None
):
    """Step counters, the finite-or-failed check, budgets and criteria, entry into stages.

    ``status0`` is the status at the start of the step and ``masks[i]`` the systems sub-stage
    ``i`` updated (docs/semantics.md §5); ``moved`` is how far the sub-stages moved each atom.
    On a run's priming pass (``priming`` true, every mask empty) only the failure check acts,
    on the primed ``slots`` (S,) bool (default: every slot), and no system has a previous
    energy yet. ``fresh`` (S,) bool: slots primed by this ordinary step (their masks empty, so
    they are checked for failures only, at 0 steps), which have no previous energy yet either.
    ``energy=False`` (static): the step did not evaluate the energy, which is then not checked
    (:func:`fused_dynamics.health.system_failures`).
    Returns the batch with new statuses, bookkeeping and fresh state for the systems that
    entered a sub-stage, and the :class:`StepReport`.
    """
    info = dict(batch.info)
    stage_steps = info["stage_steps"] + jnp.stack(masks, axis=-1).astype(jnp.int32)
    info["stage_steps"] = stage_steps
    # hooks (a failure detector) may already have moved systems out: start from their status
    status = batch.status
    # finite or failed: checked before any criterion, so a failed system never converges
    running = batch.system_mask & (status != fused.exit_status)
    if slots is not None:
        running = running & (~priming | slots)
    steps = jnp.sum(stage_steps, axis=-1)
    status, info = health.fail_failed(
        fused, batch, info, status, running, steps, moved, energy=energy
    )
    batch = batch.replace(info=info)  # criteria (custom_op) see this step's counts
    energy_change = jnp.abs(batch.energy - info["prev_energy"])
    still = [m & (status == code) for m, code in zip(masks, fused.codes, strict=True)]
    budget_spent = jnp.zeros_like(batch.system_mask)
    converged = jnp.zeros_like(batch.system_mask)
    for i, stage in enumerate(fused.stages):  # docs/semantics.md §11
        if stage.n_steps is not None:  # an int, or one per slot (from_info)
            spent = still[i] & (stage_steps[:, i] >= budget(stage, batch))
            budget_spent = budget_spent | spent
            status = jnp.where(spent, fused.next_code(i), status)
    for i, stage in enumerate(fused.stages):  # docs/semantics.md §10
        rule = fused.migration_rule(i)
        if rule is None:
            continue
        due = still[i] & (status0 == rule.source_status)
        if fused.convergence_every > 1:
            due = due & (stage_steps[:, i] % fused.convergence_every == 0)
        conv = _converged(rule, stage, batch, batch.stage_state[i], energy_change, due)
        converged = converged | conv
        status = jnp.where(conv, rule.target_status, status)
    moved_on = status != status0
    graduated = moved_on & (status == fused.exit_status) & batch.system_mask
    reason = jnp.where(
        graduated & converged,
        ExitReason.CONVERGED,
        jnp.where(graduated & budget_spent, ExitReason.BUDGET, info["exit_reason"]),
    )
    prev_energy = jnp.where(moved_on, jnp.inf, batch.energy)
    if priming is not None:
        prev_energy = jnp.where(priming, info["prev_energy"], prev_energy)
    if fresh is not None:
        prev_energy = jnp.where(fresh, info["prev_energy"], prev_energy)
    info["prev_energy"] = prev_energy
    info["exit_reason"] = reason.astype(jnp.int32)
    batch = batch.replace(status=status.astype(jnp.int32), info=info)
    left_optimizer = jnp.zeros_like(moved_on)
    for i, stage in enumerate(fused.stages):
        if stage.is_optimizer:
            left_optimizer = left_optimizer | (masks[i] & moved_on)
    # most steps move no system: then enter() is the identity, and is skipped
    batch = jax.lax.cond(
        jnp.any(moved_on),
        lambda b: enter(fused, b, moved_on & b.system_mask, left_optimizer),
        lambda b: b,
        batch,
    )
    report = StepReport(graduated=graduated, converged=converged, budget_spent=budget_spent)
    return batch, report


def _converged(rule, stage, batch: Batch, state, energy_change, due) -> jax.Array:
    """``due & rule.converged(...)``, shape (S,) bool; the criterion's observables (``fmax``
    ...) are computed only on steps where some system is due (a ``lax.cond``), else all False,
    the same bits."""

    def test(batch):
        fields = dict(stage.observables(batch, state))
        fields["energy_change"] = energy_change
        return due & rule.converged(batch, fields)

    return jax.lax.cond(jnp.any(due), test, lambda _: jnp.zeros_like(due), batch)


def enter(fused, batch: Batch, entered, at_rest) -> Batch:
    """Fresh sub-stage state for the ``entered`` systems (S,) bool, from the batch as it is.

    The engine tells a stage that a system just arrived (docs/semantics.md §18): its slice of
    that stage's state is replaced by ``init_state(batch)``, so no stage keeps a "first step"
    flag. An optimizer's velocities are its own bookkeeping (FIRE's), not physical ones: a
    system entering or leaving an optimizer (``at_rest``) starts at rest.
    """
    states = list(batch.stage_state)
    for i, (code, stage) in enumerate(fused.sub_stages):
        into = entered & (batch.status == code)
        states[i] = select_state(into, stage.init_state(batch), states[i])
        if stage.is_optimizer:
            at_rest = at_rest | into
    rest = batch.to_atoms_axis(at_rest)[:, None]
    return batch.replace(
        stage_state=tuple(states), velocities=jnp.where(rest, 0.0, batch.velocities)
    )
