"""The outputs of a run: checked and planned before anything compiles, opened, written as copies.

:func:`plan_outputs` checks every path a run writes (``outputs[i].path``, ``stages[i].write``,
``report.plot``, ``report.record``) and says what happens to each (:class:`OutputPlan`):
written new, overwritten (``--overwrite``, a file only), resumed (``--resume``: the systems it
holds, by ``system_id``, are skipped) or kept (a report file on resume). :func:`open_sink`
opens the sink of one planned output; :class:`TeeSink` writes every system to each output,
never cut by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, RunConfig, output_format
from .interrupts import INTERRUPTS
from .sinks import (
    ExtXYZSink,
    ZarrSink,
    check_writable,
    read_extxyz_ids,
    set_aside_tail,
    zarr_ids,
)

__all__ = ["OutputPlan", "TeeSink", "open_sink", "plan_outputs"]


class TeeSink:
    """Write every system to each of ``sinks`` (a run's outputs are copies, not overflow).

    ``written[k]`` is the set of ids sink ``k`` holds already (a resumed output): a system is
    written only to the sinks that lack it. A write is never cut by Ctrl-C or SIGTERM (see
    :class:`~fused_dynamics.interrupts.Interrupts`).
    """

    def __init__(self, sinks, written=None):
        self.sinks = list(sinks)
        self.written = [set(w) for w in written] if written else [set() for _ in self.sinks]

    def has_room(self, n: int = 1) -> bool:
        return all(s.has_room(n) for s in self.sinks)

    def write(self, atoms_list) -> None:
        with INTERRUPTS.deferred():
            for sink, done in zip(self.sinks, self.written, strict=True):
                new = [a for a in atoms_list if a.info.get("system_id") not in done]
                if new:
                    sink.write(new)
                    done.update(a.info.get("system_id") for a in new)

    def __len__(self) -> int:
        return min(len(s) for s in self.sinks)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def _output_path(path: str, base_dir: Path) -> Path:
    return (base_dir / os.path.expanduser(path)).resolve()


@dataclass
class OutputPlan:
    """One path a run writes, and what the run will do with it.

    Attributes
    ----------
    key : str
        The configuration key that names it (``outputs[0].path``, ``stages[0].write``,
        ``report.plot``).
    path : Path
    kind : str
        ``"extxyz"``, ``"zarr"``, ``"plot"`` or ``"record"``.
    action : str
        ``"new"`` (does not exist), ``"overwrite"`` (an existing file, replaced), ``"resume"``
        (append to it) or ``"keep"`` (an existing report file left alone on resume).
    written : set of int
        Ids of the systems it holds (resume).
    complete, size : int
        extxyz resume: bytes up to the last complete frame, and of the file.
    capacity : int or None
    stage : int or None
        For ``stages[i].write``: i.
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


def _existing_ids(p: OutputPlan) -> None:
    """Fill ``p.written`` (and the extxyz byte counts) from an existing output."""
    where = f"{p.key}: cannot resume {os.fspath(p.path)!r}"
    try:
        if p.kind == "zarr":
            ids = zarr_ids(p.path)
        else:
            ids, p.complete, p.size = read_extxyz_ids(p.path)
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
    if path.exists() or path.is_symlink():
        if directory_kind and not path.is_dir():
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
    (``report.plot``, ``report.record``) are checked: no two the same, none an input file,
    none an existing directory (unless a zarr store being resumed), an existing path only with
    ``overwrite`` or ``resume``, and every folder writable (a probe file is created and
    removed; folders are created).

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
            f"outputs[{i}].path", _output_path(o.path, base_dir), o.type, capacity=o.capacity
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
    seen: dict[Path, str] = {}
    inputs = {Path(f).resolve(): None for f in inputs}
    for p in plans:
        if p.path in seen:
            raise ConfigError(f"{p.key} and {seen[p.path]} are the same path {os.fspath(p.path)!r}")
        if p.path in inputs:
            raise ConfigError(
                f"{p.key}: {os.fspath(p.path)!r} is an input structure file; an output never "
                "replaces an input: choose another path"
            )
        seen[p.path] = p.key
        _plan_one(p, overwrite, resume)
    return plans


def _metadata(cfg: RunConfig) -> dict:
    """What every output records about the run: the configuration and the command line."""
    return {
        "run_config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        "command_line": " ".join(sys.argv),
    }


def open_sink(p: OutputPlan, cfg: RunConfig, echo):
    """The sink of one planned output (an incomplete extxyz tail is moved aside first)."""
    if p.action == "resume" and p.kind == "extxyz" and p.complete < p.size:
        side = set_aside_tail(p.path, p.complete)
        echo(
            f"{p.key}: the last frame of {os.fspath(p.path)!r} was cut short (a killed run); "
            f"its {p.size - p.complete} bytes were moved to {side!r}"
        )
    mode = {"new": "x", "overwrite": "w", "resume": "a"}[p.action]
    cls = ExtXYZSink if p.kind == "extxyz" else ZarrSink
    try:
        return cls(p.path, capacity=p.capacity, mode=mode, metadata=_metadata(cfg))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p.key}: cannot write {os.fspath(p.path)!r}: {exc}") from exc
