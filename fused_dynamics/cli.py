"""The ``fused-dynamics`` command line.

Commands
--------
``fused-dynamics run CONFIG``
    Run the job a TOML or YAML configuration describes (see :mod:`fused_dynamics.config`).
``fused-dynamics demo [--quick]``
    The embedded default job (see :mod:`fused_dynamics.demo`).
``fused-dynamics inspect OUTPUT``
    Summarise an output file (extxyz, or a zarr store): systems, exit reasons, energies.
``fused-dynamics train CONFIG``
    Fit a model to reference energies, forces and stresses (see :mod:`fused_dynamics.training`).

Outputs never destroy work: an output (or report) path that exists is refused before anything
compiles, unless ``--overwrite`` (an extxyz file or a report file is replaced; a directory,
such as a zarr store, never is) or ``--resume``. Ctrl-C and SIGTERM stop the run between two
writes: every output then holds the same systems, each record complete, and the message says
how many and from which step ``--resume`` continues.

A run writes a checkpoint every ``checkpoint_every`` steps (default 1000; 0: none) to
``<outputs[0].path>.ckpt``, and removes it when the run is complete and every output closed.
``--resume`` continues a run that did not finish: from its checkpoint when there is one (the
run goes on from the checkpoint's step bit for bit, into the outputs opened for appending;
systems written after the checkpoint are not written again, so every system is in each output
once, as an uninterrupted run writes it); else the systems already written, by
``system_id``, are skipped and the rest run from their start. It prints which of the two it
does. A last extxyz frame cut short by a kill is moved aside to ``<path>.incomplete-tail``,
never deleted. A checkpoint that exists is refused by a run without ``--resume`` or
``--overwrite`` (which deletes it), and a checkpoint is continued only with the configuration
that wrote it (structures, model, stages, capacity, seed, dtype).

Systems that fail (``exit_reason`` FAILED: a non-finite or too large quantity), are rejected
(they cannot be run) or are written with non-finite values are listed in a warning on stderr
and in the summary; the exit code stays 0 unless ``--strict`` is given, then it is 1.

``run --validate-only`` makes every check ``run`` makes before compiling (the application's
:func:`~fused_dynamics.application.preflight`), so both refuse a configuration with the same
message and exit code. ``demo --save-config FILE`` writes the demo's configuration with every
key explained in a comment. While the fused step compiles, the run says so ("compiling the
fused step ...", then "compiled in 12.3 s"); the summary gives, per stage, how many systems
entered it and left it converged, out of budget or failed. After Ctrl-C the message says what
every output holds and the exact command that resumes the run.

Before anything compiles (and with ``run --validate-only``), every structure is checked
against the model's parameters and the batch's capacity (a structure larger than
``capacity.max_atoms`` is refused naming the value needed): an element without parameters
(not in ``model.species`` or ``model.pairs``, or a second element under a model given one
set of parameters without ``species``) stops the run with exit 2 naming the element, the file
and frame, and the key to add (see :mod:`fused_dynamics.config`, "Keys of the model").

Exit codes: 0 success; 2 a bad configuration or input, or an output path that exists (the
message names the key and what to do); 1 a failure while running, or with ``--strict`` some
system failed or was rejected; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

``python -m fused_dynamics.cli ...`` works as well as the console script.

This module is the thin command line: it parses arguments, installs the signal handlers
(:mod:`fused_dynamics.interrupts`) and maps errors to exit codes. The run itself is the
application service's (:func:`fused_dynamics.application.execute`); the outputs are planned
by :mod:`fused_dynamics.run_outputs`, an output is summarised by
:mod:`fused_dynamics.inspection`, and the configuration is :mod:`fused_dynamics.config`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from .application import RunResult, execute, preflight
from .config import ConfigError, load_config
from .config import save_config as write_config_file
from .demo_job import demo_config, run_demo
from .host_memory import reuse_host_memory_if_asked
from .inspection import inspect_command, summarize_output
from .interrupts import INTERRUPTS, resume_command
from .run_outputs import OutputPlan, plan_outputs
from .training.config import TrainConfigError, run_train_config

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


def _guarded(fn, debug: bool, args: list[str] | None = None) -> None:
    """Run ``fn``; map configuration errors to exit 2 and run failures to exit 1.

    ``args``: the command's arguments, for the line that says how to resume an interrupted
    run (:func:`~fused_dynamics.interrupts.resume_command`).
    """
    try:
        fn()
    except ConfigError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        lines = getattr(exc, "lines", None) or ["run the same command with --resume to continue"]
        _err(
            f"interrupted ({signal.Signals(signum).name}): the outputs hold every system "
            "written so far, each record complete"
        )
        for line in lines:
            _err(f"  {line}")
        if args is not None:
            _err(f"to continue, run: {resume_command(args)}")
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
        help="Continue a run that did not finish: from its checkpoint (OUTPUT.ckpt) when there "
        "is one, bit for bit; else skip the systems the outputs hold (by system_id) and run "
        "the rest. The outputs are appended to; every system ends up in each once.",
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
            help="Run every check 'run' makes before compiling (the configuration, its "
            "cross-key rules, the structures against the model and the capacity, the output "
            "paths, the model, the stages) and stop; exit 2 with the same message 'run' gives.",
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
    unless --overwrite or --resume. A checkpoint is written every checkpoint_every steps
    (default 1000) to OUTPUT.ckpt next to the first output, and removed when the run is
    complete; --resume continues from it. Exit code 2 means the configuration, an input or an
    output path needs fixing (the message names the key), 1 that the run failed (or, with
    --strict, that some system failed), 130/143 that it was interrupted (outputs stay
    consistent: continue with --resume).
    """

    def go():
        cfg, base = load_config(config)
        if validate_only:  # every check execute() makes before compiling: its preflight
            pre = preflight(cfg, base, overwrite=overwrite, resume=resume)
            typer.echo(
                f"{config}: valid ({len(cfg.stages)} stages, {len(cfg.outputs)} outputs, "
                f"{len(pre.structures)} structures): every check 'run' makes before compiling "
                "passed"
            )
            typer.echo(pre.files_line)
            typer.echo(pre.species_line)
            typer.echo(pre.path_line)
            if pre.info_line:
                typer.echo(pre.info_line)
            return
        if no_progress:
            cfg = cfg.model_copy(
                update={"report": cfg.report.model_copy(update={"progress": False})}
            )
        with INTERRUPTS.installed_handlers():
            result = execute(cfg, base, echo=typer.echo, overwrite=overwrite, resume=resume)
        _finish(result, strict)

    flags = {"--no-progress": no_progress, "--resume": resume, "--strict": strict, "--debug": debug}
    _guarded(go, debug, ["run", os.fspath(config), *(f for f, on in flags.items() if on)])


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
    20 seconds on two CPU cores (7 s of it compiling); --quick takes seconds after compilation.
    """

    def go():
        if save_config is not None:
            write_config_file(demo_config(quick, output_dir), save_config, overwrite)
            typer.echo(f"wrote {save_config}")
            return
        t0, c0 = time.perf_counter(), time.process_time()
        with INTERRUPTS.installed_handlers():
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

    flags = {
        "--quick": quick,
        "--no-progress": no_progress,
        "--resume": resume,
        "--strict": strict,
        "--debug": debug,
    }
    args = ["demo", *(f for f, on in flags.items() if on), "--output-dir", os.fspath(output_dir)]
    _guarded(go, debug, args)


@app.command()
def inspect(
    output: Annotated[
        Path,
        typer.Argument(
            help="An output of a run: an .extxyz file or a .zarr store.", show_default=False
        ),
    ],
    failed: Annotated[
        bool, typer.Option("--failed", help="Only the failed and rejected systems.")
    ] = False,
    stage: Annotated[
        int | None,
        typer.Option(
            "--stage",
            help="Only systems that left the run from sub-stage STAGE (0, 1, ...).",
        ),
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export", help="Write the listed systems to a .csv or .json file (never overwritten)."
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="csv or json: of --export (default: its suffix), or printed instead of the table.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary and the systems as JSON.")
    ] = False,
) -> None:
    """List an output's systems (id, source, exit reason, steps per stage, energy, fmax,
    temperature) and its statistics; failed and rejected systems are counted apart."""
    code = inspect_command(
        output,
        failed=failed,
        stage=stage,
        export=export,
        fmt="json" if as_json and fmt is None else fmt,
    )
    if code:
        raise typer.Exit(code)


@app.command()
def train(
    config: Annotated[
        Path, typer.Argument(help="A .toml or .yaml training configuration.", show_default=False)
    ],
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Train into an output_dir that exists and is not empty, replacing the files "
            "a training writes (model.eqx, last_model.eqx, metrics.json, metrics.csv, loss.png).",
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Fit a model to reference energies, forces and stresses, as CONFIG describes.

    \b
    Example (TOML; relative paths resolve against the configuration's folder):
        seed = 0
        dtype = "float64"
        output_dir = "fit"          # new or empty, else --overwrite
        \\[data]
        path = "data/*.extxyz"      # file(s)/glob(s) ase.io reads; index = ":"
        \\[validation]
        fraction = 0.1              # or path = "val.extxyz"
        \\[model]
        type = "lennard_jones"      # lennard_jones | morse | soft_sphere | nequip
        sigma = 3.3                 #   | class (import_path, hyperparameters)
        epsilon = 0.01              #   | checkpoint (path = "old/model.eqx")
        cutoff = 7.5
        \\[loss]
        energy = 1.0                # weights of the energy/atom, force and
        forces = 1.0                # stress mean squared errors
        stress = 1.0
        \\[optimizer]
        name = "adam"               # adam | adamw | sgd
        learning_rate = 0.01
        schedule = "warmup_cosine"  # constant | warmup_cosine | plateau
        warmup_epochs = 5
        clip_norm = 10.0            # optional gradient clipping
        \\[training]
        epochs = 200
        batch_size = 8              # structures per batch
        patience = 20               # early stopping on the validation loss

    Writes OUTPUT_DIR/model.eqx (the best parameters; fd.load_model
    restores it), last_model.eqx, metrics.json, metrics.csv and loss.png.
    Exit code 2: the configuration, the data or the output folder needs
    fixing (the message names the key); 1: the training failed.
    """

    def go():
        try:
            run_train_config(config, overwrite=overwrite, progress=not no_progress, echo=typer.echo)
        except TrainConfigError as exc:
            raise ConfigError(str(exc)) from None

    _guarded(go, debug)


def main() -> None:
    """The ``fused-dynamics`` command.

    With ``FUSED_DYNAMICS_REUSE_HOST_MEMORY=1`` it first sets glibc to keep freed host memory
    (:func:`~fused_dynamics.host_memory.reuse_host_memory_if_asked`, before any JAX
    computation); calling ``app`` from Python (tests, notebooks) never does. Another value of
    the variable than those it accepts exits 2 naming it.
    """
    host_memory_from_environment()
    app()


def host_memory_from_environment() -> None:
    """:func:`~fused_dynamics.host_memory.reuse_host_memory_if_asked`, a bad value exiting 2."""
    try:
        reuse_host_memory_if_asked()
    except ValueError as exc:
        _err(f"error: {exc}")
        raise SystemExit(EXIT_CONFIG) from None


if __name__ == "__main__":
    main()
