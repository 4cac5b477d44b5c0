"""Inflight batching: run compiled chunks, stream graduated systems out, refill slots in place.

Between chunks of ``refill_frequency`` steps the host:

1. writes every system that graduated (status == exit_status) to the first sink with room;
2. frees its slot, re-packs the atom axis so the remaining systems are contiguous at the front
   (their slots, stage state and bookkeeping do not move, so they continue bit for bit);
3. writes new systems from the sampler into free slots and atoms, and admits them with one
   compiled function (``init_fn``, fresh stage state and bookkeeping, ``entry_status``, and one
   model evaluation whose results are kept for the new systems only).

Shapes never change, so the chunk compiles once for the whole run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .batch import HOST_FIELDS, Batch, atoms_from_arrays, empty_host_arrays, write_system
from .hooks import DynamicsStage, ExitReason, Hook
from .provenance import name_exit_reason

__all__ = ["RunStats", "StageExitHook", "StageExitWriter", "run_inflight", "write_graduated"]

# bookkeeping of the run loop that outputs carry (when the engine keeps it)
_INFO_OUT = ("exit_reason", "stage_steps", "failure", "failure_step")

# what fused.init may change, per atom and per system (FreezeAtomsHook adds to ``fixed``)
_ATOM_FIELDS = ("positions", "velocities", "masses", "atomic_numbers", "forces", "fixed")
_SYSTEM_FIELDS = ("cell", "energy", "stress", "status", "fix_com")


@dataclass
class RunStats:
    """What an inflight run measured.

    Attributes
    ----------
    steps : int
        Fused steps taken.
    chunks : int
        Compiled chunks run.
    slot_steps_active : int
        Sum over steps of the slots holding a system not yet graduated.
    slot_steps_total : int
        ``steps * max_systems``.
    written : int
        Systems written to the sinks (graduated, failed and rejected).
    rejected : int
    compilations : int
        Number of distinct compilations of the chunk function during the run.
    wall_time : float
        Seconds, compilation included.
    """

    steps: int = 0
    chunks: int = 0
    slot_steps_active: int = 0
    slot_steps_total: int = 0
    written: int = 0
    rejected: int = 0
    compilations: int = 0
    wall_time: float = 0.0
    per_chunk: list = field(default_factory=list)

    @property
    def utilization(self) -> float:
        """Fraction of slot-steps spent on occupied, not-yet-graduated systems."""
        return self.slot_steps_active / max(self.slot_steps_total, 1)


def _chunk(fused, batch, limit, start):
    """At most ``limit`` steps numbered from ``start``: (batch, steps taken, active slot-steps)."""
    from .fused import run_steps

    return run_steps(fused, batch, limit, start)


_CHUNK = jax.jit(_chunk)


def _run_chunk(fused, batch, limit: int, step: int, listeners=()):
    """One compiled chunk; on a neighbor-list overflow, grow it and redo the chunk.

    ``listeners`` (see :class:`StageExitWriter`) collect frames from host callbacks during the
    chunk: they are told to ``discard()`` them when the chunk is redone and to ``commit()``
    them once it is kept, so nothing computed by a discarded chunk is ever written.
    """
    from .fused import grow_neighbors, overflowed

    while True:
        out = _CHUNK(fused, batch, jnp.int32(limit), jnp.int32(step))
        done = not overflowed(out[0])
        if listeners:
            jax.effects_barrier()  # every host callback of the chunk has run
        for listener in listeners:
            listener.commit() if done else listener.discard()
        if done:
            return out
        batch = grow_neighbors(batch, out[0])


def _admit(fused, batch: Batch, new: jax.Array) -> Batch:
    """Initialize the systems in slots ``new`` (S,) bool; leave every other slot as it is."""
    fresh = fused.init(batch)
    atom_new = batch.to_atoms_axis(new)

    def pick_atoms(a, b):
        return jnp.where(atom_new.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    def pick_systems(a, b):
        return jnp.where(new.reshape((-1,) + (1,) * (jnp.ndim(a) - 1)), a, b)

    changes = {k: pick_atoms(getattr(fresh, k), getattr(batch, k)) for k in _ATOM_FIELDS}
    for k in _SYSTEM_FIELDS:
        changes[k] = pick_systems(getattr(fresh, k), getattr(batch, k))
    changes["stage_state"] = jax.tree_util.tree_map(
        pick_systems, fresh.stage_state, batch.stage_state
    )
    info = dict(fresh.info)
    for k, v in batch.info.items():
        info[k] = pick_systems(info[k], v) if k in info else v
    changes["info"] = info
    if fresh.neighbors is not None:  # refreshed by fused.init for the new atoms
        changes["neighbors"] = fresh.neighbors
    return batch.replace(**changes)


_ADMIT_JIT = jax.jit(_admit)


def _ADMIT(fused, batch: Batch, new) -> Batch:
    """The compiled admission; on a neighbor-list overflow, grow it and admit again."""
    from .fused import grow_neighbors, overflowed

    while True:
        out = _ADMIT_JIT(fused, batch, new)
        if not overflowed(out):
            return out
        batch = grow_neighbors(batch, out)


def attach_neighbors(model, batch: Batch, cells=None, pbc=None) -> Batch:
    """``batch`` with a neighbor list if ``model`` sums over one and the batch has none."""
    if batch.neighbors is not None or getattr(model, "skin", None) is None:
        return batch
    return model.attach_neighbors(batch, cells=cells, pbc=pbc)


def _initialize(fused, batch: Batch) -> Batch:
    """Initialize every occupied slot through the one compiled admission function.

    The batch is given stage state and bookkeeping of the right shapes (zeros, from
    ``jax.eval_shape``: no compilation) and then every occupied slot is admitted, so an inflight
    run compiles two programs: the admission and the chunk.
    """
    shapes = jax.eval_shape(fused.init, batch)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    blank = batch.replace(stage_state=zeros.stage_state, info=zeros.info)
    return _ADMIT(fused, blank, batch.system_mask)


def host_arrays(host) -> dict:
    """The fields of a host batch that :func:`~fused_dynamics.batch.atoms_from_arrays` reads."""
    arrays = {k: getattr(host, k) for k in HOST_FIELDS}
    arrays.update({k: host.info[k] for k in _INFO_OUT if k in host.info})
    return arrays


def write_graduated(host, slots, sinks, annotate=None) -> int:
    """Write the systems in ``slots`` of a host batch to the first sink with room each ([S15]).

    Each frame gets ``exit_reason_name``; ``annotate(frames)`` (a sampler's
    :meth:`~fused_dynamics.SizeAwareSampler.annotate`) adds the input's provenance.
    """
    if len(slots) == 0:
        return 0
    frames = [name_exit_reason(a) for a in atoms_from_arrays(host_arrays(host), slots)]
    if annotate is not None:
        frames = annotate(frames)
    write_to_sinks(frames, sinks)
    return len(frames)


def write_to_sinks(frames, sinks) -> None:
    """Each frame to the first sink with room; raise (after writing what fits) when all are full."""
    for k, atoms in enumerate(frames):
        for sink in sinks:
            if sink.has_room(1):
                sink.write([atoms])
                break
        else:
            lost = [a.info.get("system_id") for a in frames[k:]]
            raise RuntimeError(
                f"Every sink is full; systems {lost} cannot be written (nothing was dropped "
                "silently: give a sink with more room)."
            )


def _repack(host: Batch, keep: np.ndarray) -> tuple[dict, int]:
    """Host arrays with the systems of slots ``keep`` contiguous at the front of the atom axis."""
    n, s = host.max_atoms, host.max_systems
    arrays = empty_host_arrays(n, s)
    system_idx = np.asarray(host.system_idx)
    offset = 0
    for slot in np.flatnonzero(keep):
        sel = np.flatnonzero(system_idx == slot)
        dst = slice(offset, offset + len(sel))
        for k in _ATOM_FIELDS:
            arrays[k][dst] = np.asarray(getattr(host, k))[sel]
        arrays["system_idx"][dst] = slot
        arrays["atom_mask"][dst] = True
        offset += len(sel)
    for k in ("cell", "pbc", "energy", "stress", "status", "system_id", "fix_com", "virtual_cell"):
        arrays[k][keep] = np.asarray(getattr(host, k))[keep]
    arrays["system_mask"][keep] = True
    return arrays, offset


def _rejected_frames(rejected, annotate=None) -> list:
    """Frames of rejected systems: the input structure, ``exit_reason`` REJECTED and why."""
    import ase

    frames = []
    for sid, atoms, why in rejected:
        a = ase.Atoms()
        if atoms is not None:  # the input's atoms; its info and arrays come with annotate
            a = ase.Atoms(
                numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
            )
            if atoms.has("masses"):
                a.set_masses(atoms.get_masses())
        a.info.update(system_id=int(sid), exit_reason=int(ExitReason.REJECTED), rejected=why)
        frames.append(name_exit_reason(a))
    return annotate(frames) if annotate is not None else frames


def run_inflight(
    fused, sampler, refill_frequency: int, sinks, dtype=None, stats=None, listeners=()
):
    """Drive ``fused`` over a sampler's dataset with in-place refill; see the module docstring.

    Parameters
    ----------
    fused : FusedStage
    sampler : SizeAwareSampler
        Its :meth:`~fused_dynamics.SizeAwareSampler.annotate`, when it has one, adds each
        input's provenance to the frames written.
    refill_frequency : int
        Steps per compiled chunk.
    sinks : list of sinks
        Each system goes to the first with room. They are closed when the run ends, also by
        an exception or an interrupt.
    dtype : float dtype, optional
    stats : RunStats, optional
    listeners : sequence of StageExitWriter
        Told to commit what their hooks collected after each kept chunk (see
        :func:`_run_chunk`).

    Returns
    -------
    RunStats
    """
    if refill_frequency < 1:
        raise ValueError(f"refill_frequency must be >= 1, got {refill_frequency}.")
    if not sinks:
        raise ValueError("An inflight run needs at least one sink to write systems to.")
    stats = RunStats() if stats is None else stats
    try:
        return _run_inflight(fused, sampler, refill_frequency, sinks, dtype, stats, listeners)
    finally:
        for sink in sinks:
            sink.close()


def _run_inflight(fused, sampler, refill_frequency, sinks, dtype, stats, listeners):
    t0 = time.perf_counter()
    cache0 = _CHUNK._cache_size()
    annotate = getattr(sampler, "annotate", None)

    def report_rejected():
        frames = _rejected_frames(sampler.take_rejected(), annotate)
        write_to_sinks(frames, sinks)
        stats.rejected += len(frames)
        stats.written += len(frames)

    report_rejected()
    if sampler.exhausted:  # nothing left to run (every system written before, or rejected)
        stats.wall_time = time.perf_counter() - t0
        return stats
    cells, pbc = sampler.cells()
    fused = fused.prepare_for_cells(cells, pbc)
    batch = sampler.initial_batch(dtype)
    batch = attach_neighbors(fused.model, batch, cells, pbc)
    batch = _initialize(fused, batch)
    step = 0
    while True:
        batch, taken, active = _run_chunk(fused, batch, refill_frequency, step, listeners)
        host = jax.device_get(batch)
        taken = int(taken)
        step += taken
        stats.steps = step
        stats.chunks += 1
        stats.slot_steps_active += int(active)
        stats.slot_steps_total += taken * host.max_systems
        done = np.asarray(host.system_mask) & (np.asarray(host.status) == fused.exit_status)
        stats.written += write_graduated(host, np.flatnonzero(done), sinks, annotate)
        keep = np.asarray(host.system_mask) & ~done
        report_rejected()
        if sampler.exhausted and not keep.any():
            break
        if not done.any() and taken > 0:
            continue  # nothing left the batch: keep going without a host round trip of state
        arrays, offset = _repack(host, keep)
        arrays["status"][~keep] = fused.exit_status
        free_slots = [int(x) for x in np.flatnonzero(~keep)]
        incoming = sampler.take(host.max_atoms - offset, len(free_slots))
        new = np.zeros(host.max_systems, bool)
        for (index, atoms), slot in zip(incoming, free_slots, strict=False):
            write_system(arrays, slot, offset, atoms, index)
            offset += len(atoms)
            new[slot] = True
        report_rejected()
        if not keep.any() and not new.any():
            if sampler.exhausted:
                break
            raise RuntimeError("Inflight run: the next system does not fit an empty batch.")
        batch = _rebuild(batch, host, arrays)
        if new.any():
            batch = _ADMIT(fused, batch, jnp.asarray(new))
    stats.compilations = _CHUNK._cache_size() - cache0
    stats.wall_time = time.perf_counter() - t0
    return stats


def _rebuild(batch: Batch, host: Batch, arrays: dict) -> Batch:
    """The device batch with re-packed atoms; per-slot state and bookkeeping carried over."""
    fields = {k: jnp.asarray(v, dtype=getattr(batch, k).dtype) for k, v in arrays.items()}
    if batch.neighbors is not None:  # atoms moved on the atom axis: the list must be rebuilt
        fields["neighbors"] = batch.neighbors.invalidated()
    return batch.replace(**fields)


def run_streaming(fused, batch, n_steps, refill_frequency, sinks, resume, stats=None):
    """Run a fixed batch in chunks, writing each system to the sinks as it graduates."""
    stats = RunStats() if stats is None else stats
    t0 = time.perf_counter()
    cache0 = _CHUNK._cache_size()
    # written already: empty slots and, when resuming, systems that had left before; a system
    # that fails at the first evaluation leaves at once and must still be written
    written = ~np.asarray(batch.system_mask)
    if resume:
        written = written | (np.asarray(batch.status) == fused.exit_status)
    else:
        batch = _initialize(fused, batch)
    step = 0
    limit = np.iinfo(np.int32).max if n_steps is None else int(n_steps)
    while step < limit:
        k = min(refill_frequency, limit - step)
        batch, taken, active = _run_chunk(fused, batch, k, step)
        taken = int(taken)
        step += taken
        stats.chunks += 1
        stats.slot_steps_active += int(active)
        stats.slot_steps_total += taken * batch.max_systems
        status = np.asarray(batch.status)
        done = (status == fused.exit_status) & ~written
        if done.any():
            stats.written += write_graduated(jax.device_get(batch), np.flatnonzero(done), sinks)
            written |= done
        if written.all() or taken == 0:
            break
    stats.steps = step
    stats.compilations = _CHUNK._cache_size() - cache0
    stats.wall_time = time.perf_counter() - t0
    return batch


# ============================================================================ stage outputs
class StageExitWriter:
    """Writes each system as it leaves one sub-stage (converged or out of budget).

    The frames hold the structure, energy, forces and velocities at the moment the system
    left the stage, and in ``info``: ``stage`` (the sub-stage index), ``stage_type``,
    ``exit_reason`` (``CONVERGED`` or ``BUDGET``: how it left *that stage*, with
    ``exit_reason_name``), ``step`` (the fused step), ``stage_steps`` and the input's
    provenance. Systems that fail in the stage are not written here (they leave the run with
    exit reason FAILED and go to the run's outputs).

    Frames are collected by a :class:`StageExitHook` during a compiled chunk and written by
    :meth:`commit` once the chunk is kept (a chunk redone after a neighbor-list overflow is
    :meth:`discard`-ed), so what is written always comes from the kept trajectory.

    Parameters
    ----------
    stage : int
        Index of the sub-stage in the fused stage.
    next_code : int
        Status of a system that left it (``fused.next_code(stage)``).
    sink : sink
        Where the frames go (``write(list[ase.Atoms])``).
    annotate : callable, optional
        ``annotate(frames)``: adds the input's provenance (a sampler's ``annotate``).
    stage_type : str, optional
        Written as ``info["stage_type"]`` (e.g. ``"fire"``).
    """

    def __init__(self, stage: int, next_code: int, sink, annotate=None, stage_type=None):
        self.stage = int(stage)
        self.next_code = int(next_code)
        self.sink = sink
        self.annotate = annotate
        self.stage_type = stage_type
        self.pending: list = []
        self.written = 0

    def hook(self) -> StageExitHook:
        """The fused-level hook that collects this writer's frames."""
        return StageExitHook(writer=self, next_code=self.next_code)

    def collect(self, step, arrays: dict) -> None:
        """Host callback: keep the frames of the systems that left the stage this step."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        slots = np.flatnonzero(arrays.pop("left"))
        converged = arrays.pop("converged")
        frames = atoms_from_arrays(arrays, slots)
        for slot, a in zip(slots, frames, strict=True):
            reason = ExitReason.CONVERGED if converged[slot] else ExitReason.BUDGET
            a.info.pop("status", None)
            a.info.update(exit_reason=int(reason), stage=self.stage, step=int(step))
            if self.stage_type is not None:
                a.info["stage_type"] = self.stage_type
            name_exit_reason(a)
        self.pending.extend(frames)

    def commit(self) -> None:
        """Write what was collected (called after a chunk is kept)."""
        frames, self.pending = self.pending, []
        if frames and self.annotate is not None:
            frames = self.annotate(frames)
        if frames:
            self.sink.write(frames)
            self.written += len(frames)

    def discard(self) -> None:
        """Forget what was collected (the chunk is being redone)."""
        self.pending = []


class StageExitHook(Hook):
    """Sends the systems leaving a sub-stage to a :class:`StageExitWriter` (``ON_CONVERGE``).

    The host callback runs only in steps in which some system left the stage (a
    ``lax.cond`` on the step report), so it costs one reduction in the other steps.
    """

    writer: Any = eqx.field(static=True)
    next_code: int = eqx.field(static=True)
    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.ON_CONVERGE, kw_only=True)

    def apply(self, batch, ctx):
        report = ctx.report
        left = (
            batch.system_mask
            & (report.converged | report.budget_spent)
            & (batch.status == self.next_code)
        )

        def send(b):
            payload = host_arrays(b)
            payload.update(left=left, converged=report.converged)
            jax.debug.callback(self.writer.collect, ctx.step, payload, ordered=True)

        jax.lax.cond(jnp.any(left), send, lambda b: None, batch)
        return batch
