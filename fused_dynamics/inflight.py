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

import jax
import jax.numpy as jnp
import numpy as np

from .batch import HOST_FIELDS, Batch, atoms_from_arrays, empty_host_arrays, write_system
from .hooks import ExitReason

__all__ = ["RunStats", "run_inflight", "write_graduated"]

_ATOM_FIELDS = ("positions", "velocities", "masses", "atomic_numbers", "forces")


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


def _run_chunk(fused, batch, limit: int, step: int):
    """One compiled chunk; on a neighbor-list overflow, grow it and redo the chunk."""
    from .fused import grow_neighbors, overflowed

    while True:
        out = _CHUNK(fused, batch, jnp.int32(limit), jnp.int32(step))
        if not overflowed(out[0]):
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
    for k in ("cell", "energy", "stress", "status"):
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


def write_graduated(host, slots, sinks) -> int:
    """Write the systems in ``slots`` of a host batch to the first sink with room each ([S15])."""
    if len(slots) == 0:
        return 0
    arrays = {k: getattr(host, k) for k in HOST_FIELDS}
    arrays.update({k: host.info[k] for k in ("exit_reason", "stage_steps") if k in host.info})
    frames = atoms_from_arrays(arrays, slots)
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
    for k in ("cell", "pbc", "energy", "stress", "status", "system_id"):
        arrays[k][keep] = np.asarray(getattr(host, k))[keep]
    arrays["system_mask"][keep] = True
    return arrays, offset


def _rejected_frames(rejected) -> list:
    frames = []
    for i, atoms, why in rejected:
        import ase

        a = ase.Atoms() if atoms is None else atoms.copy()
        a.calc = None
        a.info.update(system_id=i, exit_reason=int(ExitReason.REJECTED), rejected=why)
        frames.append(a)
    return frames


def run_inflight(fused, sampler, refill_frequency: int, sinks, dtype=None, stats=None):
    """Drive ``fused`` over a sampler's dataset with in-place refill; see the module docstring."""
    if refill_frequency < 1:
        raise ValueError(f"refill_frequency must be >= 1, got {refill_frequency}.")
    if not sinks:
        raise ValueError("An inflight run needs at least one sink to write systems to.")
    stats = RunStats() if stats is None else stats
    t0 = time.perf_counter()
    cache0 = _CHUNK._cache_size()
    cells, pbc = sampler.cells()
    fused = fused.prepare_for_cells(cells, pbc)

    def report_rejected():
        frames = _rejected_frames(sampler.take_rejected())
        write_to_sinks(frames, sinks)
        stats.rejected += len(frames)
        stats.written += len(frames)

    report_rejected()
    batch = sampler.initial_batch(dtype)
    batch = attach_neighbors(fused.model, batch, cells, pbc)
    batch = _initialize(fused, batch)
    step = 0
    while True:
        batch, taken, active = _run_chunk(fused, batch, refill_frequency, step)
        host = jax.device_get(batch)
        taken = int(taken)
        step += taken
        stats.steps = step
        stats.chunks += 1
        stats.slot_steps_active += int(active)
        stats.slot_steps_total += taken * host.max_systems
        done = np.asarray(host.system_mask) & (np.asarray(host.status) == fused.exit_status)
        stats.written += write_graduated(host, np.flatnonzero(done), sinks)
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
    for sink in sinks:
        sink.close()
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
    if not resume:
        batch = _initialize(fused, batch)
    written = ~np.asarray(batch.system_mask) | (np.asarray(batch.status) == fused.exit_status)
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
