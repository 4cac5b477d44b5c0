"""Samplers: a queue of pending systems that packs them into a fixed-capacity batch."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterable, Sequence

import ase
import ase.io
import numpy as np

from .batch import Batch, _validate_atoms, complete_cell
from .parameters import read_info_values
from .provenance import copy_provenance

__all__ = ["SizeAwareSampler"]

log = logging.getLogger("fused_dynamics")

_ID_MAX = np.iinfo(np.int32).max  # Batch.system_id is int32; -1 marks an empty slot


def _load(dataset) -> Sequence[ase.Atoms]:
    if isinstance(dataset, (str, os.PathLike)):
        path = os.fspath(dataset)
        if not os.path.exists(path):
            raise ValueError(f"SizeAwareSampler: dataset path {path!r} does not exist.")
        try:
            return ase.io.read(path, index=":")
        except Exception as exc:  # ase raises many kinds; name the file and the cause
            raise ValueError(f"SizeAwareSampler: cannot read {path!r} with ase.io: {exc}") from exc
    if isinstance(dataset, ase.Atoms):
        return [dataset]
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            "SizeAwareSampler: dataset must be a sequence of ase.Atoms, a path readable by "
            f"ase.io.read, or an indexable of ase.Atoms; got {type(dataset).__name__}."
        )
    return dataset


def _where(i: int, sources) -> str:
    """``frame 3 of 'a.extxyz'`` or ``structure 3``: how an error names an input."""
    file, frame = sources[i]
    return f"frame {frame} of {file!r}" if file is not None else f"structure {i}"


def ids_from_key(dataset, id_key: str, sources) -> np.ndarray:
    """Each structure's ``atoms.info[id_key]`` as a system id, checked.

    Raises
    ------
    ValueError
        A structure without the key, a value that is not an integer in ``[0, 2**31 - 1)``,
        or an id used twice; the message names the frame (and its file).
    """
    ids = np.empty(len(dataset), np.int64)
    first: dict[int, int] = {}
    for i in range(len(dataset)):
        info = dataset[i].info
        if id_key not in info:
            raise ValueError(
                f"SizeAwareSampler: id_key={id_key!r}: {_where(i, sources)} has no "
                f"info[{id_key!r}]; every structure needs one (an integer id)."
            )
        value = info[id_key]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(
                f"SizeAwareSampler: id_key={id_key!r}: {_where(i, sources)} has "
                f"info[{id_key!r}] = {value!r} ({type(value).__name__}); it must be an integer."
            )
        if not 0 <= int(value) < _ID_MAX:
            raise ValueError(
                f"SizeAwareSampler: id_key={id_key!r}: {_where(i, sources)} has "
                f"info[{id_key!r}] = {value}; ids must be in [0, {_ID_MAX})."
            )
        if int(value) in first:
            raise ValueError(
                f"SizeAwareSampler: id_key={id_key!r}: {_where(i, sources)} has "
                f"info[{id_key!r}] = {value}, the same as {_where(first[int(value)], sources)}; "
                "ids must be unique."
            )
        first[int(value)] = i
        ids[i] = int(value)
    return ids


class SizeAwareSampler:
    """Hands out systems of a dataset that fit the free room of a fixed-capacity batch.

    Parameters
    ----------
    dataset : sequence of ase.Atoms, path, or indexable of ase.Atoms
        A path is read with ``ase.io.read(path, index=":")`` (extxyz, cif, POSCAR, db, ...).
        Systems are read lazily from an indexable, by index.
    max_atoms, max_systems : int
        Capacities N and S of the batch.
    max_atoms_per_system : int, optional
        Capacity of one system (default: the largest system of the dataset that fits
        ``max_atoms``).
    sort_by_size : bool, default False
        Hand systems out largest first (better packing) instead of in dataset order.
    id_key : str, optional
        Take each structure's ``system_id`` from ``atoms.info[id_key]`` (for example
        ``"seed"`` or ``"system_id"``) instead of its index in the dataset. Values must be
        integers in ``[0, 2**31 - 1)`` and unique (else ``ValueError`` naming the frame).
    sources : sequence of (str or None, int), optional
        For each structure, the file it was read from and its frame index in that file,
        written to the outputs as ``source_file`` and ``source_index``. Default: the path and
        frame index when ``dataset`` is a path, else ``(None, index in the dataset)``.

    Notes
    -----
    **Ids and random streams.** A system's random numbers (Langevin noise, Maxwell–Boltzmann
    velocities) are keyed by its ``system_id`` and its own step counter, never by its slot or
    its neighbours in the batch (see :class:`~fused_dynamics.NVTLangevin`). By default the id
    is the structure's index in the dataset, so removing a structure from a file renumbers the
    ones after it and changes their trajectories. With ``id_key`` the id (and so each
    trajectory) belongs to the structure and not to its position in the file: removing or
    reordering structures leaves the others' trajectories unchanged.

    **Rejected systems.** A system that can never fit (more atoms than ``max_atoms`` or
    ``max_atoms_per_system``) or that is invalid (non-finite positions, bad masses, singular
    periodic cell) is *rejected*: it is logged with its index and size and listed in
    :attr:`rejected`; the run writes it to the sinks with ``exit_reason == ExitReason.REJECTED``.
    It is never silently skipped.

    **Provenance.** :meth:`annotate` copies each input's ``info``, per-atom arrays and source
    onto the output built for it (see :mod:`fused_dynamics.provenance`).
    """

    def __init__(
        self,
        dataset,
        max_atoms: int,
        max_systems: int,
        max_atoms_per_system: int | None = None,
        sort_by_size: bool = False,
        id_key: str | None = None,
        sources: Sequence[tuple[str | None, int]] | None = None,
    ):
        path = os.fspath(dataset) if isinstance(dataset, (str, os.PathLike)) else None
        self.dataset = _load(dataset)
        self.max_atoms = int(max_atoms)
        self.max_systems = int(max_systems)
        n = len(self.dataset)
        if n == 0:
            raise ValueError("SizeAwareSampler: the dataset is empty.")
        if self.max_atoms < 1 or self.max_systems < 1:
            raise ValueError("SizeAwareSampler: max_atoms and max_systems must be >= 1.")
        if sources is None:
            sources = [(path, i) for i in range(n)]
        self.sources = [(None if f is None else os.fspath(f), int(k)) for f, k in sources]
        if len(self.sources) != n:
            raise ValueError(
                f"SizeAwareSampler: sources gives {len(self.sources)} entries for {n} structures."
            )
        self.id_key = id_key
        if id_key is None:
            self.ids = np.arange(n, dtype=np.int64)
        else:
            self.ids = ids_from_key(self.dataset, id_key, self.sources)
        self._index_of = {int(sid): i for i, sid in enumerate(self.ids)}
        sizes = np.array([len(self.dataset[i]) for i in range(n)])
        fits = sizes <= self.max_atoms
        if max_atoms_per_system is None:
            max_atoms_per_system = int(sizes[fits].max()) if fits.any() else self.max_atoms
        self.max_atoms_per_system = int(max_atoms_per_system)
        self.sizes = sizes
        self.rejected: list[tuple[int, str]] = []
        order = np.argsort(-sizes, kind="stable") if sort_by_size else np.arange(n)
        self._queue: deque[int] = deque()
        for i in order:
            i = int(i)
            if sizes[i] > min(self.max_atoms, self.max_atoms_per_system):
                self._reject(
                    i,
                    f"system {self.ids[i]} has {sizes[i]} atoms; the batch holds at most "
                    f"{min(self.max_atoms, self.max_atoms_per_system)} per system "
                    f"({_where(i, self.sources)})",
                )
            else:
                self._queue.append(i)
        self._pending_rejects = list(self.rejected)
        self._fingerprint: str | None = None
        self.info_keys: tuple[str, ...] = ()
        self._info_check = None
        self._info_readers: dict = {}

    def require_info(self, keys, check=None, readers=None) -> None:
        """Hand out only structures that carry a real number under each ``atoms.info`` key of
        ``keys``, and put those values in the batch (``Batch.parameters``).

        A run whose stages read ``from_info`` parameters calls it before it takes the first
        system. ``check(values, where)`` (the run's
        :func:`~fused_dynamics.parameters.check_info_values`) checks the values against the
        rules of the parameters that read them. A structure that fails either is rejected
        (reported, written with exit reason REJECTED), never run with a wrong value.
        ``readers`` (key -> the parameters that read it) names them in the reasons.
        """
        self.info_keys = tuple(keys)
        self._info_check = check
        self._info_readers = dict(readers or {})

    def info_problems(self) -> list[tuple[int, str]]:
        """``(system_id, reason)`` of the queued structures whose ``atoms.info`` values
        :meth:`require_info` would reject, without handing anything out (a dry run of what
        :meth:`take` checks)."""
        out = []
        if not self.info_keys:
            return out
        for i in self._queue:
            where = f"system {int(self.ids[i])}"
            try:
                values = read_info_values(
                    self.dataset[i].info, self.info_keys, where, self._info_readers
                )
                if self._info_check is not None and values:
                    self._info_check(values, where)
            except (TypeError, ValueError) as exc:
                out.append((int(self.ids[i]), str(exc)))
        return out

    def _reject(self, i: int, why: str) -> None:
        log.warning("SizeAwareSampler: rejected %s.", why)
        self.rejected.append((i, why))

    def __len__(self) -> int:
        """Number of systems not yet handed out."""
        return len(self._queue)

    @property
    def exhausted(self) -> bool:
        return not self._queue

    def skip(self, system_ids: Iterable[int]) -> int:
        """Leave out the systems with these ids (already written by an earlier run).

        They are neither handed out nor reported as rejected. Ids the dataset does not have
        are ignored. Returns the number of structures left out.
        """
        drop = {self._index_of[int(s)] for s in system_ids if int(s) in self._index_of}
        before = len(self._queue) + len(self._pending_rejects)
        self._queue = deque(i for i in self._queue if i not in drop)
        self._pending_rejects = [(i, w) for i, w in self._pending_rejects if i not in drop]
        return before - len(self._queue) - len(self._pending_rejects)

    def fingerprint(self) -> str:
        """A digest of the dataset as the sampler sees it: ids, sizes, elements, positions,
        cells and periodicity of every structure, in order (computed once; a resumed run checks
        that it is given the same dataset)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(np.asarray(self.ids, np.int64).tobytes())
            for i in range(len(self.dataset)):
                try:
                    a = self.dataset[i]
                    parts = (a.numbers, a.positions, np.asarray(a.cell), a.pbc)
                except Exception:  # an unreadable entry (rejected): its index still counts
                    parts = (np.asarray([i]),)
                for x in parts:
                    digest.update(np.ascontiguousarray(x).tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def state_dict(self) -> dict:
        """The sampler's position as JSON-able values: the queue of dataset indices still to
        hand out, every rejection so far and those not yet reported (for checkpoints)."""
        return {
            "n": len(self.dataset),
            "queue": [int(i) for i in self._queue],
            "rejected": [[int(i), why] for i, why in self.rejected],
            "pending_rejects": [[int(i), why] for i, why in self._pending_rejects],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of a sampler over the same dataset.

        Raises
        ------
        ValueError
            When the dataset has another length (not the one the state was taken from).
        """
        if int(state["n"]) != len(self.dataset):
            raise ValueError(
                f"SizeAwareSampler.load_state_dict: the state is of a dataset of {state['n']} "
                f"structures, this one has {len(self.dataset)}; give the same dataset."
            )
        self._queue = deque(int(i) for i in state["queue"])
        self.rejected = [(int(i), why) for i, why in state["rejected"]]
        self._pending_rejects = [(int(i), why) for i, why in state["pending_rejects"]]

    def index_of(self, system_id: int) -> int:
        """The dataset index of the structure with this ``system_id`` (KeyError if none)."""
        return self._index_of[int(system_id)]

    def annotate(self, frames: Sequence[ase.Atoms]) -> list[ase.Atoms]:
        """Copy each input's info, per-atom arrays and source onto the output made for it.

        ``frames`` are outputs of the run carrying ``info["system_id"]``; each is modified in
        place (see :func:`~fused_dynamics.provenance.copy_provenance`) and returned. Frames
        whose id is not from this dataset are returned unchanged.
        """
        for a in frames:
            sid = a.info.get("system_id")
            i = self._index_of.get(int(sid)) if sid is not None else None
            if i is None:
                continue
            try:
                source = self.dataset[i]
            except Exception:  # an unreadable entry: its source is still named
                source = None
            file, frame = self.sources[i]
            if source is None or len(source) != len(a):  # a placeholder without its atoms
                source = ase.Atoms(info=dict(source.info) if source is not None else {})
                target = ase.Atoms()
                target.info = a.info  # shared: only info is copied
            else:
                target = a
            copy_provenance(
                source, target, source_index=frame, source_file=file, system_id=int(sid)
            )
        return list(frames)

    def take_rejected(self) -> list[tuple[int, ase.Atoms | None, str]]:
        """Rejected systems not yet reported: ``(system_id, atoms, reason)``, each once."""
        out = []
        for i, why in self._pending_rejects:
            try:
                atoms = self.dataset[i]
            except Exception:  # an unreadable entry is still reported
                atoms = None
            out.append((int(self.ids[i]), atoms, why))
        self._pending_rejects = []
        return out

    def take(self, free_atoms: int, free_slots: int) -> list[tuple[int, ase.Atoms]]:
        """Pop the next systems, in order, while they fit ``free_atoms`` and ``free_slots``.

        Returns ``(system_id, atoms)`` pairs. A system that fails validation is rejected and
        skipped over (reported, not lost).
        """
        out = []
        while self._queue and free_slots > 0:
            i = self._queue[0]
            if self.sizes[i] > free_atoms:
                break
            self._queue.popleft()
            atoms = self.dataset[i]
            try:
                self._check(i, atoms)
            except (TypeError, ValueError) as exc:
                self._reject(i, f"{exc} ({_where(i, self.sources)})")
                self._pending_rejects.append(self.rejected[-1])
                continue
            out.append((int(self.ids[i]), atoms))
            free_atoms -= len(atoms)
            free_slots -= 1
        return out

    def initial_batch(self, dtype=None) -> Batch:
        """The first batch: as many systems as fit, in order (an empty batch if none do)."""
        first = self.take(self.max_atoms, self.max_systems)
        if not first:
            why = f" The first rejection: {self.rejected[0][1]}" if self.rejected else ""
            raise ValueError(
                "SizeAwareSampler: no system of the dataset fits the batch "
                f"(max_atoms={self.max_atoms}) or is valid; see the rejected list.{why}"
            )
        return Batch.from_atoms(
            [a for _, a in first],
            max_atoms=self.max_atoms,
            max_systems=self.max_systems,
            dtype=dtype,
            max_atoms_per_system=self.max_atoms_per_system,
            system_ids=[i for i, _ in first],
            info_keys=self.info_keys,
        )

    def _check(self, i: int, atoms: ase.Atoms) -> None:
        """Raise (TypeError, ValueError) for a structure the run cannot take: invalid, or
        without a valid value for a key its stages read (§14a)."""
        _validate_atoms(atoms, int(self.ids[i]))
        where = f"system {int(self.ids[i])}"
        values = read_info_values(atoms.info, self.info_keys, where, self._info_readers)
        if self._info_check is not None and values:
            self._info_check(values, where)

    @property
    def queued(self) -> tuple[int, ...]:
        """Dataset indices of the systems not yet handed out, in the order :meth:`take` will
        hand them out."""
        return tuple(self._queue)

    def preview_batches(self, dtype=None, max_atoms=None, max_systems=None, *, indices=None):
        """The queued systems packed in order into batches, without taking them (host-side).

        Each batch has the run's capacities (``max_atoms``, ``max_systems``; default the
        sampler's, or a device's share for a sharded run): the windows of the queue that the
        run's refills will bring together, with the ``atoms.info`` values the run reads, so
        they have the run's batch's shapes. Systems the run would reject are left out. Used to
        size neighbor lists for the whole dataset before the run compiles
        (:meth:`NeighborList.allocate`'s ``more_batches``). ``indices``: these dataset
        indices instead of the queue (a pipeline previews, for its later stages, the queue as
        it was when the run started: :attr:`queued`).

        Yields
        ------
        Batch
        """
        n_max = self.max_atoms if max_atoms is None else int(max_atoms)
        s_max = self.max_systems if max_systems is None else int(max_systems)
        group, free = [], n_max
        for i in self._queue if indices is None else indices:
            atoms = self.dataset[i]
            try:
                self._check(i, atoms)
            except (TypeError, ValueError):
                continue
            if group and (len(atoms) > free or len(group) == s_max):
                yield self._packed(group, dtype, n_max, s_max)
                group, free = [], n_max
            if len(atoms) <= free:
                group.append(atoms)
                free -= len(atoms)
        if group:
            yield self._packed(group, dtype, n_max, s_max)

    def _packed(self, group, dtype, n_max, s_max) -> Batch:
        return Batch.from_atoms(
            group,
            max_atoms=n_max,
            max_systems=s_max,
            dtype=dtype,
            max_atoms_per_system=self.max_atoms_per_system,
            info_keys=self.info_keys,
        )

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Cells (n, 3, 3) and pbc (n, 3) of every queued system (for static image ranges).

        The cells are the batch's (:func:`~fused_dynamics.batch.complete_cell`): a cluster's
        zero-length, non-periodic lattice vectors are filled in as the batch fills them, so
        every cell is invertible.
        """
        idx = list(self._queue)
        pbc = np.array([self.dataset[i].get_pbc() for i in idx], bool).reshape(-1, 3)
        cells = [
            complete_cell(self.dataset[i].get_cell(), p)[0] for i, p in zip(idx, pbc, strict=True)
        ]
        return np.array(cells, np.float64).reshape(-1, 3, 3), pbc
