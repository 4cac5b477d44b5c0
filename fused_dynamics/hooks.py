"""Hook points, the hook protocol and exit reasons.

A hook runs at one :class:`DynamicsStage` of the fused step, every ``every_n_steps`` steps
(``step % every_n_steps == 0``, counted before the increment, so every hook fires at step 0).
Two kinds of work, either or both:

- ``on_host(data)``: a host callback (``jax.debug.callback``, ordered) that receives NumPy copies
  of only the batch fields named in ``fields`` plus the step number, the step report where there
  is one, and the system mask. It is wrapped in ``lax.cond`` on the frequency so an idle hook
  costs one integer comparison.
- ``apply(batch, step) -> batch``: a traced, pure transformation of the batch (freezing atoms,
  wrapping positions, moving failed systems to a failure status), also gated on the frequency.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import numpy as np

__all__ = ["DynamicsStage", "ExitReason", "Hook", "HookData", "fire_hooks"]


class DynamicsStage(enum.IntEnum):
    """The nine points of a step at which a hook may run."""

    BEFORE_STEP = 0
    BEFORE_PRE_UPDATE = 1
    AFTER_PRE_UPDATE = 2
    BEFORE_COMPUTE = 3
    AFTER_COMPUTE = 4
    BEFORE_POST_UPDATE = 5
    AFTER_POST_UPDATE = 6
    AFTER_STEP = 7
    ON_CONVERGE = 8


class ExitReason(enum.IntEnum):
    """How a system left the run (``batch.info["exit_reason"]``)."""

    RUNNING = 0
    CONVERGED = 1
    BUDGET = 2
    FAILED = 3


@dataclass(frozen=True)
class HookData:
    """What a host callback receives.

    Attributes
    ----------
    step : int
        The fused step number.
    stage : DynamicsStage
    arrays : dict[str, numpy.ndarray]
        Host copies of the requested batch fields (and ``system_mask``, ``status``,
        ``system_id`` always), plus ``graduated``/``converged``/``budget_spent`` at
        ``ON_CONVERGE``.
    """

    step: int
    stage: DynamicsStage
    arrays: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


class Hook(eqx.Module):
    """Base class of hooks. Subclasses override :meth:`on_host` and/or :meth:`apply`.

    Parameters
    ----------
    stage : DynamicsStage
        Where in the step it runs.
    every_n_steps : int, default 1
    fields : tuple of str
        Batch fields (or ``info`` keys) copied to the host for :meth:`on_host`.
    """

    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.AFTER_STEP, kw_only=True)
    every_n_steps: int = eqx.field(static=True, default=1, kw_only=True)
    fields: tuple[str, ...] = eqx.field(static=True, default=(), kw_only=True)

    def __check_init__(self):
        if int(self.every_n_steps) < 1:
            raise ValueError(f"{type(self).__name__}: every_n_steps must be >= 1.")

    has_host: bool = eqx.field(static=True, default=True, kw_only=True)

    def on_host(self, data: HookData) -> None:
        """Host-side work; receives NumPy copies. Default: nothing."""

    def apply(self, batch, step: jax.Array, report: Any = None):
        """Traced transformation of the batch. Default: identity."""
        return batch


def _gather_fields(hook: Hook, batch, report) -> dict[str, Any]:
    out = {"system_mask": batch.system_mask, "status": batch.status, "system_id": batch.system_id}
    for name in hook.fields:
        out[name] = batch.info[name] if name in batch.info else getattr(batch, name)
    if report is not None:
        out.update(
            graduated=report.graduated,
            converged=report.converged,
            budget_spent=report.budget_spent,
        )
    return out


def fire_hooks(hooks, batch, step_count, when, fused, report=None):
    """Run ``hooks`` at point ``when``, each gated by ``lax.cond`` on its frequency."""
    for hook in hooks:
        due = (step_count % hook.every_n_steps) == 0

        def apply_branch(b, hook=hook):
            return hook.apply(b, step_count, report)

        if type(hook).apply is not Hook.apply:
            batch = jax.lax.cond(due, apply_branch, lambda b: b, batch)
        if hook.has_host and type(hook).on_host is not Hook.on_host:
            payload = _gather_fields(hook, batch, report)

            def host(step, payload, hook=hook):
                arrays = {k: np.asarray(v) for k, v in payload.items()}
                hook.on_host(HookData(step=int(step), stage=when, arrays=arrays))

            def send(step, payload, host=host):
                jax.debug.callback(host, step, payload, ordered=True)

            jax.lax.cond(due, send, lambda *_: None, step_count, payload)
    return batch
