"""Hook points, the hook protocol, exit reasons, and the built-in hooks: import hooks from here.

A hook runs at one :class:`DynamicsStage` of the fused step, every ``every_n_steps`` steps
(``step % every_n_steps == 0``, counted before the increment, so every hook fires at step 0).
It does either or both of:

- ``on_host(data)``: host work on NumPy copies of only the fields it names in ``fields`` (batch
  fields, ``info`` keys or per-system observables such as ``fmax`` and ``temperature``), plus
  ``system_mask``, ``status`` and ``system_id``, and the step report at ``ON_CONVERGE``. A run
  in chunks records the copies on the device and calls ``on_host`` after each chunk, in step
  order (:mod:`fused_dynamics.recording`); one compiled call (``jax.jit``/``vmap``/``grad`` of a
  run, :meth:`FusedStage.step`) calls it back during the step (``jax.debug.callback``, ordered);
- ``apply(batch, ctx) -> batch``: a traced, pure transformation of the batch (freezing atoms,
  wrapping positions, adding a bias, moving failed systems out).

Both are wrapped in ``lax.cond`` on the frequency, so an idle hook costs one integer comparison.

The protocol (:class:`DynamicsStage`, :class:`Hook`, :func:`fire_hooks`) lives in
:mod:`fused_dynamics.hooks_base`, the built-in hooks in :mod:`fused_dynamics.hooks_builtin`;
this module gathers both. Subclass :class:`Hook` for a hook of your own.
"""

from __future__ import annotations

from .hooks_base import (
    DynamicsStage,
    Hook,
    HookContext,
    HookData,
    check_hook,
    fail_systems,
    fire_hooks,
)
from .hooks_builtin import (
    AbstractFailureHook,
    AbstractSnapshotHook,
    BiasedPotentialHook,
    ConvergedSnapshotHook,
    EnergyDriftMonitorHook,
    FreezeAtomsHook,
    LoggingHook,
    MaxForceHook,
    NaNDetectorHook,
    ProgressHook,
    SnapshotHook,
    ThermalizeOnEntryHook,
    WrapPeriodicHook,
)
from .status import ExitReason, Failure

__all__ = [
    "DynamicsStage",
    "ExitReason",
    "Failure",
    "Hook",
    "HookContext",
    "HookData",
    "check_hook",
    "fail_systems",
    "fire_hooks",
    "AbstractFailureHook",
    "AbstractSnapshotHook",
    "LoggingHook",
    "NaNDetectorHook",
    "MaxForceHook",
    "EnergyDriftMonitorHook",
    "FreezeAtomsHook",
    "BiasedPotentialHook",
    "WrapPeriodicHook",
    "SnapshotHook",
    "ConvergedSnapshotHook",
    "ProgressHook",
    "ThermalizeOnEntryHook",
]
