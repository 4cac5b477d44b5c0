"""The ``fused-dynamics`` command line.

Commands
--------
``fused-dynamics run CONFIG``
    Run the job a TOML or YAML configuration describes (see :mod:`fused_dynamics.config`).
``fused-dynamics demo [--quick]``
    The embedded default job (see :mod:`fused_dynamics.demo`).
``fused-dynamics inspect OUTPUT``
    Summarise an output file (extxyz, or a zarr store): systems, exit reasons, energies.

Outputs never destroy work: an output (or report) path that exists is refused before anything
compiles, unless ``--overwrite`` (an extxyz file or a report file is replaced; a directory,
such as a zarr store, never is) or ``--resume`` (the systems already written, by ``system_id``,
are skipped and the rest appended; a last extxyz frame cut short by a kill is moved aside to
``<path>.incomplete-tail``, never deleted). Ctrl-C and SIGTERM stop the run between two
writes: every output then holds the same systems, each record complete.

Systems that fail (``exit_reason`` FAILED: a non-finite or too large quantity), are rejected
(they cannot be run) or are written with non-finite values are listed in a warning on stderr
and in the summary; the exit code stays 0 unless ``--strict`` is given, then it is 1.

Before anything compiles (and with ``run --validate-only``), every structure is checked
against the model's parameters: an element without parameters (not in ``model.species`` or
``model.pairs``, or a second element under a model given one set of parameters without
``species``) stops the run with exit 2 naming the element, the file and frame, and the key to
add (see :mod:`fused_dynamics.config`, "Keys of the model").

Exit codes: 0 success; 2 a bad configuration or input, or an output path that exists (the
message names the key and what to do); 1 a failure while running, or with ``--strict`` some
system failed or was rejected; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

``python -m fused_dynamics.cli ...`` works as well as the console script.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import ConfigError, RunConfig, load_config
from .status import exit_reason_name

__all__ = [
    "app",
    "execute",
    "plan_outputs",
    "OutputPlan",
    "RunResult",
    "summarize_output",
    "EXIT_OK",
    "EXIT_CONFIG",
    "EXIT_RUN",
]

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
    """What :func:`execute` did.

    ``problems`` lists the systems that need attention: ``{"system_id", "kind"}`` with kind
    ``"failed"`` (plus ``failure`` names and ``failure_step``), ``"rejected"`` or
    ``"non-finite"`` (written with non-finite values but not marked failed).
    """

    config: RunConfig
    outputs: list[Path]
    plot: Path | None
    wall_time: float
    run_time: float
    cpu_time: float
    stats: Any = None
    record: Any = None
    extra: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    skipped: int = 0


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


# ============================================================================ interrupts
class _Interrupts:
    """Turns SIGINT and SIGTERM into KeyboardInterrupt, never in the middle of a write.

    While :meth:`deferred` is active (a write to the outputs), a signal is remembered and
    raised when the write is complete, so every output holds the same systems and every
    record is whole.
    """

    def __init__(self):
        self.depth = 0
        self.pending: int | None = None
        self.installed = False

    def _handler(self, signum, frame):
        if self.depth:
            self.pending = signum
            return
        raise KeyboardInterrupt(signum)

    @contextlib.contextmanager
    def installed_handlers(self):
        """Install the handlers (main thread only; elsewhere a no-op)."""
        try:
            old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            yield
            return
        self.installed, self.pending = True, None
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.installed = False

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise KeyboardInterrupt(signum)


_INTERRUPTS = _Interrupts()


class TeeSink:
    """Write every system to each of ``sinks`` (a run's outputs are copies, not overflow).

    ``written[k]`` is the set of ids sink ``k`` holds already (a resumed output): a system is
    written only to the sinks that lack it. A write is never cut by Ctrl-C or SIGTERM (see
    :class:`_Interrupts`).
    """

    def __init__(self, sinks, written=None):
        self.sinks = list(sinks)
        self.written = [set(w) for w in written] if written else [set() for _ in self.sinks]

    def has_room(self, n: int = 1) -> bool:
        return all(s.has_room(n) for s in self.sinks)

    def write(self, atoms_list) -> None:
        with _INTERRUPTS.deferred():
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


# ============================================================================ output plan
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
    from .sinks import read_extxyz_ids, zarr_ids

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
    from .sinks import check_writable

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
    from .config import output_format

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


def _open_sink(p: OutputPlan, cfg: RunConfig, echo):
    """The sink of one planned output (an incomplete extxyz tail is moved aside first)."""
    import fused_dynamics as fd

    from .sinks import set_aside_tail

    if p.action == "resume" and p.kind == "extxyz" and p.complete < p.size:
        side = set_aside_tail(p.path, p.complete)
        echo(
            f"{p.key}: the last frame of {os.fspath(p.path)!r} was cut short (a killed run); "
            f"its {p.size - p.complete} bytes were moved to {side!r}"
        )
    mode = {"new": "x", "overwrite": "w", "resume": "a"}[p.action]
    cls = fd.ExtXYZSink if p.kind == "extxyz" else fd.ZarrSink
    try:
        return cls(p.path, capacity=p.capacity, mode=mode, metadata=_metadata(cfg))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p.key}: cannot write {os.fspath(p.path)!r}: {exc}") from exc


# ============================================================================ problems
def _problems(record) -> list[dict]:
    """The systems of a run that need attention, from its record of what was written."""
    from .hooks import ExitReason

    out = []
    for r in record.left:
        reason = r["exit_reason"]
        if reason == ExitReason.FAILED:
            out.append(
                {
                    "system_id": r["system_id"],
                    "kind": "failed",
                    "failure": r.get("failure") or "unknown",
                    "failure_step": r.get("failure_step"),
                }
            )
        elif reason == ExitReason.REJECTED:
            out.append({"system_id": r["system_id"], "kind": "rejected", "why": r.get("why")})
        elif not r.get("finite", True):
            out.append({"system_id": r["system_id"], "kind": "non-finite"})
    return out


def _describe_problems(problems: list[dict], limit: int = 20) -> list[str]:
    """Lines of a warning: how many failed / were rejected / are non-finite, and which."""
    lines = []
    for kind, what in (
        ("failed", "FAILED (left the run with exit_reason failed)"),
        ("non-finite", "written with NaN or inf values but not marked failed"),
        ("rejected", "REJECTED (could not be run)"),
    ):
        rows = [p for p in problems if p["kind"] == kind]
        if not rows:
            continue
        lines.append(f"warning: {len(rows)} system(s) {what}:")
        for p in rows[:limit]:
            if kind == "failed":
                step = p["failure_step"]
                at = f" at step {step}" if step is not None and step >= 0 else ""
                lines.append(f"  system {p['system_id']}: {p['failure']}{at}")
            elif kind == "rejected":
                lines.append(f"  system {p['system_id']}: {p['why']}")
            else:
                lines.append(f"  system {p['system_id']}")
        if len(rows) > limit:
            lines.append(f"  ... and {len(rows) - limit} more (fused-dynamics inspect lists them)")
    return lines


def execute(
    cfg: RunConfig,
    base_dir: str | os.PathLike = ".",
    *,
    echo=print,
    warn=None,
    title: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> RunResult:
    """Run a validated configuration: build, run inflight, write outputs, summary and plot.

    Parameters
    ----------
    cfg : RunConfig
    base_dir : path
        Relative paths of the configuration are resolved against it.
    echo, warn : callable
        Where progress lines (stdout) and warnings (default: stderr) go.
    title : str, optional
    overwrite : bool
        Replace existing output and report *files* (never a directory).
    resume : bool
        Continue existing outputs: the systems they hold (by ``system_id``) are skipped and the
        rest appended; existing report files are kept.

    Raises
    ------
    ConfigError
        For problems found before the run starts (an output path that exists or cannot be
        written, unreadable structures, a model or stage that rejects its parameters, a
        capacity no structure fits, an unavailable device); anything else comes from the run.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    base_dir = Path(base_dir)
    from . import config as C

    # the inputs first: a structure the model has no parameters for touches no output path
    structures, sources = C.load_structures_with_sources(cfg, base_dir)
    species_line = C.check_structure_species(cfg, structures, sources)
    plans = plan_outputs(
        cfg, base_dir, overwrite=overwrite, resume=resume, inputs=cfg.structures.files(base_dir)
    )
    configure_jax(cfg)
    import fused_dynamics as fd

    from .inflight import StageExitWriter, run_inflight
    from .plotting import RecorderHook, RecordingSink, RunRecord, plot_run, summary_table

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
            id_key=cfg.structures.id_key,
            sources=sources,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"structures/capacity: {exc}") from exc
    if len(sampler) == 0:
        raise ConfigError(
            f"capacity: no structure fits max_atoms={cap.max_atoms} (the largest has "
            f"{int(sampler.sizes.max())} atoms); raise capacity.max_atoms"
        )
    outputs = [p for p in plans if p.key.startswith("outputs")]
    stage_plans = [p for p in plans if p.stage is not None]
    skipped = 0
    if resume:
        done = set.intersection(*(p.written for p in outputs))
        skipped = sampler.skip(done)
        foreign = sorted(set.union(*(p.written for p in outputs)) - set(sampler.ids.tolist()))
        if foreign:
            warn(
                f"warning: the outputs hold {len(foreign)} system(s) that are not in the "
                f"structures (ids {foreign[:10]}{' ...' if len(foreign) > 10 else ''}); kept"
            )
        echo(f"resuming: {skipped} systems already written are skipped, {len(sampler)} to run")

    names = [type(s).__name__ for s in stages]
    import jax

    echo(
        f"{title or 'fused-dynamics run'}: {len(structures)} structures "
        f"({int(sampler.sizes.min())}-{int(sampler.sizes.max())} atoms), "
        f"{' -> '.join(names)}, batch {cap.max_systems} systems / {cap.max_atoms} atoms, "
        f"{cfg.dtype}, jax {jax.__version__} on {jax.default_backend()}"
    )
    echo(species_line)
    targets = []
    for sc in cfg.stages:
        targets.append(sc.fmax if sc.fmax is not None else getattr(sc, "temperature", None))
    record = RunRecord(
        names,
        [s.is_optimizer for s in stages],
        max_systems=cap.max_systems,
        total=len(structures) - skipped,
        progress=cfg.report.progress,
        targets=targets,
        budgets=[sc.n_steps for sc in cfg.stages],
        record_every=cfg.report.record_every,
    )
    recorder = RecorderHook(record, every_n_steps=cfg.report.record_every)
    sinks = []
    writers = []
    try:
        sinks = [_open_sink(p, cfg, echo) for p in outputs]
        for p in stage_plans:
            sink = TeeSink([_open_sink(p, cfg, echo)], [p.written])
            sinks.append(sink)
            writers.append(
                StageExitWriter(
                    p.stage,
                    p.stage + 1,
                    sink,
                    annotate=sampler.annotate,
                    stage_type=cfg.stages[p.stage].type,
                )
            )
        fused = C.build_fused(
            cfg, model, hooks=(recorder,), first_hooks=[w.hook() for w in writers]
        )
        fused = _with_stress(cfg, fused)
        stats = fd.RunStats()
        dtype = {"float32": jax.numpy.float32, "float64": jax.numpy.float64}[cfg.dtype]
        tee = TeeSink(sinks[: len(outputs)], [p.written for p in outputs])
        t_run = time.perf_counter()
        run_inflight(
            fused,
            sampler,
            cfg.refill_frequency,
            [RecordingSink(tee, record)],
            dtype=dtype,
            stats=stats,
            listeners=writers,
        )
    finally:
        record.close()
        for sink in sinks:
            sink.close()
    run_time = time.perf_counter() - t_run
    record.wall_time = run_time
    problems = _problems(record)
    if cfg.report.summary:
        echo("")
        echo(summary_table(record, run_time))
        echo(
            f"{len(record.left)} systems in {run_time:.1f} s: {stats.steps} fused steps "
            f"({stats.steps / max(run_time, 1e-9):.0f} steps/s, compilation included), "
            f"slot utilisation {stats.utilization:.0%}, {stats.compilations} compilation(s) "
            "of the step"
        )
        echo(species_line)
        for line in _describe_problems(problems):
            echo(line)
    report_paths = {p.kind: p for p in plans if p.kind in ("plot", "record")}
    written_reports = []
    for kind, p in report_paths.items():
        if p.action == "keep":
            echo(f"{p.key}: kept the existing {os.fspath(p.path)!r} (not rewritten on --resume)")
            continue
        if kind == "record":
            record.write_csv(p.path)
        else:
            plot_run(
                record,
                p.path,
                title=title
                and f"{title}: {len(record.left)} systems, {stats.steps} fused steps, "
                f"{run_time:.1f} s",
            )
        written_reports.append(p.path)
    for p in outputs + stage_plans:
        echo(f"{'appended to' if p.action == 'resume' else 'wrote'} {p.path}")
    for path in written_reports:
        echo(f"wrote {path}")
    echo(f"look inside: fused-dynamics inspect {outputs[0].path}")
    if problems:
        for line in _describe_problems(problems):
            warn(line)
    plot = report_paths.get("plot")
    return RunResult(
        config=cfg,
        outputs=[p.path for p in outputs],
        plot=None if plot is None or plot.action == "keep" else plot.path,
        wall_time=time.perf_counter() - t0,
        run_time=run_time,
        cpu_time=time.process_time() - c0,
        stats=stats,
        record=record,
        problems=problems,
        skipped=skipped,
        extra={"species": species_line},
    )


def _with_stress(cfg: RunConfig, fused):
    """The fused stage computing the stress at every step when an output asks for it."""
    asked = [i for i, o in enumerate(cfg.outputs) if o.stress]
    if not asked:
        return fused
    with_stress = getattr(fused, "with_stress", None)
    if with_stress is None:
        raise ConfigError(
            f"outputs[{asked[0]}].stress: this version of fused_dynamics cannot be asked to "
            "compute the stress always; remove the key (the stress is written whenever a "
            "stage computes it)"
        )
    return with_stress()


def _guarded(fn, debug: bool) -> None:
    """Run ``fn``; map configuration errors to exit 2 and run failures to exit 1."""
    try:
        fn()
    except ConfigError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        _err(
            f"interrupted ({signal.Signals(signum).name}): the outputs hold every system "
            "written so far, each record complete; run the same command with --resume to "
            "continue"
        )
        raise typer.Exit(128 + int(signum)) from None
    except typer.Exit:
        raise
    except Exception as exc:  # a failure of the run itself
        if debug:
            raise
        _err(f"error: the run failed: {type(exc).__name__}: {exc}")
        _err("(run again with --debug for the traceback)")
        raise typer.Exit(EXIT_RUN) from None


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of a failure.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace output and report files that exist (a directory, such as a zarr store, "
        "is never deleted).",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue outputs that exist: skip the systems they hold (by system_id) and "
        "append the rest.",
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Exit with code 1 when some system failed or was rejected."),
]


def _finish(result: RunResult, strict: bool) -> None:
    """Exit 1 under --strict when some system needs attention (listed already)."""
    if strict and result.problems:
        _err(f"error: --strict: {len(result.problems)} system(s) failed or were rejected")
        raise typer.Exit(EXIT_RUN)


@app.command()
def run(
    config: Annotated[
        Path, typer.Argument(help="A .toml or .yaml run configuration.", show_default=False)
    ],
    validate_only: Annotated[
        bool,
        typer.Option(
            "--validate-only",
            help="Check the configuration, the output paths and the elements of the structures "
            "against the model's parameters, and stop.",
        ),
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    strict: StrictOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the job described by CONFIG (structures, model, stages, capacity, outputs).

    The configuration, the elements of the structures (each needs parameters in the model:
    model.species or model.pairs; one set of parameters without species only for structures
    of one element type) and every output path are checked before anything is compiled;
    relative paths in it are resolved against its folder. An output that exists is refused
    unless --overwrite or --resume. Exit code 2 means the configuration, an input or an output
    path needs fixing (the message names the key), 1 that the run failed (or, with --strict,
    that some system failed), 130/143 that it was interrupted (outputs stay consistent:
    continue with --resume).
    """

    def go():
        cfg, base = load_config(config)
        if validate_only:  # the checks execute() makes before compiling, in its order
            from .config import (
                build_model,
                check_structure_species,
                load_structures_with_sources,
            )

            structures, sources = load_structures_with_sources(cfg, base)
            species_line = check_structure_species(cfg, structures, sources)
            plan_outputs(
                cfg,
                base,
                overwrite=overwrite,
                resume=resume,
                inputs=cfg.structures.files(base),
            )
            build_model(cfg)
            typer.echo(
                f"{config}: valid ({len(cfg.stages)} stages, {len(cfg.outputs)} outputs, "
                f"{len(structures)} structures)"
            )
            typer.echo(species_line)
            return
        if no_progress:
            cfg = cfg.model_copy(
                update={"report": cfg.report.model_copy(update={"progress": False})}
            )
        with _INTERRUPTS.installed_handlers():
            result = execute(cfg, base, echo=typer.echo, overwrite=overwrite, resume=resume)
        _finish(result, strict)

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
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    strict: StrictOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Relax (FIRE) then simulate (NVT Langevin) a few hundred generated argon structures.

    One FusedStage with inflight refill; writes OUTPUT_DIR/demo.extxyz and OUTPUT_DIR/demo.png
    (refused if they exist, unless --overwrite or --resume) and prints a summary table. About
    a minute on two CPU cores; --quick takes seconds after compilation.
    """
    from .demo import demo_config, run_demo

    def go():
        if save_config is not None:
            _save_config(demo_config(quick, output_dir), save_config, overwrite)
            typer.echo(f"wrote {save_config}")
            return
        t0, c0 = time.perf_counter(), time.process_time()
        with _INTERRUPTS.installed_handlers():
            result = run_demo(
                quick=quick,
                output_dir=output_dir,
                progress=not no_progress,
                echo=typer.echo,
                overwrite=overwrite,
                resume=resume,
            )
        _finish(result, strict)
        typer.echo(
            f"demo finished in {time.perf_counter() - t0:.1f} s wall, "
            f"{time.process_time() - c0:.1f} s CPU (this process, after imports)"
        )

    _guarded(go, debug)


MODEL_KEYS_HELP = """\
[model]: the pair potential, and the elements its parameters are for. Keys and units:
  lennard_jones: sigma (Å), epsilon (eV), cutoff (Å), switch_onset (Å), shift (true/false)
  morse: D (eV), alpha (1/Å), r0 (Å), cutoff (Å), switch_onset (Å), shift
  soft_sphere: sigma (Å, also the cutoff), epsilon (eV), alpha (exponent)
One set of parameters is for the elements listed in species (symbols, e.g. ["Ar"]; the same
parameters for every pair of them); without species it is used only when all structures
together hold one element type (here: argon), else the run is refused (exit 2). For several
elements give a table per species pair instead of the parameters (sigma Å, epsilon eV; morse:
D eV, alpha 1/Å, r0 Å), an element alone for its pair with itself:
{example}
Structures with an element that has no parameters are refused before anything runs.
"""

_PAIRS_EXAMPLE = {
    "toml": """\
  [model]
  type = "lennard_jones"
  cutoff = 7.5
  mixing = "lorentz_berthelot"   # or "geometric": fills cross pairs not listed
  [model.pairs]
  Ar = {sigma = 3.405, epsilon = 0.0104}
  Kr = {sigma = 3.65, epsilon = 0.014}
  Ar-Kr = {sigma = 3.5, epsilon = 0.012}   # listed pairs are kept as given""",
    "yaml": """\
  model:
    type: lennard_jones
    cutoff: 7.5
    mixing: lorentz_berthelot    # or geometric: fills cross pairs not listed
    pairs:
      Ar: {sigma: 3.405, epsilon: 0.0104}
      Kr: {sigma: 3.65, epsilon: 0.014}
      Ar-Kr: {sigma: 3.5, epsilon: 0.012}   # listed pairs are kept as given""",
}


def _commented(text: str, fmt: str) -> str:
    """``text`` with :data:`MODEL_KEYS_HELP` as comments just before the model section."""
    help_text = MODEL_KEYS_HELP.format(example=_PAIRS_EXAMPLE[fmt])
    block = "".join(f"# {line}".rstrip() + "\n" for line in help_text.splitlines())
    marker = "[model]\n" if fmt == "toml" else "model:"
    lines = text.splitlines(keepends=True)
    for k, line in enumerate(lines):
        if line.startswith(marker):
            return "".join(lines[:k]) + block + "".join(lines[k:])
    return block + text


def _save_config(cfg: dict, path: Path, overwrite: bool = False) -> None:
    """Write ``cfg`` as YAML or TOML, with the model keys explained in comments."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        text = _commented(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), "yaml")
    elif suffix == ".toml":
        text = _commented(_to_toml(cfg), "toml")
    else:
        raise ConfigError(f"--save-config: unknown format {suffix!r}; allowed: .yaml, .yml, .toml")
    if path.is_dir() or (path.exists() and not overwrite):
        raise ConfigError(
            f"--save-config: {os.fspath(path)!r} exists; give --overwrite to replace a file "
            "(a directory never is), or choose another path"
        )
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
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k) -> str:
    """A bare key where TOML allows one (letters, digits, ``_``, ``-``), else quoted."""
    import re

    k = str(k)
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _to_toml(cfg: dict) -> str:
    """A minimal TOML writer for configuration dicts (scalars, tables, arrays of tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, (dict, list))]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [
                f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None
            ]
        elif isinstance(v, list) and all(isinstance(x, dict) for x in v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [
                    f"{_toml_key(kk)} = {_toml_value(vv)}"
                    for kk, vv in item.items()
                    if vv is not None
                ]
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
    """A summary of an output file (extxyz or zarr store) as a plain dict.

    Energy, fmax and temperature statistics are over the systems that neither failed nor were
    rejected; failed systems are listed under ``"failed"`` (``system_id``, ``failure`` names,
    ``failure_step``).
    """
    import numpy as np

    from .hooks import ExitReason

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
