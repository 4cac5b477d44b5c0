"""The hook protocol: hook points, the :class:`Hook` base class, and how hooks fire.

The built-in hooks are in :mod:`fused_dynamics.hooks_builtin`; :mod:`fused_dynamics.hooks`
gathers both (import hooks from there). See :mod:`fused_dynamics.hooks` for what a hook does.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .status import ExitReason, Failure

__all__ = [
    "DynamicsStage",
    "Hook",
    "HookContext",
    "HookData",
    "check_hook",
    "fail_systems",
    "fire_hooks",
    "has_host",
]


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


@dataclass(frozen=True)
class HookData:
    """What a host callback receives.

    Attributes
    ----------
    step : int
        The fused step number.
    stage : DynamicsStage
        The point of the step.
    arrays : dict[str, numpy.ndarray]
        Host copies of the requested fields, plus ``system_mask``, ``status``, ``system_id``,
        and ``graduated``/``converged``/``budget_spent`` at ``ON_CONVERGE``.
    """

    step: int
    stage: DynamicsStage
    arrays: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


@dataclass(frozen=True)
class HookContext:
    """What a traced :meth:`Hook.apply` receives besides the batch.

    Attributes
    ----------
    step : Array
        The fused step number (int32 scalar).
    exit_status : int
        Status of graduated (and failed) systems.
    fields : callable
        ``fields(batch) -> dict`` of per-system observables (each system's from the sub-stage
        that owns it): ``fmax``, ``energy``, ``kinetic_energy``, ``temperature`` and what the
        stages add (``conserved_energy``).
    report : StepReport or None
        At ``ON_CONVERGE``: the systems that graduated, converged or spent their budget.
    priming : Array or None
        A bool scalar, true on the priming pass of a run (its first model evaluation, made by
        the loop's first iteration; see :func:`fused_dynamics.loop.run_steps`): no hook is due.
        ``None`` where there is no priming pass (a step by hand, a resumed run).
    """

    step: jax.Array
    exit_status: int
    fields: Callable
    report: Any = None
    priming: Any = None


class Hook(eqx.Module):
    """Base class of hooks. Subclasses override :meth:`on_host` and/or :meth:`apply`.

    The one base class users subclass (neither method is required on its own, so none is
    abstract). The built-in hooks are final; those that share behaviour do so through an
    abstract base (:class:`~fused_dynamics.hooks.AbstractFailureHook`,
    :class:`~fused_dynamics.hooks.AbstractSnapshotHook`), following Equinox's
    abstract-or-final pattern.

    Parameters
    ----------
    stage : DynamicsStage
        Where in the step it runs.
    every_n_steps : int, default 1
    fields : tuple of str
        What :meth:`on_host` receives: batch fields, ``info`` keys or per-system observables.
    """

    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.AFTER_STEP, kw_only=True)
    every_n_steps: int = eqx.field(static=True, default=1, kw_only=True)
    fields: tuple[str, ...] = eqx.field(static=True, default=(), kw_only=True)

    def __check_init__(self):
        if int(self.every_n_steps) < 1:
            raise ValueError(f"{type(self).__name__}: every_n_steps must be >= 1.")
        if not isinstance(self.stage, DynamicsStage):
            raise TypeError(f"{type(self).__name__}: stage must be a DynamicsStage.")

    def init_info(self, batch) -> dict[str, jax.Array]:
        """Per-system bookkeeping arrays (leading axis S) this hook keeps in ``batch.info``."""
        return {}

    def constrain(self, batch):
        """The batch with this hook's constraints added (``fixed`` / ``fix_com``), applied when
        a run initializes the batch. Default: none."""
        return batch

    def on_host(self, data: HookData) -> None:
        """Host-side work on NumPy copies. Default: nothing."""

    def apply(self, batch, ctx: HookContext):
        """Traced transformation of the batch. Default: identity."""
        return batch


def check_hook(owner: str, hook: Any) -> Hook:
    """Refuse anything that is not a :class:`Hook` where a hook is expected.

    Without this check a wrong object (a function, a hook class instead of an instance) fails
    later inside ``jax.jit`` with an opaque error.

    Parameters
    ----------
    owner : str
        Who asks, for the message (e.g. ``"NVE.register_hook"``).
    hook : object

    Returns
    -------
    Hook
        ``hook`` itself.

    Raises
    ------
    TypeError
        ``"{owner}: expected an instance of fused_dynamics.Hook, got a {type}: {repr}."``
    """
    if isinstance(hook, Hook):
        return hook
    if isinstance(hook, type):
        got = f"the class {hook.__module__}.{hook.__qualname__} itself, not an instance"
        if issubclass(hook, Hook):
            got += f" (write {hook.__qualname__}(...))"
    else:
        kind = type(hook)
        shown = repr(hook)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        got = f"a {kind.__module__}.{kind.__qualname__}: {shown}"
    raise TypeError(f"{owner}: expected an instance of fused_dynamics.Hook, got {got}.")


def zeros_like_shapes(shapes):
    """Zeros with the shapes and dtypes of a pytree of ``jax.ShapeDtypeStruct``."""
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def has_host(hook: Hook) -> bool:
    """Whether ``hook`` overrides :meth:`Hook.on_host` (host work to hand arrays to)."""
    return type(hook).on_host is not Hook.on_host


def _has_apply(hook: Hook) -> bool:
    return type(hook).apply is not Hook.apply


def _gather_fields(hook: Hook, batch, ctx: HookContext) -> dict[str, Any]:
    out = {"system_mask": batch.system_mask, "status": batch.status, "system_id": batch.system_id}
    derived = None
    for name in hook.fields:
        if name in batch.info:
            out[name] = batch.info[name]
        elif hasattr(batch, name):
            out[name] = getattr(batch, name)
        else:
            derived = ctx.fields(batch) if derived is None else derived
            if name not in derived:
                raise KeyError(f"{type(hook).__name__} asks for unknown field {name!r}.")
            out[name] = derived[name]
    if ctx.report is not None:
        out.update(
            graduated=ctx.report.graduated,
            converged=ctx.report.converged,
            budget_spent=ctx.report.budget_spent,
        )
    return out


def fire_hooks(hooks, batch, ctx: HookContext, records=None, keys=None):
    """Run ``hooks`` at one point of the step, each gated by ``lax.cond`` on its frequency.

    Parameters
    ----------
    hooks : sequence of Hook
    batch : Batch
    ctx : HookContext
    records : Recorder, optional
        Record mode (:mod:`fused_dynamics.recording`): a host hook's payload is left in
        ``records.entries[key]`` as ``(due, payload)`` instead of being sent by a host callback.
    keys : sequence of int, optional
        With ``records``: each hook's key (its position in ``FusedStage.all_hooks()``).

    Returns
    -------
    Batch
        After the hooks' :meth:`Hook.apply`.
    """
    keys = range(len(hooks)) if keys is None else keys
    for key, hook in zip(keys, hooks, strict=True):
        due = (ctx.step % hook.every_n_steps) == 0
        if ctx.priming is not None:
            due = due & ~ctx.priming
        if _has_apply(hook):
            batch = jax.lax.cond(due, lambda b, h=hook: h.apply(b, ctx), lambda b: b, batch)
        if not has_host(hook):
            continue
        if records is not None:

            def gather(b, hook=hook):
                return _gather_fields(hook, b, ctx)

            idle = zeros_like_shapes(jax.eval_shape(gather, batch))
            records.entries[key] = (due, jax.lax.cond(due, gather, lambda _, i=idle: i, batch))
            continue

        def send(b, hook=hook, stage=hook.stage):
            def host(step, payload):
                arrays = {k: np.asarray(v) for k, v in payload.items()}
                hook.on_host(HookData(step=int(step), stage=stage, arrays=arrays))

            # the payload is gathered inside the branch: an idle hook computes nothing
            jax.debug.callback(host, ctx.step, _gather_fields(hook, b, ctx), ordered=True)

        jax.lax.cond(due, send, lambda _: None, batch)
    return batch


def fail_systems(batch, failed: jax.Array, exit_status: int, code=Failure.NONE):
    """Move ``failed`` systems (S,) bool out of the run with exit reason FAILED.

    ``code`` (a :class:`Failure` or an int32 array (S,)) is recorded in ``info["failure"]`` and the
    system's step count in ``info["failure_step"]``.
    """
    failed = failed & batch.system_mask & (batch.status != exit_status)
    info = dict(batch.info)
    info["exit_reason"] = jnp.where(failed, ExitReason.FAILED, info["exit_reason"]).astype(
        jnp.int32
    )
    if "failure" in info:
        code = jnp.broadcast_to(jnp.asarray(code, jnp.int32), failed.shape)
        info["failure"] = jnp.where(failed, info["failure"] | code, info["failure"])
        steps = jnp.sum(info["stage_steps"], axis=-1, dtype=jnp.int32)
        info["failure_step"] = jnp.where(failed, steps, info["failure_step"])
    return batch.replace(status=jnp.where(failed, exit_status, batch.status), info=info)
