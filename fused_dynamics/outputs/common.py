"""Systems kept in memory, and the checks every file sink makes before writing.

File sinks never destroy data: ``mode="x"`` (the default) refuses a path that exists, ``mode="a"``
appends to an output written before, ``mode="w"`` replaces an existing extxyz *file*; a directory
is never deleted or replaced (:func:`_check_mode`). :func:`check_writable` probes a folder by
creating a file in it.
"""

from __future__ import annotations

import os
import tempfile

import ase
import numpy as np

from .order import check_order

__all__ = ["HostMemory", "check_capacity", "check_writable"]

_MODES = ("x", "a", "w")


def check_capacity(owner: str, capacity) -> None:
    """Refuse a sink ``capacity`` that is not ``None`` or an integer of at least 1.

    A sink that can hold no system would take a whole run's work and refuse it at the first
    system that finishes; so this is checked when the sink is made.

    Raises
    ------
    ValueError
        Naming the sink, the parameter and the value.
    """
    if capacity is None:
        return
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise ValueError(
            f"{owner}: capacity must be an integer >= 1 or None (no limit), got {capacity!r}."
        )
    if capacity < 1:
        raise ValueError(
            f"{owner}: capacity must be >= 1 (the number of systems the sink can hold) or None "
            f"(no limit), got {capacity}."
        )


class HostMemory:
    """Keep systems in a Python list, up to ``capacity`` of them.

    Parameters
    ----------
    capacity : int, optional
        At least 1; ``None`` for no limit.
    order : {"completion", "input"}, default "completion"
        ``"input"``: ``atoms`` is kept in the order of ``input_ids`` (systems whose id is not
        there after the others, as they came), whatever order the systems finish in.
    input_ids : sequence of int, optional
        Required with ``order="input"``: the ``system_id`` of every input structure in input
        order (a sampler's ``ids``).
    """

    def __init__(self, capacity: int | None = None, *, order: str = "completion", input_ids=None):
        check_order("HostMemory", order, input_ids)
        check_capacity("HostMemory", capacity)
        self.capacity = capacity
        self.order = order
        self._position = None
        if order == "input":
            self._position = {int(sid): k for k, sid in enumerate(input_ids)}
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
        if self._position is not None:  # a stable sort: foreign ids keep their arrival order
            last = len(self._position)
            self.atoms.sort(key=lambda a: self._position.get(int(a.info["system_id"]), last))

    def system_ids(self) -> list[int]:
        """``system_id`` of every system held (a resumed run skips these)."""
        return [int(a.info["system_id"]) for a in self.atoms if "system_id" in a.info]

    def __len__(self) -> int:
        return len(self.atoms)

    def close(self) -> None:
        pass


# ============================================================================ safety checks
def check_writable(path: str | os.PathLike) -> None:
    """Check that a file can be created next to ``path``, by creating and removing one.

    The folder is created if it is missing. ``os.access`` is not used: it says yes to root
    for read-only file systems and ``/proc``.

    Raises
    ------
    PermissionError
        The folder cannot be created or written; the message names it and the cause.
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fused_dynamics-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)  # our own empty probe file, never user data
    except OSError as exc:
        raise PermissionError(
            f"cannot write in {folder!r}: {exc.strerror or exc} (probed by creating a file)"
        ) from None


def _check_mode(kind: str, path: str, mode: str) -> None:
    """Refuse what would destroy data: an existing path in mode 'x', any directory in 'w'."""
    if mode not in _MODES:
        raise ValueError(f"{kind}: mode must be one of {_MODES}, got {mode!r}.")
    if mode == "x" and os.path.lexists(path):
        raise FileExistsError(
            f"{kind}: {path!r} already exists; it is never overwritten silently: append to it "
            "(mode='a'), replace a file explicitly (mode='w'), or choose another path."
        )


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
