"""Convergence criteria and the per-system convergence mask."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import validation as v
from .batch import Batch
from .parameters import InfoParameter

__all__ = [
    "ConvergenceHook",
    "Criterion",
    "DEFAULT_FMAX",
    "check_criterion_keys",
    "unreachable_criterion",
]

DEFAULT_FMAX = 0.05  # eV/Å, the default criterion of a stage that must converge

_REDUCE_OPS = {
    "min": jnp.min,
    "max": jnp.max,
    "norm": jnp.linalg.norm,
    "mean": jnp.mean,
    "sum": jnp.sum,
}
_ATOM_FIELDS = ("forces", "velocities", "positions")
# keys whose value is never negative: a negative threshold on one never holds
_NEVER_NEGATIVE = ("fmax", "kinetic_energy", "temperature", "energy_change")
# what every stage's observables give (Stage.observables), and the engine's energy_change
_EVERY_STAGE = ("fmax", "energy", "kinetic_energy", "temperature", "energy_change")


class Criterion(eqx.Module):
    """One criterion: ``reduce(field) <= threshold``.

    Parameters
    ----------
    key : str
        A per-system observable (``fmax``, ``energy``, ``energy_change``, ``temperature``,
        anything a stage's ``observables`` gives) or a per-atom field of the batch (``forces``,
        ``velocities``, ``positions``); a non-empty string.
    threshold : float or Array of shape (S,)
        In the unit of the key (eV/Å for ``fmax``, eV for energies, K for temperature); finite
        (NaN and infinities are refused). A negative threshold on a quantity that is never
        negative (``fmax``) never holds: a way to keep systems in a stage. Per system when an
        array: one value per occupied system or one per slot (``per_system_parameters``).
    reduce_op : {"min", "max", "norm", "mean", "sum"}, optional
        For a per-atom field: how each atom's row is reduced over ``reduce_dims`` (default: the
        absolute maximum). The system value is then the maximum over its atoms.
    reduce_dims : int or tuple of int, default -1

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the criterion,
        the parameter, the value and the rule).
    """

    per_system_parameters: ClassVar[tuple[str, ...]] = ("threshold",)

    key: str = eqx.field(static=True)
    threshold: float | jax.Array
    reduce_op: str | None = eqx.field(static=True, default=None)
    reduce_dims: int | tuple[int, ...] = eqx.field(static=True, default=-1)

    def validation_owner(self) -> str:
        """How messages name this criterion: ``Criterion 'fmax'``."""
        return f"Criterion {self.key!r}"

    def __check_init__(self):
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"Criterion: key must be a non-empty string, got {self.key!r}.")
        owner = self.validation_owner()
        if self.reduce_op is not None:
            v.check_choice(owner, "reduce_op", self.reduce_op, tuple(_REDUCE_OPS))
        dims = self.reduce_dims if isinstance(self.reduce_dims, tuple) else (self.reduce_dims,)
        for d in dims:
            v.check_integer(owner, "reduce_dims", d)
        v.check_real(owner, "threshold", self.threshold, v.finite(), per_system=True)

    def value(self, batch: Batch, fields: Mapping[str, jax.Array]) -> jax.Array:
        """The system value of this criterion, shape (S,)."""
        if self.key in fields:
            return fields[self.key]
        if self.key in _ATOM_FIELDS:
            x = getattr(batch, self.key)
            if self.reduce_op is None:
                per_atom = jnp.max(jnp.abs(x), axis=self.reduce_dims)
            else:
                per_atom = _REDUCE_OPS[self.reduce_op](x, axis=self.reduce_dims)
            per_atom = jnp.where(batch.atom_mask, per_atom, -jnp.inf)
            return batch.max_atoms_of(per_atom)
        known = sorted(set(fields) | set(_ATOM_FIELDS))
        raise KeyError(f"Convergence criterion key {self.key!r} is unknown; known keys: {known}.")


class ConvergenceHook(eqx.Module):
    """Per-system convergence test: every criterion holds (AND), and ``custom_op`` if given.

    Parameters
    ----------
    criteria : sequence of dict or Criterion
        Each dict has ``key`` and ``threshold`` and optionally ``reduce_op`` and ``reduce_dims``.
        Default: ``[{"key": "fmax", "threshold": 0.05}]``.
    source_status, target_status : int, optional
        Set by :class:`~fused_dynamics.FusedStage` from the stage's code and the next code; a
        hook given explicitly may name them.
    custom_op : callable, optional
        ``custom_op(batch, fields) -> bool array (S,)``, traceable; combined with AND.

    Raises
    ------
    ValueError
        At construction: a criterion that is not a dict with ``key`` and ``threshold`` (or a
        :class:`Criterion`) or whose values are invalid (see :class:`Criterion`); no criteria
        and no ``custom_op`` (every system would converge at once); a status that is not an
        integer; a ``custom_op`` that is not callable.
    """

    criteria: tuple[Criterion, ...]
    source_status: int | None = eqx.field(static=True, default=None)
    target_status: int | None = eqx.field(static=True, default=None)
    custom_op: Callable | None = eqx.field(static=True, default=None)

    def __init__(
        self,
        criteria: Sequence[Mapping[str, Any] | Criterion] | None = None,
        source_status: int | None = None,
        target_status: int | None = None,
        custom_op: Callable | None = None,
    ):
        if criteria is None:
            criteria = [] if custom_op is not None else [{"key": "fmax", "threshold": DEFAULT_FMAX}]
        if isinstance(criteria, (Mapping, Criterion, str)) or not isinstance(criteria, Sequence):
            raise ValueError(
                f"ConvergenceHook: criteria must be a list of dicts or Criterion objects, got "
                f"{criteria!r} (wrap a single criterion in a list)."
            )
        parsed = []
        for i, c in enumerate(criteria):
            if isinstance(c, Criterion):
                parsed.append(c)
                continue
            if not isinstance(c, Mapping) or "key" not in c or "threshold" not in c:
                raise ValueError(
                    f"ConvergenceHook criterion {i}: expected a dict with 'key' and 'threshold', "
                    f"got {c!r}."
                )
            unknown = set(c) - {"key", "threshold", "reduce_op", "reduce_dims"}
            if unknown:
                raise ValueError(
                    f"ConvergenceHook criterion {i}: unknown entries {sorted(unknown)}."
                )
            dims = c.get("reduce_dims", -1)
            parsed.append(
                Criterion(
                    key=str(c["key"]),
                    threshold=c["threshold"],
                    reduce_op=c.get("reduce_op"),
                    reduce_dims=tuple(dims) if isinstance(dims, (list, tuple)) else int(dims),
                )
            )
        self.criteria = tuple(parsed)
        self.source_status = source_status
        self.target_status = target_status
        self.custom_op = custom_op

    def __check_init__(self):
        owner = type(self).__name__
        v.check_callable(owner, "custom_op", self.custom_op, allow_none=True)
        v.check_integer(owner, "source_status", self.source_status, allow_none=True)
        v.check_integer(owner, "target_status", self.target_status, allow_none=True)
        if not self.criteria and self.custom_op is None:
            raise ValueError(
                f"{owner}: criteria must hold at least one criterion when custom_op is None, "
                "got none (every system would converge at once)."
            )

    @classmethod
    def from_fmax(cls, threshold: float = DEFAULT_FMAX, **kwargs) -> ConvergenceHook:
        """Converged when the largest atomic force is at most ``threshold`` eV/Å.

        Raises
        ------
        ValueError
            ``threshold`` is not a finite number.
        """
        return cls([{"key": "fmax", "threshold": threshold}], **kwargs)

    def converged(self, batch: Batch, fields: Mapping[str, jax.Array]) -> jax.Array:
        """Per-system boolean (S,): every criterion holds. Empty slots are False."""
        ok = batch.system_mask
        for c in self.criteria:
            v.check_fits(c, batch.max_systems)
            ok = ok & (c.value(batch, fields) <= c.threshold)
        if self.custom_op is not None:
            ok = ok & jnp.asarray(self.custom_op(batch, fields), bool)
        return ok


def check_criterion_keys(owner: str, stage) -> None:
    """Refuse a criterion of ``stage``'s convergence hook whose key no field gives.

    The keys are those of every stage (``fmax``, ``energy``, ``kinetic_energy``,
    ``temperature``, ``energy_change``), the per-atom fields (``forces``, ``velocities``,
    ``positions``), and, for any other key, those of the stage's own ``observables``, found by
    tracing them (``jax.eval_shape``, nothing computed) on a one-system batch. Where that
    tracing fails (a stage whose parameters are sized for the user's batch), the key is
    checked when the run traces its step, as before.

    Raises
    ------
    ValueError
        Naming ``owner`` (the sub-stage), the key and the keys there are.
    """
    rule = getattr(stage, "convergence_hook", None)
    if rule is None:
        return
    known = set(_EVERY_STAGE) | set(_ATOM_FIELDS)
    other = [c.key for c in rule.criteria if c.key not in known]
    if not other:
        return
    keys = _stage_observables(stage)
    if keys is None:
        return
    known |= keys
    for i, c in enumerate(rule.criteria):
        if c.key not in known:
            raise ValueError(
                f"{owner}: convergence criterion {i}: key {c.key!r} is unknown; known keys: "
                f"{sorted(known)}."
            )


def _stage_observables(stage) -> set[str] | None:
    """The keys of ``stage.observables`` on a one-system periodic batch, or None."""
    import ase

    atoms = ase.Atoms("Ar2", positions=[[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], cell=4.0 * np.eye(3))
    atoms.pbc = True
    try:
        batch = Batch.from_atoms([atoms])
        out = jax.eval_shape(lambda b: stage.observables(b, stage.init_state(b)), batch)
    except Exception:  # noqa: BLE001 - any failure: leave the check to the run's trace
        return None
    return set(out)


def unreachable_criterion(rule: ConvergenceHook) -> str | None:
    """A criterion of ``rule`` that can never hold, in words, or None.

    A negative threshold (any entry of a per-system one) on a quantity that is never
    negative: ``fmax``, ``kinetic_energy``, ``temperature``, ``energy_change``, or a per-atom
    field reduced to an absolute value or a norm. Traced thresholds are not judged.
    """
    for i, c in enumerate(rule.criteria):
        per_atom_abs = c.key in _ATOM_FIELDS and c.reduce_op in (None, "norm")
        if not (c.key in _NEVER_NEGATIVE or per_atom_abs):
            continue
        if isinstance(c.threshold, (jax.core.Tracer, InfoParameter)):
            continue  # known per structure or under a trace only
        t = np.asarray(c.threshold, float)
        if np.any(t < 0):
            return (
                f"its convergence criterion {i} ({c.key} <= {t.min():g}) can never hold "
                f"({c.key} is never negative)"
            )
    return None
