"""Pipelines: ``a | b`` runs each stage on its own devices; graduates of one stage become
entries of the next (docs/semantics.md §16).

Design
------
A :class:`DistributedPipeline` holds fused stages ``F_0 | F_1 | ... | F_{K-1}`` and one group
of devices per stage (default: ``jax.devices()`` split evenly, in order). Stage ``k`` runs as a
sharded live run (:class:`~fused_dynamics.sharding.ShardedRun`) on a mesh over its group, so a
group of several devices is itself data parallel.

Between stage ``k`` and ``k + 1`` sits a bounded :class:`Buffer` of at most ``buffer_size``
systems. Stage ``k`` writes its graduates into it as into a sink; stage ``k + 1`` refills its
free slots from it as from a sampler (in arrival order). When the buffer is full, the sender
keeps its unwritten graduates in their slots (they are graduated, nothing updates them) and
tries again at its next host visit: back-pressure, never a drop. Systems that failed or were
rejected leave the pipeline at once: they go to the final sinks, not to the next stage. Stage
0 takes the sampler; the last stage writes to the sinks.

One process drives every stage: it starts a compiled chunk on every stage's device group
(``Run.dispatch``; JAX runs them asynchronously, so the groups compute at the same time), then
waits for each in turn and makes its host visit (write graduates, refill).

A system's rows move between device groups through the host (the host visit that writes
graduates already holds them; the receiving stage packs them into its free slots), exactly as a
system written to a file and read back: in float64 positions, velocities and cells come back
bit for bit. Several processes (one stage per process, with JAX collectives
between them) are not implemented yet: ``run`` then raises.

Per-system results equal one fused run of the same sub-stages ``F_0 + F_1 + ...``: a system
entering stage ``k + 1`` is admitted (fresh stage state, one evaluation), as the fused run's
``migration.enter`` resets it; one leaving an optimizer is at rest in both. Stage ``k``'s
``init_fn`` (if any) is applied at admission, which a fused run would not do.

The run ends when stage 0's sampler is exhausted and nothing is in flight, and every later
stage has drained (its buffer is closed and empty and its batch is done).
"""

from __future__ import annotations

import hashlib
from collections import deque

import ase
import jax
import numpy as np
from jax.sharding import Mesh

from .batch import Batch
from .sharding import AXIS, ShardedRun
from .status import ExitReason

__all__ = ["Buffer", "DistributedPipeline"]

_LEAVE = (int(ExitReason.FAILED), int(ExitReason.REJECTED))


class Buffer:
    """The bounded queue between two stages: a sink for the sender, a sampler for the receiver.

    Parameters
    ----------
    size : int
        Most systems it holds (``buffer_size``).
    like : SizeAwareSampler
        The pipeline's sampler: capacities, cells of every system that may arrive (for static
        image ranges) and provenance (``annotate``).
    exits : list
        Sinks for systems that leave the pipeline early (failed or rejected).
    """

    def __init__(self, size: int, like, exits):
        self.size = int(size)
        self.queue: deque = deque()
        self.closed = False
        self.max_atoms = like.max_atoms
        self.max_systems = like.max_systems
        self.max_atoms_per_system = like.max_atoms_per_system
        self._cells = like.cells()
        self.annotate = getattr(like, "annotate", None)
        self.exits = exits
        self.received = 0
        self.peak = 0

    # ------------------------------------------------------------------ sink side
    def has_room(self, n: int = 1) -> bool:
        return len(self.queue) + n <= self.size

    def write(self, frames) -> None:
        for a in frames:
            if int(a.info.get("exit_reason", 0)) in _LEAVE:
                for sink in self.exits:  # leaves the pipeline now (the first sink with room)
                    if sink.has_room(1):
                        sink.write([a])
                        break
                else:
                    raise RuntimeError("Every sink is full (pipeline: a failed system).")
                continue
            if not self.has_room(1):
                raise RuntimeError("pipeline buffer is full")
            self.queue.append(a)
            self.received += 1
        self.peak = max(self.peak, len(self.queue))

    def close(self) -> None:
        """The sender is done: nothing more will arrive."""
        self.closed = True

    # ------------------------------------------------------------------ sampler side
    def __len__(self) -> int:
        return len(self.queue)

    @property
    def exhausted(self) -> bool:
        return self.closed and not self.queue

    def take(self, free_atoms: int, free_slots: int) -> list[tuple[int, ase.Atoms]]:
        """The next systems in arrival order while they fit (``SizeAwareSampler.take``)."""
        out = []
        while self.queue and free_slots > 0 and len(self.queue[0]) <= free_atoms:
            a = self.queue.popleft()
            out.append((int(a.info["system_id"]), _entry(a)))
            free_atoms -= len(a)
            free_slots -= 1
        return out

    def initial_batch(self, dtype=None) -> Batch:
        first = self.take(self.max_atoms, self.max_systems)
        return Batch.from_atoms(
            [a for _, a in first],
            max_atoms=self.max_atoms,
            max_systems=self.max_systems,
            dtype=dtype,
            max_atoms_per_system=self.max_atoms_per_system,
            system_ids=[i for i, _ in first],
        )

    def cells(self):
        return self._cells

    def take_rejected(self) -> list:
        return []

    def fingerprint(self) -> str:
        return hashlib.sha256(f"pipeline-buffer-{id(self)}".encode()).hexdigest()


def _entry(frame: ase.Atoms) -> ase.Atoms:
    """What the next stage reads of a graduate: structure and velocities (its results and
    bookkeeping are recomputed at admission)."""
    a = ase.Atoms(
        numbers=frame.numbers,
        positions=frame.positions,
        cell=frame.cell,
        pbc=frame.pbc,
        masses=frame.get_masses(),
        constraint=frame.constraints,
    )
    a.set_velocities(frame.get_velocities())
    a.info.update(frame.info)
    return a


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
    """

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
        self.buffers: list[Buffer] = []
        self._runs: list = []

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
        """Close every stage's live run (and so the final sinks, once)."""
        for run in self._runs:
            if run is not None:
                run.close()

    def run(self, sampler, sinks, *, refill_frequency: int = 50, buffer_size=None, dtype=None):
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

        Returns
        -------
        list of RunStats
            One per stage.

        Raises
        ------
        ValueError
            No sinks, or a bad ``refill_frequency`` / ``buffer_size``.
        NotImplementedError
            Several processes.
        """
        if not sinks:
            raise ValueError("DistributedPipeline.run: give at least one sink.")
        if int(refill_frequency) < 1:
            raise ValueError(f"refill_frequency must be >= 1, got {refill_frequency}.")
        size = self.buffer_size if buffer_size is None else int(buffer_size)
        if size < 1:
            raise ValueError(f"DistributedPipeline.run: buffer_size must be >= 1, got {size}.")
        if jax.process_count() > 1:
            raise NotImplementedError(
                "DistributedPipeline.run: stages on several processes are not implemented yet."
            )
        k_last = len(self.stages) - 1
        meshes = [Mesh(np.array(g), (AXIS,)) for g in self.stage_devices]
        sinks = list(sinks)
        self.buffers = [Buffer(size, sampler, sinks) for _ in range(k_last)]
        sources = [sampler] + self.buffers
        outs = [[b] for b in self.buffers] + [sinks]
        self._runs = [None] * len(self.stages)
        done = [False] * len(self.stages)
        options = dict(refill_frequency=int(refill_frequency), dtype=dtype)
        while not all(done):
            started = {}  # every stage's chunk first, then the host visits (groups overlap)
            for k, run in enumerate(self._runs):
                if run is not None and not done[k]:
                    started[k] = run.dispatch()
            for k, fused in enumerate(self.stages):
                if done[k]:
                    continue
                source = sources[k]
                if self._runs[k] is None:
                    if source.exhausted:
                        done[k] = True
                    elif len(source) or k == 0:
                        self._runs[k] = ShardedRun(
                            fused, sampler=source, sinks=outs[k], mesh=meshes[k], **options
                        )
                    if self._runs[k] is None:
                        if done[k] and k < k_last:
                            self.buffers[k].close()
                        continue
                run = self._runs[k]
                run.collect(started[k]) if k in started else run.advance()
                _visit(run, source, self.buffers[k] if k < k_last else None)
                if run.all_complete:
                    run.write_graduated()
                    done[k] = True
                    if k < k_last:
                        self.buffers[k].close()
        self.stats = [r.stats if r is not None else None for r in self._runs]
        for r in self._runs:
            if r is not None:
                r._finish_stats()
        return self.stats


def _visit(run, source, out: Buffer | None) -> None:
    """One host visit of a stage: write its graduates (as many as the next buffer takes; the
    rest wait in their slots) and refill its free slots when its source has systems."""
    try:
        if len(source) or source.exhausted:
            run.refill_check()
        else:
            run.write_graduated()
    except RuntimeError:
        if out is None or out.has_room(1):
            raise
        # back-pressure: the next stage's buffer is full; the graduates stay where they are
