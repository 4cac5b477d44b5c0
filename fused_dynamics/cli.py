"""The ``fused-dynamics`` command line.

Commands
--------
``fused-dynamics run CONFIG``
    Run the job a TOML or YAML configuration describes (see :mod:`fused_dynamics.config`).
``fused-dynamics demo [--quick]``
    The embedded default job (see :mod:`fused_dynamics.demo`).
``fused-dynamics inspect OUTPUT``
    Summarise an output file (extxyz, or a zarr store): systems, exit reasons, energies.

Exit codes: 0 success; 2 a bad configuration or input (the message names the key and what to
fix); 1 a failure while running; 130 interrupted.

``python -m fused_dynamics.cli ...`` works as well as the console script.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import ConfigError, RunConfig, load_config

__all__ = ["app", "execute", "RunResult", "summarize_output", "EXIT_OK", "EXIT_CONFIG", "EXIT_RUN"]

EXIT_OK, EXIT_RUN, EXIT_CONFIG = 0, 1, 2

app = typer.Typer(
    name="fused-dynamics",
    help="Batched atomistic relaxation and MD in JAX: many systems, one compiled step.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


# ============================================================================ running
@dataclass
class RunResult:
    """What :func:`execute` did."""

    config: RunConfig
    outputs: list[Path]
    plot: Path | None
    wall_time: float
    run_time: float
    cpu_time: float
    stats: Any = None
    record: Any = None
    extra: dict = field(default_factory=dict)


def configure_jax(cfg: RunConfig) -> None:
    """Apply ``dtype`` and ``device`` before any array is made; ConfigError if impossible."""
    import jax

    if cfg.dtype == "float64":  # float32 needs nothing: the batch is built with that dtype
        jax.config.update("jax_enable_x64", True)
    if cfg.device != "auto":
        platform = {"gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "tpu": "tpu", "cpu": "cpu"}[
            cfg.device
        ]
        try:
            jax.config.update("jax_platforms", platform)
            devices = jax.devices()
        except Exception as exc:  # RuntimeError, or an AssertionError inside jax
            why = f" ({type(exc).__name__}: {exc})" if str(exc) else ""
            raise ConfigError(
                f"device: {cfg.device!r} is not available here{why}; use 'auto' or 'cpu'"
            ) from None
        if devices[0].platform not in (platform, "gpu" if platform in ("cuda", "rocm") else ""):
            raise ConfigError(
                f"device: {cfg.device!r} was asked for but JAX runs on "
                f"{devices[0].platform!r} (already initialised); use 'auto' or run in a new "
                "process"
            )


class TeeSink:
    """Write every system to each of ``sinks`` (a run's outputs are copies, not overflow)."""

    def __init__(self, sinks):
        self.sinks = list(sinks)

    def has_room(self, n: int = 1) -> bool:
        return all(s.has_room(n) for s in self.sinks)

    def write(self, atoms_list) -> None:
        for s in self.sinks:
            s.write(atoms_list)

    def __len__(self) -> int:
        return min(len(s) for s in self.sinks)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def _output_path(path: str, base_dir: Path) -> Path:
    return (base_dir / os.path.expanduser(path)).resolve()


def _make_sinks(cfg: RunConfig, base_dir: Path):
    import shutil

    import fused_dynamics as fd

    sinks, paths = [], []
    for i, o in enumerate(cfg.outputs):
        p = _output_path(o.path, base_dir)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()  # the extxyz sink appends: start from an empty file
            cls = fd.ExtXYZSink if o.type == "extxyz" else fd.ZarrSink
            sinks.append(cls(p, capacity=o.capacity))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"outputs[{i}].path: cannot write {os.fspath(p)!r}: {exc}") from exc
        paths.append(p)
    return sinks, paths


def execute(
    cfg: RunConfig,
    base_dir: str | os.PathLike = ".",
    *,
    echo=print,
    title: str | None = None,
) -> RunResult:
    """Run a validated configuration: build, run inflight, write outputs, summary and plot.

    Raises :class:`~fused_dynamics.config.ConfigError` for problems found before the run
    starts (unreadable structures, a model or stage that rejects its parameters, a capacity
    no structure fits, an unavailable device); anything else comes from the run itself.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    base_dir = Path(base_dir)
    configure_jax(cfg)
    import fused_dynamics as fd

    from . import config as C
    from .plotting import RecorderHook, RecordingSink, RunRecord, plot_run, summary_table

    structures = C.load_structures(cfg, base_dir)
    model = C.build_model(cfg)
    stages = C.build_stages(cfg, model)
    cap = cfg.capacity
    try:
        sampler = fd.SizeAwareSampler(
            structures,
            max_atoms=cap.max_atoms,
            max_systems=cap.max_systems,
            max_atoms_per_system=cap.max_atoms_per_system,
            sort_by_size=cap.sort_by_size,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"structures/capacity: {exc}") from exc
    if len(sampler) == 0:
        raise ConfigError(
            f"capacity: no structure fits max_atoms={cap.max_atoms} (the largest has "
            f"{int(sampler.sizes.max())} atoms); raise capacity.max_atoms"
        )
    sinks, out_paths = _make_sinks(cfg, base_dir)
    plot_path = _output_path(cfg.report.plot, base_dir) if cfg.report.plot else None
    record_path = _output_path(cfg.report.record, base_dir) if cfg.report.record else None
    for p in (plot_path, record_path):
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)

    names = [type(s).__name__ for s in stages]
    import jax

    echo(
        f"{title or 'fused-dynamics run'}: {len(structures)} structures "
        f"({int(sampler.sizes.min())}-{int(sampler.sizes.max())} atoms), "
        f"{' -> '.join(names)}, batch {cap.max_systems} systems / {cap.max_atoms} atoms, "
        f"{cfg.dtype}, jax {jax.__version__} on {jax.default_backend()}"
    )
    targets = []
    for sc in cfg.stages:
        targets.append(sc.fmax if sc.fmax is not None else getattr(sc, "temperature", None))
    record = RunRecord(
        names,
        [s.is_optimizer for s in stages],
        max_systems=cap.max_systems,
        total=len(structures),
        progress=cfg.report.progress,
        targets=targets,
        budgets=[sc.n_steps for sc in cfg.stages],
        record_every=cfg.report.record_every,
    )
    recorder = RecorderHook(record, every_n_steps=cfg.report.record_every)
    fused = C.build_fused(cfg, model, hooks=(recorder,))

    stats = fd.RunStats()
    dtype = {"float32": jax.numpy.float32, "float64": jax.numpy.float64}[cfg.dtype]
    t_run = time.perf_counter()
    try:
        fused.run(
            sampler=sampler,
            refill_frequency=cfg.refill_frequency,
            sinks=[RecordingSink(TeeSink(sinks), record)],
            dtype=dtype,
            stats=stats,
        )
    finally:
        record.close()
    run_time = time.perf_counter() - t_run
    record.wall_time = run_time
    if cfg.report.summary:
        echo("")
        echo(summary_table(record, run_time))
        echo(
            f"{len(record.left)} systems in {run_time:.1f} s: {stats.steps} fused steps "
            f"({stats.steps / max(run_time, 1e-9):.0f} steps/s, compilation included), "
            f"slot utilisation {stats.utilization:.0%}, {stats.compilations} compilation(s) "
            "of the step"
        )
    if record_path is not None:
        record.write_csv(record_path)
    if plot_path is not None:
        plot_run(
            record,
            plot_path,
            title=title
            and f"{title}: {len(record.left)} systems, {stats.steps} fused steps, {run_time:.1f} s",
        )
    for p in out_paths:
        echo(f"wrote {p}")
    for p in (plot_path, record_path):
        if p is not None:
            echo(f"wrote {p}")
    echo(f"look inside: fused-dynamics inspect {out_paths[0]}")
    return RunResult(
        config=cfg,
        outputs=out_paths,
        plot=plot_path,
        wall_time=time.perf_counter() - t0,
        run_time=run_time,
        cpu_time=time.process_time() - c0,
        stats=stats,
        record=record,
    )


def _guarded(fn, debug: bool) -> None:
    """Run ``fn``; map configuration errors to exit 2 and run failures to exit 1."""
    try:
        fn()
    except ConfigError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # a failure of the run itself
        if debug:
            raise
        _err(f"error: the run failed: {type(exc).__name__}: {exc}")
        _err("(run again with --debug for the traceback)")
        raise typer.Exit(EXIT_RUN) from None


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of a failure.")]


@app.command()
def run(
    config: Annotated[
        Path, typer.Argument(help="A .toml or .yaml run configuration.", show_default=False)
    ],
    validate_only: Annotated[
        bool, typer.Option("--validate-only", help="Check the configuration and stop.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run the job described by CONFIG (structures, model, stages, capacity, outputs).

    The configuration is validated before anything is compiled; relative paths in it are
    resolved against its folder. Exit code 2 means the configuration or an input needs fixing
    (the message names the key), 1 that the run failed.
    """

    def go():
        cfg, base = load_config(config)
        if validate_only:
            typer.echo(f"{config}: valid ({len(cfg.stages)} stages, {len(cfg.outputs)} outputs)")
            return
        if no_progress:
            cfg = cfg.model_copy(
                update={"report": cfg.report.model_copy(update={"progress": False})}
            )
        execute(cfg, base, echo=typer.echo)

    _guarded(go, debug)


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="A small, fast version (tests).")] = False,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where the outputs go.")
    ] = Path("outputs"),
    save_config: Annotated[
        Path | None,
        typer.Option(
            "--save-config",
            help="Write the demo's configuration (.yaml or .toml) here and stop; "
            "'fused-dynamics run' runs it.",
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Relax (FIRE) then simulate (NVT Langevin) a few hundred generated argon structures.

    One FusedStage with inflight refill; writes OUTPUT_DIR/demo.extxyz and OUTPUT_DIR/demo.png
    and prints a summary table. About a minute on two CPU cores; --quick takes seconds after
    compilation.
    """
    from .demo import demo_config, run_demo

    def go():
        if save_config is not None:
            _save_config(demo_config(quick, output_dir), save_config)
            typer.echo(f"wrote {save_config}")
            return
        t0, c0 = time.perf_counter(), time.process_time()
        run_demo(quick=quick, output_dir=output_dir, progress=not no_progress, echo=typer.echo)
        typer.echo(
            f"demo finished in {time.perf_counter() - t0:.1f} s wall, "
            f"{time.process_time() - c0:.1f} s CPU (this process, after imports)"
        )

    _guarded(go, debug)


def _save_config(cfg: dict, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(cfg, sort_keys=False)
    elif suffix == ".toml":
        text = _to_toml(cfg)
    else:
        raise ConfigError(f"--save-config: unknown format {suffix!r}; allowed: .yaml, .yml, .toml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _to_toml(cfg: dict) -> str:
    """A minimal TOML writer for configuration dicts (scalars, tables, arrays of tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, (dict, list))]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and all(isinstance(x, dict) for x in v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items()]
        elif isinstance(v, list):
            lines.insert(0, f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


# ============================================================================ inspect
def _read_output(path: Path) -> list:
    import ase.io

    if path.is_dir() or path.suffix == ".zarr":
        from .sinks import read_zarr

        return read_zarr(path)
    return ase.io.read(path, index=":")


def summarize_output(path: str | os.PathLike) -> dict:
    """A summary of an output file (extxyz or zarr store) as a plain dict."""
    import numpy as np

    from .hooks import ExitReason

    path = Path(path)
    frames = _read_output(path)
    n = len(frames)
    reasons: dict[str, int] = {}
    for a in frames:
        r = a.info.get("exit_reason")
        name = "unknown" if r is None else ExitReason(int(r)).name.lower()
        reasons[name] = reasons.get(name, 0) + 1
    sizes = [len(a) for a in frames]
    e_atom, fmax, temps, steps = [], [], [], []
    for a in frames:
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
        if not xs:
            return None
        x = np.asarray(xs, float)
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
    status = [a.info.get("status") for a in frames if "status" in a.info]
    if status:
        out["statuses"] = {str(s): status.count(s) for s in sorted(set(status))}
    return out


def _format_summary(s: dict) -> str:
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
    lines += [
        f"  energy           {fmt(s['energy_per_atom'], 'eV/atom')}",
        f"  fmax             {fmt(s['fmax'], 'eV/Å')}",
        f"  temperature      {fmt(s['temperature'], 'K', '.1f')}",
    ]
    return "\n".join(lines)


@app.command()
def inspect(
    output: Annotated[
        Path,
        typer.Argument(
            help="An output of a run: an .extxyz file or a .zarr store.", show_default=False
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Summarise an output file: systems, exit reasons, steps per stage, energies, forces."""

    def go():
        if not output.exists():
            raise ConfigError(f"{os.fspath(output)!r} does not exist")
        try:
            summary = summarize_output(output)
        except Exception as exc:
            raise ConfigError(
                f"cannot read {os.fspath(output)!r} as extxyz or zarr: {exc}"
            ) from exc
        typer.echo(json.dumps(summary, indent=2) if as_json else _format_summary(summary))

    _guarded(go, debug)


def main() -> None:  # pragma: no cover - console entry for tools that want a function
    app()


if __name__ == "__main__":
    app()
