"""Structure checks of a fused stage: sub-stages, status codes, one model, one device, hooks.

Raised when a :class:`~fused_dynamics.FusedStage` is built, before anything is compiled
(docs/semantics.md §1-§3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .convergence import check_criterion_keys
from .stages.base import Stage

__all__ = ["checked_sub_stages", "same_model"]


def checked_sub_stages(sub_stages: Sequence, entry_status: int, exit_status: int):
    """The ``(code, stage)`` pairs, their codes and the exit status, checked.

    ``sub_stages`` items are ``(code, stage)`` pairs or bare stages (coded by position);
    ``exit_status=-1`` means one past the number of sub-stages.

    Raises
    ------
    TypeError
        An item that is not a :class:`~fused_dynamics.Stage`.
    ValueError
        No sub-stage, repeated codes, an exit or entry status that does not fit the codes,
        sub-stages holding different models or arrays on different devices, a convergence
        criterion whose key no field gives
        (:func:`~fused_dynamics.convergence.check_criterion_keys`).
    """
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
        if not same_model(model0, stage.model):
            raise ValueError(
                f"FusedStage: sub-stage {i} ({type(stage).__name__}) holds a different model "
                "from sub-stage 0; all sub-stages must share one model (one evaluation per "
                "step)."
            )
    for i, (_, stage) in enumerate(pairs):
        check_criterion_keys(f"FusedStage: sub-stage {i} ({type(stage).__name__})", stage)
    devices = {i: _devices(stage) for i, (_, stage) in enumerate(pairs)}
    if len({d for d in devices.values() if d}) > 1:
        raise ValueError(
            f"FusedStage: sub-stages hold arrays on different devices {devices}; put them on "
            "one device (a fused step runs on one device, docs/semantics.md §3)."
        )
    return pairs, codes, exit_status


def _devices(tree: Any) -> frozenset:
    """Devices of the concrete arrays in ``tree`` (empty for tracers and Python numbers)."""
    out = set()
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            out |= set(leaf.devices())
    return frozenset(out)


def same_model(a: Any, b: Any) -> bool:
    """Whether two models are the same: one object, or equal structure and equal leaves."""
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
