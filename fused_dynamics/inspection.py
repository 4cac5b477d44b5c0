"""What an output holds (``fused-dynamics inspect``): its systems one by one, and statistics.

:func:`read_output` reads an extxyz file or a zarr store a run wrote and refuses anything else
(an input structure file, a CIF, a store of another program) with :class:`NotAnOutputError`.
:func:`system_rows` gives one row per system: ``system_id``, its source (file and frame), the
exit reason and status by name (names from :mod:`fused_dynamics.status`), the sub-stage it left
the run from, the steps it took in each sub-stage, energy, fmax and temperature.
:func:`summarize_output` gives the statistics: energy, fmax and temperature over the systems
that neither failed nor were rejected (a failed system's numbers are not results; a rejected
one never ran), which are counted apart, and the systems of an output in input order that
still wait in its side file (:func:`~fused_dynamics.outputs.order.pending_path`).
:func:`inspect_command` is the command line's ``inspect``: it prints, filters (``failed``,
``stage``) and exports CSV or JSON.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import ase.io
import numpy as np

from .outputs.order import pending_path
from .sinks import read_extxyz_ids, read_zarr, zarr_ids
from .status import ExitReason, exit_reason_name, status_name

__all__ = [
    "NotAnOutputError",
    "format_summary",
    "format_rows",
    "inspect_command",
    "read_output",
    "select_rows",
    "summarize_output",
    "system_rows",
]

#: columns of :func:`system_rows`, in the order of the table and the CSV export
COLUMNS = (
    "system_id",
    "source",
    "exit_reason",
    "status",
    "stage",
    "stage_steps",
    "n_atoms",
    "energy",
    "energy_per_atom",
    "fmax",
    "temperature",
    "failure",
    "failure_step",
    "rejected",
)

#: what a run writes for every system (a frame without them is not an output of a run)
_REQUIRED = ("system_id", "exit_reason")

_EXPORT_FORMATS = ("csv", "json")


class NotAnOutputError(ValueError):
    """The path is not an output of a fused_dynamics run (an input file, another program's)."""


def _is_zarr(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".zarr"


def read_output(path: str | os.PathLike) -> list:
    """The systems of an output (extxyz file or zarr store) as ``ase.Atoms``.

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    NotAnOutputError
        Not what a run writes: not extxyz or zarr, no frames, or a frame without the
        ``system_id`` and ``exit_reason`` every written system has (an input structure file).
        The message names the path, the first such frame and what ``inspect`` reads.
    """
    path = Path(path)
    what = (
        "inspect reads what `fused-dynamics run` writes (outputs[i].path, stages[i].write): "
        "an .extxyz file or a .zarr store"
    )
    if not (path.exists() or path.is_symlink()):
        raise FileNotFoundError(f"{os.fspath(path)!r} does not exist")
    if _is_zarr(path):
        try:
            frames = read_zarr(path)
        except ValueError as exc:
            raise NotAnOutputError(f"{exc}; {what}") from None
    else:
        if path.suffix.lower() not in (".extxyz", ".xyz"):
            raise NotAnOutputError(
                f"{os.fspath(path)!r} is not an output of fused_dynamics "
                f"(a {path.suffix or 'suffix-less'} file); {what}"
            )
        try:
            frames = ase.io.read(path, index=":", format="extxyz")
        except Exception as exc:
            raise NotAnOutputError(
                f"{os.fspath(path)!r} is not a readable extxyz file ({exc}); {what}"
            ) from None
    if not frames:
        raise NotAnOutputError(f"{os.fspath(path)!r} holds no systems; {what}")
    for k, a in enumerate(frames):
        missing = [key for key in _REQUIRED if key not in a.info]
        if missing:
            raise NotAnOutputError(
                f"{os.fspath(path)!r} is not an output of fused_dynamics: frame {k} has no "
                f"{' and no '.join(missing)} (an input structure file?); {what}"
            )
    return frames


def _steps(a) -> list[int] | None:
    s = a.info.get("stage_steps")
    if s is None:
        return None
    # extxyz may give a one-element list back as a scalar
    return [int(x) for x in np.atleast_1d(np.asarray(s))]


def _left_from(a, steps: list[int] | None) -> int | None:
    """The sub-stage a system left the run (a stage output: the stage it left) from."""
    if "stage" in a.info:
        return int(a.info["stage"])
    if not steps:
        return None
    taken = [k for k, n in enumerate(steps) if n > 0]
    return taken[-1] if taken else 0


def _source(a) -> str | None:
    file, index = a.info.get("source_file"), a.info.get("source_index")
    if file is None and index is None:
        return None
    name = os.path.basename(str(file)) if file is not None else "<memory>"
    return name if index is None else f"{name}:{int(index)}"


def _finite_or_none(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def system_rows(frames) -> list[dict]:
    """One row per system of an output (keys :data:`COLUMNS`).

    ``exit_reason`` and ``status`` are names (``"converged"``, ``"graduated"``, ...);
    ``stage`` is the sub-stage the system left the run from (the last with steps; a stage
    output's own stage); ``energy`` in eV, ``energy_per_atom`` in eV/atom, ``fmax`` (largest
    atomic force) in eV/Å, ``temperature`` (kinetic, from the velocities) in K; ``None`` where
    the output has no such value (a rejected system, a non-finite number).
    """
    rows = []
    for a in frames:
        info = a.info
        steps = _steps(a)
        results = getattr(a.calc, "results", {}) if a.calc is not None else {}
        energy = _finite_or_none(results.get("energy"))
        fmax = None
        if "forces" in results and len(a):
            f = np.asarray(results["forces"], float)
            fmax = _finite_or_none(np.sqrt((f * f).sum(axis=1)).max())
        temperature = None
        if len(a) and "momenta" in a.arrays:
            temperature = _finite_or_none(a.get_temperature())
        status = info.get("status")
        failure_step = info.get("failure_step")
        rows.append(
            {
                "system_id": int(info["system_id"]),
                "source": _source(a),
                "exit_reason": exit_reason_name(info["exit_reason"]),
                "status": None
                if status is None
                else status_name(status, None if steps is None else len(steps)),
                "stage": _left_from(a, steps),
                "stage_steps": steps,
                "n_atoms": len(a),
                "energy": energy,
                "energy_per_atom": energy / len(a) if energy is not None and len(a) else None,
                "fmax": fmax,
                "temperature": temperature,
                "failure": info.get("failure") or None,
                "failure_step": None
                if failure_step is None or int(failure_step) < 0
                else int(failure_step),
                "rejected": info.get("rejected") or None,
            }
        )
    return rows


def _excluded(row: dict) -> bool:
    return row["exit_reason"] in ("failed", "rejected")


def select_rows(rows: list[dict], *, failed: bool = False, stage: int | None = None) -> list:
    """The rows of failed or rejected systems (``failed``) that left from sub-stage ``stage``."""
    out = [r for r in rows if _excluded(r)] if failed else list(rows)
    if stage is not None:
        out = [r for r in out if r["stage"] == stage]
    return out


def summarize_output(path: str | os.PathLike) -> dict:
    """A summary of an output file (extxyz or zarr store) as a plain dict.

    Energy, fmax and temperature statistics are over the systems that neither failed nor were
    rejected (``"statistics_over"`` of them); those are counted apart (``"excluded"``) and the
    failed ones listed under ``"failed"`` (``system_id``, ``failure`` names,
    ``failure_step``).

    Raises
    ------
    FileNotFoundError, NotAnOutputError
        See :func:`read_output`.
    """
    path = Path(path)
    frames = read_output(path)
    rows = system_rows(frames)
    return _summary(path, rows)


def _waiting(path: Path) -> dict | None:
    """The side file of an output in input order whose run did not finish, and its systems."""
    side = Path(pending_path(path))
    if not side.exists():
        return None
    try:
        ids = zarr_ids(side) if _is_zarr(path) else read_extxyz_ids(side)[0]
    except (OSError, ValueError):
        return None
    return {"path": os.fspath(side), "systems": len(ids)}


def _summary(path: Path, rows: list[dict]) -> dict:
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["exit_reason"]] = reasons.get(r["exit_reason"], 0) + 1
    kept = [r for r in rows if not _excluded(r)]

    def stats(xs):
        x = np.asarray([v for v in xs if v is not None], float)
        if not x.size:
            return None
        return {"min": float(x.min()), "mean": float(x.mean()), "max": float(x.max())}

    out = {
        "path": os.fspath(path),
        "format": "zarr" if _is_zarr(path) else "extxyz",
        "systems": len(rows),
        "atoms": int(sum(r["n_atoms"] for r in rows)),
        "atoms_per_system": stats([r["n_atoms"] for r in rows]),
        "exit_reasons": reasons,
        "statistics_over": len(kept),
        "excluded": {
            "failed": sum(r["exit_reason"] == "failed" for r in rows),
            "rejected": sum(r["exit_reason"] == "rejected" for r in rows),
        },
        "energy_per_atom": stats([r["energy_per_atom"] for r in kept]),
        "fmax": stats([r["fmax"] for r in kept]),
        "temperature": stats([r["temperature"] for r in kept]),
    }
    steps = [r["stage_steps"] for r in kept if r["stage_steps"] is not None]
    if steps and len({len(s) for s in steps}) == 1:
        arr = np.asarray(steps)
        out["stage_steps_mean"] = [float(x) for x in arr.mean(axis=0)]
        out["stage_steps_max"] = [int(x) for x in arr.max(axis=0)]
    waiting = _waiting(path)
    if waiting is not None:
        out["waiting"] = waiting
    failed = [
        {
            "system_id": r["system_id"],
            "failure": r["failure"] or "unknown",
            "failure_step": r["failure_step"],
        }
        for r in rows
        if r["exit_reason"] == exit_reason_name(ExitReason.FAILED)
    ]
    if failed:
        out["failed"] = failed
    status = [r["status"] for r in rows if r["status"] is not None]
    if status:
        out["statuses"] = {s: status.count(s) for s in sorted(set(status))}
    return out


def format_summary(s: dict) -> str:
    """The summary of :func:`summarize_output` as text."""

    def fmt(d, unit, spec=".4g"):
        if d is None:
            return "n/a"
        return f"min {d['min']:{spec}}  mean {d['mean']:{spec}}  max {d['max']:{spec}} {unit}"

    lines = [
        f"{s['path']} ({s['format']})",
        f"  systems          {s['systems']} ({s['atoms']} atoms; per system "
        + (fmt(s["atoms_per_system"], "", ".0f") if s["atoms_per_system"] else "n/a")
        + ")",
        "  exit reasons     "
        + (", ".join(f"{k}: {v}" for k, v in s["exit_reasons"].items()) or "none"),
    ]
    if "waiting" in s:
        w = s["waiting"]
        lines.append(
            f"  waiting          {w['systems']} systems in {w['path']} (written in input order: "
            "they finished before an earlier system; a resumed run writes them in their turn)"
        )
    if "statuses" in s:
        lines.append(
            "  final statuses   " + ", ".join(f"{k}: {v}" for k, v in s["statuses"].items())
        )
    if "stage_steps_mean" in s:
        mean = ", ".join(f"{x:.1f}" for x in s["stage_steps_mean"])
        mx = ", ".join(str(x) for x in s["stage_steps_max"])
        lines.append(f"  steps per stage  mean [{mean}], max [{mx}]")
    if "failed" in s:
        shown = ", ".join(
            f"{f['system_id']} ({f['failure']}, step {f['failure_step']})" for f in s["failed"][:10]
        )
        more = f" and {len(s['failed']) - 10} more" if len(s["failed"]) > 10 else ""
        lines.append(f"  failed systems   {shown}{more}")
    ex = s["excluded"]
    apart = (
        f"; {ex['failed']} failed and {ex['rejected']} rejected left out"
        if any(ex.values())
        else ""
    )
    lines += [
        f"  statistics over  {s['statistics_over']} systems{apart}",
        f"  energy           {fmt(s['energy_per_atom'], 'eV/atom')}",
        f"  fmax             {fmt(s['fmax'], 'eV/Å')}",
        f"  temperature      {fmt(s['temperature'], 'K', '.1f')}",
    ]
    return "\n".join(lines)


def _cell(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return format(value, spec) if spec else str(value)


def _why(row: dict, width: int = 48) -> str:
    """What made a system fail (its failure bits and step) or be rejected (the reason, cut)."""
    if row["failure"]:
        return f" ({row['failure']}, step {row['failure_step']})"
    if row["rejected"]:
        why = str(row["rejected"])
        return f" ({why if len(why) <= width else why[: width - 3] + '...'})"
    return ""


def format_rows(rows: list[dict]) -> str:
    """The systems as a text table: id, source, exit reason, stage, steps, E, fmax, T."""
    head = ("id", "source", "exit reason", "stage", "steps", "E (eV/atom)", "fmax (eV/Å)", "T (K)")
    body = [
        (
            _cell(r["system_id"]),
            _cell(r["source"]),
            _cell(r["exit_reason"]) + _why(r),
            _cell(r["stage"]),
            _cell(r["stage_steps"]),
            _cell(r["energy_per_atom"], ".6g"),
            _cell(r["fmax"], ".4g"),
            _cell(r["temperature"], ".1f"),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
        for line in (head, *body)
    )


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                k: "" if v is None else (json.dumps(v) if isinstance(v, list) else v)
                for k, v in r.items()
            }
        )
    return buf.getvalue()


def _json(summary: dict, rows: list[dict]) -> str:
    return json.dumps({**summary, "per_system": rows}, indent=2)


def inspect_command(
    path: str | os.PathLike,
    *,
    failed: bool = False,
    stage: int | None = None,
    export: str | os.PathLike | None = None,
    fmt: str | None = None,
) -> int:
    """``fused-dynamics inspect``: print what an output holds; return the exit code.

    Prints the summary (:func:`format_summary`) and the table of systems (:func:`format_rows`)
    to stdout, or with ``fmt`` and no ``export`` the summary and rows as ``"json"`` (the
    summary's keys and ``"per_system"``) or the rows as ``"csv"``.

    Parameters
    ----------
    path : str or path
        An extxyz file or a zarr store written by a run.
    failed : bool, default False
        Only the failed and rejected systems.
    stage : int, optional
        Only the systems that left the run from sub-stage ``stage`` (0-based, as
        ``stage_steps``).
    export : str or path, optional
        Write the (filtered) systems there, one row each (columns :data:`COLUMNS`): CSV, or
        JSON with the summary. Never overwrites an existing file.
    fmt : {"csv", "json"}, optional
        Format of ``export`` (default: from its suffix) or, without ``export``, of what is
        printed.

    Returns
    -------
    int
        0; 2 (with the reason on stderr) for a path that is missing or not an output, a bad
        ``fmt`` or ``stage``, or an export path that exists or cannot be written.
    """

    def refuse(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if fmt is None and export is not None:
        fmt = Path(export).suffix.lower().lstrip(".")
    if fmt is not None and fmt not in _EXPORT_FORMATS:
        return refuse(
            f"fmt: {fmt!r} is not an export format; give one of {', '.join(_EXPORT_FORMATS)}"
            + (" (or an export path ending .csv or .json)" if export is not None else "")
        )
    if stage is not None and (isinstance(stage, bool) or int(stage) != stage or stage < 0):
        return refuse(f"stage: {stage!r} is not a sub-stage index (0, 1, ...)")
    try:
        frames = read_output(path)
    except (FileNotFoundError, NotAnOutputError) as exc:
        return refuse(str(exc))
    rows = system_rows(frames)
    n_stages = max((len(r["stage_steps"]) for r in rows if r["stage_steps"]), default=None)
    if stage is not None and n_stages is not None and stage >= n_stages:
        return refuse(f"stage: {stage} is past the last sub-stage of this run ({n_stages - 1})")
    summary = _summary(Path(path), rows)
    shown = select_rows(rows, failed=failed, stage=stage)
    if export is not None:
        text = _csv(shown) if fmt == "csv" else _json(summary, shown)
        try:
            with open(export, "x", encoding="utf-8") as fh:
                fh.write(text)
        except FileExistsError:
            return refuse(f"export: {os.fspath(export)!r} exists; it is never overwritten")
        except OSError as exc:
            return refuse(f"export: cannot write {os.fspath(export)!r}: {exc.strerror or exc}")
    if fmt is not None and export is None:
        print((_csv(shown) if fmt == "csv" else _json(summary, shown)).rstrip("\n"))
        return 0
    which = []
    if failed:
        which.append("failed or rejected")
    if stage is not None:
        which.append(f"left from stage {stage}")
    print(format_summary(summary))
    print(f"\nsystems ({', '.join(which)}): {len(shown)}" if which else "\nsystems:")
    if shown:
        print(format_rows(shown))
    if export is not None:
        print(f"\n{len(shown)} systems exported to {os.fspath(export)} ({fmt})")
    return 0
