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

from .batch import _voigt, atoms_from_arrays

__all__ = ["HostMemory", "ExtXYZSink", "ZarrSink", "atoms_from_arrays", "read_zarr"]


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


# per-system records of a ZarrSink: name -> (trailing shape, dtype)
_ZARR_SYSTEM = {
    "n_atoms": ((), "int64"),
    "atom_start": ((), "int64"),
    "cell": ((3, 3), "float64"),
    "pbc": ((3,), "bool"),
    "energy": ((), "float64"),
    "stress": ((3, 3), "float64"),
    "status": ((), "int32"),
    "exit_reason": ((), "int32"),
    "system_id": ((), "int64"),
}
_ZARR_ATOM = {
    "positions": ((3,), "float64"),
    "velocities": ((3,), "float64"),
    "forces": ((3,), "float64"),
    "masses": ((), "float64"),
    "numbers": ((), "int32"),
}


class ZarrSink:
    """Per-system records in a zarr v3 store, appended as systems leave the run.

    Layout: per-atom arrays (``positions``, ``velocities``, ``forces``, ``masses``,
    ``numbers``) concatenated over systems, and per-system arrays (``n_atoms``,
    ``atom_start``, ``cell``, ``pbc``, ``energy``, ``stress``, ``status``, ``exit_reason``,
    ``system_id``, and ``stage_steps`` of shape (n, n_sub_stages)). Each write resizes and
    writes the arrays before it returns, so a crash loses only systems still in flight.
    :func:`read_zarr` gives the systems back as ``ase.Atoms``.
    """

    def __init__(self, path: str | os.PathLike, capacity: int | None = None):
        import zarr

        self.path = os.fspath(path)
        self.capacity = capacity
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise ValueError(f"ZarrSink: cannot write to {self.path!r} (no writable folder).")
        self.root = zarr.open_group(self.path, mode="w", zarr_format=3)
        for name, (shape, dtype) in {**_ZARR_SYSTEM, **_ZARR_ATOM}.items():
            chunk = 256 if name in _ZARR_SYSTEM else 4096
            self.root.create_array(name, shape=(0, *shape), chunks=(chunk, *shape), dtype=dtype)
        self.count = 0
        self.atom_count = 0

    def has_room(self, n: int = 1) -> bool:
        return self.capacity is None or self.count + n <= self.capacity

    def _append(self, name: str, values: np.ndarray, start: int) -> None:
        arr = self.root[name]
        arr.resize((start + len(values), *arr.shape[1:]))
        arr[start : start + len(values)] = values

    def write(self, atoms_list: list[ase.Atoms]) -> None:
        if not self.has_room(len(atoms_list)):
            raise RuntimeError(f"ZarrSink {self.path!r} is full ({self.count}).")
        if not atoms_list:
            return
        sizes = np.array([len(a) for a in atoms_list])
        starts = self.atom_count + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rec = {
            "n_atoms": sizes,
            "atom_start": starts,
            "cell": np.array([np.asarray(a.get_cell()) for a in atoms_list]),
            "pbc": np.array([a.get_pbc() for a in atoms_list]),
            "energy": np.array([_result(a, "energy", np.nan) for a in atoms_list]),
            "stress": np.array([_stress33(a) for a in atoms_list]),
            "status": np.array([a.info.get("status", -1) for a in atoms_list]),
            "exit_reason": np.array([a.info.get("exit_reason", 0) for a in atoms_list]),
            "system_id": np.array([a.info.get("system_id", -1) for a in atoms_list]),
        }
        per_atom = {
            "positions": np.concatenate([a.get_positions() for a in atoms_list]),
            "velocities": np.concatenate([a.get_velocities() for a in atoms_list]),
            "forces": np.concatenate(
                [_result(a, "forces", np.full((len(a), 3), np.nan)) for a in atoms_list]
            ),
            "masses": np.concatenate([a.get_masses() for a in atoms_list]),
            "numbers": np.concatenate([a.get_atomic_numbers() for a in atoms_list]),
        }
        for name, values in per_atom.items():
            self._append(name, values, self.atom_count)
        steps = [a.info.get("stage_steps") for a in atoms_list]
        if all(s is not None for s in steps):
            steps = np.asarray(steps, np.int64)
            if "stage_steps" not in self.root:
                self.root.create_array(
                    "stage_steps",
                    shape=(0, steps.shape[1]),
                    chunks=(256, steps.shape[1]),
                    dtype="int64",
                )
            self._append("stage_steps", steps, self.count)
        # per-system records last: a reader trusts only systems whose record is complete
        for name, values in rec.items():
            self._append(name, values, self.count)
        self.count += len(atoms_list)
        self.atom_count += int(sizes.sum())

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        pass


def _result(atoms: ase.Atoms, key: str, default):
    calc = atoms.calc
    if calc is None or key not in getattr(calc, "results", {}):
        return default
    return calc.results[key]


def _stress33(atoms: ase.Atoms) -> np.ndarray:
    v = _result(atoms, "stress", None)
    if v is None:
        return np.full((3, 3), np.nan)
    xx, yy, zz, yz, xz, xy = v
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def read_zarr(path: str | os.PathLike) -> list[ase.Atoms]:
    """Read the systems written by a :class:`ZarrSink` back as ``ase.Atoms``."""
    import zarr

    root = zarr.open_group(os.fspath(path), mode="r")
    n = root["system_id"].shape[0]
    sys = {k: root[k][:n] for k in _ZARR_SYSTEM}
    atoms_arr = {k: root[k][:] for k in _ZARR_ATOM}
    steps = root["stage_steps"][:n] if "stage_steps" in root else None
    out = []
    for i in range(n):
        sel = slice(int(sys["atom_start"][i]), int(sys["atom_start"][i] + sys["n_atoms"][i]))
        a = ase.Atoms(
            numbers=atoms_arr["numbers"][sel],
            positions=atoms_arr["positions"][sel],
            masses=atoms_arr["masses"][sel],
            cell=sys["cell"][i],
            pbc=sys["pbc"][i],
        )
        a.set_velocities(atoms_arr["velocities"][sel])
        s = sys["stress"][i]
        results = {"energy": float(sys["energy"][i]), "forces": atoms_arr["forces"][sel]}
        if np.all(np.isfinite(s)):
            results["stress"] = _voigt(s)
        a.calc = SinglePointCalculator(a, **results)
        a.info.update(
            system_id=int(sys["system_id"][i]),
            status=int(sys["status"][i]),
            exit_reason=int(sys["exit_reason"][i]),
        )
        if steps is not None:
            a.info["stage_steps"] = steps[i].tolist()
        out.append(a)
    return out
