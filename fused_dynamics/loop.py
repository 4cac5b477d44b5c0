"""The traced run loop: at most ``limit`` fused steps in one ``lax.while_loop``, and the
compiled programs of a run (docs/semantics.md §13)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import health, recording
from .batch import Batch
from .compiled import filter_compile, model_options
from .inflight import admit_systems
from .models.base import evaluate_energy
from .models.neighbors import NeighborList

__all__ = ["run_steps", "output_stress", "compiled_chunk", "compiled_loop", "LoopOptions"]


def run_steps(
    fused,
    batch: Batch,
    limit,
    max_steps: int | None = None,
    checkpoints: int | None = None,
    axis_name: str | None = None,
    record_steps: int | None = None,
    stress_at_exit=None,
    prime: bool | jax.Array = False,
    energy_at_exit: bool = False,
    stretch=None,
):
    """At most ``limit`` steps from ``batch.step_count``, stopping when all have graduated.

    Parameters
    ----------
    fused : FusedStage
    batch : Batch
        Initialized (:meth:`FusedStage.init`), or prepared only (see ``prime``).
    limit : int or Array
        Largest number of steps.
    max_steps : int, optional
        Static bound for a reverse-differentiable (checkpointed) loop.
    checkpoints : int, optional
        With ``max_steps``: how many states the reverse pass stores (default: Equinox's
        choice, about ``sqrt(2 max_steps)``). The rest are recomputed (online treeverse
        checkpointing, Stumm & Walther, SIAM J. Sci. Comput. 32, 836 (2010)), so memory is
        ``O(checkpoints)`` states, not ``O(max_steps)``.
    axis_name : str, optional
        Inside ``jax.shard_map`` over a mesh axis of this name (a sharded run,
        :mod:`fused_dynamics.sharding`): ``batch`` is one device's local batch, and the loop
        stops when no system on *any* device is pending (one ``psum`` of a scalar per step), so
        every device takes the same steps and keeps the same ``step_count`` as a run of the
        whole batch on one device (docs/semantics.md §8, §13).
    record_steps : int, optional
        Record mode (:mod:`fused_dynamics.recording`): host hooks write their payloads into
        buffers sized for this many steps instead of calling back during the loop; the loop
        also stops when a buffer is full.
    stress_at_exit : Array, optional
        A run in chunks (bool scalar, traced): the stress is computed only for the systems
        that left the run during these steps (systems that had left before keep theirs),
        and for every system still without one when true (the last chunk of a run).
    prime : bool or Array
        ``True``: ``batch`` was prepared by ``FusedStage._prepare`` (:meth:`~FusedStage.init`
        without its evaluation), and the loop's first iteration is the priming pass, which
        evaluates the model, checks failures and takes no step (not counted in ``limit``,
        ``taken`` or ``active``), with the same result as ``init``. An array (S,) bool: the
        slots admitted that way (a chunk that refilled slots); when any is, the first
        iteration primes them: where other systems are running (and the fused stage has no
        hooks, and ``axis_name`` is None) it is those systems' step and the new ones' first
        evaluation (they take no step in it, ``FusedStage._step``'s ``fresh``); else a
        priming pass that writes energy, forces and stress and checks failures for those slots
        only (the others keep theirs, bit for bit). Either way the program holds
        one copy of the model, not two: the W1 relaxation's run program
        (``benchmarks/bench_peers.py``) compiles in about 30 % less time.
    energy_at_exit : bool
        Static. True (a whole run of a fixed batch whose fused stage does not need the energy
        at every step, ``FusedStage.needs_energy``): the steps evaluate forces only, and the
        energy of the final positions is computed once after the loop, with the exit stress
        where there is one (one evaluation), then checked (a system whose energy is not finite
        leaves FAILED, :func:`fused_dynamics.health.fail_non_finite_energy`). With
        ``stress_at_exit`` (a chunk): the energy at the chunk's end of every system that took a
        step in it or was admitted by it, in one forward pass, so that what the host reads
        between chunks (sinks, checkpoints, progress) has it; the others keep theirs.
    stretch : tuple of two int32 scalars, optional
        A chunk of a run driven to its end (:meth:`~fused_dynamics.live.Run.run_to_end`):
        ``(most, to_stop)``. The loop goes on past ``limit``, in whole multiples of ``limit``
        and to at most ``most`` steps, while no system has graduated during the chunk (a host
        visit then would have nothing to write or refill, docs/semantics.md §14); the
        graduation of every system stops it as before. ``to_stop``: the steps
        left before the run's step budget ends it; a chunk that reaches it computes the stress
        of every system still without one (as ``stress_at_exit`` true).

    Returns
    -------
    batch : Batch
        With the stress of the final positions (:func:`output_stress`; see
        ``stress_at_exit``).
    taken : Array
        Steps taken.
    active : Array
        Sum over the steps of the slots holding a system not yet graduated that took the step
        (of this device's slots under ``axis_name``; a refill primed by the first step takes
        no step in it).
    """

    def pending(batch):
        return batch.system_mask & (batch.status != fused.exit_status)

    def graduated(batch):
        return batch.system_mask & (batch.status == fused.exit_status)

    if stretch is not None:
        before = graduated(batch)  # had left before this chunk: written by the last visit

    def cond(carry):
        batch, k, _, buffers, primed = carry
        go = k < limit
        if stretch is not None:  # on, at multiples of limit, until a system has graduated
            left = jnp.any(graduated(batch) & ~before)
            boundary = k % jnp.maximum(limit, 1) == 0
            go = go | ((k < stretch[0]) & ~(boundary & left))
        if buffers:
            go = go & recording.has_room(buffers)
        if axis_name is None:
            go = go & jnp.any(pending(batch))
        else:
            count = jax.lax.psum(jnp.sum(pending(batch), dtype=jnp.int32), axis_name)
            go = go & (count > 0)
        return go | ~primed

    some = prime if isinstance(prime, bool) else jnp.any(prime)
    slots = None if isinstance(prime, bool) else prime
    # refills are primed by the chunk's first step when other systems are running (no
    # evaluation of their own); with hooks (which see every step) or across devices (whose
    # loops must take the same steps), by a priming pass of their own
    merge = slots is not None and axis_name is None and not fused.all_hooks()

    def body(carry):
        batch, k, active, buffers, primed = carry
        priming = None if some is False else ~primed
        live, fresh = pending(batch), None
        if merge:
            fresh = slots & priming & jnp.any(live & ~slots) & (k < limit)
            priming = priming & ~jnp.any(fresh)
            live = live & ~fresh
        counts = jnp.sum(live, dtype=jnp.int32)
        one = jnp.ones((), jnp.int32)
        if priming is not None:  # the priming pass is not a step
            counts, one = jnp.where(priming, 0, counts), jnp.where(priming, 0, one)
        active = active + counts
        recorder = recording.Recorder(axis_name) if buffers else None
        step = batch.step_count
        batch, _ = fused._step(batch, None, recorder, priming, slots, not energy_at_exit, fresh)
        if buffers:
            buffers = recording.write(buffers, recorder.entries, step)
        if stretch is not None and energy_at_exit:
            batch = _energy_check_at_boundary(fused, batch, k + one, limit, stretch[0], before)
        return batch, k + one, active, buffers, jnp.ones((), bool)

    zero = jnp.zeros((), jnp.int32)
    if batch.step_count is None:  # a batch prepared before the step count was kept
        batch = batch.replace(step_count=zero)
    buffers = {}
    if record_steps is not None:
        buffers = recording.empty_buffers(fused, batch, record_steps, axis_name)
    init = (batch, zero, zero, buffers, jnp.logical_not(some))
    start = batch
    if max_steps is None:
        batch, taken, active, buffers, _ = jax.lax.while_loop(cond, body, init)
    else:
        bound = max_steps + (some is not False)
        batch, taken, active, buffers, _ = _checkpointed_loop(cond, body, init, bound, checkpoints)
    if stretch is not None:  # a stretched chunk that reached the run's budget is its last
        stress_at_exit = stress_at_exit | (taken >= stretch[1])
    if stress_at_exit is not None:  # a chunk: its energy first, then the stress of who left
        if energy_at_exit:
            # the systems that stepped or were primed here: their positions are new, and the
            # list was refreshed at them by the chunk's last evaluation
            def steps(b):
                return jnp.sum(b.info["stage_steps"], axis=-1)

            touched = (steps(batch) > steps(start)) | (False if slots is None else slots)
            batch = _energy_at_exit(fused, batch, True, start, ~touched, taken > 0)
        batch = _stress_at_exit(fused, start, batch, stress_at_exit)
    elif energy_at_exit:
        batch = _energy_at_exit(fused, batch, fresh_list=prime is True)
    else:
        batch = output_stress(fused, batch)
    out = (batch, taken, active)
    return out if record_steps is None else out + (buffers,)


def _energy_check_at_boundary(fused, batch: Batch, k, limit, most, before) -> Batch:
    """A stretched chunk whose steps evaluate forces only, after its step ``k``: at a boundary
    the loop may go on past (a multiple of ``limit`` below ``most``, no system having left
    since the chunk began, ``before``), every system still running whose energy is not
    finite leaves FAILED at this step (:func:`fused_dynamics.health.fail_non_finite_energy`),
    as the energy pass at the end of an unstretched chunk ending here would have made it; its
    leaving then ends the chunk here. Nothing else is written (the chunk's energy pass at its
    end writes the energies). One forward pass under a ``lax.cond``, at boundaries only."""
    running = batch.system_mask & (batch.status != fused.exit_status)
    left = batch.system_mask & (batch.status == fused.exit_status) & ~before
    due = (k >= limit) & (k % jnp.maximum(limit, 1) == 0) & (k < most) & ~jnp.any(left)

    def check(b):
        energy = _forward_energy(fused, b, fresh_list=True)
        bad = running & ~jnp.isfinite(energy)
        failed = health.fail_non_finite_energy(fused, b.replace(energy=jnp.where(bad, energy, 0)))
        return failed.replace(energy=b.energy)

    return jax.lax.cond(due, check, lambda b: b, batch)


def _forward_energy(fused, batch: Batch, fresh_list: bool) -> jax.Array:
    """The energy of ``batch``'s positions by the forward pass alone (:func:`evaluate_energy`);
    ``fresh_list``: an evaluation at these positions refreshed the neighbor list already, so
    it is not checked again (no second copy of a rebuild)."""
    if fresh_list and isinstance(batch.neighbors, NeighborList):
        fresh = dataclasses.replace(batch.neighbors, refreshed=True)
        batch = batch.replace(neighbors=fresh)
    return evaluate_energy(fused.model, batch)


def _checkpointed_loop(cond, body, init, max_steps, checkpoints=None):
    import equinox.internal as eqxi  # only reverse-differentiable runs need it

    return eqxi.while_loop(
        cond, body, init, max_steps=max_steps, kind="checkpointed", checkpoints=checkpoints
    )


def output_stress(fused, batch: Batch, systems: jax.Array | None = None) -> Batch:
    """The batch with the stress of its final positions, for outputs.

    A run whose steps do not read the stress skips it at every step (the strain derivative
    costs several times the forces); what leaves the run still carries it, computed here
    (docs/semantics.md §6), unless the fused stage was built with ``output_stress=False``.

    Parameters
    ----------
    fused : FusedStage
    batch : Batch
    systems : Array, shape (S,) bool, optional
        Only these slots (the others keep ``batch.stress``). Default: every slot, in one
        evaluation of the batch. On CPU, for a model evaluated without a neighbor list or size
        buckets, each of ``systems`` is evaluated alone (:meth:`Batch.single_system`, a
        ``lax.map`` with a ``lax.cond`` per slot), so the cost is that of those systems, not of
        the batch; elsewhere the batch is evaluated when any slot is in ``systems``.
    """
    if not fused.computes_exit_stress:
        return batch
    model = fused.model
    if systems is None:
        return batch.replace(stress=model(batch, stress=True).stress)
    alone = (
        jax.default_backend() == "cpu"  # a GPU would read every slot's predicate back
        and batch.neighbors is None
        and not getattr(model, "size_buckets", None)
        and batch.max_atoms_per_system > 0
    )
    if alone:

        def one(slot):
            def evaluate(_):
                return model(batch.single_system(slot), stress=True).stress[0]

            return jax.lax.cond(systems[slot], evaluate, lambda _: batch.stress[slot], None)

        stress = jax.lax.map(one, jnp.arange(batch.max_systems))
    else:
        stress = jax.lax.cond(
            jnp.any(systems),
            lambda b: model(b, stress=True).stress,
            lambda b: b.stress,
            batch,
        )
    return batch.replace(stress=jnp.where(systems[:, None, None], stress, batch.stress))


def _energy_at_exit(
    fused,
    batch: Batch,
    fresh_list: bool = False,
    start: Batch | None = None,
    keep=None,
    stepped=None,
) -> Batch:
    """The batch after a loop whose steps evaluated forces only: the energy of its final
    positions (and their stress where the run computes it once, :func:`output_stress`: one
    evaluation for both), ``prev_energy`` as the steps would have left it (the energy, or
    ``inf`` for a system that moved on at the last step), and the energy checked. The forces are
    the last step's, at these positions already. ``fresh_list`` (static): the loop evaluated
    at least once (its priming pass), so a neighbor list is fresh at these positions and is
    not checked again; a resumed loop may have taken no step from a batch edited since.

    ``start`` (a chunk's first batch): the forward pass alone (the chunk computes the stress of
    the systems that leave in it, :func:`_stress_at_exit`), and the slots of ``keep`` (S,) bool
    (those that neither took a step in the chunk nor were admitted by it: systems that had left
    the run before, reported when they left, and every slot of a chunk that took no step) keep
    their energy, status and exit record as they were at ``start``; their ``prev_energy`` is
    what a step with the energy leaves to a system that did not move on: their energy, when
    the chunk took a step (``stepped``, a bool scalar), else as it was."""
    if fused.computes_exit_stress and start is None:
        out = fused.model(batch, stress=True)
        energy, stress = out.energy, out.stress
    else:  # the forward pass alone: compiles in a fraction of the time of the derivatives
        energy, stress = _forward_energy(fused, batch, fresh_list), batch.stress
    info = dict(batch.info)
    prev = info["prev_energy"]
    info["prev_energy"] = jnp.where(prev == jnp.inf, prev, energy)
    out = health.fail_non_finite_energy(
        fused, batch.replace(energy=energy, stress=stress, info=info)
    )
    if start is None:
        return out
    info = dict(out.info)
    for key in ("exit_reason", "failure", "failure_step"):
        info[key] = jnp.where(keep, start.info[key], info[key])
    kept_prev = jnp.where(stepped, start.energy, start.info["prev_energy"])
    info["prev_energy"] = jnp.where(keep, kept_prev, info["prev_energy"])
    return out.replace(
        energy=jnp.where(keep, start.energy, out.energy),
        status=jnp.where(keep, start.status, out.status),
        info=info,
    )


def _stress_at_exit(fused, start: Batch, end: Batch, everyone) -> Batch:
    """``end`` (a chunk's last batch) with the stress of the systems that left the run since
    ``start``; systems that had left before keep the stress they left with; with ``everyone``
    (the last chunk of a run), every system still without one gets it too."""
    if not fused.computes_exit_stress:
        return end

    def left(b):
        return b.system_mask & (b.status == fused.exit_status)

    before = left(start)
    end = end.replace(stress=jnp.where(before[:, None, None], start.stress, end.stress))
    missing = ~jnp.all(jnp.isfinite(end.stress), axis=(-2, -1))
    due = (left(end) & ~before) | (everyone & end.system_mask & missing)
    return output_stress(fused, end, due)


def step_limit(n_steps: int | None) -> np.ndarray:
    """The ``limit`` of :func:`run_steps` for a run of at most ``n_steps`` (None: no bound),
    a host int32 scalar array. A NumPy array goes into the program as it is, while
    ``jnp.asarray`` of a Python int compiles a conversion program of its own (jax 0.10)."""
    return np.asarray(np.iinfo(np.int32).max if n_steps is None else int(n_steps), np.int32)


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """Static options of :func:`_run_loop` (hashable, never traced)."""

    resume: bool
    max_steps: int | None
    checkpoints: int | None = None


def run_loop(fused, batch: Batch, limit, options: LoopOptions) -> Batch:
    """A whole run of a fixed batch: prepared (unless resumed), primed by the loop's first
    iteration, then stepped (:func:`run_steps`)."""
    prime = not options.resume
    if prime:
        batch = fused._prepare(batch)
    out = run_steps(
        fused,
        batch,
        limit,
        options.max_steps,
        options.checkpoints,
        prime=prime,
        energy_at_exit=not fused.needs_energy,
    )
    return out[0]


_COMPILED: dict = {}


def _compiled(fn, compile_kwargs: dict):
    key = (fn, tuple(sorted((k, repr(v)) for k, v in compile_kwargs.items())))
    if key not in _COMPILED:
        _COMPILED[key] = filter_compile(fn, options_for=model_options, **compile_kwargs)
    return _COMPILED[key]


def chunk(
    fused,
    batch: Batch,
    limit,
    last,
    new,
    record_steps: int | None,
    stretch=None,
    axis_name: str | None = None,
):
    """At most ``limit`` steps of a run in chunks: ``(batch, taken, active, records)``.

    Host hooks are recorded for at most ``record_steps`` steps (:mod:`fused_dynamics.recording`;
    ``None`` where no hook works on the host: no records); ``axis_name`` as in
    :func:`run_steps`. The stress is computed for the systems that leave the run in this
    chunk, and with ``last`` (a bool array: the run stops after this chunk) for every system
    without one (``stress_at_exit`` of :func:`run_steps`). ``new`` (S,) bool, or None: slots
    refilled by the host visit before this chunk, admitted first
    (:func:`~fused_dynamics.inflight.admit_systems`, under a ``lax.cond``, and primed by the
    loop's first iteration): one compiled call
    per visit instead of two (each call of this program touches its temporaries afresh, which
    costs about as much as an evaluation on CPU; see docs/semantics.md §14). ``stretch``: see
    :func:`run_steps` (the chunk goes on while a host visit would have nothing to do).
    """
    prime = False
    if new is not None:
        batch = jax.lax.cond(
            jnp.any(new), lambda b: admit_systems(fused, b, new, evaluate=False), lambda b: b, batch
        )
        prime = new  # the loop's first iteration evaluates them (one copy of the model)
    out = run_steps(
        fused,
        batch,
        limit,
        axis_name=axis_name,
        record_steps=record_steps,
        stress_at_exit=last,
        prime=prime,
        energy_at_exit=not fused.needs_energy,
        stretch=stretch,
    )
    return out if record_steps is not None else out + ({},)


def compiled_chunk(fused):
    """The compiled chunk function of ``fused`` (cached per ``compile_kwargs``)."""
    return _compiled(chunk, fused.compile_kwargs)


def compiled_loop(fused):
    """The compiled whole-run program of ``fused`` (cached per ``compile_kwargs``)."""
    return _compiled(run_loop, fused.compile_kwargs)
