"""The application service: a validated configuration turned into a run.

:func:`execute` loads and checks the structures, plans the outputs (before anything
compiles), configures JAX, builds the model, the stages and the
:class:`~fused_dynamics.FusedStage` (:mod:`fused_dynamics.config`), the sampler and the sinks,
runs inflight, and writes the summary, the plot and the record. It knows nothing of a command
line: :mod:`fused_dynamics.cli` parses arguments, installs the signal handlers and maps
errors to exit codes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import annotated_types
import jax
import numpy as np

from . import inflight
from .checkpoint import read_header
from .compilation_cache import (
    cache_settings,
    check_cache_folder,
    disable_compilation_cache,
    enable_compilation_cache,
    restore_cache_settings,
)
from .config import (
    ConfigError,
    InfoValue,
    RunConfig,
    build_fused,
    build_model,
    build_stages,
    check_structure_species,
    choose_model_path,
    load_structures_with_sources,
)
from .inflight import StageExitWriter
from .interrupts import RunInterrupted
from .plotting import RecorderHook, RunRecord, plot_run, summary_table
from .run_outputs import TeeSink, open_sink, plan_outputs
from .sampling import SizeAwareSampler
from .status import ExitReason

__all__ = [
    "Preflight",
    "RunResult",
    "check_capacity",
    "check_output_capacity",
    "check_compilation_cache",
    "configure_jax",
    "execute",
    "files_line",
    "format_stage_exits",
    "preflight",
    "stage_exit_counts",
    "use_compilation_cache",
]


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


def _cache_folder(cfg: RunConfig, base_dir) -> Path | None:
    """The folder a configuration names (None for ``true``: the default folder)."""
    if isinstance(cfg.compilation_cache, str):
        return Path(base_dir) / Path(cfg.compilation_cache).expanduser()
    return None


def check_compilation_cache(cfg: RunConfig, base_dir: str | os.PathLike = ".") -> None:
    """Before compiling (``--validate-only`` too): a folder the configuration names can be
    used. ConfigError naming ``compilation_cache`` otherwise; nothing is created."""
    folder = _cache_folder(cfg, base_dir)
    if folder is None:
        return  # the default folder: a problem with it only costs the cache (a warning)
    try:
        check_cache_folder(folder)
    except ValueError as exc:
        raise ConfigError(
            f"compilation_cache: {exc} Give another folder, or false to compile every time."
        ) from None


def use_compilation_cache(
    cfg: RunConfig, base_dir: str | os.PathLike = ".", warn=None
) -> Path | None:
    """Apply ``cfg.compilation_cache`` to this process (:func:`execute` undoes it after the
    run): the folder in use, or None when the run compiles every time (``false``, or the
    default folder cannot be used, which ``warn`` is told).

    Raises
    ------
    ConfigError
        A folder the configuration names cannot be used.
    """
    if cfg.compilation_cache is False:
        disable_compilation_cache()
        return None
    folder = _cache_folder(cfg, base_dir)
    try:
        return enable_compilation_cache(folder)
    except ValueError as exc:
        why = str(exc).removeprefix("enable_compilation_cache: ")
        if folder is not None:
            raise ConfigError(
                f"compilation_cache: {why} Give another folder, or false to compile every time."
            ) from None
        disable_compilation_cache()
        (warn or print)(f"warning: compilation_cache: {why} The run compiles without a cache.")
        return None


def _problems(record) -> list[dict]:
    """The systems of a run that need attention, from its record of what was written."""
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


@dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` checked and built: everything a run needs before it compiles."""

    structures: list
    sources: list
    species_line: str
    files_line: str
    plans: list
    model: Any
    stages: list
    sampler: SizeAwareSampler
    path_line: str = ""
    info_line: str = ""  # the atoms.info values the job reads: how many structures carry them


def preflight(
    cfg: RunConfig,
    base_dir: str | os.PathLike = ".",
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> Preflight:
    """Every check a run makes before it compiles, in the run's order (``run --validate-only``).

    The structures are read and checked against the model's elements and the batch's
    capacity, every output path is planned (folders created and probed, nothing else
    written), JAX's dtype and device are applied (:func:`configure_jax`), the model, the
    stages, the sampler and the :class:`~fused_dynamics.FusedStage` are built (each checks
    its parameters). Nothing is compiled. :func:`execute` starts with it, so a configuration
    ``--validate-only`` accepts passes the same checks in ``run``, and one it refuses is
    refused by ``run`` with the same message.

    Raises
    ------
    ConfigError
        The first problem, naming the key to change and how.
    """
    base_dir = Path(base_dir)
    # the inputs first: a structure the model has no parameters for touches no output path
    structures, sources = load_structures_with_sources(cfg, base_dir)
    species_line = check_structure_species(cfg, structures, sources)
    check_capacity(cfg, structures, sources)
    check_output_capacity(cfg, len(structures))
    files = cfg.structures.files(base_dir)
    plans = plan_outputs(cfg, base_dir, overwrite=overwrite, resume=resume, inputs=files)
    check_compilation_cache(cfg, base_dir)
    configure_jax(cfg)
    per_system = cfg.capacity.max_atoms_per_system or max(len(a) for a in structures)
    ck = next(p for p in plans if p.kind == "checkpoint")
    layout = ck.header.get("layout") if ck.action == "resume" and ck.header else None
    model, choice = choose_model_path(cfg, build_model(cfg), structures, per_system, layout)
    stages = build_stages(cfg, model)
    sampler = _sampler(cfg, structures, sources)
    try:  # the fused stage's own checks (sub-stages, one model, one device)
        fused = build_fused(cfg, model)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"stages: {exc}") from None
    never = fused.why_never_graduates()
    if never is not None:  # a run has no overall step limit: it would never end
        raise ConfigError(f"stages: {never}. Give that stage n_steps, or a threshold >= 0.")
    _with_stress(cfg, fused)
    info_line = _check_info_values(cfg, fused, sampler)
    return Preflight(
        structures=structures,
        sources=sources,
        species_line=species_line,
        files_line=files_line(cfg, sources),
        plans=plans,
        model=model,
        stages=stages,
        sampler=sampler,
        path_line=f"pairs: {choice.reason}",
        info_line=info_line,
    )


def _check_info_values(cfg: RunConfig, fused, sampler) -> str:
    """The values the job reads from ``atoms.info`` (``{info = "KEY"}``), checked before
    compiling as the run will check them: a line saying how many structures carry good ones
    and which would be REJECTED; ConfigError when none would run."""
    dtype = np.float64 if cfg.dtype == "float64" else np.float32
    keys = inflight.require_info(fused, sampler, dtype)
    if not keys:
        return ""
    bad = sampler.info_problems()
    queued = len(sampler)
    shown = ", ".join(repr(k) for k in keys)
    if bad and len(bad) == queued:
        readers = job_info_keys(cfg)
        carried = {k: sum(k in sampler.dataset[i].info for i in sampler._queue) for k in keys}
        absent = [k for k in keys if not carried[k] and k in readers]
        if absent:
            raise ConfigError(
                f"{readers[absent[0]]}: no structure carries atoms.info[{absent[0]!r}]; give "
                "the structures that key, or write a number instead of {info = ...}"
            )
        raise ConfigError(
            f"structures: none can run: each has a bad atoms.info value the job reads "
            f"({', '.join(readers.get(k, k) for k in keys)}); the first: {bad[0][1]}"
        )
    line = f"atoms.info: {queued - len(bad)} of {queued} structures carry good values of {shown}"
    if bad:
        line += f"; {len(bad)} will be REJECTED, the first: {bad[0][1]}"
    return line


def job_info_keys(cfg: RunConfig) -> dict[str, str]:
    """Each ``atoms.info`` key a job file reads -> the first key that reads it
    (``"stages[1].temperature"``), for messages."""
    out: dict[str, str] = {}
    for key, where, _ in _info_fields(cfg):
        out.setdefault(key, where)
    return out


def _info_fields(cfg: RunConfig):
    """``(atoms.info key, "stages[i].name", field)`` of every ``{info = KEY}`` in a job."""
    for i, sc in enumerate(cfg.stages):
        for name, spec in type(sc).model_fields.items():
            value = getattr(sc, name)
            if isinstance(value, InfoValue):
                yield value.info, f"stages[{i}].{name}", spec


def files_line(cfg: RunConfig, sources) -> str:
    """``structures: 12 from 3 files, in this order: a.extxyz (10), POSCAR (1), b.cif (1)``."""
    if cfg.structures.generate is not None:
        return f"structures: {len(sources)} generated ({cfg.structures.generate})"
    counts: dict[str, int] = {}
    for f, _ in sources:
        counts[f] = counts.get(f, 0) + 1
    shown = [f"{os.path.basename(f)} ({n})" for f, n in list(counts.items())[:6]]
    more = f", ... and {len(counts) - 6} more files" if len(counts) > 6 else ""
    return (
        f"structures: {len(sources)} from {len(counts)} file(s), read in this order "
        f"(system_id 0 first): {', '.join(shown)}{more}"
    )


def check_output_capacity(cfg: RunConfig, n_structures: int) -> None:
    """Refuse an output whose ``capacity`` cannot hold every structure of the job.

    Every output receives every system that leaves the run (REJECTED ones too), so an output
    that holds fewer would stop the run with "every sink is full" after the work was done.

    Raises
    ------
    ConfigError
        Naming ``outputs[i].capacity``, its value and the number of structures.
    """
    for i, out in enumerate(cfg.outputs):
        if out.capacity is not None and out.capacity < n_structures:
            raise ConfigError(
                f"outputs[{i}].capacity = {out.capacity}: the job has {n_structures} "
                "structures, and every output receives every system: raise it to at least "
                f"{n_structures}, or leave it out (no limit)."
            )


def check_capacity(cfg: RunConfig, structures, sources) -> None:
    """Refuse structures the batch cannot hold, naming the capacity key and the value needed.

    A structure with more atoms than ``capacity.max_atoms`` (or than
    ``capacity.max_atoms_per_system``, when given) could never be run.

    Raises
    ------
    ConfigError
        Naming the key, the largest structure (file and frame), how many are too large and
        the smallest value that holds them all.
    """
    cap = cfg.capacity
    limit, key = cap.max_atoms, "capacity.max_atoms"
    if cap.max_atoms_per_system is not None and cap.max_atoms_per_system < limit:
        limit, key = cap.max_atoms_per_system, "capacity.max_atoms_per_system"
    sizes = [len(a) for a in structures]
    large = [i for i, n in enumerate(sizes) if n > limit]
    if not large:
        return
    worst = max(large, key=sizes.__getitem__)
    need = sizes[worst]
    f, k = sources[worst]
    where = f"generated structure {k}" if f is None else f"{os.path.basename(f)!r} frame {k}"
    others = f" ({len(large) - 1} more structure(s) are larger than {limit} atoms too)"
    raise ConfigError(
        f"{key}: {where} has {need} atoms, more than {key} = {limit}"
        + (others if len(large) > 1 else "")
        + f": raise {key} to at least {need}"
        + (
            f" (and capacity.max_atoms to at least {need})"
            if key.endswith("per_system") and cap.max_atoms < need
            else ""
        )
        + ", or leave the larger structures out"
    )


class _CompileWatch:
    """Feeds a :class:`~fused_dynamics.plotting.RunRecord` and says when compilation is done.

    The first sample of the run's recorder arrives from inside the compiled step, so the
    time from :meth:`start` to it is the compilation of the fused step (and of the run's
    start: the first batch, its first evaluation). Until then the progress bar says it is
    compiling.
    """

    def __init__(self, record, echo):
        self.record = record
        self.echo = echo
        self.t0: float | None = None

    def start(self) -> None:
        self._say("compiling the fused step (the first chunk waits for it) ...")
        if self.record.bar is not None:
            self.record.bar.set_description("compiling the fused step")
        self.t0 = time.perf_counter()

    def _say(self, line: str) -> None:
        bar = self.record.bar
        if bar is not None:
            bar.clear()
        self.echo(line)
        if bar is not None:
            bar.refresh()

    def on_sample(self, data) -> None:
        if self.t0 is not None:
            took = time.perf_counter() - self.t0
            self.t0 = None
            if self.record.bar is not None:
                self.record.bar.set_description("graduated")
            self._say(f"compiled in {took:.1f} s; running")
        self.record.on_sample(data)


def stage_exit_counts(left, budgets, stage_names) -> list[dict]:
    """Per stage: how many systems left it converged, out of budget, or failed in it.

    Parameters
    ----------
    left : list of dict
        One per system written (:attr:`~fused_dynamics.plotting.RunRecord.left`):
        ``exit_reason`` and ``stage_steps`` (steps spent in each stage).
    budgets : list of int or None
        Each stage's ``n_steps`` (a system's own ``budgets`` in ``left``, when it has them,
        come first: budgets read from ``atoms.info``).
    stage_names : list of str

    Returns
    -------
    list of dict
        ``{"stage", "entered", "converged", "budget", "failed"}`` per stage. A system that
        went on from a stage left it by its budget when it spent ``n_steps`` there, else by
        its criterion (docs/semantics.md §10-§11); in the stage it ended in, its exit reason
        says. A failed system is counted in the last stage it took a step in (the first stage
        when it failed before any). Rejected systems never entered a stage (not counted).
    """
    n = len(stage_names)
    rows = [
        {"stage": name, "entered": 0, "converged": 0, "budget": 0, "failed": 0}
        for name in stage_names
    ]
    for r in left:
        reason = r["exit_reason"]
        if reason == ExitReason.REJECTED:
            continue
        steps = list(r.get("stage_steps") or [0] * n)[:n] + [0] * n
        ran = [k for k in range(n) if steps[k] > 0]
        last = ran[-1] if ran else 0
        if reason in (ExitReason.CONVERGED, ExitReason.BUDGET):
            last = n - 1  # it left the final stage
        for k in range(last + 1):
            if k < last and steps[k] == 0:
                continue  # passed through without a step (criterion held on entry)
            rows[k]["entered"] += 1
            if k < last:
                budget = (r.get("budgets") or budgets)[k]  # the system's own, when it has one
                hit = isinstance(budget, int | float) and steps[k] >= budget
                rows[k]["budget" if hit else "converged"] += 1
            elif reason == ExitReason.FAILED:
                rows[k]["failed"] += 1
            elif reason == ExitReason.BUDGET:
                rows[k]["budget"] += 1
            elif reason == ExitReason.CONVERGED:
                rows[k]["converged"] += 1
    return rows


def format_stage_exits(rows: list[dict]) -> str:
    """The lines of :func:`stage_exit_counts`: per stage converged / budget / failed."""
    head = f"{'stage':<20}{'entered':>9}{'converged':>11}{'budget':>8}{'failed':>8}"
    lines = ["how systems left each stage:", head]
    for i, row in enumerate(rows):
        name = f"{i}: {row['stage']}"
        lines.append(
            f"{name:<20}{row['entered']:>9}{row['converged']:>11}{row['budget']:>8}"
            f"{row['failed']:>8}"
        )
    return "\n".join(lines)


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
        Replace existing output and report *files* (never a directory); an existing
        checkpoint is deleted before the run starts.
    resume : bool
        Continue an earlier run. When its checkpoint (``<outputs[0].path>.ckpt``) exists, the
        run continues from it bit for bit, the outputs are appended to, and the systems every
        output holds already (written after the checkpoint) are not written again. Without
        one, the systems the outputs hold (by ``system_id``) are skipped and the rest run
        from their start. Existing report files are kept.

    Checkpoints are written every ``cfg.checkpoint_every`` steps (0: none) and the checkpoint
    is removed once the run is complete and every output is closed. JAX's persistent
    compilation cache is set as ``cfg.compilation_cache`` asks for the run, and JAX's
    settings are put back after it.

    Raises
    ------
    ConfigError
        For problems found before the run starts (an output path that exists or cannot be
        written, unreadable structures, a model or stage that rejects its parameters, a
        capacity no structure fits, an unavailable device, a checkpoint that does not fit the
        configuration); anything else comes from the run.
    RunInterrupted
        Ctrl-C or SIGTERM (a KeyboardInterrupt): its ``lines`` say what the outputs hold and
        where ``--resume`` continues. The outputs are closed first.
    """
    settings = cache_settings()  # compilation_cache applies to this run only
    try:
        return _execute(
            cfg, base_dir, echo=echo, warn=warn, title=title, overwrite=overwrite, resume=resume
        )
    finally:
        restore_cache_settings(settings)


def _execute(cfg, base_dir, *, echo, warn, title, overwrite, resume) -> RunResult:
    t0, c0 = time.perf_counter(), time.process_time()
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    base_dir = Path(base_dir)
    pre = preflight(cfg, base_dir, overwrite=overwrite, resume=resume)
    structures, species_line, plans = pre.structures, pre.species_line, pre.plans
    model, stages, sampler = pre.model, pre.stages, pre.sampler
    outputs = [p for p in plans if p.key.startswith("outputs")]
    stage_plans = [p for p in plans if p.stage is not None]
    ck = next(p for p in plans if p.kind == "checkpoint")
    from_checkpoint = ck.action == "resume"
    ids = set(sampler.ids.tolist())
    done = set.intersection(*(p.written for p in outputs)) & ids
    skipped = 0
    if resume:
        foreign = sorted(set.union(*(p.written for p in outputs)) - ids)
        if foreign:
            warn(
                f"warning: the outputs hold {len(foreign)} system(s) that are not in the "
                f"structures (ids {foreign[:10]}{' ...' if len(foreign) > 10 else ''}); kept"
            )
        if from_checkpoint:
            echo(
                f"resuming from the checkpoint {os.fspath(ck.path)} at step "
                f"{ck.header['step_count']}: the run continues where it was saved, bit for bit; "
                f"the systems the outputs hold ({len(done)}) are not written again"
            )
        else:
            skipped = sampler.skip(done)
            echo(
                f"resuming by system_id (no checkpoint at {os.fspath(ck.path)}): {skipped} "
                f"systems already written are skipped, {len(sampler)} to run from their start"
            )

    cache = use_compilation_cache(cfg, base_dir, warn)
    names = [type(s).__name__ for s in stages]
    cap = cfg.capacity
    echo(
        f"{title or 'fused-dynamics run'}: {len(structures)} structures "
        f"({int(sampler.sizes.min())}-{int(sampler.sizes.max())} atoms), "
        f"{' -> '.join(names)}, batch {cap.max_systems} systems / {cap.max_atoms} atoms, "
        f"{cfg.dtype}, jax {jax.__version__} on {jax.default_backend()}"
    )
    echo(pre.files_line)
    echo(species_line)
    echo(pre.path_line)
    if pre.info_line:
        echo(pre.info_line)
    if cache is not None:
        echo(f"compiled programs: kept in {os.fspath(cache)} (compilation_cache)")
    if cfg.checkpoint_every:
        echo(
            f"checkpoints: every {cfg.checkpoint_every} steps to {os.fspath(ck.path)} "
            "(a killed run continues from the last one with --resume)"
        )
    targets = []  # a line on the plot: none where each structure carries its own value
    for sc in cfg.stages:
        target = sc.fmax if sc.fmax is not None else getattr(sc, "temperature", None)
        targets.append(None if isinstance(target, InfoValue) else target)
    record = RunRecord(
        names,
        [s.is_optimizer for s in stages],
        max_systems=cap.max_systems,
        total=len(structures) - (len(done) if from_checkpoint else skipped),
        progress=cfg.report.progress,
        targets=targets,
        budgets=[  # an atoms.info key: each system's own budget (RunRecord.on_written)
            sc.n_steps.info if isinstance(sc.n_steps, InfoValue) else sc.n_steps
            for sc in cfg.stages
        ],
        record_every=cfg.report.record_every,
    )
    watch = _CompileWatch(record, echo)
    recorder = RecorderHook(watch, every_n_steps=cfg.report.record_every)
    sinks: list = []
    held: list = []  # (plan, ids it holds) of every output, for an interrupt's report
    try:
        try:
            if ck.action == "overwrite":  # it would continue the run being replaced
                ck.path.unlink()
            sinks = [open_sink(p, cfg, echo, input_ids=sampler.ids) for p in outputs]
            tee = TeeSink(sinks, [p.written for p in outputs], on_written=record.on_written)
            held = list(zip(outputs, tee.written, strict=True))
            writers = []
            for p in stage_plans:
                stage_sink = TeeSink([open_sink(p, cfg, echo)], [p.written])
                sinks.append(stage_sink)
                held.append((p, stage_sink.written[0]))
                writers.append(
                    StageExitWriter(
                        p.stage,
                        p.stage + 1,
                        stage_sink,
                        annotate=sampler.annotate,
                        stage_type=cfg.stages[p.stage].type,
                    )
                )
            fused = build_fused(
                cfg, model, hooks=(recorder,), first_hooks=[w.hook() for w in writers]
            )
            fused = _with_stress(cfg, fused)
            dtype = {"float32": jax.numpy.float32, "float64": jax.numpy.float64}[cfg.dtype]
            t_run = time.perf_counter()
            watch.start()
            stats = fused.run(
                sampler=sampler,
                sinks=[tee],
                refill_frequency=cfg.refill_frequency,
                dtype=dtype,
                listeners=writers,
                checkpoint=ck.path if cfg.checkpoint_every else None,
                checkpoint_every=cfg.checkpoint_every or None,
                resume=ck.path if from_checkpoint else False,
            )
            tee.finish()  # input order: nothing is held back once the run has ended
        finally:
            record.close()
            for sink in sinks:
                sink.close()
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        raise RunInterrupted(signum, _left_behind(held, ck.path, cfg)) from None
    except Exception:
        step = _checkpoint_step(ck.path)
        if step is not None:
            warn(
                f"the checkpoint {os.fspath(ck.path)} (step {step}) is kept: --resume "
                "continues the run from it"
            )
        raise
    run_time = time.perf_counter() - t_run
    # complete, every output closed: the checkpoint would only continue a finished run
    removed = ck.path.is_file()
    if removed:
        ck.path.unlink()
    record.wall_time = run_time
    problems = _problems(record)
    if cfg.report.summary:
        echo("")
        echo(summary_table(record, run_time))
        first = ck.header["step_count"] if from_checkpoint else 0
        steps = stats.steps - first
        echo(
            f"{len(record.left)} systems in {run_time:.1f} s: {steps} fused steps"
            + (f" (steps {first} to {stats.steps})" if from_checkpoint else "")
            + f" ({steps / max(run_time, 1e-9):.0f} steps/s, compilation included), "
            f"slot utilisation {stats.utilization:.0%}, {stats.compilations} compilation(s) "
            f"of the step, {stats.checkpoints} checkpoint(s)"
        )
        echo(species_line)
        echo(pre.path_line)
        echo(format_stage_exits(stage_exit_counts(record.left, record.budgets, names)))
        for line in _describe_problems(problems):
            echo(line)
    report_paths = {p.kind: p for p in plans if p.kind in ("plot", "record")}
    written_reports = []
    for kind, p in report_paths.items():
        if p.action == "keep":
            echo(f"{p.key}: kept the existing {os.fspath(p.path)!r} (not rewritten on --resume)")
            continue
        if kind == "record":
            record.write_csv(p.path, overwrite=True)  # planned: new, or --overwrite
        else:
            plot_run(
                record,
                p.path,
                overwrite=True,
                title=title
                and f"{title}: {len(record.left)} systems, {stats.steps} fused steps, "
                f"{run_time:.1f} s",
            )
        written_reports.append(p.path)
    for p in outputs + stage_plans:
        echo(f"{'appended to' if p.action == 'resume' else 'wrote'} {p.path}")
    for path in written_reports:
        echo(f"wrote {path}")
    if removed:
        echo(f"removed the checkpoint {ck.path}: the run is complete")
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
        extra={"species": species_line, "resumed_from_checkpoint": from_checkpoint},
    )


class _JobSampler(SizeAwareSampler):
    """The sampler of a job file's run: a value read from ``atoms.info`` for a key written
    ``{info = "KEY"}`` must also meet the bounds the job file puts on that key (``fmax > 0``
    where the stage's own rule only asks for a finite number), :func:`job_info_rules`."""

    job_rules: dict = {}  # noqa: RUF012 - replaced per instance, never mutated

    def require_info(self, keys, check=None, readers=None) -> None:
        rules = self.job_rules

        def both(values, where):
            if check is not None:  # the stages' own rules first, then the job file's bounds
                check(values, where)
            for key, value in values.items():
                for name, symbol, limit in rules.get(key, ()):
                    ok = value > limit if symbol == ">" else value >= limit
                    if not ok:
                        raise ValueError(
                            f"{where}: atoms.info[{key!r}] (read by {name} of the job file) "
                            f"must be {symbol} {limit:g}, got {value!r}."
                        )

        super().require_info(keys, both if rules and keys else check, readers)


def job_info_rules(cfg: RunConfig) -> dict[str, list[tuple[str, str, float]]]:
    """For each ``atoms.info`` key a job file reads (``{info = "KEY"}``), the lower bounds
    of the keys that read it: ``{"F": [("stages[0].fmax", ">", 0.0)]}``."""
    out: dict[str, list] = {}
    for key, where, spec in _info_fields(cfg):
        for symbol, limit in _lower_bounds(spec.annotation):
            out.setdefault(key, []).append((where, symbol, limit))
    return out


def _lower_bounds(annotation) -> list[tuple[str, float]]:
    found = []
    for arg in typing.get_args(annotation):
        if isinstance(arg, annotated_types.Gt):
            found.append((">", float(arg.gt)))
        elif isinstance(arg, annotated_types.Ge):
            found.append((">=", float(arg.ge)))
        else:
            found += _lower_bounds(arg)
    return found


def _sampler(cfg: RunConfig, structures, sources) -> SizeAwareSampler:
    """The sampler of the run's structures; ConfigError when the capacity does not fit.

    A model that sums over a neighbor list gets a list sized for any batch of these
    structures when the run starts (docs/semantics.md §14), so that refilling the slots with
    larger or denser systems does not overflow it.
    """
    cap = cfg.capacity
    try:
        sampler = _JobSampler(
            structures,
            max_atoms=cap.max_atoms,
            max_systems=cap.max_systems,
            max_atoms_per_system=cap.max_atoms_per_system,
            sort_by_size=cap.sort_by_size,
            id_key=cfg.structures.id_key,
            sources=sources,
        )
    except (TypeError, ValueError) as exc:
        why = str(exc).removeprefix("SizeAwareSampler: ")
        if cfg.structures.id_key is not None and "id_key" in why:
            raise ConfigError(
                f"structures.id_key: {why} Fix the structures' info, or remove "
                "structures.id_key (system_id is then each structure's position)"
            ) from None
        raise ConfigError(f"structures: {why}") from None
    sampler.job_rules = job_info_rules(cfg)
    if len(sampler) == 0:
        raise ConfigError(
            f"capacity: no structure fits max_atoms={cap.max_atoms} (the largest has "
            f"{int(sampler.sizes.max())} atoms); raise capacity.max_atoms"
        )
    return sampler


def _checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path``, or None when there is none (or unreadable)."""
    try:
        return int(read_header(path)["step_count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _left_behind(held, ckpt_path: Path, cfg: RunConfig) -> list[str]:
    """What an interrupted run leaves: what each output holds, where --resume continues."""
    lines = []
    for p, ids in held:
        lines.append(
            f"{p.key} {os.fspath(p.path)!r}: {len(ids)} systems ({len(ids) - len(p.written)} "
            "written by this run)"
        )
    if not held:
        lines.append("no output was opened: nothing was written")
    step = _checkpoint_step(ckpt_path)
    if step is not None:
        lines.append(
            f"the last checkpoint is {os.fspath(ckpt_path)!r}, of step {step}: run the same "
            f"command with --resume to continue from step {step} (the systems written since "
            "are not written again)"
        )
    else:
        why = (
            "checkpoints are off (checkpoint_every = 0)"
            if not cfg.checkpoint_every
            else f"no checkpoint was written yet (every {cfg.checkpoint_every} steps)"
        )
        lines.append(
            f"{why}: run the same command with --resume to skip the systems written and run "
            "the rest from their start"
        )
    return lines


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
