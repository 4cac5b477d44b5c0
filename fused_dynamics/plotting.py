"""Watching a run: a recording hook, a progress bar, the summary table and the figure.

- :class:`RunRecord` keeps, on the host, a sample of every active system every few steps
  (fmax, energy per atom, temperature, its step in its stage), the number of systems per
  stage, and each system as it leaves the run (through :class:`RecordingSink`, a wrapper
  around any sink). It drives a tqdm bar (graduated / total, fused steps per second).
- :class:`RecorderHook` is the :class:`~fused_dynamics.Hook` that feeds it from inside the
  compiled loop (a host callback, gated by its frequency like every hook).
- :func:`summary_table` and :func:`plot_run` turn a record into text and a PNG.

Example
-------
>>> record = RunRecord(["FIRE", "NVTLangevin"], [True, False], max_systems=24, total=200)
>>> fused = fused.register_fused_hook(RecorderHook(record, every_n_steps=5))
>>> sinks = [RecordingSink(fd.ExtXYZSink("out.extxyz"), record)]
>>> fused.run(sampler=sampler, sinks=sinks)
>>> print(summary_table(record)); plot_run(record, "run.png")
"""

from __future__ import annotations

import os
import time
from typing import Any

import equinox as eqx
import numpy as np

from .hooks import DynamicsStage, ExitReason, Hook, HookData

__all__ = ["RunRecord", "RecorderHook", "RecordingSink", "summary_table", "plot_run"]

_SAMPLE_KEYS = ("step", "system_id", "status", "stage_step", "fmax", "energy", "temperature")


class RunRecord:
    """Host-side record of a run (see the module docstring).

    Parameters
    ----------
    stage_names : list of str
        One per sub-stage, in status-code order.
    is_optimizer : list of bool
        Whether each sub-stage relaxes (its systems go to the fmax and energy panels) or
        integrates (the temperature panel).
    max_systems : int
        System capacity S of the batch.
    total : int, optional
        Number of systems expected, for the progress bar.
    progress : bool, default True
        Show a tqdm bar on stderr.
    targets : list of float or None, optional
        Per sub-stage: the fmax threshold (optimizers) or the target temperature (MD), drawn
        as reference lines.
    budgets : list of int, str or None, optional
        Per sub-stage step budget (``n_steps``), for the summary; a str is the
        ``atoms.info`` key each system's own budget is read from (``fd.from_info``).
    """

    def __init__(
        self,
        stage_names,
        is_optimizer,
        max_systems: int,
        total: int | None = None,
        progress: bool = True,
        targets=None,
        budgets=None,
        record_every: int = 1,
    ):
        self.stage_names = list(stage_names)
        self.is_optimizer = list(is_optimizer)
        self.max_systems = int(max_systems)
        self.record_every = int(record_every)
        self.total = total
        self.targets = list(targets) if targets is not None else [None] * len(self.stage_names)
        self.budgets = list(budgets) if budgets is not None else [None] * len(self.stage_names)
        self._samples: list[dict[str, np.ndarray]] = []
        self.counts: list[tuple[int, np.ndarray]] = []  # (step, systems per status)
        self.left: list[dict[str, Any]] = []  # one dict per system written out
        self.left_steps: list[int] = []  # fused step at which each was written
        self.last_step = 0
        self.t_start = time.perf_counter()
        self.t_first_sample: float | None = None
        self.wall_time: float | None = None
        self.bar = None
        self.refresh_interval = 0.25  # s between progress bar redraws
        self._last_refresh = -1.0
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="graduated", unit="sys", dynamic_ncols=True)

    # ------------------------------------------------------------------ feeding
    def on_sample(self, data: HookData) -> None:
        """Record one sample of the active systems (called by :class:`RecorderHook`)."""
        now = time.perf_counter()
        if self.t_first_sample is None:
            self.t_first_sample = now
        status = np.asarray(data["status"])
        active = np.asarray(data["system_mask"]) & (status < len(self.stage_names)) & (status >= 0)
        slots = np.flatnonzero(active)
        st = status[slots]
        n_atoms = np.maximum(np.asarray(data["n_atoms"])[slots], 1)
        stage_steps = np.asarray(data["stage_steps"])[slots, st] + 1  # this step included
        self._samples.append(
            {
                "step": np.full(len(slots), data.step, np.int64),
                "system_id": np.asarray(data["system_id"])[slots].astype(np.int64),
                "status": st.astype(np.int64),
                "stage_step": stage_steps.astype(np.int64),
                "fmax": np.asarray(data["fmax"], np.float64)[slots],
                "energy": np.asarray(data["energy"], np.float64)[slots] / n_atoms,
                "temperature": np.asarray(data["temperature"], np.float64)[slots],
            }
        )
        self.counts.append(
            (int(data.step), np.bincount(st, minlength=len(self.stage_names)).astype(np.int64))
        )
        self.last_step = int(data.step)
        self._refresh()

    def on_written(self, atoms_list) -> None:
        """Record systems leaving the run (called by :class:`RecordingSink`)."""
        for a in atoms_list:
            info = a.info
            energy = np.nan
            if a.calc is not None and "energy" in getattr(a.calc, "results", {}):
                energy = float(a.calc.results["energy"])
            finite = bool(np.isfinite(a.positions).all()) and not np.isnan(energy)
            if a.calc is not None and "forces" in getattr(a.calc, "results", {}):
                finite = finite and bool(np.isfinite(a.calc.results["forces"]).all())
            step = info.get("failure_step")
            self.left.append(
                {
                    "system_id": int(info.get("system_id", -1)),
                    "exit_reason": int(info.get("exit_reason", 0)),
                    "stage_steps": list(info.get("stage_steps", [])),
                    "n_atoms": len(a),
                    "energy": energy,
                    "finite": finite and bool(np.isfinite(energy) or len(a) == 0),
                    "failure": info.get("failure") or None,
                    "failure_step": None if step is None else int(step),
                    "why": info.get("rejected"),
                    # each stage's budget for this system: a key names its atoms.info value
                    "budgets": [
                        _number(info.get(b)) if isinstance(b, str) else b for b in self.budgets
                    ],
                }
            )
            self.left_steps.append(self.last_step)
        self._refresh()

    def _refresh(self, force: bool = False) -> None:
        if self.bar is None:
            return
        now = time.perf_counter()
        if not force and now - self._last_refresh < self.refresh_interval:
            return
        self._last_refresh = now
        self.bar.n = len(self.left)
        t0 = self.t_first_sample
        rate = self.last_step / max(time.perf_counter() - t0, 1e-9) if t0 else 0.0
        self.bar.set_postfix_str(f"step {self.last_step}, {rate:.0f} steps/s", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        """Stop the clock and close the progress bar."""
        if self.wall_time is None:
            self.wall_time = time.perf_counter() - self.t_start
        if self.bar is not None:
            self._refresh(force=True)
            self.bar.close()
            self.bar = None

    # ------------------------------------------------------------------ reading
    @property
    def samples(self) -> dict[str, np.ndarray]:
        """Every sample as columns (one row per active system per recorded step)."""
        if not self._samples:
            return {k: np.zeros(0) for k in _SAMPLE_KEYS}
        return {k: np.concatenate([s[k] for s in self._samples]) for k in _SAMPLE_KEYS}

    def write_csv(self, path, overwrite: bool = False) -> None:
        """Write :attr:`samples` to a CSV file (one row per system per recorded step).

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is False (nothing is written).
        """
        _refuse_existing(path, overwrite)
        cols = self.samples
        names = list(_SAMPLE_KEYS)
        stage = np.asarray(self.stage_names, dtype=object)
        with open(path, "w" if overwrite else "x") as fh:  # "x": not one created meanwhile
            fh.write(",".join(names + ["stage"]) + "\n")
            for i in range(len(cols["step"])):
                row = [repr(cols[k][i].item()) for k in names]
                fh.write(",".join(row + [str(stage[cols["status"][i]])]) + "\n")

    def stage_stats(self) -> list[dict[str, Any]]:
        """Per sub-stage: systems, mean and max steps, budget hits, share of slot-steps."""
        steps = np.array(
            [r["stage_steps"] for r in self.left if len(r["stage_steps"]) == len(self.stage_names)]
        ).reshape(-1, len(self.stage_names))
        total = max(int(steps.sum()), 1)
        out = []
        for k, name in enumerate(self.stage_names):
            col = steps[:, k]
            entered = col > 0
            budget = np.array(  # per system: budgets read from atoms.info differ
                [
                    _number((r.get("budgets") or self.budgets)[k])
                    for r in self.left
                    if len(r["stage_steps"]) == len(self.stage_names)
                ],
                float,  # None (no budget) becomes NaN: never hit
            ).reshape(-1)
            out.append(
                {
                    "stage": name,
                    "systems": int(entered.sum()),
                    "mean_steps": float(col[entered].mean()) if entered.any() else 0.0,
                    "max_steps": int(col.max()) if col.size else 0,
                    "budget_hits": int(np.sum(col >= budget)) if budget.size else 0,
                    "share": float(col.sum()) / total,
                }
            )
        return out

    def exit_counts(self) -> dict[str, int]:
        reasons = [r["exit_reason"] for r in self.left]
        return {ExitReason(r).name.lower(): int(reasons.count(r)) for r in sorted(set(reasons))}


class RecorderHook(Hook):
    """Feed a :class:`RunRecord` every ``every_n_steps`` steps (``AFTER_STEP``, fused level)."""

    record: Any = eqx.field(static=True)
    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.AFTER_STEP, kw_only=True)
    fields: tuple[str, ...] = eqx.field(
        static=True,
        default=("fmax", "energy", "temperature", "n_atoms", "stage_steps"),
        kw_only=True,
    )

    def on_host(self, data: HookData) -> None:
        self.record.on_sample(data)


class RecordingSink:
    """A sink that forwards to ``sink`` and tells ``record`` what left the run."""

    def __init__(self, sink, record: RunRecord):
        self.sink = sink
        self.record = record

    def has_room(self, n: int = 1) -> bool:
        return self.sink.has_room(n)

    def write(self, atoms_list) -> None:
        self.sink.write(atoms_list)
        self.record.on_written(atoms_list)

    def system_ids(self) -> list[int]:
        """What the wrapped sink holds (a resumed run skips these)."""
        ids = getattr(self.sink, "system_ids", None)
        return [] if ids is None else ids()

    def __len__(self) -> int:
        return len(self.sink)

    def close(self) -> None:
        self.sink.close()


# ============================================================================ text
def summary_table(record: RunRecord, wall_time: float | None = None) -> str:
    """The per-stage table (systems, mean/max steps, budget hits, share of time) and exits.

    The time of a stage is the run's wall time times its share of the slot-steps (the steps
    systems spent in it): one fused step serves every stage at once.
    """
    wall = record.wall_time if wall_time is None else wall_time
    wall = 0.0 if wall is None else wall
    head = f"{'stage':<16}{'systems':>8}{'mean steps':>12}{'max':>6}{'budget hit':>12}{'time':>10}"
    lines = [head, "-" * len(head)]
    for row in record.stage_stats():
        lines.append(
            f"{row['stage']:<16}{row['systems']:>8}{row['mean_steps']:>12.1f}"
            f"{row['max_steps']:>6}{row['budget_hits']:>12}"
            f"{row['share'] * wall:>8.1f} s"
        )
    lines.append("-" * len(head))
    exits = ", ".join(f"{k}: {v}" for k, v in record.exit_counts().items()) or "none"
    lines.append(f"exit reasons: {exits}")
    lines.append("(time: the run's wall time, compilation included, split by slot-steps per stage)")
    return "\n".join(lines)


# ============================================================================ figure
def plot_run(
    record: RunRecord,
    path,
    title: str | None = None,
    max_lines: int = 400,
    overwrite: bool = False,
):
    """Save a 2x2 PNG: fmax and energy/atom during relaxation, temperature during MD, and
    systems per stage (with the graduated count) over the fused steps.

    Returns the path. Uses matplotlib's Agg backend (no display needed).

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False (checked before anything is drawn).
    """
    _refuse_existing(path, overwrite)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    s = record.samples
    names = record.stage_names
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    ax_f, ax_e, ax_t, ax_n = axes.ravel()

    def traces(stage: int, key: str):
        sel = s["status"] == stage
        ids = s["system_id"][sel]
        x, y = s["stage_step"][sel], s[key][sel]
        order = np.lexsort((x, ids))
        ids, x, y = ids[order], x[order], y[order]
        cuts = np.flatnonzero(np.diff(ids)) + 1
        return list(zip(np.split(x, cuts), np.split(y, cuts), strict=True)) if len(ids) else []

    def draw(ax, stage: int, key: str, color, log: bool, relative: bool = False):
        center, cname = (np.mean, "mean") if key == "temperature" else (np.median, "median")
        tr = traces(stage, key)
        if relative:  # above the lowest value the system reached in the stage; drop the zero
            tr = [(x, y - y.min()) for x, y in tr]
            tr = [(x[y > 0], y[y > 0]) for x, y in tr]
            tr = [(x, y) for x, y in tr if len(x)]
        for x, y in tr[:max_lines]:
            ax.plot(x, y, color=color, alpha=0.15, lw=0.7)
        if tr:
            # median over bins of record_every steps, where enough systems are left for one
            width = max(int(record.record_every), 1)
            allx = np.concatenate([x for x, _ in tr])
            ally = np.concatenate([y for _, y in tr])
            bins = (allx - 1) // width
            xs, med = [], []
            for b in np.unique(bins):
                sel = bins == b
                if sel.sum() >= max(3, 0.1 * len(tr)):
                    xs.append(allx[sel].mean())
                    med.append(center(ally[sel]))
            ax.plot(
                xs, med, color=color, lw=2.2, label=f"{names[stage]} {cname} ({len(tr)} systems)"
            )
        if log:
            ax.set_yscale("log")

    opt = [k for k, o in enumerate(record.is_optimizer) if o]
    md = [k for k, o in enumerate(record.is_optimizer) if not o]
    for k in opt:
        draw(ax_f, k, "fmax", colors[k % len(colors)], log=True)
        draw(ax_e, k, "energy", colors[k % len(colors)], log=True, relative=True)
        if record.targets[k] is not None:
            ax_f.axhline(record.targets[k], color="k", ls="--", lw=1, label="fmax threshold")
    ax_f.set(xlabel="step in stage", ylabel="fmax (eV/Å)", title="Relaxation: largest force")
    ax_e.set(
        xlabel="step in stage",
        ylabel="E - E_min (eV/atom)",
        title="Relaxation: energy above each system's lowest",
    )
    for k in md:
        draw(ax_t, k, "temperature", colors[k % len(colors)], log=False)
        if record.targets[k] is not None:
            ax_t.axhline(record.targets[k], color="k", ls="--", lw=1, label="target")
    ax_t.set(xlabel="step in stage", ylabel="temperature (K)", title="MD: temperature")
    for ax, empty in ((ax_f, not opt), (ax_e, not opt), (ax_t, not md)):
        # a small run can leave a panel without a sampled trace: say so instead of calling
        # legend() on nothing (matplotlib warns "No artists with labels found")
        note = "no such stage in this run" if empty else "no samples of this stage"
        if ax.get_legend_handles_labels()[1]:
            ax.legend(loc="best", fontsize=8)
        if empty or not ax.lines:
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)

    if record.counts:
        steps = np.array([c[0] for c in record.counts])
        counts = np.stack([c[1] for c in record.counts], axis=1)
        free = record.max_systems - counts.sum(axis=0)
        ax_n.stackplot(
            steps,
            *counts,
            free,
            labels=[*names, "free / waiting"],
            colors=[colors[k % len(colors)] for k in range(len(names))] + ["#dddddd"],
            step="post",
            alpha=0.85,
        )
        ax_n.set_ylim(0, record.max_systems)
        if record.left_steps:
            ax2 = ax_n.twinx()
            ax2.plot(
                record.left_steps,
                np.arange(1, len(record.left_steps) + 1),
                "k-",
                lw=1.5,
                label="graduated (cumulative)",
            )
            ax2.set_ylabel("systems graduated")
            ax2.legend(loc="upper center", fontsize=8)
        ax_n.legend(loc="lower right", fontsize=8)
    ax_n.set(xlabel="fused step", ylabel="slots", title="Systems per stage (inflight refill)")
    n = len(record.left)
    wall = record.wall_time
    fig.suptitle(
        title
        or f"fused_dynamics: {n} systems, {record.last_step} fused steps"
        + (f", {wall:.1f} s" if wall else "")
    )
    # the format named: matplotlib then writes ``path`` itself (it appends ".png" to a name
    # without a suffix otherwise), into a file opened here ("xb": not one created meanwhile)
    fmt = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
    created = False
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise ValueError(
                f"plot_run: {os.fspath(path)!r}: matplotlib writes no {fmt!r} files; give a "
                "path ending in .png, .pdf or .svg (or no suffix: PNG)."
            )
        with open(path, "wb" if overwrite else "xb") as fh:
            created = not overwrite
            fig.savefig(fh, dpi=110, format=fmt)
    except BaseException:
        if created:  # the file this call made, half written
            os.unlink(path)
        raise
    finally:
        plt.close(fig)
    return path


def _refuse_existing(path, overwrite: bool) -> None:
    """A report never replaces a file (or anything else) the user has, unless asked."""
    if os.path.lexists(path) and (not overwrite or os.path.isdir(path)):
        raise FileExistsError(
            f"{os.fspath(path)!r} exists; pass overwrite=True to replace a file (a directory "
            "never is), or give another path."
        )


def _number(value) -> float | None:
    """A budget read from a system's ``atoms.info``, or None when it is not one number."""
    if isinstance(value, bool | str):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None
