"""Extxyz output: :class:`ExtXYZSink`, and reading and repairing what it wrote.

Every record is written whole and flushed before ``write`` returns, so a crash loses only systems
not yet written, and :func:`read_extxyz_ids` ignores a frame cut short by a kill
(:func:`set_aside_tail` moves it aside). Every frame carries ``units`` and
``fused_dynamics_version``; the first frame a sink writes also carries the
``exit_reason_legend``, the ``legend`` of every code's name (JSON,
:func:`~fused_dynamics.provenance.output_legend`) and whatever ``metadata`` it was given.
Frames go in completion order, or in input order (``order="input"``, see
:mod:`fused_dynamics.outputs.order`).
"""

from __future__ import annotations

import io
import json
import os
import re

import ase
import ase.io
from ase.constraints import FixCom

from ..provenance import (
    UNITS,
    exit_reason_legend,
    name_exit_reason,
    output_legend,
    package_version,
)
from .common import _check_mode, _jsonable, check_capacity
from .order import InputOrder, check_order, pending_path

__all__ = ["ExtXYZSink", "read_extxyz_frames", "read_extxyz_ids", "set_aside_tail"]

_UNITS_TEXT = ", ".join(f"{k}: {v}" for k, v in UNITS.items())


def _extxyz_frame(atoms: ase.Atoms, extra: dict) -> ase.Atoms:
    """A copy that ASE's extxyz writer and reader round-trip: empty strings and None left out
    (ASE misreads ``key=``), dicts and ragged lists as JSON strings, and a ``FixCom``
    constraint (which ASE's extxyz drops; it keeps ``FixAtoms`` and ``FixCartesian`` as
    ``move_mask``) as ``info["fix_com"] = True``."""
    out = atoms.copy()
    out.calc = atoms.calc
    info = {}
    for key, value in {**atoms.info, **extra}.items():
        if value is None or (isinstance(value, str) and value == ""):
            continue
        if isinstance(value, dict):
            value = json.dumps(_jsonable(value))
        elif isinstance(value, (list, tuple)) and any(
            isinstance(v, (list, tuple, dict, str)) for v in value
        ):
            value = json.dumps(_jsonable(value))
        info[key] = value
    if any(isinstance(c, FixCom) for c in atoms.constraints):
        info["fix_com"] = True  # ASE's extxyz has no FixCom; Batch.from_atoms reads this key
    out.info = info
    return out


class ExtXYZSink:
    """Append systems to an extxyz file readable by ``ase.io.read(path, index=":")``.

    Parameters
    ----------
    path : str or path
    capacity : int, optional
        Most systems this sink takes, at least 1 (``None``: no limit; another value raises
        ``ValueError``).
    mode : {"x", "a", "w"}, default "x"
        ``"x"``: the file must not exist (``FileExistsError``); ``"a"``: append to it (an
        earlier run's output: a file whose first frame has no ``system_id`` is refused with
        ``ValueError``, never appended to); ``"w"``: start an empty file, replacing an
        existing *file*. A directory is always refused (``IsADirectoryError``), whatever the
        mode.
    metadata : dict of str, optional
        Keys written into the comment line of the first frame this sink writes (for example
        the run configuration as JSON).
    order : {"completion", "input"}, default "completion"
        ``"completion"``: frames in the order the systems leave the run. ``"input"``: in the
        order of ``input_ids``; a system that finishes early waits in a side file
        (``run.pending.extxyz`` next to ``run.extxyz``) until every system before it is
        written (see :mod:`fused_dynamics.outputs.order`).
    input_ids : sequence of int, optional
        Required with ``order="input"``: the ``system_id`` of every input structure in input
        order (a sampler's ``ids``).

    Notes
    -----
    Each call to :meth:`write` formats its frames first and then writes them with one
    ``write``, ``flush`` and ``fsync``: a crash loses only what was not yet written, and at
    most the last frame can be cut short (see :func:`read_extxyz_ids`). Empty strings in
    ``atoms.info`` are left out of the file (ASE cannot read ``key=`` back).

    Raises
    ------
    ValueError
        The folder does not exist or cannot be written, a bad mode or order, or
        ``order="input"`` without ``input_ids``.
    FileExistsError, IsADirectoryError
        See ``mode`` (with ``order="input"``, ``<name>.pending.<suffix>`` too).
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
        check_capacity("ExtXYZSink", capacity)
        self.capacity = capacity
        self.count = 0
        self.mode = mode
        self.order = order
        check_order("ExtXYZSink", order, input_ids)
        _check_mode("ExtXYZSink", self.path, mode)
        if os.path.isdir(self.path):
            raise IsADirectoryError(
                f"ExtXYZSink: {self.path!r} is a directory; a directory is never replaced by "
                "an output file: choose a file path."
            )
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise ValueError(f"ExtXYZSink: cannot write to {self.path!r} (no such folder).")
        # an output in input order whose first systems never came has only its side file
        only_side = order == "input" and os.path.isfile(pending_path(self.path))
        if mode == "a" and not os.path.isfile(self.path) and not only_side:
            raise ValueError(f"ExtXYZSink: mode 'a' appends to a file, and {self.path!r} is none.")
        if mode == "a" and os.path.isfile(self.path):
            _check_own_output(self.path)
        # the file is created (x) or replaced (w) by the first write: a reader never sees an
        # empty file, and an existing one is kept until there is something to put in its place
        self._open_mode = {"x": "x", "a": "a", "w": "w"}[mode]
        if mode == "a" and not os.path.isfile(self.path):
            self._open_mode = "x"
        self._order = None
        if order == "input":
            self._order = InputOrder(
                "ExtXYZSink",
                self.path,
                input_ids,
                self._file_ids() if mode == "a" else (),
                mode=mode,
                open_side=lambda side, m: ExtXYZSink(side, mode=m),
                read_side=_read_side,
            )
        self.header = {
            "exit_reason_legend": " ".join(f"{k}={v}" for k, v in exit_reason_legend().items()),
            "legend": json.dumps(output_legend()),
            **{
                k: v if isinstance(v, str) else json.dumps(_jsonable(v))
                for k, v in (metadata or {}).items()
            },
        }

    def has_room(self, n: int = 1) -> bool:
        return self.capacity is None or len(self) + n <= self.capacity

    def write(self, atoms_list: list[ase.Atoms]) -> None:
        """Write ``atoms_list`` (in input order: what is due now; the rest waits on disk)."""
        if not self.has_room(len(atoms_list)):
            raise RuntimeError(f"ExtXYZSink {self.path!r} is full ({len(self)}).")
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
        every = {"units": _UNITS_TEXT, "fused_dynamics_version": package_version()}
        frames = []
        for a in atoms_list:
            name_exit_reason(a)
            extra = dict(every)
            if self.header is not None:
                extra.update(self.header)
                self.header = None
            frames.append(_extxyz_frame(a, extra))
        buf = io.StringIO()
        ase.io.write(buf, frames, format="extxyz")
        with open(self.path, self._open_mode) as fh:
            self._open_mode = "a"
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        self.count += len(atoms_list)

    def _file_ids(self) -> list[int]:
        if not os.path.isfile(self.path):
            return []
        return [i for i in read_extxyz_ids(self.path)[0] if i is not None]

    def system_ids(self) -> list[int]:
        """``system_id`` of every complete frame in the file and, in input order, of every
        system waiting in ``<name>.pending.<suffix>`` (a resumed run skips these)."""
        ids = self._file_ids()
        if self._order is not None:
            ids += sorted(set(self._order.waiting) - set(ids))
        return ids

    def __len__(self) -> int:
        """Systems written by this sink (waiting ones included)."""
        return self.count + (len(self._order) if self._order is not None else 0)

    def close(self) -> None:
        pass


def _check_own_output(path: str) -> None:
    """Refuse to append to an extxyz file whose first frame has no ``system_id``: a file this
    package did not write (a data set, say), which appending would mix results into. Only
    the first frame's comment line is read."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        count, comment = fh.readline(), fh.readline()
    if count.strip() and not re.search(r"(^|\s)system_id=", comment):
        raise ValueError(
            f"ExtXYZSink: mode 'a' appends to an output of fused_dynamics, and the first frame "
            f"of {path!r} has no system_id (not one): appending would mix this run's results "
            "into it. Write to a new path (mode 'x')."
        )


def _frame_ends(text: str) -> tuple[list[int], int]:
    """Character offsets where each complete extxyz frame ends, and where the text is cut.

    A frame is complete when its atom-count line, its comment line and its atom lines are all
    there and end with a newline. Returns ``(ends, cut)``: ``cut`` is the end of the last
    complete frame (``len(text)`` when nothing is cut short).
    """
    ends, pos, n = [], 0, len(text)
    while pos < n:
        nl = text.find("\n", pos)
        if nl < 0:
            break
        head = text[pos:nl].strip()
        if not head:  # blank line between frames
            pos = nl + 1
            continue
        try:
            count = int(head)
        except ValueError:
            break
        end = nl
        for _ in range(count + 1):  # comment line and atom lines
            end = text.find("\n", end + 1)
            if end < 0:
                break
        if end < 0:
            break
        pos = end + 1
        ends.append(pos)
    cut = ends[-1] if ends else 0
    if text[cut:].strip() == "":
        cut = n
    return ends, cut


def read_extxyz_ids(path: str | os.PathLike) -> tuple[list[int | None], int, int]:
    """The ``system_id`` of every complete frame of an extxyz output.

    Returns
    -------
    ids : list of int or None
        One per complete frame (None where a frame has no ``system_id``).
    complete : int
        Bytes of the file up to the end of the last complete frame.
    size : int
        Bytes of the file. ``complete < size`` means the last frame was cut short (a run
        killed while writing); :func:`set_aside_tail` moves that tail aside.

    Raises
    ------
    ValueError
        A complete part that ASE cannot read as extxyz (not an output of this package).
    """
    with open(path, "rb") as fh:
        data = fh.read()
    text = data.decode("utf-8", errors="replace")
    _, cut = _frame_ends(text)
    complete = len(text[:cut].encode("utf-8", errors="replace"))
    if cut == 0:
        return [], complete, len(data)
    try:
        frames = ase.io.read(io.StringIO(text[:cut]), index=":", format="extxyz")
    except Exception as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a readable extxyz file: {exc}") from exc
    ids = [a.info.get("system_id") for a in frames]
    return [None if i is None else int(i) for i in ids], complete, len(data)


def read_extxyz_frames(path: str | os.PathLike) -> list[ase.Atoms]:
    """The complete frames of an extxyz output (a frame cut short by a kill is left out)."""
    with open(path, "rb") as fh:
        text = fh.read().decode("utf-8", errors="replace")
    _, cut = _frame_ends(text)
    if cut == 0:
        return []
    return ase.io.read(io.StringIO(text[:cut]), index=":", format="extxyz")


def _read_side(path: str) -> list[ase.Atoms]:
    """The waiting systems of an output in input order; a cut-short tail is moved aside."""
    frames = read_extxyz_frames(path)
    _, complete, size = read_extxyz_ids(path)
    if complete < size:
        set_aside_tail(path, complete)
    for a in frames:  # the side file's own header, not the system's
        a.info.pop("exit_reason_legend", None)
        a.info.pop("legend", None)
    return frames


def set_aside_tail(path: str | os.PathLike, complete: int) -> str:
    """Move the bytes after ``complete`` (a frame cut short) to a side file; return its path.

    The side file is ``<path>.incomplete-tail`` (``...-tail.1``, ... when taken); nothing is
    deleted. The output then ends with its last complete frame.
    """
    path = os.fspath(path)
    side, k = f"{path}.incomplete-tail", 0
    while os.path.lexists(side):
        k += 1
        side = f"{path}.incomplete-tail.{k}"
    with open(path, "rb+") as fh:
        fh.seek(complete)
        tail = fh.read()
        with open(side, "xb") as out:
            out.write(tail)
            out.flush()
            os.fsync(out.fileno())
        fh.truncate(complete)
        fh.flush()
        os.fsync(fh.fileno())
    return side
