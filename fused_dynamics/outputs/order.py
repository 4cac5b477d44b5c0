"""Writing systems in input order: :class:`InputOrder`, shared by the file sinks.

A sink opened with ``order="input"`` writes its systems in the order of ``input_ids`` (the
``system_id`` of every input structure, in input order: a sampler's ``ids``), whatever order
they finish in. A system that finishes before one of the systems ahead of it waits; it is
written to the output as soon as every system ahead of it is there. So that a run killed in the
meantime loses nothing, a waiting system is first written to a side file, ``run.pending.extxyz``
next to ``run.extxyz`` (:func:`pending_path`; same format as the output, every record flushed),
and that side file is removed once every system in it is in the output. A sink that continues
the output (``mode="a"``) reads the side file back: its systems count as held (a resumed run
does not run them again) and go to the output in their turn.

Systems whose id is not in ``input_ids`` (or that the output holds already) go to the output
when they come. A system that never
comes (a sink that is only given some of the systems) holds back the ones after it: they stay
in the side file when the sink is closed, and :meth:`InputOrder.finish` writes them to the
output in input order without waiting any longer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence

import ase

__all__ = ["ORDERS", "InputOrder", "pending_path"]

#: the values of a sink's ``order`` keyword
ORDERS = ("completion", "input")


def pending_path(path: str | os.PathLike) -> str:
    """The side file of an output written in input order: ``run.pending.extxyz`` next to
    ``run.extxyz`` (``run.pending.zarr`` for a store), readable as the output is."""
    root, suffix = os.path.splitext(os.fspath(path))
    return f"{root}.pending{suffix}"


def check_order(kind: str, order: str, input_ids) -> None:
    """Refuse an unknown ``order`` and ``order="input"`` without ``input_ids``."""
    if order not in ORDERS:
        raise ValueError(f"{kind}: order must be one of {ORDERS}, got {order!r}.")
    if order == "input" and input_ids is None:
        raise ValueError(
            f"{kind}: order='input' needs input_ids, the system_id of every input structure in "
            "input order (a sampler's ids: input_ids=sampler.ids)."
        )


class InputOrder:
    """Which systems an output in input order writes now, and which wait in its side file.

    Parameters
    ----------
    kind : str
        The sink's class name, for messages.
    path : str
        The output; the side file is :func:`pending_path` of it.
    input_ids : sequence of int
        ``system_id`` of every input structure, in input order (unique).
    written : iterable of int
        Ids the output holds already (an output being continued).
    mode : {"x", "a", "w"}
        The sink's mode: ``"x"`` refuses an existing side file, ``"a"`` reads it back,
        ``"w"`` replaces a side *file* along with the output it belongs to.
    open_side : callable
        ``open_side(path, mode)``: a sink of the output's format (completion order).
    read_side : callable
        ``read_side(path)``: the complete records of a side file, as ``ase.Atoms``.

    Raises
    ------
    ValueError
        Repeated ids in ``input_ids``.
    FileExistsError
        Mode ``"x"`` and the side file exists (a run that did not finish wrote it).
    """

    def __init__(
        self,
        kind: str,
        path: str,
        input_ids: Sequence[int],
        written,
        *,
        mode: str,
        open_side: Callable,
        read_side: Callable,
    ):
        self.ids = [int(i) for i in input_ids]
        self.position = {sid: k for k, sid in enumerate(self.ids)}
        if len(self.position) != len(self.ids):
            raise ValueError(f"{kind}: input_ids repeat an id; every system_id must be unique.")
        self.side = pending_path(path)
        self._open_side = open_side
        self._side_sink = None
        self.written = {int(i) for i in written}
        self.waiting: dict[int, ase.Atoms] = {}
        self.next = 0  # position in ids of the first system the output lacks
        exists = os.path.lexists(self.side)
        if exists and mode == "x":
            raise FileExistsError(
                f"{kind}: {self.side!r} (the systems of an output in input order that wait for "
                "earlier ones) already exists: a run that did not finish wrote it; continue "
                "that output (mode='a') or choose another path."
            )
        if exists and mode == "w":
            if os.path.isdir(self.side):
                raise IsADirectoryError(
                    f"{kind}: {self.side!r} is a directory; it is never replaced."
                )
            os.remove(self.side)  # the side file of the output being replaced
        if exists and mode == "a":
            for a in read_side(self.side):
                sid = int(a.info["system_id"])
                if sid not in self.written:
                    self.waiting[sid] = a
            self._side_sink = open_side(self.side, "a")

    def held(self) -> set[int]:
        """Ids in the output or waiting in the side file (a resumed run skips them)."""
        return self.written | set(self.waiting)

    def __len__(self) -> int:
        return len(self.waiting)

    def take(self, frames: list[ase.Atoms]) -> list[ase.Atoms]:
        """Accept ``frames``; return those the output is to get now, in order.

        The frames that have to wait are written to the side file before this returns (so
        they are on disk before anything else happens); call :meth:`written_out` after
        writing the returned frames to the output.
        """

        def placed(a) -> bool:  # an input system the output does not hold yet
            sid = int(a.info["system_id"])
            return sid in self.position and sid not in self.written

        ready = [a for a in frames if not placed(a)]
        ordered = [a for a in frames if placed(a)]
        new = {int(a.info["system_id"]): a for a in ordered}
        self.waiting.update(new)
        ready_ids = self._prefix()
        later = [a for sid, a in new.items() if sid not in ready_ids]
        if later:
            if self._side_sink is None:
                self._side_sink = self._open_side(self.side, "x")
            self._side_sink.write(later)
        return ready + [self.waiting[sid] for sid in ready_ids]

    def _prefix(self) -> list[int]:
        """Ids of the waiting systems that have every system before them in the output."""
        out, k, done = [], self.next, self.written
        while k < len(self.ids) and (self.ids[k] in done or self.ids[k] in self.waiting):
            if self.ids[k] not in done:
                out.append(self.ids[k])
            k += 1
        return out

    def written_out(self, frames: list[ase.Atoms]) -> None:
        """Record that ``frames`` are in the output; remove the side file once it is empty."""
        for a in frames:
            sid = int(a.info["system_id"])
            self.written.add(sid)
            self.waiting.pop(sid, None)
        while self.next < len(self.ids) and self.ids[self.next] in self.written:
            self.next += 1
        if not self.waiting and self._side_sink is not None:
            self._side_sink.close()
            self._side_sink = None
            # every system it held is in the output now: the side file is this sink's own copy
            if os.path.isdir(self.side):
                shutil.rmtree(self.side)
            elif os.path.lexists(self.side):
                os.remove(self.side)

    def write(self, frames: list[ase.Atoms], write_now: Callable[[list], None]) -> None:
        """Write what is due of ``frames`` to the output with ``write_now``; the rest waits
        in the side file (:meth:`take`, then :meth:`written_out`)."""
        ready = self.take(list(frames))
        if ready:
            write_now(ready)
            self.written_out(ready)

    def finish(self, write_now: Callable[[list], None]) -> None:
        """Write every waiting system to the output with ``write_now`` now, in input order,
        gaps and all (a run that ended: nothing more will come)."""
        if self.waiting:
            rest = self.rest()
            write_now(rest)
            self.written_out(rest)

    def rest(self) -> list[ase.Atoms]:
        """Every waiting system, in input order (what :meth:`finish` writes)."""
        return [self.waiting[sid] for sid in sorted(self.waiting, key=self.position.get)]
