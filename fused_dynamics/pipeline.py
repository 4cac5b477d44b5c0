"""Pipelines: ``a | b`` runs each stage on its own devices; graduates of one stage become
entries of the next (docs/semantics.md §16).

Design
------
A :class:`DistributedPipeline` holds fused stages ``F_0 | F_1 | ... | F_{K-1}`` and one group
of devices per stage (default: ``jax.devices()`` split evenly, in order). Stage ``k`` runs as a
sharded live run (:class:`~fused_dynamics.sharding.ShardedRun`) on a mesh over its group, so a
group of several devices is itself data parallel.

Between stage ``k`` and ``k + 1`` sits a bounded
:class:`~fused_dynamics.pipeline_transfer.DeviceBuffer` of at most ``buffer_size`` systems.
A graduate of stage ``k`` enters it as a *row* (its structure, velocities and the
``atoms.info`` values any stage reads through ``fd.from_info``) that stays on the sender's
device; stage ``k + 1`` takes rows in arrival order for its free slots and moves
them onto its own devices with ``jax.device_put``, where a compiled scatter writes them into
the slots and atom offsets the host chose (:mod:`fused_dynamics.pipeline_transfer`). A
system's values never pass through the host between two stages. When the buffer is full, the
sender keeps its graduates in their slots (they are graduated, nothing updates them) and tries
again at its next host visit: back-pressure, never a drop. Systems that failed or were rejected
leave the pipeline at once: they go to the final sinks, not to the next stage. Stage 0 takes
the sampler; the last stage writes to the sinks. The sampler reads the ``atoms.info`` keys of
every stage and checks each structure by the rules of all of them, so a structure a later
stage could not run is rejected before stage 0 takes it (docs/semantics.md §14a).

One process drives every stage: each *round* it starts a compiled chunk on every stage's
device group (``Run.dispatch``; JAX runs them asynchronously, so the groups compute at the
same time), then waits for each in turn and makes its host visit (forward graduates, refill).

Several processes (after ``jax.distributed.initialize()``): each stage's devices must belong
to one process, and stages may sit on different processes. Every process calls ``run`` with
the same stages, devices and (a replica of the same) sampler, and runs the rounds of its own
stages in lockstep with the others; at the end of each round the rows crossing to another
process move in a ``ppermute`` of fixed-size buffers (:mod:`fused_dynamics.pipeline_remote`)
and every stage's done flag goes to every process. Each process writes to its own sinks what
its stages write (the last stage's graduates, failures of its other stages). Checkpoints of a
pipeline over several processes are written in parts, one per process (:meth:`save`).

Per-system results equal one fused run of the same sub-stages ``F_0 + F_1 + ...``: a system
entering stage ``k + 1`` is admitted (fresh stage state, one evaluation), as the fused run's
``migration.enter`` resets it; one leaving an optimizer is at rest in both. Stage ``k``'s
``init_fn`` (if any) is applied at admission, which a fused run would not do.

Neighbor lists. A stage whose model sums over a neighbor list keeps one list per device, as
any sharded run (:mod:`fused_dynamics.sharding`). The lists of a later stage are sized before
it compiles for every structure of the dataset as it was when the pipeline started (the
sampler's :meth:`~fused_dynamics.SizeAwareSampler.preview_batches` over its
:attr:`~fused_dynamics.SizeAwareSampler.queued` systems; a sampler without them gives no
preview); a row written into a slot marks the lists stale, and a list that overflows (a system
denser than any it started as) grows and the admission or chunk is redone, on every stage.

Checkpoints (``run(..., checkpoint=DIR, checkpoint_every=N)``, ``save(DIR)``) are taken
between rounds: a directory holding each started stage's run checkpoint
(:mod:`fused_dynamics.checkpoint`), the rows waiting in each buffer (``.npz``, no pickles) and
a JSON header. ``run(..., resume=DIR)`` continues it; systems the final sinks already hold are
not written again.

The run ends when stage 0's sampler is exhausted and nothing is in flight, and every later
stage has drained (its buffer is closed and empty and its batch is done).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the coordination service's barrier
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from . import inflight
from .batch import Batch, default_float, empty_host_arrays
from .pipeline_remote import exchange
from .pipeline_transfer import DeviceBuffer, _extract_local, extract, insert, slice_rows
from .sharding import (
    _ADMIT,
    _INITIALIZE,
    AXIS,
    ShardedRun,
    _merge,
    _stale,
    attach_neighbors,
    gather,
    place,
    prepare,
)
from .status import ExitReason

__all__ = ["DeviceBuffer", "DistributedPipeline"]

_LEAVE = (int(ExitReason.FAILED), int(ExitReason.REJECTED))
FORMAT = "fused_dynamics-pipeline-checkpoint"
BARRIER_MS = 30 * 60 * 1000  # how long a process waits for the others at a round's end


class _StageRun(ShardedRun):
    """One stage of a pipeline: a sharded live run whose source may be a :class:`DeviceBuffer`
    (rows admitted on device) and whose graduates may go to a :class:`DeviceBuffer` (rows
    left on device) instead of sinks. ``sinks`` are the pipeline's final sinks: the last
    stage's graduates, and failed or rejected systems of any stage."""

    def __init__(
        self, fused, *, forward: DeviceBuffer | None, info_keys=(), preview=None, **options
    ):
        self.forward = forward
        self.info_keys = tuple(info_keys)  # every stage's: the rows carry them all
        self.preview = preview  # the dataset as the run started, for sizing neighbor lists
        super().__init__(fused, **options)

    def _require_info(self, sampler, dtype) -> None:
        pass  # the pipeline made its sampler read every stage's values (start)

    @property
    def _from_buffer(self) -> bool:
        return isinstance(self.sampler, DeviceBuffer)

    def _dataset_batches(self, dtype, max_atoms=None, max_systems=None):
        if not self._from_buffer:
            return super()._dataset_batches(dtype, max_atoms, max_systems)
        if getattr(self.fused.model, "skin", None) is None or self.preview is None:
            return None
        # every system reaches this stage from the first, in the structure it started with
        # (relaxation and dynamics move it; a list that overflows grows, as in any run)
        return functools.partial(self.preview, dtype, max_atoms, max_systems)

    # ------------------------------------------------------------------ receiving
    def _start_inflight(self, dtype) -> None:
        if not self._from_buffer:
            return super()._start_inflight(dtype)
        source = self.sampler
        n_l, s_l = source.max_atoms // self.devices, source.max_systems // self.devices
        cells, pbc = source.cells()
        self.fused = self.fused.prepare_for_cells(cells, pbc)
        inflight.refuse_size_buckets(self.fused.model)
        host = empty_host_arrays(n_l, s_l, self.info_keys)
        dtype = default_float() if dtype is None else dtype
        local = jax.device_get(Batch.from_host_arrays(host, dtype, source.max_atoms_per_system))
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[local] * self.devices)
        self.fused = prepare(self.fused, _merge(stacked))
        stacked = attach_neighbors(
            self.fused.model, stacked, cells, pbc, self._dataset_batches(dtype, n_l, s_l)
        )
        self.batch = self._retry(
            lambda b: _INITIALIZE(self.fused, b, self.mesh), place(stacked, self.mesh)
        )
        keep = np.zeros(self.devices * s_l, bool)
        self.batch, new = self._refill(keep)
        self._written = ~new

    def _refill(self, keep: np.ndarray):
        if not self._from_buffer:
            return super()._refill(keep)
        host = gather(self.batch)  # the receiver's own batch, re-packed as in every refill
        d, s_l = np.shape(host.system_mask)
        n_l = host.max_atoms
        keep = keep.reshape(d, s_l)
        new = np.zeros((d, s_l), bool)
        parts, incoming = [], []
        for k in range(d):
            local = jax.tree_util.tree_map(lambda x, k=k: x[k], host)
            arrays, offset = inflight.repack(local, keep[k])
            arrays["status"][~keep[k]] = self.fused.exit_status
            free = [int(x) for x in np.flatnonzero(~keep[k])]
            part = []
            for (sid, n, row), slot in zip(
                self.sampler.take(n_l - offset, len(free)), free, strict=False
            ):
                # the bookkeeping of write_system; the values come on device (insert)
                arrays["system_idx"][offset : offset + n] = slot
                arrays["atom_mask"][offset : offset + n] = True
                arrays["system_mask"][slot] = True
                arrays["status"][slot] = 0
                arrays["system_id"][slot] = sid
                part.append((slot, offset, row))
                offset += n
                new[k, slot] = True
            parts.append(arrays)
            incoming.append(part)
        values = [p.pop("parameters") for p in parts]  # the kept systems'; rows bring the new
        fields = {
            key: np.stack([p[key] for p in parts]).astype(np.asarray(getattr(host, key)).dtype)
            for key in parts[0]
        }
        fields["parameters"] = {
            key: np.stack([v[key] for v in values]).astype(host.dtype) for key in values[0]
        }
        batch = _stale(self.batch.replace(**place(fields, self.mesh)), self.mesh)
        if new.any():
            batch = insert(batch, incoming, self.mesh)
            placed = place(new, self.mesh)
            batch = self._retry(lambda b: _ADMIT(self.fused, b, placed, self.mesh), batch)
        return batch, new.reshape(-1)

    # ------------------------------------------------------------------ sending
    def write_graduated(self) -> int:
        if self.forward is None or self.batch is None:
            return super().write_graduated()
        mask, done = self._host_status()
        new = mask & done & ~self._written
        if not new.any():
            return 0
        slots = np.flatnonzero(new)
        reason = self._fetch(self.batch.info["exit_reason"])
        leave = np.asarray([k for k in slots if int(reason[k]) in _LEAVE], np.int64)
        go = [int(k) for k in slots if int(reason[k]) not in _LEAVE]
        if len(leave):  # out of the pipeline now, into the final sinks
            host = self._flat_host()
            inflight.write_graduated(host, leave, self.sinks, self._annotate, self._held)
            self._written[leave] = True
            self.stats.written += len(leave)
        go = go[: self.forward.room]
        if go:
            rows = extract(self.batch, self.mesh)
            n_atoms = self._fetch(rows["n_atoms"])
            ids = self._fetch(self.batch.system_id)
            s_l = self.batch.max_systems
            for g in go:
                device, slot = divmod(g, s_l)
                self.forward.put(ids[g], n_atoms[g], slice_rows(rows, device, slot))
                self._written[g] = True
            self.stats.written += len(go)
        return len(leave) + len(go)

    def _kept_slots(self, mask: np.ndarray, done: np.ndarray) -> np.ndarray:
        return mask & (~done | ~self._written)  # unsent graduates keep their slots

    def close(self) -> None:
        self._closed = True  # the pipeline closes the shared final sinks once


class DistributedPipeline:
    """Fused stages that each run on their own group of devices (``a | b``).

    Parameters
    ----------
    stages : sequence of FusedStage
        In order; ``a | b`` makes them from sub-stages or fused stages.
    devices : sequence of sequences of jax.Device, optional
        One group per stage. Default: ``jax.devices()`` split evenly in order (with fewer
        devices than stages, stages share them round-robin).
    buffer_size : int, default 64
        Most systems waiting between two stages.

    Raises
    ------
    ValueError
        No stages, a group count other than the number of stages, an empty group, or a
        ``buffer_size`` below 1.

    Examples
    --------
    >>> pipe = fd.FIRE(model, ...) | fd.NVTLangevin(model, ...)
    >>> with pipe:
    ...     stats = pipe.run(sampler, [fd.HostMemory()], checkpoint="ckpt", checkpoint_every=20)
    """

    _started = 0

    def __init__(self, stages, *, devices=None, buffer_size: int = 64):
        self.stages = tuple(stages)
        if not self.stages:
            raise ValueError("DistributedPipeline: stages is empty.")
        for st in self.stages:
            if not hasattr(st, "sub_stages"):
                raise ValueError(
                    f"DistributedPipeline: stages must be FusedStage, got {type(st).__name__}."
                )
        if int(buffer_size) < 1:
            raise ValueError(f"DistributedPipeline: buffer_size must be >= 1, got {buffer_size}.")
        self.buffer_size = int(buffer_size)
        self._devices = None if devices is None else [list(g) for g in devices]
        if self._devices is not None:
            if len(self._devices) != len(self.stages) or not all(self._devices):
                raise ValueError(
                    f"DistributedPipeline: devices must give one non-empty group per stage "
                    f"({len(self.stages)}), got {len(self._devices)} groups."
                )
        self.stats: list = []
        self.buffers: list[DeviceBuffer] = []
        self.rounds = 0
        self._runs: list = []
        self._done: list[bool] = []
        self._sinks: list = []

    # ------------------------------------------------------------------ composition
    def __or__(self, other):
        if isinstance(other, DistributedPipeline):
            return DistributedPipeline(
                self.stages + other.stages, buffer_size=min(self.buffer_size, other.buffer_size)
            )
        if hasattr(other, "sub_stages"):
            return DistributedPipeline(self.stages + (other,), buffer_size=self.buffer_size)
        return NotImplemented  # a bare sub-stage: Stage.__ror__ makes it a FusedStage

    def with_devices(self, devices) -> DistributedPipeline:
        """A copy whose stages run on the given device groups (one per stage)."""
        return DistributedPipeline(self.stages, devices=devices, buffer_size=self.buffer_size)

    # ------------------------------------------------------------------ placement
    @property
    def stage_devices(self) -> list[list]:
        """The device group of each stage."""
        if self._devices is not None:
            return [list(g) for g in self._devices]
        devices, k = jax.devices(), len(self.stages)
        if len(devices) < k:
            return [[devices[i % len(devices)]] for i in range(k)]
        return [list(g) for g in np.array_split(np.array(devices, dtype=object), k)]

    def _local(self, k: int) -> bool:
        mine = {d.id for d in jax.local_devices()}
        return any(d.id in mine for d in self.stage_devices[k])

    @property
    def is_first_stage(self) -> bool:
        """Whether this process holds (devices of) the first stage."""
        return self._local(0)

    @property
    def is_final_stage(self) -> bool:
        """Whether this process holds (devices of) the last stage."""
        return self._local(len(self.stages) - 1)

    # ------------------------------------------------------------------ running
    def __enter__(self) -> DistributedPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the final sinks (once)."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()

    def start(
        self, sampler, sinks, *, refill_frequency: int = 50, buffer_size=None, dtype=None,
        resume: str | os.PathLike | None = None,
    ) -> DistributedPipeline:  # fmt: skip
        """Set up a run of every system of ``sampler`` through all stages into ``sinks``,
        driven by :meth:`round` (what :meth:`run` does); options as :meth:`run`."""
        if not sinks:
            raise ValueError("DistributedPipeline.run: give at least one sink.")
        if int(refill_frequency) < 1:
            raise ValueError(f"refill_frequency must be >= 1, got {refill_frequency}.")
        size = self.buffer_size if buffer_size is None else int(buffer_size)
        if size < 1:
            raise ValueError(f"DistributedPipeline.run: buffer_size must be >= 1, got {size}.")
        self._owner = [_process_of(g, k) for k, g in enumerate(self.stage_devices)]
        # every stage's atoms.info keys, each value checked by the rules of all of them, so a
        # structure a later stage could not run is rejected before the first (§14a)
        self._info_keys = inflight.require_info(list(self.stages), sampler, dtype)
        # several processes: each one's part is looked for in _agreed, together
        if (
            resume is not None
            and jax.process_count() == 1
            and not os.path.isdir(_existing(os.fspath(resume)))
        ):
            raise FileNotFoundError(f"resume={os.fspath(resume)!r}: no pipeline checkpoint.")
        k = len(self.stages)
        self._meshes = [Mesh(np.array(g), (AXIS,)) for g in self.stage_devices]
        self._sinks = list(sinks)
        self.buffers = [DeviceBuffer(size, sampler, f"{i}->{i + 1}") for i in range(k - 1)]
        self._sources = [sampler] + self.buffers
        # the later stages' neighbor lists are sized for every system the run will bring them
        # (NeighborList.allocate), from the dataset as it is now: the queue empties as stage 0
        # takes it, before those stages start
        self._preview = None
        if hasattr(sampler, "preview_batches") and hasattr(sampler, "queued"):
            self._preview = functools.partial(sampler.preview_batches, indices=sampler.queued)
        self._options = dict(refill_frequency=int(refill_frequency), dtype=dtype)
        self._runs = [None] * k
        self._done = [False] * k
        self.rounds = 0
        me = jax.process_index()
        self._remote = [  # boundaries to another process that this process takes part in
            i for i in range(k - 1)
            if self._owner[i] != self._owner[i + 1] and me in (self._owner[i], self._owner[i + 1])
        ]  # fmt: skip
        self._room = {i: size for i in self._remote}
        DistributedPipeline._started += 1  # the same count on every process (same calls)
        self._id = DistributedPipeline._started
        self._row = None
        self._saves = 0
        if self._remote:
            self._row = _row_template(sampler, self._meshes[0], dtype, self._info_keys)
        if resume is not None:
            self._restore(self._agreed(os.path.abspath(os.fspath(resume))))
        return self

    def _make_run(self, k: int, resume=False):
        forward = self.buffers[k] if k < len(self.stages) - 1 else None
        return _StageRun(
            self.stages[k], sampler=self._sources[k], sinks=self._sinks, forward=forward,
            mesh=self._meshes[k], resume=resume, info_keys=self._info_keys,
            preview=self._preview, **self._options,
        )  # fmt: skip

    @property
    def done(self) -> bool:
        """Whether every stage has finished."""
        return all(self._done)

    def round(self) -> bool:
        """One round: a chunk on every running stage's devices (together), then each stage's
        host visit (forward graduates, refill). Returns :attr:`done`."""
        started = {}  # every stage's chunk first, then the host visits (groups overlap)
        for k, run in enumerate(self._runs):
            if run is not None and not self._done[k]:
                started[k] = run.dispatch()
        me = jax.process_index()
        for k in range(len(self.stages)):
            if self._done[k] or self._owner[k] != me:
                continue
            source = self._sources[k]
            if self._runs[k] is None:
                if source.exhausted:
                    self._finish(k)
                    continue
                if not (len(source) or k == 0):
                    continue
                self._runs[k] = self._make_run(k)
            run = self._runs[k]
            run.collect(started[k]) if k in started else run.advance()
            if len(source) or source.exhausted:
                run.refill_check()
            else:
                run.write_graduated()
            if run.all_complete:
                run.write_graduated()
                self._finish(k)
        if jax.process_count() > 1:
            self._across_processes()
        self.rounds += 1
        return self.done

    def _across_processes(self) -> None:
        """Rows across the boundaries to other processes (a collective each,
        :func:`~fused_dynamics.pipeline_remote.exchange`), then every stage's done flag to
        every process (each process only runs its own stages)."""
        groups = self.stage_devices
        # Meet first at a barrier of the jax.distributed coordination service, whose timeout
        # is ours: a process may wait long for the other's first compilation, longer than
        # the CPU collectives' own connect timeout (30 s) allows inside a collective.
        client = jax_distributed.global_state.client
        client.wait_at_barrier(f"fused_dynamics-pipeline-{self._id}-{self.rounds}", BARRIER_MS)
        for i in self._remote:
            room = exchange(
                groups[i][0], groups[i + 1][0], self.buffers[i], self.buffers[i], self._room[i],
                self._row,
            )  # fmt: skip
            if self._owner[i] == jax.process_index():
                self._room[i] = room
        flags = np.asarray(self._done, np.int32)
        every = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, len(flags))
        self._done = [bool(x) for x in every.max(axis=0)]

    def _finish(self, k: int) -> None:
        self._done[k] = True
        if k < len(self.stages) - 1:
            self.buffers[k].close()

    def run(
        self, sampler, sinks, *, refill_frequency: int = 50, buffer_size=None, dtype=None,
        checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
        resume: str | os.PathLike | None = None,
    ):  # fmt: skip
        """Run every system of ``sampler`` through all stages into ``sinks``.

        Parameters
        ----------
        sampler : SizeAwareSampler
            The first stage's systems; its capacities are every stage's (global over the
            stage's device group).
        sinks : sequence of sinks
            Where the last stage writes (and failed or rejected systems of any stage).
        refill_frequency : int, default 50
            Steps per compiled chunk of each stage between host visits.
        buffer_size : int, optional
            Overrides the pipeline's ``buffer_size``.
        dtype : float dtype, optional
        checkpoint : path, optional
            A directory to write the whole pipeline to every ``checkpoint_every`` rounds
            (:meth:`save`). Nothing may be there already, unless it is ``resume`` (the run
            goes on writing where it was saved).
        checkpoint_every : int, optional
            Rounds (one chunk of every stage and its host visit) between checkpoints.
        resume : path, optional
            A checkpoint directory to continue from (same stages, devices per stage, sampler
            and ``buffer_size``; the same sinks, which may hold systems written after it).

        Returns
        -------
        list of RunStats
            One per stage (``None`` for a stage that never ran).

        Raises
        ------
        ValueError
            No sinks, a bad ``refill_frequency`` / ``buffer_size``, ``checkpoint`` without
            ``checkpoint_every`` (or the reverse), or a checkpoint of another pipeline.
        FileNotFoundError
            ``resume`` names no checkpoint.
        FileExistsError
            Something is at ``checkpoint`` and it is not ``resume``.
        NotImplementedError
            Several processes with a stage spread over more than one.
        """
        if (checkpoint is None) != (checkpoint_every is None):
            raise ValueError(
                "DistributedPipeline.run: checkpoint=DIR and checkpoint_every=N go together."
            )
        if checkpoint_every is not None and int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
        if checkpoint is not None:
            same = resume is not None and os.path.realpath(resume) == os.path.realpath(checkpoint)
            names = (os.fspath(checkpoint), os.fspath(checkpoint) + ".previous")
            found = [name for name in names if os.path.lexists(name) and not same]
            if _anywhere(bool(found)):  # every process raises, none left waiting at a barrier
                where = repr(found[0]) if found else "another process's copy of it"
                raise FileExistsError(
                    f"DistributedPipeline.run: checkpoint={os.fspath(checkpoint)!r}: {where} "
                    "exists; a run never replaces what it did not write: continue the run saved "
                    "there with resume=DIR, or remove it, or give another path."
                )
        self.start(
            sampler, sinks, refill_frequency=refill_frequency, buffer_size=buffer_size,
            dtype=dtype, resume=resume,
        )  # fmt: skip
        while not self.round():
            if checkpoint is not None and self.rounds % int(checkpoint_every) == 0:
                self.save(checkpoint)
        self.stats = [r.stats if r is not None else None for r in self._runs]
        for r in self._runs:
            if r is not None:
                r._finish_stats()
        return self.stats

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write the pipeline between two rounds to the directory ``path``.

        Each started stage's live run is saved with :meth:`Run.save` (which first forwards
        its graduates), then the rows waiting in each buffer, then a JSON header. The new
        directory is written next to ``path`` and renamed over it (the previous one is kept
        as ``path + ".previous"`` until the rename is done, and :meth:`run` falls back to it),
        so a run killed at any moment leaves a whole checkpoint. Only a pipeline checkpoint is
        replaced: anything else at ``path`` (or at ``path + ".previous"``) raises
        ``FileExistsError`` and is left as it was.

        Several processes (every one calls it, after the same round): each writes its own
        part, ``path/process<i>``, the same way (its stages, the buffers as it holds them,
        the room it last heard of), and removes its previous part only once every process has
        renamed its new one into place; a resume takes the latest round every process holds,
        so a run killed between two processes' renames resumes from the round before. With
        several hosts, ``path`` must be a folder every process can write (a shared file
        system), or each host keeps its own parts under the same path.
        """
        path = os.path.abspath(os.fspath(path))
        if jax.process_count() == 1:
            self._write_part(path)
            return
        part = _part(path)
        clash = _clash(part)
        if clash is None and os.path.lexists(path) and not os.path.isdir(path):
            clash = f"pipeline checkpoint {path!r}: a file is there, not a folder of parts."
        if _anywhere(clash is not None):  # every process raises, none left at the barrier
            raise FileExistsError(
                clash or f"pipeline checkpoint {path!r}: another process's part cannot be written."
            )
        os.makedirs(path, exist_ok=True)
        self._write_part(part, keep_previous=True)
        self._saves += 1  # the same count on every process (barrier names)
        client = jax_distributed.global_state.client
        client.wait_at_barrier(f"fused_dynamics-pipeline-{self._id}-save-{self._saves}", BARRIER_MS)
        _remove(part + ".previous")

    def _write_part(self, path: str, keep_previous: bool = False) -> None:
        """This process's stages and buffers into the directory ``path`` (renamed into place,
        the old one kept as ``path + ".previous"`` until then, or after with
        ``keep_previous``)."""
        previous = path + ".previous"
        clash = _clash(path)
        if clash is not None:
            raise FileExistsError(clash)
        parent = os.path.dirname(path)
        # what a save killed while writing left behind: folders of this library's own prefix
        prefix = os.path.basename(path) + _TMP_TAG
        for name in os.listdir(parent):
            left = os.path.join(parent, name)
            if name.startswith(prefix) and os.path.isdir(left) and not os.path.islink(left):
                _remove(left)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        for k, run in enumerate(self._runs):
            if run is not None:
                run.save(os.path.join(tmp, f"stage{k}.ckpt"))
        buffers = []
        for k, buf in enumerate(self.buffers):
            state = buf.state()
            entries = state.pop("entries")
            fields = {}
            if entries:
                fields = {f: np.stack([row[f] for _, _, row in entries]) for f in entries[0][2]}
            _save_npz(os.path.join(tmp, f"buffer{k}.npz"), fields)
            buffers.append({**state, "entries": [[sid, n] for sid, n, _ in entries]})
        header = {
            "format": FORMAT,
            "stages": [repr(s) for s in self.stages],
            "devices": [len(g) for g in self.stage_devices],
            "buffer_size": self.buffers[0].size if self.buffers else self.buffer_size,
            "processes": jax.process_count(),
            "rounds": self.rounds,
            "done": self._done,
            "started": [r is not None for r in self._runs],
            "buffers": buffers,
            "room": {str(i): int(r) for i, r in self._room.items()},
        }
        with open(os.path.join(tmp, "pipeline.json"), "w") as f:
            json.dump(header, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            _remove(previous)
            os.replace(path, previous)
        os.replace(tmp, path)
        if not keep_previous:
            _remove(previous)

    def _agreed(self, path: str) -> str:
        """The directory to resume this process from: ``path`` (or its previous copy) on one
        process; on several, this process's part of the latest round that every process
        holds (its current or its previous part)."""
        if jax.process_count() == 1:
            return _existing(path)
        part = _part(path)
        held = np.full(2, -1, np.int64)
        for j, candidate in enumerate((part, part + ".previous")):
            if os.path.isfile(os.path.join(candidate, "pipeline.json")):
                with open(os.path.join(candidate, "pipeline.json")) as f:
                    held[j] = int(json.load(f)["rounds"])
        every = np.asarray(multihost_utils.process_allgather(held)).reshape(-1, 2)
        if (every.max(axis=1) < 0).any():  # raised on every process, none left waiting
            missing = [i for i, row in enumerate(every) if row.max() < 0]
            raise FileNotFoundError(
                f"resume={path!r}: no pipeline checkpoint part of process(es) {missing}."
            )
        common = set(every[0]) - {-1}
        for row in every[1:]:
            common &= set(row)
        if not common:
            raise ValueError(
                f"resume={path!r}: the processes hold parts of different rounds "
                f"({every.tolist()}, current and previous per process); no round is whole."
            )
        rounds = max(common)
        if held[0] != rounds:
            # the newer part of an unfinished save goes: the next save must not rotate it in
            # as the previous part (over the one round every process holds)
            _remove(part)
            os.replace(part + ".previous", part)
        return part

    def _restore(self, path: str) -> None:
        with open(os.path.join(path, "pipeline.json")) as f:
            header = json.load(f)
        mine = {
            "stages": [repr(s) for s in self.stages],
            "devices": [len(g) for g in self.stage_devices],
            "buffer_size": self.buffers[0].size if self.buffers else self.buffer_size,
            "processes": jax.process_count(),
        }
        for key, value in mine.items():
            if header.get("format") != FORMAT or header.get(key, 1) != value:
                raise ValueError(
                    f"resume={path!r}: the checkpoint is of another pipeline ({key} differs: "
                    f"{header.get(key)!r}, here {value!r}); resume with the pipeline that "
                    "wrote it."
                )
        for k, (buf, state) in enumerate(zip(self.buffers, header["buffers"], strict=True)):
            with np.load(os.path.join(path, f"buffer{k}.npz"), allow_pickle=False) as z:
                fields = {f: z[f] for f in z.files}
            entries = [
                (sid, n, {f: x[i] for f, x in fields.items()})
                for i, (sid, n) in enumerate(state["entries"])
            ]
            buf.restore({**state, "entries": entries})
        self.rounds = int(header["rounds"])
        self._done = [bool(x) for x in header["done"]]
        self._room.update({int(i): int(r) for i, r in header.get("room", {}).items()})
        for k, started in enumerate(header["started"]):
            if started:
                self._runs[k] = self._make_run(k, resume=os.path.join(path, f"stage{k}.ckpt"))


def _process_of(group, k: int) -> int:
    owners = {d.process_index for d in group}
    if len(owners) > 1:
        raise NotImplementedError(
            f"DistributedPipeline: the devices of stage {k} belong to processes "
            f"{sorted(owners)}; a stage must run on the devices of one process (stages on "
            "different processes are supported)."
        )
    return owners.pop()


def _row_template(sampler, mesh, dtype, keys=()) -> dict:
    """The shapes of one row (:func:`~fused_dynamics.pipeline_transfer.extract`), the same on
    every process; ``keys``: the ``atoms.info`` values the rows carry."""
    d = int(mesh.devices.size)
    n_l, s_l = sampler.max_atoms // d, sampler.max_systems // d
    dtype = default_float() if dtype is None else dtype
    host = empty_host_arrays(n_l, s_l, keys)
    local = Batch.from_host_arrays(host, dtype, sampler.max_atoms_per_system)
    shapes = jax.eval_shape(lambda b: _extract_local(b, sampler.max_atoms_per_system), local)
    return {f: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for f, x in shapes.items()}


def _part(path: str) -> str:
    """Where this process's part of a pipeline checkpoint lives: ``path`` itself on one
    process, ``path/process<i>`` on several."""
    if jax.process_count() == 1:
        return path
    return os.path.join(path, f"process{jax.process_index()}")


_TMP_TAG = ".fused-dynamics-tmp-"  # a save's folder being written, next to the checkpoint


def _clash(path: str) -> str | None:
    """Why a save may not write ``path`` (something not a pipeline checkpoint there or at
    ``path + ".previous"``), or None."""
    for name in (path, path + ".previous"):
        if os.path.lexists(name) and not _is_pipeline_checkpoint(name):
            return (
                f"pipeline checkpoint {name!r}: a file or folder that is not a pipeline "
                "checkpoint is there; a checkpoint replaces only a checkpoint. Remove it or "
                "give another path."
            )
    return None


def _anywhere(flag: bool) -> bool:
    """``flag`` of any process (this one's alone on one process)."""
    if jax.process_count() == 1:
        return flag
    every = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(np.asarray(every)))


def _is_pipeline_checkpoint(path: str) -> bool:
    """Whether ``path`` is a folder (or a link to one) holding a pipeline checkpoint's header.
    A link is replaced by the new checkpoint, its target left as it was."""
    header = os.path.join(path, "pipeline.json")
    if not os.path.isfile(header):
        return False
    try:
        with open(header) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _remove(path: str) -> None:
    """Delete a checkpoint folder: renamed first, so a deletion cut short never leaves a
    partial folder under a name a resume would read."""
    if not os.path.exists(path):
        return
    trash = tempfile.mkdtemp(prefix=os.path.basename(path) + ".trash-", dir=os.path.dirname(path))
    os.replace(path, os.path.join(trash, "x"))
    shutil.rmtree(trash, ignore_errors=True)


def _existing(path: str) -> str:
    """``path``, or the previous checkpoint kept while a new one was being renamed into place."""
    previous = path + ".previous"
    if not os.path.isdir(path) and os.path.isdir(previous):
        return previous
    return path


def _save_npz(path: str, fields: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **fields)
        f.flush()
        os.fsync(f.fileno())
