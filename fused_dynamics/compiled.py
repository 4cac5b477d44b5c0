"""Compiling engine functions, and the one neighbor-list overflow-grow-retry helper.

Any Equinox module may hold leaves that are not arrays (an ``eqx.nn.MLP``'s activation
functions, a hook's string field, a ``bool`` flag used in Python control flow). As
``equinox.filter_jit`` does, :func:`filter_compile` traces arrays and keeps Python ``bool``,
``int``, strings, functions and other objects static; unlike it, it also traces Python
``float`` and ``complex`` leaves, so that a new time step or temperature does not recompile.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np

__all__ = [
    "TREE_REDUCTION_WIDTH",
    "library_products_only",
    "model_options",
    "filter_compile",
    "overflowed",
    "grow_neighbors",
    "retry_on_overflow",
]

# XLA:CPU (jaxlib 0.10) rewrites a float32 sum over more than this many elements into a
# reduce-window of this width and a short sum (pairwise summation)
TREE_REDUCTION_WIDTH = 32
_PRODUCTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
_products_only_known: bool | None = None


def library_products_only() -> dict:
    """``compiler_options`` that keep XLA:CPU's YNNPACK library for matrix products only.

    By default XLA:CPU (jaxlib 0.10) also hands float32 reductions to YNNPACK
    (``LIBRARY_FUSION_TYPE_REDUCE``), including the reduce-windows its tree-reduction pass makes
    of sums over more than :data:`TREE_REDUCTION_WIDTH` elements. Where that width does not
    divide the summed axis, the library call costs more than the loop XLA emits itself: the
    gradient of the dense pair kernel's 36-atom tiles (108-atom systems) ran twice as slowly in
    float32 as in float64. Plain reductions (32-atom tiles) are faster in the library, so
    models ask for this per batch shape (:meth:`fused_dynamics.models.base.Model.compiler_options`;
    docs/models.md, "float32 on the CPU").

    Returns
    -------
    dict
        The option on the CPU backend where this jaxlib knows it (checked once, by compiling a
        scalar program with it); else empty (XLA's defaults).
    """
    global _products_only_known
    if jax.default_backend() != "cpu":
        return {}
    if _products_only_known is None:
        try:
            jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(dict(_PRODUCTS_ONLY))
            _products_only_known = True
        except Exception:  # noqa: BLE001 - an option this jaxlib does not have: its defaults
            _products_only_known = False
    return dict(_PRODUCTS_ONLY) if _products_only_known else {}


class _Static:
    """The non-array part of the arguments, hashable for ``jax.jit``'s cache."""

    __slots__ = ("leaves", "treedef", "_hash")

    def __init__(self, tree):
        self.leaves, self.treedef = jax.tree_util.tree_flatten(tree)
        self._hash = hash((self.treedef, tuple(map(_key, self.leaves))))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (
            isinstance(other, _Static)
            and self.treedef == other.treedef
            and len(self.leaves) == len(other.leaves)
            and all(_key(a) == _key(b) for a, b in zip(self.leaves, other.leaves, strict=True))
        )

    def tree(self):
        return jax.tree_util.tree_unflatten(self.treedef, self.leaves)


def _traced(leaf) -> bool:
    """Arrays and Python floats are traced; bools, ints and everything else static."""
    return eqx.is_array(leaf) or isinstance(leaf, (float, complex))


def _key(leaf):
    """A hashable identity of a static leaf (by value when it has one, else by object)."""
    try:
        hash(leaf)
    except TypeError:
        return ("id", id(leaf))
    return leaf


def model_options(owner, batch, *_) -> dict:
    """The ``options_for`` of engine programs called as ``(owner, batch, ...)``.

    Parameters
    ----------
    owner : FusedStage
        Anything with a ``model`` attribute.
    batch : Batch
        Flat, or stacked per device (capacities are read from the last axes).

    Returns
    -------
    dict
        ``owner.model.compiler_options(batch)`` (empty for a model without the method).
    """
    options = getattr(owner.model, "compiler_options", None)
    return options(batch) if options is not None else {}


def filter_compile(fn: Callable, options_for: Callable | None = None, **jit_kwargs) -> Callable:
    """``fn`` compiled with ``jax.jit``, tracing only the array-like leaves of its arguments.

    Parameters
    ----------
    fn : callable
        Called with the positional arguments; its outputs must be arrays (or pytrees of them
        whose other parts are static fields).
    options_for : callable, optional
        ``options_for(*args) -> dict``: XLA ``compiler_options`` for a call with these
        arguments (host-side, from static shapes: one program per distinct answer), under those
        of ``jit_kwargs``. Only a top-level call is compiled with options: inside any trace
        (``jax.jit``, ``jax.grad``, ``jax.vmap``, ``jax.eval_shape``) the function is traced into
        the caller's program without them (JAX refuses ``compiler_options`` on a jit nested in
        ``jax.jit`` or ``jax.grad``). A float32 program compiled with other options may round
        differently: the same call inside and outside a trace can differ in the last bits.
    **jit_kwargs
        Forwarded to ``jax.jit``: options that do not name arguments (``inline``,
        ``keep_unused``, ``compiler_options``).

    Returns
    -------
    callable
        With a ``cache_size()`` method (the number of programs compiled so far for top-level
        calls) and a ``lower(*args)`` method (``jax.stages.Lowered`` of the program a call with
        these arguments runs; ``.compile().as_text()`` shows what XLA made of it).
    """

    def inner(static, dynamic):
        return fn(*eqx.combine(dynamic, static.tree()))

    nested_kwargs = {k: v for k, v in jit_kwargs.items() if k != "compiler_options"}
    nested = jax.jit(inner, static_argnums=0, **nested_kwargs)
    tops: dict = {}

    def program(args):
        options = dict(options_for(*args)) if options_for is not None else {}
        options.update(jit_kwargs.get("compiler_options") or {})
        if options and not _top_level():
            # without options one jit serves both: one trace (say, an eval_shape and the call)
            return nested
        key = tuple(sorted(options.items()))
        if key not in tops:
            kwargs = {**jit_kwargs, "compiler_options": options or None}
            tops[key] = jax.jit(inner, static_argnums=0, **kwargs)
        return tops[key]

    @functools.wraps(fn)
    def call(*args):
        dynamic, static = eqx.partition(args, _traced)
        return program(args)(_Static(static), dynamic)

    def lower(*args):
        dynamic, static = eqx.partition(args, _traced)
        return program(args).lower(_Static(static), dynamic)

    call.cache_size = lambda: sum(t._cache_size() for t in tops.values())
    call.lower = lower
    return call


def _top_level() -> bool:
    """Whether JAX is tracing nothing now (``compiler_options`` are for top-level jits only)."""
    from jax._src import core  # no public test of the trace state in jax 0.10

    clean = getattr(core, "trace_state_clean", None)
    if clean is None:  # another jax: no options rather than a refused nested jit
        warnings.warn(
            "fused_dynamics: jax._src.core.trace_state_clean is gone; engine programs are "
            "compiled with XLA's default options (docs/models.md, 'float32 on the CPU').",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return clean()


def overflowed(batch, fetch: Callable = np.asarray) -> bool:
    """Whether a concrete batch's neighbor list overflowed (host-side; False when traced).

    ``fetch`` reads an array to the host (a sharded run's reads the flags of every device of
    every process, one per device)."""
    nl = getattr(batch, "neighbors", None)
    flag = getattr(nl, "overflow", None)
    if flag is None or isinstance(flag, jax.core.Tracer):
        return False
    return bool(np.any(fetch(flag)))


def grow_neighbors(batch, out=None, can_fail: bool = True):
    """``batch`` with a larger neighbor list (one recompilation follows), with a warning.

    ``out`` is the batch the overflowing call returned: its list recorded what was needed.
    When the larger list would have no int32 pair codes (a cell that collapsed, or atoms
    piled into one bin), and ``can_fail``, the list keeps its size and leaves out the systems
    that ask it instead (:meth:`~fused_dynamics.models.neighbors.NeighborList.crowding_systems`,
    measured on ``out``): they fail ``NEIGHBOR_OVERFLOW`` at the first step of the re-run, and
    the others re-run from the last good state.
    """
    nl = batch.neighbors
    grown = nl.grown(seen=None if out is None else out.neighbors)
    if can_fail and not grown.codes_fit(batch.max_atoms):
        candidates = np.asarray(batch.system_mask & ~nl.excluded(batch))
        crowded = grown.crowding_systems(batch if out is None else out, candidates)
        excluded = nl.excluding(batch, crowded)
        # progress: each pass leaves out one system more (else the list grows, and may raise)
        if np.sum(excluded.excluded(batch)) > np.sum(nl.excluded(batch)):
            warnings.warn(
                f"fused_dynamics: systems {np.asarray(batch.system_id)[crowded].tolist()} "
                "fail NEIGHBOR_OVERFLOW: the neighbor list they need (stencil, atoms per bin) "
                "has no int32 pair codes; the others re-run from the last good state.",
                RuntimeWarning,
                stacklevel=3,
            )
            return batch.replace(neighbors=excluded)
    warnings.warn(
        f"fused_dynamics: the neighbor list overflowed its capacity; grown to "
        f"{grown.capacity} pairs and re-run from the last good state (one recompilation).",
        RuntimeWarning,
        stacklevel=3,
    )
    return batch.replace(neighbors=grown)


def retry_on_overflow(fn: Callable, batch, *args, listeners=(), fetch=None, place=None):
    """``fn(batch, *args)``, redone on a larger neighbor list until nothing overflowed.

    ``fn`` returns a batch or a tuple whose first item is the batch. ``listeners`` (objects with
    ``commit()`` and ``discard()``, such as :class:`~fused_dynamics.inflight.StageExitWriter`)
    collect frames from host callbacks during the call: they are told to discard them when the
    call is redone and to commit them once it is kept, so that nothing computed by a discarded
    attempt is ever written.

    A batch spread over devices (:mod:`fused_dynamics.sharding`, one list per device stacked
    on a leading axis) gives ``fetch`` (array -> whole host copy, from every process) and
    ``place`` (host list -> the list on the devices): the flags and needs of every device are
    read, and every device's list grows to the same capacities, since they share one program.
    """
    while True:
        out = fn(batch, *args)
        result = out[0] if isinstance(out, tuple) else out
        done = not overflowed(result, fetch or np.asarray)
        if listeners:
            jax.effects_barrier()  # every host callback of the call has run
        for listener in listeners:
            listener.commit() if done else listener.discard()
        if done:
            return out
        if fetch is None:
            batch = grow_neighbors(batch, result)
            continue
        host = jax.tree_util.tree_map(fetch, (batch.neighbors, result.neighbors))
        grown = grow_neighbors(
            batch.replace(neighbors=host[0]), result.replace(neighbors=host[1]), can_fail=False
        )
        batch = batch.replace(neighbors=place(grown.neighbors))
