"""Inflight batching, the host side: write graduated systems out, refill their slots in place.

The loop that calls these lives in :mod:`fused_dynamics.driver`. Between compiled chunks the
host:

1. writes every system that graduated (status == exit_status) to the first sink with room;
2. frees its slot, re-packs the atom axis so the remaining systems are contiguous at the front
   (their slots, stage state and bookkeeping do not move, so they continue bit for bit);
3. writes new systems from the sampler into free slots and atoms, and admits them: ``init_fn``,
   fresh stage state and bookkeeping, ``entry_status`` (:func:`admit_systems`), and one model
   evaluation whose results are kept for the new systems only. On one device the next chunk
   admits them in its loop's first iteration (the priming pass,
   :func:`fused_dynamics.loop.chunk`), so a run compiles no admission program; a sharded run
   admits on every device with :func:`admit`.

Shapes never change, so the chunk compiles once for the whole run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .batch import HOST_FIELDS, Batch, atoms_from_arrays, default_float, empty_host_arrays
from .compiled import filter_compile, model_options, retry_on_overflow
from .hooks import DynamicsStage, Hook
from .parameters import (
    check_info_values,
    info_keys,
    info_readers,
    is_traced,
    missing_key_message,
)
from .provenance import name_exit_reason
from .status import ExitReason

__all__ = [
    "RunStats",
    "StageExitHook",
    "StageExitWriter",
    "admit",
    "blank",
    "check_batch_info",
    "initialize",
    "require_info",
    "repack",
    "rebuild",
    "write_graduated",
]

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
        Sum over steps of the slots holding a system not yet graduated that took the step (a
        refill primed by a chunk's first step takes no step in it).
    slot_steps_total : int
        ``steps * max_systems``.
    written : int
        Systems written to the sinks (graduated, failed and rejected).
    rejected : int
    compilations : int
        Number of distinct compilations of the chunk function during the run.
    wall_time : float
        Seconds, compilation included (summed over resumed parts of a run).
    checkpoints : int
        Checkpoints written.
    """

    steps: int = 0
    chunks: int = 0
    slot_steps_active: int = 0
    slot_steps_total: int = 0
    written: int = 0
    rejected: int = 0
    compilations: int = 0
    wall_time: float = 0.0
    checkpoints: int = 0

    @property
    def utilization(self) -> float:
        """Fraction of slot-steps spent on occupied, not-yet-graduated systems."""
        return self.slot_steps_active / max(self.slot_steps_total, 1)

    def to_dict(self) -> dict:
        """The counters as plain Python values (for checkpoints and reports)."""
        return asdict(self)


def require_info(fused, sampler, dtype=None) -> tuple[str, ...]:
    """Make ``sampler`` read the ``atoms.info`` values the ``from_info`` parameters of
    ``fused`` need, and reject the structures without valid ones (docs/semantics.md §14a):
    each value is checked as the batch will store it, in ``dtype`` (the batch's float dtype).

    ``fused`` may be a list of fused stages (a pipeline's): the sampler then reads the keys
    of all of them, and each value is checked by the rules of every parameter that reads it.
    Returns the keys, sorted.

    Raises
    ------
    TypeError
        ``fused`` reads ``from_info`` values and the sampler cannot supply them.
    """
    stages = list(fused) if isinstance(fused, list | tuple) else [fused]
    keys = tuple(sorted({k for stage in stages for k in info_keys(stage)}))
    able = callable(getattr(sampler, "require_info", None))
    if not keys:
        if able:  # a sampler reused from a run that read values: it must stop requiring them
            sampler.require_info((), None)
        return keys
    if not able:
        raise TypeError(
            f"The stages read from_info parameters {list(keys)}, but the sampler "
            f"({type(sampler).__name__}) has no require_info(keys, check) to read them from "
            "each structure's atoms.info; use fused_dynamics.SizeAwareSampler."
        )
    dtype = np.dtype(default_float() if dtype is None else dtype)
    readers: dict[str, list] = {}
    for k, stage in enumerate(stages):
        for key, who in info_readers(stage).items():
            readers.setdefault(key, []).append((k, who))
    for key, found in readers.items():  # a name two stages share says which stage
        names = [who for _, who in found]
        readers[key] = [f"{who} of stage {k}" if names.count(who) > 1 else who for k, who in found]

    def check(values, where):
        for stage in stages:
            check_info_values(stage, values, where, dtype=dtype)

    sampler.require_info(keys, check, {k: " and ".join(v) for k, v in readers.items()})
    return keys


def check_batch_info(fused, batch: Batch) -> None:
    """Before compiling: the batch carries every ``atoms.info`` value the ``from_info``
    parameters of ``fused`` read, and each occupied slot's values meet the parameters' rules.

    Raises
    ------
    ValueError
        A key the batch does not carry, or a value that breaks a rule (naming the system).
    """
    keys = info_keys(fused)
    if not keys:
        return
    missing = [k for k in keys if k not in batch.parameters]
    if missing:
        raise ValueError(missing_key_message(missing[0], batch.parameters))
    if any(is_traced(batch.parameters[k]) for k in keys) or is_traced(batch.system_mask):
        return  # under an outer jit/vmap/grad the values are unknown: not checked
    mask = np.asarray(batch.system_mask)
    ids = np.asarray(batch.system_id)
    stored = {k: np.asarray(batch.parameters[k]) for k in keys}
    for slot in np.flatnonzero(mask):
        values = {k: stored[k][slot].item() for k in keys}
        where = f"system {int(ids[slot])} (slot {int(slot)})"
        check_info_values(fused, values, where, dtype=stored[keys[0]].dtype)


def admit_systems(fused, batch: Batch, new: jax.Array, evaluate: bool = True) -> Batch:
    """Initialize the systems in slots ``new`` (S,) bool; leave every other slot as it is
    (traced: the body of :func:`admit`, and the start of a chunk that admits,
    :func:`fused_dynamics.loop.chunk`). With ``evaluate=False`` they are prepared only
    (``FusedStage.init`` without its model evaluation): the chunk's loop primes them in its
    first iteration (:func:`fused_dynamics.loop.run_steps`)."""
    fresh = fused.init(batch) if evaluate else fused._prepare(batch)
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


_ADMIT = filter_compile(admit_systems, options_for=model_options)


def admit(fused, batch: Batch, new) -> Batch:
    """The compiled admission of the systems in slots ``new``; on a neighbor-list overflow the
    list is grown and the admission redone."""
    return retry_on_overflow(lambda b: _ADMIT(fused, b, new), batch)


def refuse_size_buckets(model) -> None:
    """Raise if ``model`` has size buckets: an inflight run refills its slots with systems of any
    size, which fixed buckets could not always place (docs/models.md, "Size buckets").

    Raises
    ------
    ValueError
        Naming the model and its ``size_buckets``.
    """
    buckets = getattr(model, "size_buckets", None)
    if buckets:
        raise ValueError(
            f"{type(model).__name__}(size_buckets={buckets}): size buckets are for fixed "
            "batches; an inflight run (a sampler) refills slots with systems of any size. "
            "Build the model without size_buckets (the default) for inflight runs."
        )


def attach_neighbors(model, batch: Batch, cells=None, pbc=None, more_batches=None) -> Batch:
    """``batch`` with a neighbor list if ``model`` sums over one and the batch has none;
    ``cells``, ``pbc`` and ``more_batches`` as in ``NeighborList.allocate`` (what else the
    list must serve: an inflight run's dataset)."""
    if batch.neighbors is not None or getattr(model, "skin", None) is None:
        return batch
    if more_batches is None:
        return model.attach_neighbors(batch, cells=cells, pbc=pbc)
    return model.attach_neighbors(batch, cells=cells, pbc=pbc, more_batches=more_batches)


def blank(fused, batch: Batch) -> Batch:
    """``batch`` ready for the admission of every occupied slot: fresh bookkeeping
    (:meth:`FusedStage.fresh_info`), every slot the status of a graduated system, and stage
    state of the right shapes (zeros, from ``jax.eval_shape`` of the preparation, which neither
    compiles nor traces the model). Admitting the occupied slots then leaves empty slots as
    :meth:`FusedStage.init` leaves them."""
    shapes = jax.eval_shape(fused._prepare, batch)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes.stage_state)
    return batch.replace(
        stage_state=zeros,
        info=fused.fresh_info(batch),
        status=jnp.full_like(batch.status, fused.exit_status),
        step_count=jnp.zeros((), jnp.int32),
    )


def initialize(fused, batch: Batch) -> Batch:
    """Initialize every occupied slot through the one compiled admission function
    (:func:`blank`, then :func:`admit`); a sharded run's start. A run on one device admits
    through its chunk program instead (``Run._admit``), and compiles no admission program."""
    return admit(fused, blank(fused, batch), batch.system_mask)


def host_arrays(host) -> dict:
    """The fields of a host batch that :func:`~fused_dynamics.batch.atoms_from_arrays` reads."""
    arrays = {k: getattr(host, k) for k in HOST_FIELDS}
    arrays.update({k: host.info[k] for k in _INFO_OUT if k in host.info})
    return arrays


def write_graduated(host, slots, sinks, annotate=None, held=None, on_written=None) -> int:
    """Write the systems in ``slots`` of a host batch to the first sink with room each
    (docs/semantics.md §15).

    Each frame gets ``exit_reason_name``; ``annotate(frames)`` (a sampler's
    :meth:`~fused_dynamics.SizeAwareSampler.annotate`) adds the input's provenance. Systems
    whose id is in ``held`` (what the sinks of a resumed run hold already) are not written again.
    ``on_written(frames)`` is called after each successful ``write``. Returns the number of
    systems written.
    """
    if len(slots) == 0:
        return 0
    frames = [name_exit_reason(a) for a in atoms_from_arrays(host_arrays(host), slots)]
    if annotate is not None:
        frames = annotate(frames)
    return write_to_sinks(frames, sinks, held, on_written)


def write_to_sinks(frames, sinks, held=None, on_written=None) -> int:
    """Each frame to the first sink with room; raise (after writing what fits) when all are full.

    Consecutive frames bound for the same sink go in one ``write`` call (a zarr store commits
    once per call). Frames whose ``system_id`` is in ``held`` are skipped; ``on_written(frames)``
    is called after each successful ``write``. Returns the number written.
    """
    if held:
        frames = [a for a in frames if int(a.info.get("system_id", -1)) not in held]
    k = 0
    for sink in sinks:  # sinks only fill up: once one is full, later frames skip it too
        fits = _room(sink, len(frames) - k)
        if fits:
            sink.write(frames[k : k + fits])
            if on_written is not None:
                on_written(frames[k : k + fits])
            k += fits
        if k == len(frames):
            return k
    lost = [a.info.get("system_id") for a in frames[k:]]
    raise RuntimeError(
        f"Every sink is full; systems {lost} cannot be written (nothing was dropped "
        "silently: give a sink with more room)."
    )


def _room(sink, n: int) -> int:
    """The largest ``k <= n`` with ``sink.has_room(k)`` (room is monotone in ``k``)."""
    if n == 0 or sink.has_room(n):
        return n
    lo, hi = 0, n  # has_room(lo) holds, has_room(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sink.has_room(mid) else (lo, mid)
    return lo


def repack(host: Batch, keep: np.ndarray) -> tuple[dict, int]:
    """Host arrays with the systems of slots ``keep`` contiguous at the front of the atom axis."""
    n, s = host.max_atoms, host.max_systems
    arrays = empty_host_arrays(n, s, tuple(host.parameters))
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
    for k, values in arrays["parameters"].items():
        values[keep] = np.asarray(host.parameters[k])[keep]
    return arrays, offset


def rejected_frames(rejected, annotate=None) -> list:
    """Frames of rejected systems: the input structure, ``exit_reason`` REJECTED and why."""
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


def rebuild(batch: Batch, host: Batch, arrays: dict) -> Batch:
    """The device batch with re-packed atoms; per-slot state and bookkeeping carried over."""
    arrays = dict(arrays)
    parameters = arrays.pop("parameters", {})
    fields = {k: jnp.asarray(v, dtype=getattr(batch, k).dtype) for k, v in arrays.items()}
    fields["parameters"] = {k: jnp.asarray(v, batch.dtype) for k, v in parameters.items()}
    if batch.neighbors is not None:  # atoms moved on the atom axis: the list must be rebuilt
        fields["neighbors"] = batch.neighbors.invalidated()
    return batch.replace(**fields)


# ============================================================================ stage outputs
class StageExitWriter:
    """Writes each system as it leaves one sub-stage (converged or out of budget).

    The frames hold the structure, energy, forces and velocities at the moment the system
    left the stage, and in ``info``: ``stage`` (the sub-stage index), ``stage_type``,
    ``exit_reason`` (``CONVERGED`` or ``BUDGET``: how it left *that stage*, with
    ``exit_reason_name``), ``step`` (the fused step), ``stage_steps`` and the input's
    provenance. Systems that fail in the stage are not written here (they leave the run with
    exit reason FAILED and go to the run's outputs).

    Frames reach it through its :class:`StageExitHook` (register :meth:`hook` with the fused
    stage, and pass the writer as a run's listener), a host hook recorded during a compiled
    chunk and handed over only once the chunk is kept (a chunk redone after a neighbor-list
    overflow hands over nothing), so what is written always comes from the kept trajectory;
    it works on a mesh of several devices too. The memory this takes on the device is that of
    host hooks' records (docs/semantics.md §8a): up to one copy of the batch's output fields
    per step of a chunk.

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
        self.held: set = set()  # ids the sink holds already (a resumed run)

    def hook(self) -> StageExitHook:
        """The fused-level hook that collects this writer's frames."""
        return StageExitHook(writer=self, next_code=self.next_code)

    def collect(self, step, arrays: dict) -> None:
        """Host callback: keep the frames of the systems that left the stage this step."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}  # every entry an array
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
        frames = [a for a in frames if int(a.info["system_id"]) not in self.held]
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

    A host hook like any other (docs/semantics.md §8a): in a run driven in chunks its payload
    (the batch's output fields) is recorded on the device at each step in which some system
    left a sub-stage, and handed over once the chunk is kept, so a chunk redone on a grown
    neighbor list writes nothing twice, and on a mesh of several devices each device records
    its own systems and the host merges them (no ordered callback, which JAX runs on one
    device only). Under an outer ``jit`` or ``vmap`` it is a host callback.
    """

    writer: Any = eqx.field(static=True)
    next_code: int = eqx.field(static=True)
    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.ON_CONVERGE, kw_only=True)
    fields: tuple[str, ...] = eqx.field(static=True, default=HOST_FIELDS + _INFO_OUT, kw_only=True)

    def on_host(self, data) -> None:
        arrays = dict(data.arrays)
        left = (
            arrays["system_mask"]
            & (arrays["converged"] | arrays["budget_spent"])
            & (arrays["status"] == self.next_code)
        )
        if not left.any():
            return
        arrays["left"] = left
        self.writer.collect(data.step, arrays)
        # what reaches on_host comes from a kept chunk (or from a traced run, which is never
        # redone): written at once
        self.writer.commit()
