"""What an output holds (``fused-dynamics inspect``): systems, exit reasons, failures, energies."""

from __future__ import annotations

import os
from pathlib import Path

import ase.io
import numpy as np

from .sinks import read_zarr
from .status import ExitReason, exit_reason_name

__all__ = ["format_summary", "summarize_output"]


def _read_output(path: Path) -> list:
    if path.is_dir() or path.suffix == ".zarr":
        return read_zarr(path)
    return ase.io.read(path, index=":")


def summarize_output(path: str | os.PathLike) -> dict:
    """A summary of an output file (extxyz or zarr store) as a plain dict.

    Energy, fmax and temperature statistics are over the systems that neither failed nor were
    rejected; failed systems are listed under ``"failed"`` (``system_id``, ``failure`` names,
    ``failure_step``).
    """
    path = Path(path)
    frames = _read_output(path)
    n = len(frames)
    reasons: dict[str, int] = {}
    for a in frames:
        r = a.info.get("exit_reason")
        name = "unknown" if r is None else a.info.get("exit_reason_name") or exit_reason_name(r)
        reasons[name] = reasons.get(name, 0) + 1
    sizes = [len(a) for a in frames]
    e_atom, fmax, temps, steps = [], [], [], []
    for a in frames:
        if a.info.get("exit_reason") in (int(ExitReason.FAILED), int(ExitReason.REJECTED)):
            continue  # listed apart; a failed system's finite numbers are not results either
        calc_results = getattr(a.calc, "results", {}) if a.calc is not None else {}
        if "energy" in calc_results and len(a):
            e_atom.append(float(calc_results["energy"]) / len(a))
        if "forces" in calc_results and len(a):
            f = np.asarray(calc_results["forces"], float)
            fmax.append(float(np.sqrt((f * f).sum(axis=1)).max()))
        if len(a) and a.get_velocities() is not None:
            temps.append(float(a.get_temperature()))
        if "stage_steps" in a.info:
            s = a.info["stage_steps"]
            steps.append([int(x) for x in (s.tolist() if hasattr(s, "tolist") else s)])

    def stats(xs):
        x = np.asarray(xs, float)
        x = x[np.isfinite(x)]  # failed systems are listed apart, not averaged in
        if not x.size:
            return None
        return {"min": float(x.min()), "mean": float(x.mean()), "max": float(x.max())}

    out = {
        "path": os.fspath(path),
        "format": "zarr" if (path.is_dir() or path.suffix == ".zarr") else "extxyz",
        "systems": n,
        "atoms": int(sum(sizes)),
        "atoms_per_system": stats(sizes),
        "exit_reasons": reasons,
        "energy_per_atom": stats(e_atom),
        "fmax": stats(fmax),
        "temperature": stats(temps),
    }
    if steps and len({len(s) for s in steps}) == 1:
        arr = np.asarray(steps)
        out["stage_steps_mean"] = [float(x) for x in arr.mean(axis=0)]
        out["stage_steps_max"] = [int(x) for x in arr.max(axis=0)]
    failed = [
        {
            "system_id": a.info.get("system_id"),
            "failure": a.info.get("failure") or "unknown",
            "failure_step": a.info.get("failure_step"),
        }
        for a in frames
        if a.info.get("exit_reason") == ExitReason.FAILED
    ]
    if failed:
        out["failed"] = failed
    status = [a.info.get("status") for a in frames if "status" in a.info]
    if status:
        out["statuses"] = {str(s): status.count(s) for s in sorted(set(status))}
    return out


def format_summary(s: dict) -> str:
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
    lines += [
        f"  energy           {fmt(s['energy_per_atom'], 'eV/atom')}",
        f"  fmax             {fmt(s['fmax'], 'eV/Å')}",
        f"  temperature      {fmt(s['temperature'], 'K', '.1f')}",
    ]
    return "\n".join(lines)
