"""The embedded default job: relax then simulate a few hundred argon structures, inflight.

``fused-dynamics demo`` (and ``python -m fused_dynamics.demo``, what ``make demo`` runs)
generates perturbed Lennard-Jones argon clusters (icosahedra, octahedra, decahedra) and fcc/hcp
crystals (no download), relaxes each with FIRE until fmax <= 0.01 eV/Å, then runs NVT Langevin
at 60 K, all through ONE FusedStage (one compiled step, one model evaluation per step) with
in-place refill of finished slots. It shows a progress bar, prints a summary table, and writes

- ``outputs/demo.extxyz``: every system as it left the run (``ase.io.read(path, ":")``),
- ``outputs/demo.png``: fmax and energy during relaxation, temperature during MD, systems per
  stage over time.

The job is an ordinary run configuration (:data:`DEMO_CONFIG`); ``fused-dynamics demo
--save-config demo.toml`` (or ``.yaml``) writes it out with every key explained in a comment
(unit, default, allowed values, and how to read your own structure files instead of the
generated ones), and ``fused-dynamics run demo.toml`` runs it.
``--quick`` is a small version (a few seconds after compilation) for tests.

This module is the ``python -m fused_dynamics.demo`` command line (it runs the ``demo``
command of :mod:`fused_dynamics.cli`); the job itself is :mod:`fused_dynamics.demo_job`
(:data:`DEMO_CONFIG`, :func:`run_demo`) and the structures come from
:mod:`fused_dynamics.structures` (:func:`make_structures`). Those names are importable from
here too.
"""

from __future__ import annotations

import argparse

from .cli import app, host_memory_from_environment
from .demo_job import DEMO_CONFIG, QUICK_OVERRIDES, demo_config, run_demo
from .structures import make_structures

__all__ = ["DEMO_CONFIG", "QUICK_OVERRIDES", "demo_config", "make_structures", "main", "run_demo"]


def main(argv=None) -> int:
    """``python -m fused_dynamics.demo [--quick] [--output-dir DIR] [--no-progress] [--overwrite]
    [--resume]``."""
    p = argparse.ArgumentParser(
        prog="python -m fused_dynamics.demo",
        description="fused_dynamics demo: FIRE -> NVT Langevin over argon structures, inflight.",
    )
    p.add_argument("--quick", action="store_true", help="a small run for tests")
    p.add_argument("--output-dir", default="outputs", help="where to write (default: outputs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--resume", action="store_true", help="continue outputs that exist")
    args = p.parse_args(argv)
    cmd = ["demo", "--output-dir", args.output_dir]
    for flag in ("quick", "no_progress", "overwrite", "resume"):
        cmd += [f"--{flag.replace('_', '-')}"] if getattr(args, flag) else []
    try:
        app(cmd, prog_name="fused-dynamics")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    host_memory_from_environment()  # a program of its own: docs/concepts.md, inflight batching
    raise SystemExit(main())
