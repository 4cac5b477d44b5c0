"""The outputs of a run: checked and planned before anything compiles, opened, written as copies.

:func:`plan_outputs` checks every path a run writes (``outputs[i].path``, ``stages[i].write``,
``report.plot``, ``report.record`` and the checkpoint ``<outputs[0].path>.ckpt``) and says what
happens to each (:class:`OutputPlan`): written new, overwritten (``--overwrite``, a file only),
resumed (``--resume``: continued from the checkpoint when there is one, else the systems an
output holds, by ``system_id``, are skipped) or kept (a report file on resume).
:func:`open_sink` opens the sink of one planned output; :class:`TeeSink` writes every system to
each output, never cut by Ctrl-C or SIGTERM, and tells a resumed run which systems every output
holds already (:meth:`TeeSink.system_ids`).

An output in input order (``OutputPlan.order == "input"``, from ``outputs[i].order`` when the
configuration has that key) keeps the systems that finished early in ``<name>.pending.<suffix>``
(:mod:`fused_dynamics.outputs.order`): the plan treats that side file as part of the output
(refused, overwritten or resumed with it) and counts its systems as held.

Every path a run writes (outputs, side files, stage outputs, report files, the checkpoint)
is its own and never an input structure file: two that are one file (the same resolved path,
or a hard link of it) or one that is an input are refused before anything else, even with
``--overwrite`` or ``--resume``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import ase.io

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig, output_format
from .interrupts import INTERRUPTS
from .outputs.order import pending_path
from .sinks import (
    ExtXYZSink,
    ZarrSink,
    check_writable,
    read_extxyz_ids,
    set_aside_tail,
    zarr_ids,
)

__all__ = ["OutputPlan", "TeeSink", "checkpoint_path", "open_sink", "plan_outputs"]

# the keys of a configuration a checkpoint must be continued with (the rest, such as the
# report, refill_frequency or checkpoint_every, may change between a run and its resumption)
_CHECKPOINT = "the checkpoint (outputs[0].path + '.ckpt')"
_RUN_KEYS = ("structures", "model", "stages", "capacity", "seed", "dtype", "initial_temperature")


class TeeSink:
    """Write every system to each of ``sinks`` (a run's outputs are copies, not overflow).

    ``written[k]`` is the set of ids sink ``k`` holds already (a resumed output): a system is
    written only to the sinks that lack it. ``on_written(atoms_list)`` is called after each
    write (the run's record). A write is never cut by Ctrl-C or SIGTERM (see
    :class:`~fused_dynamics.interrupts.Interrupts`).
    """

    def __init__(self, sinks, written=None, on_written=None):
        self.sinks = list(sinks)
        self.written = [set(w) for w in written] if written else [set() for _ in self.sinks]
        self.on_written = on_written

    def has_room(self, n: int = 1) -> bool:
        return all(s.has_room(n) for s in self.sinks)

    def write(self, atoms_list) -> None:
        with INTERRUPTS.deferred():
            for sink, done in zip(self.sinks, self.written, strict=True):
                new = [a for a in atoms_list if a.info.get("system_id") not in done]
                if new:
                    sink.write(new)
                    done.update(a.info.get("system_id") for a in new)
            if self.on_written is not None:
                self.on_written(atoms_list)

    def system_ids(self) -> set[int]:
        """Ids of the systems *every* output holds (what a resumed run need not write again).

        A system that only some outputs hold is left out: the run writes it again and it goes
        to the outputs that lack it. Each output's ids are those read when it was planned, those
        written since and, when the sink can tell (``system_ids()``), what it reports.
        """
        held = None
        for sink, done in zip(self.sinks, self.written, strict=True):
            more = getattr(sink, "system_ids", None)
            if more is not None:
                done.update(int(i) for i in more())
            held = set(done) if held is None else held & done
        return held or set()

    def __len__(self) -> int:
        """Systems every output holds (those held before a resumed run included)."""
        return len(set.intersection(*self.written)) if self.written else 0

    def finish(self) -> None:
        """Write what outputs in input order still hold back (a run that ended), in order."""
        with INTERRUPTS.deferred():
            for s in self.sinks:
                if hasattr(s, "finish"):
                    s.finish()

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def checkpoint_path(cfg: RunConfig, base_dir: str | os.PathLike = ".") -> Path:
    """Where a run's checkpoint goes: a file next to the first output, ``<path>.ckpt``."""
    first = _output_path(cfg.outputs[0].path, Path(base_dir))
    return first.with_name(first.name + ".ckpt")


def _output_path(path: str, base_dir: Path) -> Path:
    return (base_dir / os.path.expanduser(path)).resolve()


@dataclass
class OutputPlan:
    """One path a run writes, and what the run will do with it.

    Attributes
    ----------
    key : str
        The configuration key that names it (``outputs[0].path``, ``stages[0].write``,
        ``report.plot``, ``checkpoint_every`` for the checkpoint).
    path : Path
    kind : str
        ``"extxyz"``, ``"zarr"``, ``"plot"``, ``"record"`` or ``"checkpoint"``.
    action : str
        ``"new"`` (does not exist), ``"overwrite"`` (an existing file, replaced), ``"resume"``
        (append to it; a checkpoint: continue the run from it) or ``"keep"`` (an existing
        report file left alone on resume).
    written : set of int
        Ids of the systems it holds (resume).
    complete, size : int
        extxyz resume: bytes up to the last complete frame, and of the file.
    capacity : int or None
    stage : int or None
        For ``stages[i].write``: i.
    header : dict or None
        A checkpoint being resumed: its header (``step_count``, ...).
    order : {"completion", "input"}
        The order systems are written in (``outputs[i].order``); ``"input"`` keeps the
        systems that finished early in ``<name>.pending.<suffix>``.
    """

    key: str
    path: Path
    kind: str
    action: str = "new"
    written: set = field(default_factory=set)
    complete: int = 0
    size: int = 0
    capacity: int | None = None
    stage: int | None = None
    header: dict | None = None
    order: str = "completion"

    def exists(self) -> bool:
        """The output is there: its path, or (input order) its side file of waiting systems."""
        if self.path.exists() or self.path.is_symlink():
            return True
        return self.order == "input" and os.path.lexists(pending_path(self.path))


def _existing_ids(p: OutputPlan) -> None:
    """Fill ``p.written`` (and the extxyz byte counts) from an existing output."""
    where = f"{p.key}: cannot resume {os.fspath(p.path)!r}"
    side = pending_path(p.path)
    try:
        ids = []
        if p.path.exists() and p.kind == "zarr":
            ids = zarr_ids(p.path)
        elif p.path.exists():
            ids, p.complete, p.size = read_extxyz_ids(p.path)
        if p.order == "input" and os.path.exists(side):  # systems waiting for earlier ones
            ids = ids + (zarr_ids(side) if p.kind == "zarr" else read_extxyz_ids(side)[0])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    missing = [k for k, i in enumerate(ids) if i is None]
    if missing:
        raise ConfigError(
            f"{where}: frame {missing[0]} has no system_id (not an output of fused-dynamics); "
            "choose another path"
        )
    p.written = set(ids)


def _plan_one(p: OutputPlan, overwrite: bool, resume: bool) -> None:
    path, key = p.path, p.key
    where = f"{key}: {os.fspath(path)!r}"
    directory_kind = p.kind == "zarr"
    if path.is_dir() and not directory_kind:
        raise ConfigError(
            f"{where} is an existing directory; a directory is never deleted or replaced by an "
            "output, even with --overwrite: give a file path"
        )
    if p.exists():
        if directory_kind and path.exists() and not path.is_dir():
            raise ConfigError(f"{where} exists and is not a zarr store (a directory)")
        if p.kind in ("plot", "record"):
            if resume:
                p.action = "keep"
            elif overwrite:
                p.action = "overwrite"
            else:
                raise ConfigError(
                    f"{where} exists; give --overwrite to replace it, or choose another path"
                )
        elif resume:
            p.action = "resume"
            _existing_ids(p)
        elif overwrite and not directory_kind:
            p.action = "overwrite"
        elif overwrite:
            raise ConfigError(
                f"{where} exists and is a zarr store, a directory: it is never deleted, even "
                "with --overwrite; give --resume to continue it, or choose another path"
            )
        else:
            raise ConfigError(
                f"{where} exists (an earlier run?); give --resume to skip the systems it holds "
                "and append the rest, or --overwrite to replace it"
                + (" (a zarr store cannot be overwritten)" if directory_kind else "")
                + ", or choose another path"
            )
    try:
        check_writable(path)
    except PermissionError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def plan_outputs(
    cfg: RunConfig,
    base_dir: str | os.PathLike = ".",
    *,
    overwrite: bool = False,
    resume: bool = False,
    inputs=(),
) -> list[OutputPlan]:
    """Check every path the run writes before anything compiles, and say what happens to it.

    Outputs (``outputs[i].path``), stage outputs (``stages[i].write``) and report files
    (``report.plot``, ``report.record``) are checked: none an existing directory (unless a
    zarr store being resumed), an existing path only with ``overwrite`` or ``resume``, and
    every folder writable (a probe file is created and removed; folders are created).

    First, whatever ``overwrite`` or ``resume`` say, every path the run writes (those, the
    side file of waiting systems of an output in input order, ``<name>.pending.<suffix>``,
    and the checkpoint) must be its own: no two the same file, none an input file of
    ``inputs``, none inside a zarr store the run writes. Paths are compared resolved
    (symbolic links followed, ``..`` removed) and, where both exist, as files (a hard link
    is the same file, as :func:`os.path.samefile` says).

    Raises
    ------
    ConfigError
        Naming the key, the path and what to do.
    """
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other; give one of them")
    base_dir = Path(base_dir)
    plans = [
        OutputPlan(
            f"outputs[{i}].path",
            _output_path(o.path, base_dir),
            o.type,
            capacity=o.capacity,
            order=getattr(o, "order", "completion"),
        )
        for i, o in enumerate(cfg.outputs)
    ]
    for i, st in enumerate(cfg.stages):
        if st.write is not None:
            path = _output_path(st.write, base_dir)
            plans.append(OutputPlan(f"stages[{i}].write", path, output_format(st.write), stage=i))
    for kind in ("plot", "record"):
        value = getattr(cfg.report, kind)
        if value:
            plans.append(OutputPlan(f"report.{kind}", _output_path(value, base_dir), kind))
    ck = OutputPlan("checkpoint_every", checkpoint_path(cfg, base_dir), "checkpoint")
    # every path the run writes is its own, and none is an input, whatever the flags say
    _check_distinct(_written_paths(plans, ck), inputs)
    # a checkpoint that exists first: a run that did not finish is what the user must know
    _plan_checkpoint(ck, overwrite, resume)
    for p in plans:
        _plan_one(p, overwrite, resume)
    if ck.action == "resume":
        _check_checkpoint_fits(ck, cfg, [p for p in plans if p.key.startswith("outputs")])
    plans.append(ck)
    return plans


@dataclass(frozen=True)
class _Written:
    """One path a run writes: who names it (for messages), where it is, which file it is."""

    what: str
    path: Path  # resolved (symbolic links followed)
    identity: tuple[int, int] | None  # (device, inode) of what is there now, else None
    store: bool  # a zarr store: a folder the run writes into


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file or folder at ``path`` (links followed); None if none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _written(what: str, path: str | os.PathLike, store: bool = False) -> _Written:
    path = Path(path).resolve()
    return _Written(what, path, _identity(path), store)


def _written_paths(plans: list[OutputPlan], ck: OutputPlan) -> list[_Written]:
    """Every path the run writes: the checkpoint, each planned path and, for an output in
    input order, its side file of waiting systems (:func:`pending_path`)."""
    out = [_written(_CHECKPOINT, ck.path)]
    for p in plans:
        out.append(_written(p.key, p.path, p.kind == "zarr"))
        if p.order == "input":
            side = (
                f"the side file of {p.key} (where systems that finished early wait for the "
                "ones before them, order = 'input')"
            )
            out.append(_written(side, pending_path(p.path), p.kind == "zarr"))
    return out


def _same(a: _Written, path: Path, identity: tuple[int, int] | None) -> bool:
    """One file: the same resolved path, or (both there) the same inode: a hard link, or
    another name of the same file (``os.path.samefile``)."""
    return a.path == path or (a.identity is not None and a.identity == identity)


def _check_distinct(written: list[_Written], inputs) -> None:
    """Refuse two paths the run writes that are one file, one that is an input structure file
    and one inside a zarr store the run writes: a configuration error naming both, whatever
    ``--overwrite`` or ``--resume`` say (an input is never an output)."""
    files = [(os.fspath(f), Path(f).resolve(), _identity(f)) for f in inputs]
    for k, w in enumerate(written):
        for other in written[:k]:
            if _same(other, w.path, w.identity):
                both = (
                    f"{w.what} and {other.what} are the same path {os.fspath(w.path)!r}"
                    if w.path == other.path
                    else f"{w.what} ({os.fspath(w.path)!r}) and {other.what} "
                    f"({os.fspath(other.path)!r}) are the same file (a hard link)"
                )
                raise ConfigError(
                    f"{both}; their writes would clobber each other: choose another path"
                )
        for name, path, identity in files:
            if _same(w, path, identity):
                same = "" if w.path == path else f" ({name!r}, the same file by a hard link)"
                raise ConfigError(
                    f"{w.what}: {os.fspath(w.path)!r} is an input structure file{same}; an "
                    "output never replaces an input, even with --overwrite or --resume: "
                    "choose another path"
                )
    for store in (w for w in written if w.store):
        for w in written:
            if w is not store and w.path != store.path and w.path.is_relative_to(store.path):
                raise ConfigError(
                    f"{w.what}: {os.fspath(w.path)!r} is inside {store.what} "
                    f"{os.fspath(store.path)!r}, a zarr store (a folder the run writes): "
                    "choose a path outside it"
                )
        for name, path, _ in files:
            if path.is_relative_to(store.path):
                raise ConfigError(
                    f"{store.what}: {os.fspath(store.path)!r} is a zarr store the run writes, "
                    f"and the input structure file {name!r} is inside it; an output never "
                    "holds an input: choose another path"
                )


def _plan_checkpoint(p: OutputPlan, overwrite: bool, resume: bool) -> None:
    """A checkpoint that exists: continued on ``resume``, deleted by the run on
    ``overwrite``, else an error (it belongs to a run that did not finish)."""
    where = f"checkpoint: {os.fspath(p.path)!r}"
    if p.path.is_dir():
        raise ConfigError(
            f"{where} (outputs[0].path + '.ckpt', where the run's checkpoint goes) is a "
            "directory; move it away or choose another outputs[0].path"
        )
    if not (p.path.exists() or p.path.is_symlink()):
        return
    if resume:
        try:
            header = ckpt.read_header(p.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{where} cannot be continued: {exc}; move it away to resume by system_id "
                "(the systems the outputs hold are skipped, the rest run from their start)"
            ) from None
        if not header.get("inflight"):
            raise ConfigError(
                f"{where} is the checkpoint of a run without a sampler, not of a run of this "
                "command; move it away to resume by system_id"
            )
        p.action, p.header = "resume", header
    elif overwrite:
        p.action = "overwrite"
    else:
        raise ConfigError(
            f"{where} exists: the checkpoint of an earlier run that did not finish; give "
            "--resume to continue that run from it, or --overwrite to start over (the "
            "checkpoint is deleted), or choose another outputs[0].path"
        )


def _check_checkpoint_fits(p: OutputPlan, cfg: RunConfig, outputs: list[OutputPlan]) -> None:
    """A checkpoint continues only the run that wrote it, into the outputs it wrote to."""
    where = f"--resume: the checkpoint {os.fspath(p.path)!r} (step {p.header.get('step_count')})"
    away = "; move the checkpoint away to resume by system_id instead"
    layout = p.header.get("layout", {})
    for key, value, saved in (
        ("capacity.max_atoms", cfg.capacity.max_atoms, layout.get("max_atoms")),
        ("capacity.max_systems", cfg.capacity.max_systems, layout.get("max_systems")),
        ("dtype", cfg.dtype, layout.get("dtype")),
    ):
        if saved is not None and saved != value:
            raise ConfigError(
                f"{key}: {value!r}, but {where} was written with {saved!r}; restore it{away}"
            )
    recorded = _recorded_config(outputs)
    if recorded is not None:
        now = cfg.model_dump(mode="json")
        changed = [k for k in _RUN_KEYS if k in recorded and recorded[k] != now.get(k)]
        if changed:
            raise ConfigError(
                f"{', '.join(changed)}: the configuration differs from the one that wrote the "
                f"outputs and {where}; restore it to continue that run{away}"
            )
    counts = p.header.get("sink_counts") or [None]
    for o in outputs:
        if counts[0] is not None and len(o.written) < counts[0]:
            raise ConfigError(
                f"{o.key}: {os.fspath(o.path)!r} holds {len(o.written)} systems, but every "
                f"output held {counts[0]} when {where} was written: the output was replaced or "
                f"cut, and continuing would lose systems{away}"
            )


def _recorded_config(outputs: list[OutputPlan]) -> dict | None:
    """The run configuration an existing output recorded (the first one that has it)."""
    for o in outputs:
        if not o.written:
            continue
        try:
            if o.kind == "zarr":
                import zarr

                text = zarr.open_group(os.fspath(o.path), mode="r").attrs["metadata"]["run_config"]
            else:
                text = ase.io.read(o.path, index=0, format="extxyz").info["run_config"]
            return json.loads(text) if isinstance(text, str) else dict(text)
        except Exception:  # an output of another version, or without the record: no check
            continue
    return None


def _metadata(cfg: RunConfig) -> dict:
    """What every output records about the run: the configuration and the command line."""
    return {
        "run_config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        "command_line": " ".join(sys.argv),
    }


def open_sink(p: OutputPlan, cfg: RunConfig, echo, *, input_ids=None):
    """The sink of one planned output (an incomplete extxyz tail is moved aside first).

    ``input_ids`` (the sampler's ``ids``) is what an output in input order (``p.order``)
    orders its systems by; it is required then (ConfigError naming the key otherwise).
    """
    if p.action == "resume" and p.kind == "extxyz" and p.complete < p.size:
        side = set_aside_tail(p.path, p.complete)
        echo(
            f"{p.key}: the last frame of {os.fspath(p.path)!r} was cut short (a killed run); "
            f"its {p.size - p.complete} bytes were moved to {side!r}"
        )
    mode = {"new": "x", "overwrite": "w", "resume": "a"}[p.action]
    cls = ExtXYZSink if p.kind == "extxyz" else ZarrSink
    order = {} if p.order == "completion" else {"order": p.order, "input_ids": input_ids}
    try:
        return cls(p.path, capacity=p.capacity, mode=mode, metadata=_metadata(cfg), **order)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p.key}: cannot write {os.fspath(p.path)!r}: {exc}") from exc
