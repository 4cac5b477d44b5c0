"""Output files of a training: the models, the metrics (JSON, CSV) and the loss curve (PNG)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .serialization import atomic_write, save_model

__all__ = ["OUTPUT_FILES", "plan_outputs", "write_outputs", "history_rows", "plot_history"]

#: files :func:`~.trainer.train` writes into ``output_dir``
OUTPUT_FILES = ("model.eqx", "last_model.eqx", "metrics.json", "metrics.csv", "loss.png")


def plan_outputs(output_dir, overwrite: bool) -> dict[str, Path]:
    """The output files in ``output_dir`` (created); FileExistsError if one exists."""
    if output_dir is None:
        return {}
    out = Path(output_dir)
    files = {name: out / name for name in OUTPUT_FILES}
    existing = [os.fspath(p) for p in files.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"output file(s) exist: {', '.join(existing)}; pass overwrite=True to replace them."
        )
    out.mkdir(parents=True, exist_ok=True)
    return files


def history_rows(history: list[dict]) -> list[dict]:
    """The history flattened to one row per epoch (``train_force_rmse``, ...)."""
    rows = []
    for entry in history:
        row = {"epoch": entry["epoch"], "learning_rate": entry["learning_rate"]}
        for split in ("train", "validation", "train_end"):
            for k, v in (entry.get(split) or {}).items():
                row[f"{split}_{k}"] = v
        rows.append(row)
    return rows


def write_outputs(result: Any, files: dict[str, Path], overwrite: bool) -> dict[str, Path]:
    """Write a :class:`~.trainer.TrainResult`'s models, metrics (JSON, CSV) and loss curve (PNG).

    Each file is written atomically; ``files`` comes from :func:`plan_outputs`.
    """
    save_model(files["model.eqx"], result.model, overwrite=overwrite)
    save_model(files["last_model.eqx"], result.last_model, overwrite=overwrite)
    summary = {
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "epochs_run": len(result.history),
        "best": result.best_metrics,
        "train_indices": result.train_indices,
        "validation_indices": result.validation_indices,
        "units": {
            "energy_mae_per_atom": "eV/atom",
            "energy_rmse_per_atom": "eV/atom",
            "force_rmse": "eV/Å",
            "stress_rmse": "eV/Å³",
        },
        "history": result.history,
    }
    text = json.dumps(_json_safe(summary), indent=2, allow_nan=False)
    atomic_write(files["metrics.json"], text.encode(), overwrite=overwrite)
    rows = history_rows(result.history)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(files["metrics.csv"], buf.getvalue().encode(), overwrite=overwrite)
    atomic_write(files["loss.png"], plot_history(result), overwrite=overwrite)
    return files


def _json_safe(x):
    """NaN and infinities as null (strict JSON); containers recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def plot_history(result: Any) -> bytes:
    """PNG bytes of the loss and metric curves per epoch (matplotlib, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = history_rows(result.history)
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [
        ("loss", "loss"),
        ("energy_mae_per_atom", "energy MAE (eV/atom)"),
        ("force_rmse", "force RMSE (eV/Å)"),
        ("stress_rmse", "stress RMSE (eV/Å³)"),
    ]
    axes = fig.subplots(1, len(panels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log scale of all-NaN or zero curves
        for ax, (key, label) in zip(axes, panels, strict=True):
            for split, style in (("train", "-"), ("validation", "--"), ("train_end", ":")):
                ys = np.array([r.get(f"{split}_{key}", np.nan) for r in rows], float)
                if np.any(np.isfinite(ys)):
                    ax.plot(epochs, ys, style, label=split)
                    if np.all(ys[np.isfinite(ys)] > 0):
                        ax.set_yscale("log")
            if not ax.lines:
                ax.text(0.5, 0.5, "no references", ha="center", transform=ax.transAxes)
                ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
            ax.axvline(result.best_epoch, color="0.6", lw=0.8)
            ax.set_xlabel("epoch")
            ax.set_title(label, fontsize=9)
        axes[0].legend(fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
