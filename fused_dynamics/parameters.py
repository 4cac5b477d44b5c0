"""Per-system parameters: one value per slot, fitted to a batch, checked, broadcast.

A per-system parameter (a name in a class's ``per_system_parameters``: a stage's time step, a
criterion's threshold, ...) accepts a scalar, one value per occupied system or one per slot.

- :func:`fit_per_system` (host side, before compiling) turns one value per occupied system into
  one per slot for a given batch (:func:`fit_value` for one value);
- :func:`check_fits` (where a stage meets the batch: ``init_state``, convergence tests) refuses a
  length that is neither 1 nor the batch's number of slots, naming the parameter;
- :func:`per_system` (inside the traced update) gives the value as an array of shape (S,) in the
  batch's float dtype: the one helper every stage uses for its per-system parameters.

Like :mod:`fused_dynamics.validation` (which re-exports the first three) this module imports
nothing from the package, so that any module may use it.
"""

from __future__ import annotations

import numbers
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fit_per_system", "fit_value", "check_fits", "per_system", "is_traced"]


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (its values are unknown; never call ``float`` on it)."""
    return isinstance(value, jax.core.Tracer)


def per_system(batch: Any, value: Any, dtype: Any = None) -> jax.Array:
    """A per-system parameter as one value per slot: an array of shape (S,).

    Parameters
    ----------
    batch : Batch
        Gives ``S = batch.max_systems`` and the default dtype ``batch.dtype``.
    value : scalar or array of shape (S,)
        A scalar (the same for every system) or one value per slot. A parameter given as one
        value per occupied system is fitted first (:func:`fit_per_system`, which
        :class:`~fused_dynamics.FusedStage` runs); ``init_state`` checks the lengths with
        :func:`check_fits`.
    dtype : dtype, optional
        Default: the batch's float dtype.

    Returns
    -------
    Array, shape (S,)

    Raises
    ------
    ValueError
        ``value`` has another shape (a static check: it costs nothing under ``jax.jit``).
    """
    s = batch.max_systems
    shape = tuple(np.shape(value))
    if shape not in ((), (s,)):
        raise ValueError(
            f"A per-system parameter has shape {shape}; the batch has max_systems={s} slots: "
            "give a scalar or one value per slot (one per occupied system must first be spread "
            "over the slots with fused_dynamics.validation.fit_per_system(stage, batch))."
        )
    dtype = batch.dtype if dtype is None else dtype
    return jnp.broadcast_to(jnp.asarray(value, dtype), (s,))


# ----------------------------------------------------------------------------- fit to a batch
def _owner(obj: Any) -> str:
    label = getattr(obj, "validation_owner", None)
    return label() if callable(label) else type(obj).__name__


def fit_value(owner: str, name: str, value: Any, system_mask: Any) -> Any:
    """One per-system parameter fitted to a batch of ``S`` slots.

    Parameters
    ----------
    owner, name : str
        Class and parameter names, for the message.
    value : scalar, array or tracer
        A scalar (0-d) is returned as is; a 1-D array of length ``S`` too. A 1-D array with one
        value per occupied slot is scattered over the occupied slots in slot order; empty slots
        get its first value (so arithmetic on them stays finite).
    system_mask : bool array, shape (S,)
        The batch's occupied slots. When it is traced only scalars and length ``S`` are allowed.

    Returns
    -------
    scalar or array of shape (S,)
        Same kind as ``value`` (NumPy stays NumPy, JAX stays JAX).

    Raises
    ------
    ValueError
        The array has another length or more dimensions; the message names the parameter and
        the accepted lengths.
    """
    if value is None or isinstance(value, (numbers.Number, np.bool_)):
        return value
    shape = getattr(value, "shape", None)
    if shape is None:  # lists and other sequences: only their length can be judged
        shape = np.shape(value)
    if len(shape) == 0:
        return value
    s = int(system_mask.shape[-1])
    traced_mask = is_traced(system_mask)
    n_occupied = None if traced_mask else int(np.count_nonzero(np.asarray(system_mask)))
    if len(shape) == 1 and shape[0] == s:
        return value
    if len(shape) == 1 and n_occupied is not None and shape[0] == n_occupied and n_occupied > 0:
        slots = np.flatnonzero(np.asarray(system_mask))
        index = np.zeros(s, np.int64)
        index[slots] = np.arange(n_occupied)
        return value[index] if hasattr(value, "shape") else np.asarray(value)[index]
    if len(shape) == 1:
        count = f"{shape[0]} value" + ("" if shape[0] == 1 else "s")
    else:
        count = f"shape {tuple(shape)}"
    if traced_mask:
        accepted = (
            f"give a scalar or one per slot (max_systems={s}); one per occupied system needs "
            "a batch whose system_mask is not traced"
        )
    else:
        accepted = (
            f"give a scalar, one per occupied system ({n_occupied}) or one per slot "
            f"(max_systems={s})"
        )
    raise ValueError(f"{owner}: {name} has {count}; {accepted}.")


def check_fits(obj: Any, max_systems: int) -> None:
    """Check that every per-system parameter of ``obj`` is a scalar or has one value per slot.

    Stages call it where they meet the batch (``init_state``, convergence tests), so that an
    array of another length fails with a message naming it rather than deep inside JAX with a
    broadcasting error. Only shapes are read, so it works on tracers.

    Parameters
    ----------
    obj : equinox.Module
        A sub-stage or criterion with ``per_system_parameters``.
    max_systems : int
        The batch's number of slots ``S``.

    Raises
    ------
    ValueError
        ``"NVTLangevin: temperature has 2 values; the batch has max_systems=3 slots: ..."``
    """
    for name in getattr(type(obj), "per_system_parameters", ()):
        value = getattr(obj, name)
        if value is None or isinstance(value, (numbers.Number, np.bool_)):
            continue
        shape = tuple(getattr(value, "shape", np.shape(value)))
        if shape == () or shape == (max_systems,):
            continue
        count = f"{shape[0]} value" + ("" if shape[0] == 1 else "s") if len(shape) == 1 else None
        count = count or f"shape {shape}"
        raise ValueError(
            f"{_owner(obj)}: {name} has {count}; the batch has "
            f"max_systems={max_systems} slots: give a scalar or one value per slot (one per "
            "occupied system must first be spread over the slots with "
            "fused_dynamics.validation.fit_per_system(stage, batch))."
        )


def fit_per_system(stage: Any, batch: Any) -> Any:
    """A copy of ``stage`` whose per-system parameters fit ``batch``.

    Every field named in the class attribute ``per_system_parameters`` that is a 1-D array
    with one value per occupied system (``batch.system_mask.sum()``) is scattered into an array
    of length ``S = batch.max_systems`` over the occupied slots, in slot order (empty slots get
    the first value). Scalars and arrays of length ``S`` are kept. Thresholds of the criteria
    of the stage's ``convergence_hook`` are fitted the same way (``Criterion``'s
    ``per_system_parameters``). The stage is copied with :func:`equinox.tree_at`, so its
    ``__init__`` and checks do not run again.

    Call it on the host before compiling, with the batch the run starts from.

    Parameters
    ----------
    stage : equinox.Module
        A sub-stage (or any module with ``per_system_parameters``).
    batch : Batch
        Anything with a ``system_mask`` of shape (S,).

    Returns
    -------
    equinox.Module
        ``stage`` itself when nothing changes.

    Raises
    ------
    ValueError
        A per-system parameter has a length that is neither 1 (a scalar), the number of
        occupied systems nor ``S``, or more than one dimension:
        ``"NVTLangevin: temperature has 2 values; give a scalar, one per occupied system (1)
        or one per slot (max_systems=3)."``
    """
    mask = batch.system_mask
    names, values = [], []
    for name in getattr(type(stage), "per_system_parameters", ()):
        value = getattr(stage, name)
        fitted = fit_value(_owner(stage), name, value, mask)
        if fitted is not value:
            names.append(name)
            values.append(fitted)
    hook = getattr(stage, "convergence_hook", None)
    criteria = getattr(hook, "criteria", None)
    if criteria:
        new = tuple(fit_per_system(c, batch) for c in criteria)
        if any(a is not b for a, b in zip(new, criteria, strict=True)):
            hook = eqx.tree_at(lambda h: h.criteria, hook, new)
            names.append("convergence_hook")
            values.append(hook)
    if not names:
        return stage
    return eqx.tree_at(
        lambda m: [getattr(m, n) for n in names],
        stage,
        values,
        is_leaf=lambda x: x is None,
    )
