"""The live run: a fused run driven chunk by chunk, with refill, sinks and checkpoints
(docs/semantics.md §14, §19, §20)."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint as ckpt
from . import inflight, loop, recording
from .batch import Batch, write_system
from .compiled import overflowed, retry_on_overflow
from .inflight import RunStats
from .outputs.common import check_writable
from .provenance import batch_inputs
from .validation import MAX_STEPS

__all__ = ["Run", "fit_to_batch", "STRETCH"]

# A run driven to its end goes on past a chunk of refill_frequency steps while no system
# graduates, to at most this many times as many steps: the host still gets control (Ctrl-C,
# host hooks' records) at least that often.
STRETCH = 8


def fit_to_batch(fused, batch: Batch):
    """Host-side checks and static choices for a concrete batch, before compiling.

    Returns ``(fused, batch)``: the fused stage fitted to the batch's cells, system sizes (the
    size buckets of a pair potential's dense path) and per-system parameters, and the batch with
    a neighbor list attached when the model sums over one and the batch has none (one call:
    ``model.with_neighbors`` is enough).
    """
    fused.model.check_batch(batch)
    inflight.check_batch_info(fused, batch)
    mask = np.asarray(batch.system_mask)
    cells, pbc = np.asarray(batch.cell)[mask], np.asarray(batch.pbc)[mask]
    fused = fused.prepare_for_cells(cells, pbc).fit_size_buckets(batch).fit_per_system(batch)
    return fused, inflight.attach_neighbors(fused.model, batch)


class Run:
    """A run driven chunk by chunk: the original's inflight control, functionally.

    ``fused.start(...)`` makes one (same options as :func:`run`). Each :meth:`advance` runs one
    compiled chunk; :meth:`refill_check` writes the systems that graduated to the sinks and
    refills their slots from the sampler; :meth:`run_to_end` does both until
    :attr:`all_complete`, writing checkpoints every ``checkpoint_every`` steps. The device state
    is :attr:`batch`, a new immutable batch after every call (the PyTorch original mutates its
    batch in place; here the run object holds the latest state and the compiled functions are
    pure). Use it as a context manager, or call :meth:`close`, so that the sinks are closed.

    Attributes
    ----------
    batch : Batch or None
        The current batch (``None`` when the sampler had nothing to run).
    stats : RunStats
    fused : FusedStage
        The fused stage, fitted to the data (image range, per-system parameters).

    Examples
    --------
    >>> run = fused.start(sampler=sampler, sinks=[sink], refill_frequency=10)
    >>> with run:
    ...     while not run.all_complete:
    ...         run.advance()  # returns 0 once every system in the batch has graduated
    ...         if run.room_in_active_batch > 4 or run.active_batch_size == 0:
    ...             run.refill_check()
    ...     run.refill_check()  # write the last graduates
    >>> run.stats.steps
    """

    def __init__(
        self,
        fused,
        batch: Batch | None = None,
        *,
        n_steps: int | None = None,
        sampler=None,
        sinks=(),
        refill_frequency: int = 50,
        resume: bool | str | os.PathLike = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        dtype=None,
        listeners=(),
        inputs=None,
    ):
        resume_path = None if isinstance(resume, bool) else os.fspath(resume)
        _check_options(
            fused, batch, n_steps, sampler, sinks, refill_frequency, resume, resume_path,
            checkpoint, checkpoint_every,
        )  # fmt: skip
        self.fused = fused
        self.sampler = sampler
        self.sinks = list(sinks)
        self.listeners = list(listeners)
        self.refill_frequency = int(refill_frequency)
        self.n_steps = None if n_steps is None else int(n_steps)
        self._stop_at: int | None = None  # absolute step count at which the run stops
        self.checkpoint_path = None if checkpoint is None else os.fspath(checkpoint)
        self.checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        self.stats = RunStats()
        self._annotate = getattr(sampler, "annotate", None)
        if inputs is not None:
            if sampler is not None or batch is None:
                raise ValueError(
                    "inputs: the structures a batch was made from, given with that batch; a "
                    "sampler carries its inputs' info and arrays itself."
                )
            self._annotate = batch_inputs(batch, inputs)
        self._held: set[int] = set()
        self._t0 = time.perf_counter()
        self._closed = False
        self._held_list = ()  # capacities of a list that overflowed a stretched chunk
        self._chunk = self._make_chunk()
        # host hooks are recorded on the device and delivered after each chunk
        self._record_steps = self.refill_frequency if recording.records_hooks(fused) else None
        self._cache0 = _cache_size(self._chunk)
        self._compilations0 = 0
        self._restored_stop_at = None
        self.batch: Batch | None = None
        self._status_of = None  # (batch, mask, done) of the last host status fetched
        self._pending: np.ndarray | None = None  # refilled slots the next chunk admits
        self._fingerprint = ckpt.fingerprint(fused)
        self._dataset = None if sampler is None else sampler.fingerprint()
        if sampler is not None:
            self._require_info(sampler, dtype)
        if resume_path is not None:
            self._restore(resume_path, dtype)
        elif sampler is not None:
            self._start_inflight(dtype)
        else:
            self._start_batch(batch, bool(resume))
        if self.n_steps is not None:  # at most n_steps more steps in this call
            self._stop_at = self.step_count + self.n_steps
        elif resume_path is not None:
            self._stop_at = self._restored_stop_at
        self._next_checkpoint = self._following_checkpoint()

    # ------------------------------------------------------------------ layout
    # Where the batch lives: one device here; fused_dynamics.sharding.ShardedRun overrides these
    # for a batch spread over a mesh (docs/semantics.md §21).
    # Whether run_to_end's refills leave the admission to the next chunk (one compiled call per
    # host visit); a sharded run admits in a program of its own.
    _admits_in_chunk = True

    def _make_chunk(self):
        return loop.compiled_chunk(self.fused) if self.fused.compile_step else loop.chunk

    def _fetch(self, x) -> np.ndarray:
        """A host copy of a per-slot (or scalar) array of the batch, one value per slot."""
        return np.asarray(x)

    def _deliver(self, records) -> None:
        """Hand a kept chunk's recorded host-hook payloads to the hooks' ``on_host``."""
        if records:
            recording.deliver(self.fused, jax.device_get(records))

    def _flat_host(self) -> Batch:
        """A host copy of the batch with one flat slot axis (what the sinks are written from)."""
        return jax.device_get(self.batch)

    def _owned(self, slots):
        """The slots among ``slots`` whose systems this process writes (all of them here)."""
        return slots

    def _layout_header(self) -> dict:
        """What a checkpoint records of the batch's placement (nothing for one device)."""
        return {}

    def _placed(self, batch: Batch) -> Batch:
        """A batch read from a checkpoint, placed where the run keeps it."""
        return batch

    def _retry(self, fn, batch, **options):
        """``fn(batch)``, redone on a grown neighbor list until nothing overflowed
        (:func:`~fused_dynamics.compiled.retry_on_overflow`)."""
        return retry_on_overflow(fn, batch, **options)

    def _write_checkpoint(self, path, header) -> None:
        self._save_file(path, self.batch, header)

    @staticmethod
    def _save_file(path, batch, header) -> None:
        ckpt.save(path, batch, header)

    # ------------------------------------------------------------------ setup
    def _require_info(self, sampler, dtype) -> None:
        """Make the sampler read the ``atoms.info`` values this run's stages read (§14a)."""
        inflight.require_info(self.fused, sampler, dtype)

    def _start_inflight(self, dtype) -> None:
        self._report_rejected()
        if self.sampler.exhausted:  # nothing to run (every system written before, or rejected)
            self._written = np.zeros(0, bool)
            return
        cells, pbc = self.sampler.cells()
        self.fused = self.fused.prepare_for_cells(cells, pbc)
        inflight.refuse_size_buckets(self.fused.model)
        try:
            batch = self.sampler.initial_batch(dtype)
        except ValueError:
            if not self.sampler.exhausted:
                raise
            # every structure left was rejected as it was taken: they are written, nothing runs
            self._report_rejected()
            self._written = np.zeros(0, bool)
            return
        batch = inflight.attach_neighbors(
            self.fused.model, batch, cells, pbc, self._dataset_batches(batch.dtype)
        )
        self.batch = self._admit(inflight.blank(self.fused, batch), batch.system_mask)
        self._written = ~np.asarray(self.batch.system_mask)

    def _dataset_batches(self, dtype, max_atoms=None, max_systems=None):
        """The rest of the dataset as the refills will bring it
        (:meth:`~fused_dynamics.SizeAwareSampler.preview_batches`), for sizing a neighbor list
        before the run compiles; None when the model sums over no list (nothing to size)."""
        if getattr(self.fused.model, "skin", None) is None:
            return None
        preview = getattr(self.sampler, "preview_batches", None)
        if preview is None:  # a sampler of the caller's own, without a preview
            return None
        # streamed (NeighborList.allocate calls it twice): never the whole dataset at once
        return functools.partial(preview, dtype, max_atoms, max_systems)

    def _start_batch(self, batch: Batch, resume: bool) -> None:
        self.fused, batch = fit_to_batch(self.fused, batch)
        # written already: empty slots and, on resume, systems that had left before
        written = ~np.asarray(batch.system_mask)
        if resume:
            written = written | (np.asarray(batch.status) == self.fused.exit_status)
        else:
            batch = self._admit(inflight.blank(self.fused, batch), batch.system_mask)
        self.batch = batch
        self._written = written

    # ------------------------------------------------------------------ live API
    @property
    def inflight_mode(self) -> bool:
        """Whether systems come from a sampler (and slots are refilled)."""
        return self.sampler is not None

    @property
    def step_count(self) -> int:
        """Fused steps taken since the run began (carried on across resumes)."""
        if self.batch is None or self.batch.step_count is None:
            return 0
        return int(np.ravel(self._fetch(self.batch.step_count))[0])

    def _host_status(self):
        """Host copies of ``system_mask`` and "graduated" (S,), fetched once per batch."""
        cached = self._status_of
        if cached is None or cached[0] is not self.batch:
            mask = self._fetch(self.batch.system_mask)
            done = self._fetch(self.batch.status) == self.fused.exit_status
            self._status_of = cached = (self.batch, mask, done)
        return cached[1], cached[2]

    @property
    def active_batch_size(self) -> int:
        """Systems in the batch that have not graduated (still running)."""
        if self.batch is None:
            return 0
        mask, done = self._host_status()
        return int(np.sum(mask & ~done))

    @property
    def room_in_active_batch(self) -> int:
        """Slots that :meth:`refill_check` could fill: empty or holding a graduated system."""
        if self.batch is None:
            return 0
        return len(self._host_status()[0]) - self.active_batch_size

    @property
    def active_batch_has_room(self) -> bool:
        """Whether :attr:`room_in_active_batch` is above zero."""
        return self.room_in_active_batch > 0

    @property
    def all_complete(self) -> bool:
        """Nothing left to run: no system running, nothing queued in the sampler, every
        graduated system written (or the step budget ``n_steps`` spent)."""
        if self.batch is None:
            return True
        mask, done = self._host_status()
        unwritten = np.any(mask & done & ~self._written)
        if self._stop_at is not None and self.step_count >= self._stop_at:
            return not unwritten
        queued = self.sampler is not None and not self.sampler.exhausted
        return not (np.any(mask & ~done) or queued or unwritten)

    def advance(self, n_steps: int | None = None) -> int:
        """Run one compiled chunk of at most ``n_steps`` steps (default ``refill_frequency``).

        The chunk is shorter when a checkpoint step or the run's step budget comes first, or
        when every system in the batch has graduated: it returns 0 then, and
        :meth:`refill_check` (or :meth:`write_graduated`) is what moves the run on. A checkpoint
        due at the current step is written first (so it holds what the caller's host visit,
        a refill, did). Returns the steps taken. Every system in :attr:`batch` afterwards
        carries its output stress, unless the fused stage has ``output_stress=False``
        (docs/semantics.md §6).
        """
        return self.collect(self.dispatch(n_steps))

    def dispatch(self, n_steps: int | None = None):
        """Start the chunk of :meth:`advance` without waiting for it (JAX runs it
        asynchronously; ``run.batch`` is its future result); :meth:`collect` waits and counts.
        A pipeline starts every stage's chunk this way before waiting for any, so that its
        device groups compute at the same time. Returns what :meth:`collect` takes (``None``
        when no step is due)."""
        return self._dispatch(n_steps, every_stress=True)

    def _list_shape(self):
        """The static capacities of the batch's neighbor list (None without one): what a
        growth after an overflow changes (:meth:`NeighborList.grown`)."""
        nl = getattr(self.batch, "neighbors", None)
        fields = ("capacity", "bin_capacity", "stencil", "max_neighbors")
        return None if nl is None else tuple(getattr(nl, f, None) for f in fields)

    def _stretch(self, most: int) -> tuple | None:
        """The ``stretch`` argument of the chunk (:func:`fused_dynamics.loop.run_steps`): it may
        go on to ``most`` steps (0: no further than asked) while no system graduates, bounded
        by the run's budget and the next checkpoint. None for a chunk that takes no such
        argument (a sharded run's)."""
        if not self._admits_in_chunk:
            return None
        top = np.iinfo(np.int32).max
        if most <= 0:  # the chunk as asked; its last flag says whether the run ends with it
            return np.asarray(0, np.int32), np.asarray(top, np.int32)
        step = self.step_count
        to_stop = top if self._stop_at is None else self._stop_at - step
        if self._next_checkpoint is not None:
            most = min(most, self._next_checkpoint - step)
        return np.asarray(min(most, to_stop), np.int32), np.asarray(to_stop, np.int32)

    def _dispatch(self, n_steps: int | None, every_stress: bool, stretch: bool = False):
        """:meth:`dispatch`; ``every_stress`` False (:meth:`run_to_end`, which hands out only
        the systems that left, and the batch after its last chunk): the output stress only
        for the systems that leave in this chunk, and for all in the run's last chunk.
        ``stretch`` (:meth:`run_to_end`, without host hooks): the chunk goes on past
        ``refill_frequency`` steps, in whole multiples of it and to at most :data:`STRETCH`
        times it, while no system graduates: a host visit would have nothing to write or
        refill (docs/semantics.md §14)."""
        if self.batch is None:
            return None
        k = self.refill_frequency if n_steps is None else int(n_steps)
        if k < 1:
            raise ValueError(f"Run.advance: n_steps must be >= 1, got {k}.")
        self._maybe_checkpoint()
        if self._stop_at is not None:
            k = min(k, self._stop_at - self.step_count)
        if self._next_checkpoint is not None:
            k = min(k, self._next_checkpoint - self.step_count)
        if k <= 0:
            return None
        fused = self.fused
        # the run stops after this chunk: every system still running gets its output stress
        last = self._stop_at is not None and self.step_count + k >= self._stop_at
        last = np.asarray(last or every_stress)  # host scalars: no conversion program
        new = None
        if self._admits_in_chunk:
            pending = self._pending
            shape = np.shape(self.batch.system_mask)
            new = jnp.asarray(np.zeros(shape, bool) if pending is None else pending)
        # host hooks' records are delivered after each chunk: such runs are not stretched
        stretch = stretch and n_steps is None and self._record_steps is None
        stretch = stretch and self._admits_in_chunk and not self.listeners
        stretch = stretch and self._list_shape() != self._held_list

        def call(b, most):
            more = self._stretch(most)
            extra = () if more is None else (more,)
            steps = np.asarray(k, np.int32)
            return self._chunk(fused, b, steps, last, new, self._record_steps, *extra)

        out = call(self.batch, STRETCH * k) if stretch else None
        if out is not None and overflowed(out[0]):
            # Redone unstretched from the chunk's start on the same list, and not stretched
            # again until the list has grown: it then grows at the chunk that overflows in a
            # run visiting the host every refill_frequency steps (a grown list is stale, so
            # where it grows decides where it is rebuilt, and the sums' rounding after it).
            self._held_list, out = self._list_shape(), None
        if out is None:
            out = self._retry(lambda b: call(b, 0), self.batch, listeners=self.listeners)
        batch, taken, active, records = out
        self.batch = batch
        self._pending = None
        return taken, active, records

    def _admit(self, batch: Batch, new) -> Batch:
        """``batch`` with the slots ``new`` (S,) bool admitted now: a call of the run's chunk
        program that takes no step (its loop's priming pass primes the slots), so the run
        compiles no admission program besides its chunk. A sharded run admits in a program of
        its own and overrides every caller; its chunk ignores ``new``, so reaching here would
        leave the slots unprimed without a word: refused."""
        if not self._admits_in_chunk:
            raise NotImplementedError(
                f"{type(self).__name__} admits in a program of its own, not through its chunk"
            )
        new = jnp.asarray(new)
        last, no_steps = np.asarray(False), np.asarray(0, np.int32)
        more = self._stretch(0)  # the run's one chunk program: the same arguments
        out = self._retry(
            lambda b: self._chunk(self.fused, b, no_steps, last, new, self._record_steps, more),
            batch,
            listeners=self.listeners,
        )
        return out[0]

    def _admit_pending(self) -> None:
        """Admit the slots a refill left to the next chunk, now (before the batch is saved or
        handed out)."""
        if self._pending is not None:
            self.batch = self._admit(self.batch, self._pending)
            self._pending = None

    def collect(self, pending) -> int:
        """Wait for a chunk started by :meth:`dispatch` and count it; returns the steps taken."""
        if pending is None:
            return 0
        taken, active, records = pending
        self._deliver(records)
        taken = int(taken)
        self.stats.steps = self.step_count
        self.stats.chunks += 1
        self.stats.slot_steps_active += int(active)
        self.stats.slot_steps_total += taken * len(self._host_status()[0])
        return taken

    def write_graduated(self) -> int:
        """Write the graduated systems not yet written to the sinks; returns how many."""
        if self.batch is None:
            return 0
        mask, done = self._host_status()
        new = mask & done & ~self._written
        if not new.any():
            return 0
        slots = np.flatnonzero(new)
        if not self.sinks:  # a fixed batch run without sinks: the caller reads run.batch
            self._written |= new
            return len(slots)
        host = self._flat_host()
        slot_of = {int(host.system_id[k]): int(k) for k in slots}

        def written(frames):  # marked as each write succeeds: a failed one loses nothing
            for a in frames:
                self._written[slot_of[int(a.info["system_id"])]] = True
            self.stats.written += len(frames)

        inflight.write_graduated(
            host, self._owned(slots), self.sinks, self._annotate, self._held, on_written=written
        )
        for k in slots:  # held already by a sink of a resumed run: skipped, done
            self._written[k] = True
        return len(slots)

    def refill_check(self) -> int:
        """Write graduated systems, free their slots and refill them from the sampler.

        Returns the number of systems admitted (0 without a sampler or when nothing left).

        Raises
        ------
        RuntimeError
            When the next system of the sampler does not fit even an empty batch.
        """
        return self._refill_check(defer=False)

    def _refill_check(self, defer: bool) -> int:
        """:meth:`refill_check`; with ``defer`` (inside :meth:`run_to_end`, whose next call is
        a chunk) the new systems are admitted by that chunk (:attr:`_pending`)."""
        self.write_graduated()
        if self.sampler is None or self.batch is None:
            return 0
        self._report_rejected()
        mask, done = self._host_status()
        keep = self._kept_slots(mask, done)
        if self.sampler.exhausted or keep.all():
            return 0
        if defer and self._admits_in_chunk:
            batch, new = self._refill(keep, admit=False)
            self._pending = new if new.any() else None
        else:
            batch, new = self._refill(keep)
        self.batch = batch
        self._written = ~(keep | new)
        return int(new.sum())

    def _kept_slots(self, mask: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Slots a refill keeps (S,) bool: occupied ones whose system has not left the run."""
        return mask & ~done

    def _refill(self, keep: np.ndarray, admit: bool = True) -> tuple[Batch, np.ndarray]:
        """Free the slots not in ``keep``, re-pack the atoms and admit new systems from the
        sampler; returns the new batch and which slots were refilled. Without ``admit`` the
        new slots are only written (status: the entry sub-stage's code, so that the host
        counts them as running) and the next chunk admits them."""
        host = jax.device_get(self.batch)
        arrays, offset = inflight.repack(host, keep)
        arrays["status"][~keep] = self.fused.exit_status
        free_slots = [int(x) for x in np.flatnonzero(~keep)]
        incoming = self.sampler.take(host.max_atoms - offset, len(free_slots))
        new = np.zeros(host.max_systems, bool)
        for (index, atoms), slot in zip(incoming, free_slots, strict=False):
            write_system(arrays, slot, offset, atoms, index)
            arrays["status"][slot] = self.fused.entry_status
            offset += len(atoms)
            new[slot] = True
        self._report_rejected()
        if not keep.any() and not new.any() and not self.sampler.exhausted:
            raise RuntimeError("Inflight run: the next system does not fit an empty batch.")
        batch = inflight.rebuild(self.batch, host, arrays)
        if new.any() and admit:
            batch = self._admit(batch, new)
        return batch, new

    def run_to_end(self) -> RunStats:
        """Advance and refill until :attr:`all_complete`, checkpointing as asked; returns the
        statistics."""
        while not self.all_complete:
            taken = self.collect(self._dispatch(None, every_stress=False, stretch=True))
            mask, done = self._host_status()
            left = np.any(mask & done & ~self._written)
            if left or taken == 0 or not np.any(mask & ~done):
                self._refill_check(defer=True)
            self._maybe_checkpoint()
            if taken == 0 and not self.all_complete and self._stuck():
                raise RuntimeError(
                    "Run: no step could be taken and nothing could be admitted; the next "
                    "system does not fit the batch."
                )
        self._admit_pending()  # refilled before a step budget ran out: admitted, not run
        self.write_graduated()
        self._finish_stats()
        return self.stats

    def _stuck(self) -> bool:
        mask, done = self._host_status()
        return not np.any(mask & ~done) and self.sampler is not None and not self.sampler.exhausted

    # ------------------------------------------------------------------ checkpoints
    def _following_checkpoint(self) -> int | None:
        if self.checkpoint_every is None:
            return None
        step = self.step_count
        return (step // self.checkpoint_every + 1) * self.checkpoint_every

    def _maybe_checkpoint(self) -> None:
        if self._next_checkpoint is not None and self.step_count >= self._next_checkpoint:
            self.save(self.checkpoint_path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole run state to ``path`` atomically (see
        :mod:`fused_dynamics.checkpoint`): the batch with its stage state, random-stream
        positions and step count, the sampler's position and rejected set, which slots were
        written, the statistics and the fitted model's static choices."""
        if self.batch is None:
            return
        self._admit_pending()
        self.write_graduated()
        self._finish_stats()
        self.stats.checkpoints += 1
        header = {
            "inflight": self.inflight_mode,
            "step_count": self.step_count,
            "stop_at": self._stop_at,
            "fingerprint": self._fingerprint,
            "dataset": self._dataset,
            "stats": self.stats.to_dict(),
            "written": [bool(x) for x in self._written],
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
            "sink_counts": [_sink_len(s) for s in self.sinks],
            "images": _images(self.fused.model),
            "fused": repr(self.fused),
            **self._layout_header(),
        }
        self._write_checkpoint(path, header)
        if os.fspath(path) == self.checkpoint_path:
            self._next_checkpoint = self._following_checkpoint()

    def _restore(self, path: str, dtype) -> None:
        def check(header):
            if header["fused"] != repr(self.fused) or header["fingerprint"] != self._fingerprint:
                raise ValueError(
                    f"resume={path!r}: the checkpoint was written by another fused stage (its "
                    "sub-stages, parameters, model or hooks differ, or its pair path: a "
                    "neighbor list and its skin, or dense pairs); resume with the fused "
                    f"stage that wrote it:\n{header['fused']}"
                )
            if header["dataset"] != self._dataset:
                raise ValueError(
                    f"resume={path!r}: the sampler's dataset is not the one the checkpoint was "
                    "written with (other structures, order or ids); give the same dataset."
                )
            if header.get("devices") != self._layout_header().get("devices"):
                raise ValueError(
                    f"resume={path!r}: the checkpoint is of a run over "
                    f"{header.get('devices') or 1} device(s) (mesh=); resume it with a mesh of "
                    "as many devices."
                )
            if header["inflight"] != (self.sampler is not None):
                need = "a sampler" if header["inflight"] else "no sampler"
                raise ValueError(f"resume={path!r}: the checkpoint is of a run with {need}.")

        header, batch = ckpt.load(path, self.fused, check)
        if dtype is not None and jnp.dtype(dtype) != batch.dtype:
            raise ValueError(
                f"resume={path!r}: the checkpoint holds {batch.dtype} data, not {jnp.dtype(dtype)}."
            )
        self.fused = _fit_static(self.fused, header["images"], batch)
        if self.sampler is not None:
            self.sampler.load_state_dict(header["sampler"])
        self._restored_stop_at = header["stop_at"]
        for k, v in header["stats"].items():
            setattr(self.stats, k, v)
        self._compilations0 = self.stats.compilations
        self._written = np.asarray(header["written"], bool)
        self.batch = self._placed(batch)
        # what the sinks hold already (written after this checkpoint, before the run stopped)
        self._held = set()
        for sink in self.sinks:
            self._held |= set(_sink_ids(sink, path))
        for listener in self.listeners:
            listener.held = set(_sink_ids(listener.sink, path))

    # ------------------------------------------------------------------ end
    def _report_rejected(self) -> None:
        if self.sampler is None:
            return
        frames = inflight.rejected_frames(self.sampler.take_rejected(), self._annotate)
        n = inflight.write_to_sinks(frames, self.sinks, self._held)
        self.stats.rejected += len(frames)
        self.stats.written += n

    def _finish_stats(self) -> None:
        self.stats.steps = self.step_count
        self.stats.compilations = self._compilations0 + _cache_size(self._chunk) - self._cache0
        self.stats.wall_time += time.perf_counter() - self._t0
        self._t0 = time.perf_counter()

    def close(self) -> None:
        """Close the sinks (once)."""
        if self._closed:
            return
        self._closed = True
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_options(
    fused, batch, n_steps, sampler, sinks, refill_frequency, resume, resume_path, checkpoint,
    checkpoint_every,
) -> None:  # fmt: skip
    if not 1 <= refill_frequency <= MAX_STEPS:  # a chunk's steps are an int32
        raise ValueError(
            f"refill_frequency must be >= 1 and <= {MAX_STEPS}, got {refill_frequency}."
        )
    if sampler is not None:
        if batch is not None:
            raise ValueError("FusedStage.run: give either a batch or a sampler, not both.")
        if n_steps is not None:
            raise ValueError("FusedStage.run: n_steps is not used in inflight mode.")
        if not sinks:
            raise ValueError("An inflight run needs at least one sink to write systems to.")
        held = [type(h).__name__ for h in fused.all_hooks() if getattr(h, "holds_slots", False)]
        if held:
            raise ValueError(
                f"FusedStage.run: {', '.join(held)} holds atom slots of one batch, and an "
                "inflight run refills slots with other systems (they would be moved to the "
                "previous occupant's positions); give FixAtoms constraints on the ase.Atoms "
                "instead (they travel with each system), or run a fixed batch."
            )
    elif resume_path is None and batch is None:
        raise ValueError("FusedStage.run: give a batch (or a sampler for inflight mode).")
    if resume_path is not None and batch is not None:
        raise ValueError(
            "FusedStage.run(resume=PATH) continues the batch saved in the checkpoint; give no "
            "batch (resume=True continues a batch you pass)."
        )
    if resume is True and batch is not None and not fused.is_initialized(batch):
        raise ValueError(
            "FusedStage.run(resume=True): the batch was not prepared by this fused stage "
            "(stage state or bookkeeping missing); run it without resume first."
        )
    if (checkpoint is None) != (checkpoint_every is None):
        raise ValueError(
            "FusedStage.run: checkpoint=PATH and checkpoint_every=N go together (got "
            f"checkpoint={checkpoint!r}, checkpoint_every={checkpoint_every!r})."
        )
    if checkpoint_every is not None and int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
    if checkpoint is not None:
        if os.path.isdir(checkpoint):
            raise IsADirectoryError(
                f"checkpoint={os.fspath(checkpoint)!r} is a directory; give a file path."
            )
        if (
            os.path.lexists(checkpoint)
            and not _same_file(checkpoint, resume_path)
            and not (resume is True and _continued_by(checkpoint, fused, batch))
        ):
            raise FileExistsError(
                f"checkpoint={os.fspath(checkpoint)!r} exists; a run never replaces a file it "
                "did not write: continue the run saved there with resume=PATH (or a batch it "
                "returned, at or after the checkpoint's step, with resume=True), or remove the "
                "file, or give another path (docs/semantics.md §19)."
            )
        check_writable(checkpoint)  # before anything is compiled or run
    if n_steps is None and resume_path is None:
        fused.check_ends()
    if resume_path is not None and not os.path.isfile(resume_path):
        raise FileNotFoundError(f"resume={resume_path!r}: no such checkpoint file.")


def _same_file(path, other) -> bool:
    """Whether ``other`` (a path or None) names the file at ``path``."""
    if other is None or not os.path.exists(path) or not os.path.exists(other):
        return False
    return os.path.samefile(path, other)


def _continued_by(path, fused, batch) -> bool:
    """Whether the checkpoint at ``path`` is of a fixed-batch run of ``fused`` at a step no
    later than ``batch``'s: a ``resume=True`` call continuing that run goes on writing it."""
    step = None if batch is None else batch.step_count
    if step is None or not ckpt.is_checkpoint(path):
        return False
    try:
        header = ckpt.read_header(path)
    except (OSError, ValueError):
        return False
    return (
        not header.get("inflight")
        and header.get("fingerprint") == ckpt.fingerprint(fused)
        and int(header.get("step_count", step + 1)) <= int(step)
    )


def _cache_size(fn) -> int:
    size = getattr(fn, "cache_size", None)
    return 0 if size is None else size()


def _sink_len(sink) -> int | None:
    try:
        return len(sink)
    except TypeError:
        return None


def _sink_ids(sink, path) -> list[int]:
    """Ids of the systems a sink holds (its ``system_ids()``), with a warning for a sink that
    cannot tell: systems it received after the checkpoint may then be written twice."""
    ids = getattr(sink, "system_ids", None)
    if ids is None:
        warnings.warn(
            f"resume={path!r}: the sink {type(sink).__name__} has no system_ids() method, so "
            "systems it received after the checkpoint cannot be recognised and may be written "
            "to it twice; give it a system_ids() method returning the ids it holds.",
            RuntimeWarning,
            stacklevel=4,
        )
        return []
    return [int(i) for i in ids()]


def _images(model) -> Any:
    images = getattr(model, "images", None)
    return None if images is None else [int(n) for n in images]


def _fit_static(fused, images, batch: Batch):
    """``fused`` with the static choices of the run that wrote a checkpoint: the model's
    periodic image range (fitted then to every cell of the dataset) and the per-system
    parameters spread over the batch's slots."""
    model = fused.model
    if images is not None and hasattr(model, "with_images_for"):
        fused = fused.with_model(dataclasses.replace(model, images=tuple(images)))
    return fused.fit_per_system(batch)
