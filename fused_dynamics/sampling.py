"""Samplers: a queue of pending systems that packs them into a fixed-capacity batch."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence

import ase
import ase.io
import numpy as np

from .batch import Batch, _validate_atoms

__all__ = ["SizeAwareSampler"]

log = logging.getLogger("fused_dynamics")


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

    Notes
    -----
    A system that can never fit (more atoms than ``max_atoms`` or ``max_atoms_per_system``) or
    that is invalid (non-finite positions, bad masses, singular periodic cell) is *rejected*:
    it is logged with its index and size and listed in :attr:`rejected`; the run writes it to
    the sinks with ``exit_reason == ExitReason.REJECTED``. It is never silently skipped.
    """

    def __init__(
        self,
        dataset,
        max_atoms: int,
        max_systems: int,
        max_atoms_per_system: int | None = None,
        sort_by_size: bool = False,
    ):
        self.dataset = _load(dataset)
        self.max_atoms = int(max_atoms)
        self.max_systems = int(max_systems)
        n = len(self.dataset)
        if n == 0:
            raise ValueError("SizeAwareSampler: the dataset is empty.")
        if self.max_atoms < 1 or self.max_systems < 1:
            raise ValueError("SizeAwareSampler: max_atoms and max_systems must be >= 1.")
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
                    f"system {i} has {sizes[i]} atoms; the batch holds at most "
                    f"{min(self.max_atoms, self.max_atoms_per_system)} per system",
                )
            else:
                self._queue.append(i)
        self._pending_rejects = list(self.rejected)

    def _reject(self, i: int, why: str) -> None:
        log.warning("SizeAwareSampler: rejected %s.", why)
        self.rejected.append((i, why))

    def __len__(self) -> int:
        """Number of systems not yet handed out."""
        return len(self._queue)

    @property
    def exhausted(self) -> bool:
        return not self._queue

    def take_rejected(self) -> list[tuple[int, ase.Atoms | None, str]]:
        """Rejected systems not yet reported: ``(index, atoms, reason)``, each returned once."""
        out = []
        for i, why in self._pending_rejects:
            try:
                atoms = self.dataset[i]
            except Exception:  # an unreadable entry is still reported
                atoms = None
            out.append((i, atoms, why))
        self._pending_rejects = []
        return out

    def take(self, free_atoms: int, free_slots: int) -> list[tuple[int, ase.Atoms]]:
        """Pop the next systems, in order, while they fit ``free_atoms`` and ``free_slots``.

        A system that fails validation is rejected and skipped over (reported, not lost).
        """
        out = []
        while self._queue and free_slots > 0:
            i = self._queue[0]
            if self.sizes[i] > free_atoms:
                break
            self._queue.popleft()
            atoms = self.dataset[i]
            try:
                _validate_atoms(atoms, i)
            except (TypeError, ValueError) as exc:
                self._reject(i, str(exc))
                self._pending_rejects.append(self.rejected[-1])
                continue
            out.append((i, atoms))
            free_atoms -= len(atoms)
            free_slots -= 1
        return out

    def initial_batch(self, dtype=None) -> Batch:
        """The first batch: as many systems as fit, in order (an empty batch if none do)."""
        first = self.take(self.max_atoms, self.max_systems)
        if not first:
            raise ValueError(
                "SizeAwareSampler: no system of the dataset fits the batch "
                f"(max_atoms={self.max_atoms}); see the rejected list."
            )
        return Batch.from_atoms(
            [a for _, a in first],
            max_atoms=self.max_atoms,
            max_systems=self.max_systems,
            dtype=dtype,
            max_atoms_per_system=self.max_atoms_per_system,
            system_ids=[i for i, _ in first],
        )

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Cells (n, 3, 3) and pbc (n, 3) of every queued system (for static image ranges)."""
        idx = list(self._queue)
        cells = np.array([np.asarray(self.dataset[i].get_cell()) for i in idx]).reshape(-1, 3, 3)
        pbc = np.array([self.dataset[i].get_pbc() for i in idx]).reshape(-1, 3)
        return cells, pbc
