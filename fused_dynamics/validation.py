"""Parameter checks at construction, and per-system parameters fitted to a batch.

Every stage, criterion and convergence hook checks its parameters when it is built (in
Equinox's ``__check_init__``) with the helpers here, so that a wrong value fails where it is
given, with a :class:`ValueError` that names the class, the parameter, the value and the rule::

    NVE: dt must be > 0 and finite (fs), got -5.0.
    FIRE: n_steps must be an integer >= 1, got -3.

Parameters may be Python numbers, NumPy or JAX arrays (a per-system parameter is a 1-D array)
or JAX tracers (under ``jax.vmap``, ``jax.jit`` or ``jax.grad`` a parameter is a tracer). The
shape and dtype of a tracer are checked; its values are not (they are unknown when the stage is
built).

A per-system parameter (a name in the class's ``per_system_parameters``) accepts a scalar, one
value per occupied system or one per slot; :func:`fit_per_system` turns the second form into the
third for a given batch, :func:`check_fits` checks the lengths against the batch's slots (both
live in :mod:`fused_dynamics.parameters`, with the helper that broadcasts a parameter to one
value per slot, and are re-exported here).

The helpers are pure and import nothing from the package but :mod:`fused_dynamics.parameters`
(which imports nothing from it), so that any module may use them.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from .parameters import (
    INFO_BUDGET_LIMIT,
    InfoParameter,
    check_fits,
    fit_per_system,
    fit_value,
    is_traced,
)

__all__ = [
    "Rule",
    "positive",
    "non_negative",
    "finite",
    "interval",
    "is_traced",
    "check_real",
    "check_integer",
    "check_bool",
    "check_choice",
    "check_callable",
    "check_order",
    "check_stage",
    "check_fits",
    "fit_per_system",
    "fit_value",
    "SEED_LIMIT",
    "seed_leaf",
]

#: The most steps of a budget, of a fused stage's budgets together, or of one run call: step
#: counters (``step_count``, ``info["stage_steps"]``) are int32, and a larger value would wrap.
MAX_STEPS = 2**31 - 1
SEED_LIMIT = 2**32  # seeds at or above it collide without jax_enable_x64 (PRNGKey keeps 32 bits)


def seed_leaf(value: Any) -> Any:
    """A seed field's converter: a Python int in [0, SEED_LIMIT) as a 0-d ``uint32`` array.

    Engine programs keep Python ints static (:func:`~fused_dynamics.compiled.filter_compile`),
    so a new int seed would compile a new program; an array is traced, so seeds share one.
    ``PRNGKey`` of the array is the key of the int, bit for bit. Anything else is returned
    unchanged, for ``check_integer`` to refuse in the owner's words.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        if 0 <= int(value) < SEED_LIMIT:
            return np.asarray(int(value), np.uint32)
    return value


# ----------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule on a real value: finite, and within optional bounds.

    Parameters
    ----------
    lower, upper : float, optional
        Bounds; None for none.
    lower_closed, upper_closed : bool
        Whether the bound itself is allowed.
    """

    lower: float | None = None
    upper: float | None = None
    lower_closed: bool = False
    upper_closed: bool = False

    def holds(self, x: np.ndarray) -> np.ndarray:
        """Elementwise: ``x`` satisfies the rule (NaN and infinities never do)."""
        ok = np.isfinite(x)
        with np.errstate(invalid="ignore"):
            if self.lower is not None:
                ok &= (x >= self.lower) if self.lower_closed else (x > self.lower)
            if self.upper is not None:
                ok &= (x <= self.upper) if self.upper_closed else (x < self.upper)
        return ok

    @property
    def text(self) -> str:
        """The rule in words, e.g. ``> 0 and finite`` or ``in (0, 1]``."""
        if self.lower is not None and self.upper is not None:
            left = "[" if self.lower_closed else "("
            right = "]" if self.upper_closed else ")"
            return f"in {left}{_fmt_bound(self.lower)}, {_fmt_bound(self.upper)}{right}"
        if self.lower is not None:
            op = ">=" if self.lower_closed else ">"
            return f"{op} {_fmt_bound(self.lower)} and finite"
        if self.upper is not None:
            op = "<=" if self.upper_closed else "<"
            return f"{op} {_fmt_bound(self.upper)} and finite"
        return "finite"


def _fmt_bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def positive() -> Rule:
    """Finite and > 0 (time steps, damping times, cut-offs)."""
    return Rule(lower=0.0)


def non_negative() -> Rule:
    """Finite and >= 0 (temperatures, friction)."""
    return Rule(lower=0.0, lower_closed=True)


def finite() -> Rule:
    """Any finite real number (pressures, thresholds)."""
    return Rule()


def interval(lower: float, upper: float, closed: str = "neither") -> Rule:
    """Finite and between ``lower`` and ``upper``.

    Parameters
    ----------
    lower, upper : float
    closed : {"neither", "left", "right", "both"}
        Which bounds are allowed.
    """
    if closed not in ("neither", "left", "right", "both"):
        raise ValueError(f"interval: closed={closed!r} is not one of neither, left, right, both.")
    return Rule(lower, upper, closed in ("left", "both"), closed in ("right", "both"))


# ----------------------------------------------------------------------------- formatting
def _type_name(value: Any) -> str:
    return type(value).__name__


def _show(value: Any) -> str:
    """A short text of a concrete value for an error message."""
    if isinstance(value, (bool, np.bool_)):
        return f"{bool(value)!r} (a bool)"
    if isinstance(value, numbers.Integral):
        return repr(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, (np.ndarray, jax.Array)) and not is_traced(value):
        arr = np.asarray(value)
        if arr.ndim == 0:
            return _show(arr.item())
        return np.array2string(arr, separator=", ", threshold=8)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} (a {_type_name(value)})"


def _unit(unit: str | None) -> str:
    return f" ({unit})" if unit else ""


def _dtype_kind(value: Any) -> str | None:
    """NumPy dtype kind of an array or tracer (``b``, ``i``, ``u``, ``f``, ``c``), else None."""
    dtype = getattr(value, "dtype", None)
    return None if dtype is None else np.dtype(dtype).kind


# ----------------------------------------------------------------------------- checks
def _array_shape_error(owner, name, value, per_system, what) -> ValueError | None:
    ndim = len(value.shape)
    if ndim == 0 or (per_system and ndim == 1):
        return None
    allowed = "a scalar or a 1-D array of per-system values" if per_system else "a scalar"
    return ValueError(
        f"{owner}: {name} must be {what}, given as {allowed}; got an array of shape "
        f"{tuple(value.shape)}."
    )


def check_real(
    owner: str,
    name: str,
    value: Any,
    rule: Rule,
    *,
    unit: str | None = None,
    allow_none: bool = False,
    per_system: bool = False,
) -> None:
    """Check a real-valued parameter.

    Parameters
    ----------
    owner : str
        The class name, for the message.
    name : str
        The parameter name.
    value : float, int, NumPy/JAX array, tracer or None
        Booleans, complex numbers, strings and other objects are refused. A per-system array
        must be 1-D and every entry must satisfy ``rule``.
    rule : Rule
    unit : str, optional
        Unit shown in the message.
    allow_none : bool, default False
        Whether None (a default chosen later) is allowed.
    per_system : bool, default False
        Whether a 1-D array (one value per system) is allowed.

    Raises
    ------
    ValueError
        ``"{owner}: {name} must be {rule} ({unit}), got {value}."``
    """
    what = f"{rule.text}{_unit(unit)}"
    if per_system and isinstance(value, InfoParameter):
        return  # checked value by value when the structures are read (check_info_values)
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{owner}: {name} must be {what}, got None.")
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: {name} must be {what}, got {_show(value)}.")
    if isinstance(value, numbers.Real):
        if not bool(rule.holds(np.asarray(float(value)))):
            raise ValueError(f"{owner}: {name} must be {what}, got {_show(value)}.")
        return
    if not isinstance(value, (np.ndarray, np.generic, jax.Array)):
        raise ValueError(f"{owner}: {name} must be a number, {what}, got {_show(value)}.")
    kind = _dtype_kind(value)
    if kind not in ("i", "u", "f"):
        raise ValueError(
            f"{owner}: {name} must be {what}, got an array of dtype {np.dtype(value.dtype)}."
        )
    err = _array_shape_error(owner, name, value, per_system, what)
    if err is not None:
        raise err
    if is_traced(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    ok = rule.holds(arr)
    if not bool(np.all(ok)):
        if arr.ndim == 0:
            raise ValueError(f"{owner}: {name} must be {what}, got {_show(arr.item())}.")
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"{owner}: {name} must be {what} for every system, got {_show(arr)} "
            f"(entry {bad} is {_show(arr[bad].item())})."
        )


def check_integer(
    owner: str,
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    allow_none: bool = False,
    allow_array: bool = False,
    per_system: bool = False,
) -> None:
    """Check an integer parameter (a count, a budget, a seed).

    Parameters
    ----------
    owner, name : str
        Class and parameter names, for the message.
    value : int, NumPy integer, integer array, tracer or None
        ``bool`` and floats (even ``5.0``) are refused: a number of steps is an integer.
    minimum, maximum : int, optional
        Inclusive bounds.
    allow_none : bool, default False
    allow_array : bool, default False
        Whether a 0-d integer array or tracer is allowed (for fields that are pytree leaves; a
        static field needs a Python or NumPy integer).
    per_system : bool, default False
        Whether a 1-D integer array is allowed (implies ``allow_array``).

    Raises
    ------
    ValueError
        ``"{owner}: {name} must be an integer >= {minimum}, got {value}."``
    """
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    what = "an integer" + (" " + " and ".join(bounds) if bounds else "")
    if allow_none:
        what += " or None"
    if per_system and isinstance(value, InfoParameter):
        return  # checked value by value when the structures are read (check_info_values)
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{owner}: {name} must be {what}, got None.")
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Integral, np.ndarray, np.generic, jax.Array)
    ):
        shown = _show(value)
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            shown += f" (a {_type_name(value)})"
        raise ValueError(f"{owner}: {name} must be {what}, got {shown}.")
    if isinstance(value, numbers.Integral):
        arr = np.asarray(int(value), dtype=object)
    else:
        if not (allow_array or per_system) and not isinstance(value, np.generic):
            raise ValueError(
                f"{owner}: {name} must be {what} (a Python int, not an array), got {_show(value)}."
            )
        if _dtype_kind(value) not in ("i", "u"):
            raise ValueError(
                f"{owner}: {name} must be {what}, got {_show(value)} of dtype "
                f"{np.dtype(value.dtype)}."
            )
        err = _array_shape_error(owner, name, value, per_system, what)
        if err is not None:
            raise err
        if is_traced(value):
            return
        arr = np.asarray(value).astype(object)
    ok = np.ones(arr.shape, bool)
    if minimum is not None:
        ok &= arr >= minimum
    if maximum is not None:
        ok &= arr <= maximum
    if not bool(np.all(ok)):
        raise ValueError(f"{owner}: {name} must be {what}, got {_show(value)}.")


def check_bool(owner: str, name: str, value: Any, *, allow_array: bool = False) -> None:
    """Check a flag: a Python or NumPy bool (or, with ``allow_array``, a bool array or tracer).

    Raises
    ------
    ValueError
        ``"{owner}: {name} must be True or False, got {value}."``
    """
    if isinstance(value, (bool, np.bool_)):
        return
    if allow_array and isinstance(value, (np.ndarray, jax.Array)) and _dtype_kind(value) == "b":
        if len(value.shape) <= 1:
            return
    raise ValueError(f"{owner}: {name} must be True or False, got {_show(value)}.")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Check that ``value`` is one of ``choices``.

    Raises
    ------
    ValueError
        ``"{owner}: {name} must be one of (...), got {value!r}."``
    """
    choices = tuple(choices)
    ok = any(_same_choice(value, c) for c in choices)
    if not ok:
        raise ValueError(f"{owner}: {name} must be one of {choices!r}, got {value!r}.")


def _same_choice(value: Any, choice: Any) -> bool:
    if choice is None or value is None:
        return value is choice
    if isinstance(choice, bool) or isinstance(value, (bool, np.bool_)):
        return isinstance(value, (bool, np.bool_)) and bool(value) == choice
    if isinstance(choice, numbers.Integral):
        return isinstance(value, numbers.Integral) and int(value) == choice
    if isinstance(choice, str):
        return isinstance(value, str) and value == choice
    return type(value) is type(choice) and value == choice


def check_callable(owner: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    """Check that ``value`` is callable (or None where allowed).

    Raises
    ------
    ValueError
        ``"{owner}: {name} must be callable, got {value}."``
    """
    if value is None and allow_none:
        return
    if not callable(value):
        what = "callable or None" if allow_none else "callable"
        raise ValueError(f"{owner}: {name} must be {what}, got {_show(value)}.")


def check_order(
    owner: str, low_name: str, low: Any, high_name: str, high: Any, *, strict: bool = False
) -> None:
    """Check ``low <= high`` (``<`` if ``strict``) where both are concrete (elementwise).

    Values that are None or traced are skipped.

    Raises
    ------
    ValueError
        ``"{owner}: {low_name} must be <= {high_name}, got {low} and {high}."``
    """
    if low is None or high is None or is_traced(low) or is_traced(high):
        return
    if isinstance(low, InfoParameter) or isinstance(high, InfoParameter):
        return  # one value per structure: each checked when it is read (check_info_values)
    lo, hi = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    try:
        ok = np.all(lo < hi) if strict else np.all(lo <= hi)
    except ValueError:  # shapes that do not broadcast: reported by fit_per_system
        return
    if not bool(ok):
        op = "<" if strict else "<="
        raise ValueError(
            f"{owner}: {low_name} must be {op} {high_name}, got {low_name}={_show(low)} and "
            f"{high_name}={_show(high)}."
        )


def check_total_budget(stages) -> None:
    """Refuse sub-stage budgets whose sum passes :data:`MAX_STEPS`: a system that spends them
    all counts its steps in one int32 (``step_count``). A budget read from ``atoms.info``
    counts as its largest value, ``INFO_BUDGET_LIMIT`` (``2**24``).

    Raises
    ------
    ValueError
        Naming each sub-stage's budget and the sum.
    """
    budgets = []
    for stage in stages:
        n = getattr(stage, "n_steps", None)
        if n is not None:
            largest = INFO_BUDGET_LIMIT if isinstance(n, InfoParameter) else n
            budgets.append((type(stage).__name__, largest))
    total = sum(int(n) for _, n in budgets)
    if total > MAX_STEPS:
        each = ", ".join(f"{name} n_steps={int(n)}" for name, n in budgets)
        raise ValueError(
            f"FusedStage: the sub-stages' budgets ({each}) add up to {total} steps, more than "
            f"the {MAX_STEPS} (2**31 - 1) a step counter holds; give smaller budgets."
        )


def check_stage(stage: Any) -> None:
    """Checks every sub-stage shares: ``n_steps`` and ``convergence_hook``.

    Parameters
    ----------
    stage : Stage
        ``n_steps`` must be None or an integer in ``[1, MAX_STEPS]`` (a per-system budget of
        steps; step counters are int32);
        ``convergence_hook`` None or an object with a ``converged`` method (a
        :class:`~fused_dynamics.ConvergenceHook`).

    Raises
    ------
    ValueError
    """
    owner = type(stage).__name__
    n_steps = getattr(stage, "n_steps", None)
    if not isinstance(n_steps, InfoParameter):  # else checked when the structures are read
        check_integer(owner, "n_steps", n_steps, 1, MAX_STEPS, allow_none=True)
    hook = getattr(stage, "convergence_hook", None)
    if hook is not None and not callable(getattr(hook, "converged", None)):
        raise ValueError(
            f"{owner}: convergence_hook must be a ConvergenceHook or None (for an fmax "
            f"threshold use ConvergenceHook.from_fmax(...)), got {_show(hook)}."
        )
