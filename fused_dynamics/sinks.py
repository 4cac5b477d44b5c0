"""Where systems go when they leave a run: in memory or to an extxyz file.

A sink has ``write(atoms_list)``, ``has_room(n)`` and ``close()``. Each written ``ase.Atoms``
carries energy, forces and stress in a ``SinglePointCalculator``, velocities, and in
``atoms.info``: ``system_id``, ``status``, ``exit_reason`` and ``stage_steps`` where known.
"""

from __future__ import annotations

import os

import ase
import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

__all__ = ["HostMemory", "ExtXYZSink", "atoms_from_arrays"]


def atoms_from_arrays(arrays: dict[str, np.ndarray], slots) -> list[ase.Atoms]:
    """Build ``ase.Atoms`` for the given slots from host copies of batch fields.

    ``arrays`` holds at least ``positions``, ``atomic_numbers``, ``masses``, ``system_idx``,
    ``cell`` and ``pbc``; ``velocities``, ``energy``, ``forces``, ``stress``, ``system_id``,
    ``status``, ``exit_reason`` and ``stage_steps`` are carried over when present.
    """
    system_idx = np.asarray(arrays["system_idx"])
    out = []
    for slot in slots:
        sel = np.flatnonzero(system_idx == slot)
        atoms = ase.Atoms(
            numbers=np.asarray(arrays["atomic_numbers"])[sel],
            positions=np.asarray(arrays["positions"], np.float64)[sel],
            masses=np.asarray(arrays["masses"], np.float64)[sel],
            cell=np.asarray(arrays["cell"], np.float64)[slot],
            pbc=np.asarray(arrays["pbc"])[slot],
        )
        if "velocities" in arrays:
            atoms.set_velocities(np.asarray(arrays["velocities"], np.float64)[sel])
        results = {}
        if "energy" in arrays:
            results["energy"] = float(arrays["energy"][slot])
        if "forces" in arrays:
            results["forces"] = np.asarray(arrays["forces"], np.float64)[sel]
        if "stress" in arrays:
            s = np.asarray(arrays["stress"], np.float64)[slot]
            results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        for key in ("system_id", "status", "exit_reason"):
            if key in arrays:
                atoms.info[key] = int(np.asarray(arrays[key])[slot])
        if "stage_steps" in arrays:
            atoms.info["stage_steps"] = np.asarray(arrays["stage_steps"])[slot].tolist()
        out.append(atoms)
    return out


class HostMemory:
    """Keep systems in a Python list, up to ``capacity`` of them.

    Parameters
    ----------
    capacity : int, optional
        ``None`` for no limit.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.atoms: list[ase.Atoms] = []

    def has_room(self, n: int = 1) -> bool:
        return self.capacity is None or len(self.atoms) + n <= self.capacity

    def write(self, atoms_list: list[ase.Atoms]) -> None:
        if not self.has_room(len(atoms_list)):
            raise RuntimeError(
                f"HostMemory is full ({len(self.atoms)} of {self.capacity}); "
                f"{len(atoms_list)} more cannot be stored."
            )
        self.atoms.extend(atoms_list)

    def __len__(self) -> int:
        return len(self.atoms)

    def close(self) -> None:
        pass


class ExtXYZSink:
    """Append systems to an extxyz file readable by ``ase.io.read(path, index=":")``.

    Each write is flushed to disk before it returns, so a crash loses only what was not yet
    written.
    """

    def __init__(self, path: str | os.PathLike, capacity: int | None = None):
        self.path = os.fspath(path)
        self.capacity = capacity
        self.count = 0
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise ValueError(f"ExtXYZSink: cannot write to {self.path!r} (no writable folder).")

    def has_room(self, n: int = 1) -> bool:
        return self.capacity is None or self.count + n <= self.capacity

    def write(self, atoms_list: list[ase.Atoms]) -> None:
        if not self.has_room(len(atoms_list)):
            raise RuntimeError(f"ExtXYZSink {self.path!r} is full ({self.count}).")
        with open(self.path, "a") as fh:
            ase.io.write(fh, atoms_list, format="extxyz")
            fh.flush()
            os.fsync(fh.fileno())
        self.count += len(atoms_list)

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        pass
