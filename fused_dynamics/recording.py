"""Host hooks recorded into device buffers and delivered once per chunk (docs/semantics.md §8a).

A hook's ``on_host`` is host work on NumPy copies of a few fields. Inside one compiled call
(``jax.jit``, ``jax.vmap``, ``jax.grad`` of a run, or :meth:`FusedStage.step`) it is an ordered
``jax.debug.callback``: the loop stops at every due step to hand the arrays to Python. A run
driven in chunks (:class:`~fused_dynamics.driver.Run`: every run of a concrete batch that has
host hooks, sinks, a sampler or checkpoints) records instead:

- at each due step the hook's payload (what its callback would have received) is written into a
  buffer of the loop carry, ``ceil(chunk / every_n_steps)`` rows per hook, plus a spill row
  (:func:`write`: under a ``lax.cond`` on CPU, into the spill row without a branch elsewhere);
- after the chunk, once the run has kept it (a chunk redone on a grown neighbor list is
  discarded with its records, so nothing is delivered twice), the host receives the buffers in
  one transfer and calls ``on_host`` for each record in the order a callback run would have:
  by step, then in firing order within the step.

What ``on_host`` receives is the same; only when differs (after the chunk, not during it). A
chunk stops early if a buffer fills (a chunk longer than the one the buffers were sized for).
Buffers are per-device under a mesh (each device records its own systems; the host merges them
into the flat layout), which is how host hooks run on a mesh of several devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .hooks_base import HookData, has_host, zeros_like_shapes

__all__ = [
    "Recorder",
    "records_hooks",
    "empty_buffers",
    "write",
    "has_room",
    "deliver",
    "zeros_like_shapes",
]


def records_hooks(fused) -> bool:
    """Whether some hook of ``fused`` works on the host (a run in chunks then records)."""
    return any(has_host(h) for h in fused.all_hooks())


class Recorder:
    """Trace-time collector of the host hooks' payloads of one step.

    Passed to :meth:`FusedStage.step` (``records=``): instead of a host callback, each host hook
    leaves ``entries[key] = (due, payload)``, ``key`` its position in
    :meth:`FusedStage.all_hooks`, ``due`` a bool scalar and ``payload`` the dict of arrays its
    ``on_host`` receives (zeros when not due). Entries are inserted in firing order.

    Parameters
    ----------
    axis_name : str, optional
        Inside ``shard_map``: ``ON_CONVERGE`` hooks fire on a step where a system of *any* device
        left its sub-stage (as on one device), so every device records the same steps.
    """

    def __init__(self, axis_name: str | None = None):
        self.entries: dict[int, tuple] = {}
        self.axis_name = axis_name

    def any(self, x: jax.Array) -> jax.Array:
        """``jnp.any(x)``, over the whole mesh under ``axis_name``."""
        x = jnp.any(x)
        if self.axis_name is None:
            return x
        return jax.lax.psum(x.astype(jnp.int32), self.axis_name) > 0


def empty_buffers(fused, batch, steps: int, axis_name: str | None = None) -> dict:
    """Buffers for the host hooks of ``fused`` over a chunk of at most ``steps`` steps.

    Returns
    -------
    dict
        ``{key: {"step": (K+1,) int32, "count": () int32, "order": () int32,
        "arrays": {name: (K+1, *shape)}}}`` with ``K = ceil(steps / every_n_steps)`` rows and a
        spill row; ``order`` is the hook's firing position within a step. Empty when no hook
        of ``fused`` works on the host.
    """
    if not records_hooks(fused):
        return {}
    hooks = fused.all_hooks()
    order: list[int] = []  # the keys in firing order (a returned dict comes back sorted)

    def probe(b):
        recorder = Recorder(axis_name)
        fused.step(b, records=recorder)
        order.extend(recorder.entries)
        return recorder.entries

    entries = jax.eval_shape(probe, batch)  # a trace of one step; nothing is computed
    buffers = {}
    for key, (_, payload) in entries.items():
        rows = math.ceil(steps / hooks[key].every_n_steps) + 1
        buffers[key] = {
            "step": jnp.zeros((rows,), jnp.int32),
            "count": jnp.zeros((), jnp.int32),
            "order": jnp.asarray(order.index(key), jnp.int32),
            "arrays": jax.tree_util.tree_map(
                lambda s, r=rows: jnp.zeros((r,) + s.shape, s.dtype), payload
            ),
        }
    return buffers


def write(buffers: dict, entries: dict, step: jax.Array) -> dict:
    """The buffers with this step's due entries appended.

    On CPU a not-due entry skips the write (a ``lax.cond``; writing the spill row every step
    instead cost about 5 % of a FIRE+NVT step of 64 x 108 atoms with a positions tape every 5
    steps, the cond nothing measurable). Elsewhere it goes to the spill row, so the write needs
    no branch (a GPU reads a cond's predicate back to the host, a synchronisation per step, as
    in :func:`fused_dynamics.stages.base.masked_update`).
    """
    branch = jax.default_backend() == "cpu"
    out = {}
    for key, buf in buffers.items():
        due, payload = entries[key]

        def put(buf, row, due=due, payload=payload):
            return {
                "step": buf["step"].at[row].set(step),
                "count": buf["count"] + due.astype(jnp.int32),
                "order": buf["order"],
                "arrays": jax.tree_util.tree_map(
                    lambda b, x: b.at[row].set(x.astype(b.dtype)), buf["arrays"], payload
                ),
            }

        if branch:
            out[key] = jax.lax.cond(due, lambda b, put=put: put(b, b["count"]), lambda b: b, buf)
        else:
            spill = buf["step"].shape[0] - 1
            out[key] = put(buf, jnp.where(due, buf["count"], spill))
    return out


def has_room(buffers: dict) -> jax.Array:
    """Whether every buffer can take one more record (a step records at most one per hook)."""
    room = jnp.asarray(True)
    for buf in buffers.values():
        room = room & (buf["count"] < buf["step"].shape[0] - 1)
    return room


def deliver(fused, buffers: dict, row: Callable | None = None) -> int:
    """Host: call each hook's ``on_host`` on its records, by step and firing order.

    Parameters
    ----------
    fused : FusedStage
        The stage whose :meth:`~FusedStage.all_hooks` the keys index.
    buffers : dict
        Host (NumPy) copies of what :func:`write` filled.
    row : callable, optional
        ``row(name, array, i) -> numpy.ndarray``: record ``i`` of one payload array (default
        ``array[i]``; a sharded run merges the devices' rows into the flat layout).

    Returns
    -------
    int
        The number of ``on_host`` calls made.
    """
    if not buffers:
        return 0
    row = row or (lambda name, x, i: x[i])
    hooks = fused.all_hooks()
    records = []
    for key, buf in buffers.items():
        count = int(np.reshape(buf["count"], -1)[0])
        order = int(np.reshape(buf["order"], -1)[0])
        steps = np.asarray(buf["step"]).reshape(-1, buf["step"].shape[-1])[0]
        records += [(int(steps[i]), order, key, i) for i in range(count)]
    for step, _, key, i in sorted(records):
        hook = hooks[key]
        arrays = {k: np.asarray(row(k, v, i)) for k, v in buffers[key]["arrays"].items()}
        hook.on_host(HookData(step=step, stage=hook.stage, arrays=arrays))
    return len(records)
