"""Zarr output: :class:`ZarrSink` and :func:`read_zarr`.

A zarr v3 store of per-atom and per-system arrays appended as systems leave the run (in
completion order, or in input order: ``order="input"``, see :mod:`fused_dynamics.outputs.order`),
with the units, the ``exit_reason_legend``, the ``legend`` of every code's name and the run's
``metadata`` in its attributes; the committed
counts are updated last, so a record cut short by a kill is ignored by :func:`read_zarr` and
:func:`zarr_ids` and trimmed by a sink that appends (``mode="a"``). ``zarr`` is imported when a
store is opened.
"""

from __future__ import annotations

import json
import os

import ase
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from .. import constraints
from ..batch import _voigt
from ..provenance import (
    UNITS,
    exit_reason_legend,
    name_exit_reason,
    output_legend,
    package_version,
)
from .common import _check_mode, _jsonable, check_capacity
from .order import InputOrder, check_order, pending_path

__all__ = ["ZarrSink", "read_zarr", "zarr_ids"]


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
# info keys stored in their own arrays, not in the per-system JSON record
_ZARR_INFO_ARRAYS = ("system_id", "status", "exit_reason", "stage_steps")
_ZARR_FORMAT = "fused_dynamics.ZarrSink/2"


def _info_record(atoms: ase.Atoms) -> str:
    """Everything of an output the fixed arrays do not hold, as JSON: info and extra arrays."""
    info = {k: _jsonable(v) for k, v in atoms.info.items() if k not in _ZARR_INFO_ARRAYS}
    arrays = {
        k: {"dtype": np.asarray(v).dtype.str, "data": _jsonable(np.asarray(v))}
        for k, v in atoms.arrays.items()
        if k not in ("numbers", "positions", "momenta", "masses")
    }
    if arrays:
        info["__arrays__"] = arrays
    if atoms.constraints:  # what the system ran with, given back by read_zarr
        fixed, fix_com = constraints.from_ase(atoms, 0)
        rows = np.flatnonzero(fixed.any(axis=1))
        info["__constraints__"] = {
            "fixed": [[int(i), *map(bool, fixed[i])] for i in rows],
            "fix_com": bool(fix_com),
        }
    return json.dumps(info)


class ZarrSink:
    """Per-system records in a zarr v3 store, appended as systems leave the run.

    Layout: per-atom arrays (``positions``, ``velocities``, ``forces``, ``masses``,
    ``numbers``) concatenated over systems, and per-system arrays (``n_atoms``,
    ``atom_start``, ``cell``, ``pbc``, ``energy``, ``stress`` (NaN where not computed),
    ``status``, ``exit_reason``, ``system_id``, ``stage_steps`` of shape (n, n_sub_stages),
    and ``info_json``: the rest of ``atoms.info`` (names, ``exit_reason_name``, ``failure``,
    ``failure_step``, provenance), the input's extra per-atom arrays and the system's
    constraints (fixed components, ``FixCom``), as JSON).
    :func:`read_zarr` gives the systems back as ``ase.Atoms``.

    The store's attributes hold ``count`` and ``atom_count`` (the committed systems and atoms:
    each write updates them last, so a record cut short by a kill is not counted), ``format``,
    ``fused_dynamics_version``, ``units``, ``exit_reason_legend``, ``legend`` (the names of
    exit reasons, failure bits and statuses: :func:`~fused_dynamics.provenance.output_legend`)
    and ``metadata`` (the run configuration, when the command line wrote it). Each system's
    ``exit_reason_name``, ``status_name`` and ``failure`` names are in its ``info_json``.

    Parameters
    ----------
    path : str or path
    capacity : int, optional
        Most systems this sink takes, at least 1 (``None``: no limit; another value raises
        ``ValueError``).
    mode : {"x", "a"}, default "x"
        ``"x"``: the path must not exist; ``"a"``: append to a store this class wrote (to
        continue a run). A store is a directory and is never deleted or replaced.
    metadata : dict, optional
        JSON-serialisable description of the run, kept in the attributes.
    order : {"completion", "input"}, default "completion"
        ``"input"``: systems in the order of ``input_ids``; one that finishes early waits in
        the store ``<name>.pending.<suffix>`` until every system before it is written.
    input_ids : sequence of int, optional
        Required with ``order="input"``: the ``system_id`` of every input structure in input
        order (a sampler's ``ids``).

    Raises
    ------
    ValueError
        No writable folder, a bad mode or order, ``order="input"`` without ``input_ids``, or
        (mode "a") a path that is not a store of this class.
    FileExistsError
        Mode "x" and the path (with ``order="input"``, ``<name>.pending.<suffix>`` too) exists.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        capacity: int | None = None,
        *,
        mode: str = "x",
        metadata: dict | None = None,
        order: str = "completion",
        input_ids=None,
    ):
        self.path = os.fspath(path)
        check_capacity("ZarrSink", capacity)
        self.capacity = capacity
        self.order = order
        check_order("ZarrSink", order, input_ids)
        self._open(mode, metadata)
        self._order = None
        if order == "input":
            self._order = InputOrder(
                "ZarrSink",
                self.path,
                input_ids,
                zarr_ids(self.path) if mode == "a" else (),
                mode=mode,
                open_side=lambda side, m: ZarrSink(side, mode=m),
                read_side=read_zarr,
            )

    def _open(self, mode: str, metadata: dict | None) -> None:
        import zarr

        if mode == "w":
            raise ValueError(
                "ZarrSink: mode 'w' is not offered: a store is a directory and is never deleted; "
                "append to it (mode='a') or choose another path."
            )
        _check_mode("ZarrSink", self.path, mode)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise ValueError(f"ZarrSink: cannot write to {self.path!r} (no such folder).")
        if mode == "a" and not os.path.exists(self.path) and os.path.isdir(pending_path(self.path)):
            mode = "x"  # an output in input order whose first systems never came: a new store
        if mode == "a":
            self.root = _open_store(self.path, "r+")
            self.count = int(self.root.attrs["count"])
            # the committed rows say where the atoms end (stores written before the counts were
            # committed in one write could hold a stale atom_count)
            self.atom_count = _atoms_end(self.root, self.count)
            self._trim()
            return
        try:
            self.root = zarr.open_group(self.path, mode="w-", zarr_format=3)
        except Exception as exc:
            raise ValueError(f"ZarrSink: cannot write to {self.path!r}: {exc}") from None
        for name, (shape, dtype) in {**_ZARR_SYSTEM, **_ZARR_ATOM}.items():
            chunk = 256 if name in _ZARR_SYSTEM else 4096
            self.root.create_array(name, shape=(0, *shape), chunks=(chunk, *shape), dtype=dtype)
        self.root.create_array("info_json", shape=(0,), chunks=(256,), dtype=str)
        self.count = 0
        self.atom_count = 0
        self.root.attrs.put(
            dict(
                format=_ZARR_FORMAT,
                fused_dynamics_version=package_version(),
                units=UNITS,
                exit_reason_legend={str(k): v for k, v in exit_reason_legend().items()},
                legend=output_legend(),
                metadata=_jsonable(metadata or {}),
                count=0,
                atom_count=0,
            )
        )

    def _trim(self) -> None:
        """Drop rows past the committed counts (a write cut short by a kill)."""
        for name in self.root.array_keys():
            arr = self.root[name]
            n = self.atom_count if name in _ZARR_ATOM else self.count
            if arr.shape[0] > n:
                arr.resize((n, *arr.shape[1:]))

    def has_room(self, n: int = 1) -> bool:
        return self.capacity is None or len(self) + n <= self.capacity

    def _append(self, name: str, values: np.ndarray, start: int) -> None:
        arr = self.root[name]
        arr.resize((start + len(values), *arr.shape[1:]))
        arr[start : start + len(values)] = values

    def write(self, atoms_list: list[ase.Atoms]) -> None:
        """Write ``atoms_list`` (in input order: what is due now; the rest waits on disk)."""
        if not self.has_room(len(atoms_list)):
            raise RuntimeError(f"ZarrSink {self.path!r} is full ({len(self)}).")
        if not atoms_list:
            return
        if self._order is None:
            self._write_now(atoms_list)
        else:
            self._order.write(atoms_list, self._write_now)

    def finish(self) -> None:
        """Write the systems still waiting (input order) now, in input order, gaps and all."""
        if self._order is not None:
            self._order.finish(self._write_now)

    def _write_now(self, atoms_list: list[ase.Atoms]) -> None:
        for a in atoms_list:
            name_exit_reason(a)
        sizes = np.array([len(a) for a in atoms_list])
        starts = self.atom_count + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rec = {
            "n_atoms": sizes,
            "atom_start": starts,
            "cell": np.array([np.asarray(a.get_cell()) for a in atoms_list]).reshape(-1, 3, 3),
            "pbc": np.array([a.get_pbc() for a in atoms_list]).reshape(-1, 3),
            "energy": np.array([_result(a, "energy", np.nan) for a in atoms_list], np.float64),
            "stress": np.array([_stress33(a) for a in atoms_list]).reshape(-1, 3, 3),
            "status": np.array([a.info.get("status", -1) for a in atoms_list]),
            "exit_reason": np.array([a.info.get("exit_reason", 0) for a in atoms_list]),
            "system_id": np.array([a.info.get("system_id", -1) for a in atoms_list]),
            "info_json": np.array([_info_record(a) for a in atoms_list], dtype=object),
        }

        def per_atom(fn, width):
            parts = [np.asarray(fn(a), np.float64).reshape(len(a), *width) for a in atoms_list]
            return np.concatenate(parts)

        atoms_rec = {
            "positions": per_atom(lambda a: a.get_positions(), (3,)),
            "velocities": per_atom(lambda a: a.get_velocities(), (3,)),
            "forces": per_atom(lambda a: _result(a, "forces", np.full((len(a), 3), np.nan)), (3,)),
            "masses": per_atom(lambda a: a.get_masses(), ()),
            "numbers": np.concatenate([a.get_atomic_numbers() for a in atoms_list]),
        }
        for name, values in atoms_rec.items():
            self._append(name, values, self.atom_count)
        steps = [a.info.get("stage_steps") for a in atoms_list]
        known = [s for s in steps if s is not None]
        width = len(known[0]) if known else None
        if "stage_steps" in self.root:
            width = self.root["stage_steps"].shape[1]
        if width is not None:
            # one row per system, always (-1 where unknown: a rejected system never ran), so the
            # rows stay aligned with the systems
            rows = np.full((len(atoms_list), width), -1, np.int64)
            for k, s in enumerate(steps):
                if s is not None and len(s) == width:
                    rows[k] = np.asarray(s, np.int64)
            if "stage_steps" not in self.root:
                self.root.create_array(
                    "stage_steps",
                    shape=(self.count, width),
                    chunks=(256, width),
                    dtype="int64",
                    fill_value=-1,
                )
            self._append("stage_steps", rows, self.count)
        for name, values in rec.items():
            self._append(name, values, self.count)
        # commit last: a reader trusts only the systems counted here
        self.count += len(atoms_list)
        self.atom_count += int(sizes.sum())
        # both counts in ONE metadata write (``attrs.update`` writes once per key: a kill
        # between the two writes left a stale atom_count, and a resumed run then wrote new atoms
        # over committed ones)
        self.root.attrs.put(
            {**dict(self.root.attrs), "count": self.count, "atom_count": self.atom_count}
        )

    def system_ids(self) -> list[int]:
        """``system_id`` of every committed system of the store and, in input order, of every
        system waiting in ``<name>.pending.<suffix>`` (a resumed run skips these)."""
        ids = zarr_ids(self.path) if os.path.exists(self.path) else []
        if self._order is not None:
            ids += sorted(set(self._order.waiting) - set(ids))
        return ids

    def __len__(self) -> int:
        """Systems written by this sink (waiting ones included)."""
        return self.count + (len(self._order) if self._order is not None else 0)

    def close(self) -> None:
        pass


def _open_store(path: str, mode: str):
    """Open a store a :class:`ZarrSink` wrote; ValueError naming the path if it is not one."""
    import zarr

    try:
        root = zarr.open_group(os.fspath(path), mode=mode)
    except Exception as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a zarr store: {exc}") from None
    if "system_id" not in root:
        raise ValueError(f"{os.fspath(path)!r} is not a store written by fused_dynamics' ZarrSink")
    return root


def _committed(root) -> int:
    """Systems whose record is complete (stores of older versions: every row)."""
    if "count" in root.attrs:
        return int(root.attrs["count"])
    return root["system_id"].shape[0]


def _atoms_end(root, count: int) -> int:
    """Where the atoms of the first ``count`` (committed) systems end."""
    if count == 0:
        return 0
    return int(root["atom_start"][count - 1]) + int(root["n_atoms"][count - 1])


def zarr_ids(path: str | os.PathLike) -> list[int]:
    """The ``system_id`` of every committed system of a :class:`ZarrSink` store."""
    root = _open_store(os.fspath(path), "r")
    return [int(x) for x in root["system_id"][: _committed(root)]]


def _result(atoms: ase.Atoms, key: str, default):
    calc = atoms.calc
    if calc is None or key not in getattr(calc, "results", {}):
        return default
    return calc.results[key]


def _stress33(atoms: ase.Atoms) -> np.ndarray:
    v = _result(atoms, "stress", None)
    if v is None:
        return np.full((3, 3), np.nan)
    v = np.asarray(v, np.float64)
    if v.shape == (3, 3):
        return v
    xx, yy, zz, yz, xz, xy = v
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def read_zarr(path: str | os.PathLike) -> list[ase.Atoms]:
    """Read the systems written by a :class:`ZarrSink` back as ``ase.Atoms``.

    Only committed systems are returned (a record cut short by a kill is ignored). The stress
    is attached where it was computed (finite); ``info`` and the input's extra per-atom arrays
    come back from ``info_json``, and so do the constraints the system ran with (``FixAtoms``,
    ``FixCartesian``, ``FixCom``).
    """
    root = _open_store(os.fspath(path), "r")
    n = _committed(root)
    sys = {k: root[k][:n] for k in _ZARR_SYSTEM}
    n_atoms_total = int((sys["atom_start"] + sys["n_atoms"]).max()) if n else 0
    atoms_arr = {k: root[k][:n_atoms_total] for k in _ZARR_ATOM}
    steps = root["stage_steps"][:n] if "stage_steps" in root else None
    records = root["info_json"][:n] if "info_json" in root else [None] * n
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
        if steps is not None and steps[i][0] >= 0:
            a.info["stage_steps"] = steps[i].tolist()
        if records[i]:
            extra = json.loads(str(records[i]))
            for key, spec in extra.pop("__arrays__", {}).items():
                a.arrays[key] = np.asarray(spec["data"], dtype=np.dtype(spec["dtype"]))
            held = extra.pop("__constraints__", None)
            if held is not None:
                fixed = np.zeros((len(a), 3), bool)
                for i, *mask in held["fixed"]:
                    fixed[i] = mask
                a.set_constraint(constraints.to_ase(fixed, held["fix_com"]))
            a.info.update(extra)
        out.append(a)
    return out
