"""Per-system parameters: one value per slot, fitted to a batch, checked, broadcast.

A per-system parameter (a name in a class's ``per_system_parameters``: a stage's time step, a
criterion's threshold, ...) accepts a scalar, one value per occupied system or one per slot.

- :func:`fit_per_system` (host side, before compiling) turns one value per occupied system into
  one per slot for a given batch (:func:`fit_value` for one value);
- :func:`check_fits` (where a stage meets the batch: ``init_state``, convergence tests) refuses a
  length that is neither 1 nor the batch's number of slots, naming the parameter;
- :func:`per_system` (inside the traced update) gives the value as an array of shape (S,) in the
  batch's float dtype: the one helper every stage uses for its per-system parameters;
- :func:`from_info` (:class:`InfoParameter`) names a value each structure carries in its
  ``atoms.info``: it travels with the system through the batch (``Batch.parameters``), so an
  inflight run gives every system its own value whatever slot it lands in
  (docs/semantics.md §14a); :func:`resolve_info` puts the batch's values in place of the names.

Like :mod:`fused_dynamics.validation` (which re-exports the first three) this module imports
nothing from the package, so that any module may use it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "InfoParameter",
    "fit_per_system",
    "fit_value",
    "check_fits",
    "from_info",
    "info_keys",
    "read_info_values",
    "info_readers",
    "check_info_values",
    "per_system",
    "is_traced",
    "resolve_info",
]


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (its values are unknown; never call ``float`` on it)."""
    return isinstance(value, jax.core.Tracer)


class InfoParameter(eqx.Module):
    """A per-system parameter read from each structure's ``atoms.info[key]``.

    Made by :func:`from_info`. Give it for any per-system parameter (a name in a class's
    ``per_system_parameters``: a time step, a temperature, a convergence threshold) or for a
    sub-stage's step budget ``n_steps``. The value is read when the structure enters a batch
    (``Batch.from_atoms(..., info_keys=...)``, or a sampler in an inflight run), checked against
    the parameter's rules (by the sampler as it hands the structure out; for a fixed batch when
    the run starts), and stored in ``batch.parameters[key]`` (shape (S,)), so it
    moves with the system: a slot refilled with another structure takes that structure's
    value. Inside the compiled step :func:`resolve_info` puts the stored values in place of
    this name.

    Attributes
    ----------
    key : str
        The ``atoms.info`` key.
    """

    key: str = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"from_info: key must be a non-empty str, got {self.key!r}.")


def from_info(key: str) -> InfoParameter:
    """A per-system parameter whose value each structure carries in ``atoms.info[key]``.

    Examples
    --------
    >>> nvt = fd.NVTLangevin(model, dt=2.0, temperature=fd.from_info("temperature_K"),
    ...                      friction=0.01, n_steps=fd.from_info("md_steps"))

    Each structure handed to the run must carry a finite number under that key. One that does
    not, or whose value breaks the parameter's rule (a negative temperature), is refused with a
    message naming the key and the parameter: an inflight run writes it with exit reason
    REJECTED; ``Batch.from_atoms`` raises for a missing or non-numeric value, and a run of a
    fixed batch raises before compiling for a value that breaks a rule (not under an outer
    ``jit``/``vmap``/``grad``, where the values are unknown). See docs/semantics.md §14a.
    """
    return InfoParameter(key)


def _is_info(x: Any) -> bool:
    return isinstance(x, InfoParameter)


def info_keys(tree: Any) -> tuple[str, ...]:
    """The ``atoms.info`` keys that :func:`from_info` parameters of ``tree`` read, sorted.

    ``tree`` is a fused stage, a sub-stage or any pytree of them; the step budgets
    (``n_steps``, a static field) of its sub-stages are included.
    """
    keys = set()
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_info):
        if _is_info(leaf):
            keys.add(leaf.key)
    for stage in _stages_of(tree):
        if _is_info(getattr(stage, "n_steps", None)):
            keys.add(stage.n_steps.key)
    return tuple(sorted(keys))


def _stages_of(tree: Any) -> list:
    stages = getattr(tree, "stages", None)
    if isinstance(stages, tuple):
        return list(stages)
    return [tree] if hasattr(tree, "n_steps") else []


def resolve_info(tree: Any, batch: Any) -> Any:
    """``tree`` with every :class:`InfoParameter` leaf replaced by ``batch.parameters[key]``.

    Traced in the step (``FusedStage.init`` and ``FusedStage.step`` call it first), so every
    stage sees a per-slot array (S,), the form a per-system parameter already takes.

    Raises
    ------
    ValueError
        The batch does not carry a key a parameter reads (checked while tracing).
    """
    stored = getattr(batch, "parameters", None) or {}

    def value(x):
        if not _is_info(x):
            return x
        if x.key not in stored:
            raise ValueError(missing_key_message(x.key, stored))
        return stored[x.key]

    return jax.tree_util.tree_map(value, tree, is_leaf=_is_info)


def missing_key_message(key: str, stored) -> str:
    """Why a batch cannot serve ``from_info(key)``."""
    return (
        f"A parameter is from_info({key!r}), but the batch carries no atoms.info[{key!r}] values "
        f"(it carries {sorted(stored) or 'none'}): build it with "
        f"Batch.from_atoms(..., info_keys=[{key!r}]), or run from a sampler (which reads them)."
    )


def budget(stage: Any, batch: Any) -> Any:
    """A sub-stage's step budget: ``stage.n_steps`` (an int or None), or per slot (S,) int32
    when it is :func:`from_info`."""
    n = stage.n_steps
    if not _is_info(n):
        return n
    stored = getattr(batch, "parameters", None) or {}
    if n.key not in stored:
        raise ValueError(missing_key_message(n.key, stored))
    return stored[n.key].astype(jnp.int32)


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
    if _is_info(value):
        value = resolve_info(value, batch)
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
    if value is None or isinstance(value, (numbers.Number, np.bool_, InfoParameter)):
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
        if value is None or isinstance(value, (numbers.Number, np.bool_, InfoParameter)):
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


# ----------------------------------------------------------------------------- values from info
#: The largest step budget read from ``atoms.info``: exact in a float32 batch.
INFO_BUDGET_LIMIT = 2**24


def read_info_values(info: dict, keys, where: str, readers=None) -> dict[str, float | int]:
    """The numbers a structure carries for :func:`from_info` parameters.

    Parameters
    ----------
    info : dict
        The structure's ``atoms.info``.
    keys : sequence of str
    where : str
        Names the structure in messages (``"system 3"``).
    readers : dict, optional
        For messages: key -> the parameters that read it (:func:`info_readers`).

    Raises
    ------
    ValueError
        A key is missing, or its value is not one real number (a bool, a string, an array).
    """
    out = {}
    readers = readers or {}
    for key in keys:
        reader = readers.get(key) or f"a from_info({key!r}) parameter"
        if key not in info:
            raise ValueError(
                f"{where}: atoms.info has no {key!r}, which {reader} reads; give every "
                "structure that key."
            )
        value = info[key]
        if isinstance(value, (np.ndarray, jax.Array)) and value.shape == ():
            value = value.item()
        finite = False
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            try:
                finite = math.isfinite(float(value))
            except OverflowError:  # an int beyond float64
                finite = False
        if not finite:
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ValueError(
                f"{where}: atoms.info[{key!r}] must be a finite real number ({reader} reads "
                f"it), got {shown}."
            )
        out[key] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def _info_owners(tree: Any, seen=None) -> list[tuple[Any, str, str]]:
    """``(module, field, key)`` for every field of a module in ``tree`` that is a
    :class:`InfoParameter` (static fields such as ``n_steps`` included)."""
    out: list = []
    seen = set() if seen is None else seen
    if id(tree) in seen:
        return out
    seen.add(id(tree))
    if isinstance(tree, eqx.Module) and not _is_info(tree):
        for f in dataclasses.fields(tree):
            value = getattr(tree, f.name, None)
            if _is_info(value):
                out.append((tree, f.name, value.key))
            else:
                out.extend(_info_owners(value, seen))
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            out.extend(_info_owners(x, seen))
    elif isinstance(tree, dict):
        for x in tree.values():
            out.extend(_info_owners(x, seen))
    return out


def info_readers(tree: Any) -> dict[str, str]:
    """For messages: each ``atoms.info`` key of ``tree``'s :func:`from_info` parameters ->
    the parameters that read it (``"NVTLangevin.temperature"``)."""
    out: dict[str, list] = {}
    for module, name, key in _info_owners(tree):
        out.setdefault(key, []).append(f"{type(module).__name__}.{name}")
    return {k: " and ".join(v) for k, v in out.items()}


def check_info_values(tree: Any, values: dict, where: str, dtype: Any = None) -> None:
    """Check one structure's values for the :func:`from_info` parameters of ``tree`` by the
    rules of the parameters that read them.

    Each owning module's own checks (``__check_init__``) run on a copy with the values in
    place, so a value read from ``atoms.info`` meets exactly the rule a value given in Python
    meets (a temperature >= 0, a time step > 0, ...). With ``dtype`` (the batch's float dtype)
    each value is checked as the batch stores it (a float32 batch stores 1e39 as inf, which
    the rules refuse). A step budget must be an integer in ``[1, 2**24]`` that ``dtype``
    holds exactly.

    Raises
    ------
    ValueError
        ``"system 3: atoms.info['T'] (read by NVTLangevin.temperature): NVTLangevin:
        temperature must be >= 0 (K), got -5.0."``
    """
    given = values
    if dtype is not None:
        values = {k: _as_stored(v, dtype) for k, v in values.items()}
    by_module: dict[int, tuple[Any, list]] = {}
    for module, name, key in _info_owners(tree):
        by_module.setdefault(id(module), (module, []))[1].append((name, key))
    for module, fields in by_module.values():
        owner = type(module).__name__
        copy = object.__new__(type(module))
        for f in dataclasses.fields(module):
            object.__setattr__(copy, f.name, getattr(module, f.name))
        checked = []
        for name, key in fields:
            value = values[key]
            if name == "n_steps":
                exact = float(value) == float(given[key])  # not rounded by the dtype
                whole = math.isfinite(value) and float(value).is_integer()
                if not (whole and exact and 1 <= value <= INFO_BUDGET_LIMIT):
                    raise ValueError(
                        f"{where}: atoms.info[{key!r}] (read by {owner}.n_steps) must be an "
                        f"integer in [1, {INFO_BUDGET_LIMIT}], got {given[key]!r}"
                        + _rounding(given[key], value, dtype)
                        + "."
                    )
                object.__setattr__(copy, name, None)
            else:
                object.__setattr__(copy, name, value)
                checked.append(f"atoms.info[{key!r}] (read by {owner}.{name})")
        try:
            for cls in type(module).__mro__:
                check = cls.__dict__.get("__check_init__")
                if check is not None:
                    check(copy)
        except (TypeError, ValueError, ArithmeticError) as exc:
            rounded = "".join(
                f" (atoms.info[{k!r}] is {given[k]!r}{_rounding(given[k], values[k], dtype)})"
                for _, k in fields
                if _rounding(given[k], values[k], dtype)
            )
            raise ValueError(f"{where}: {', '.join(checked)}: {exc}{rounded}") from None


def _rounding(given, stored, dtype) -> str:
    """``", which the batch's float32 stores as inf"`` when storing changed the value."""
    if dtype is None or float(stored) == float(given):
        return ""
    return f", which the batch's {np.dtype(dtype).name} stores as {stored!r}"


def _as_stored(value, dtype):
    """``value`` as a batch of float ``dtype`` stores it, a Python number (an integral value as
    an int, so that integer parameters such as FIRE's ``Nmin`` pass their integer rule)."""
    with np.errstate(over="ignore"):
        stored = np.asarray(value, dtype).item()
    if math.isfinite(stored) and float(stored).is_integer():
        return int(stored)
    return float(stored)
