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
--save-config demo.yaml`` writes it out, and ``fused-dynamics run demo.yaml`` runs it.
``--quick`` is a small version (a few seconds after compilation) for tests.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import numpy as np

__all__ = ["DEMO_CONFIG", "QUICK_OVERRIDES", "demo_config", "make_structures", "main", "run_demo"]

DEMO_CONFIG: dict = {
    "seed": 0,
    "dtype": "float32",
    "device": "auto",
    "refill_frequency": 10,
    "structures": {"generate": "argon", "count": 256, "rattle": 0.15, "max_size": 32},
    "model": {
        "type": "lennard_jones",
        "sigma": 3.405,
        "epsilon": 0.0104,
        "cutoff": 7.5,
        "switch_onset": 6.5,
    },
    "stages": [
        {"type": "fire", "fmax": 0.01, "n_steps": 300},
        {
            "type": "nvt_langevin",
            "dt": 5.0,
            "temperature": 60.0,
            "friction": 0.02,
            "n_steps": 100,
        },
    ],
    "capacity": {"max_atoms": 384, "max_systems": 24},
    "outputs": [{"type": "extxyz", "path": "demo.extxyz"}],
    "report": {"plot": "demo.png", "record_every": 5},
}

# --quick: fewer and smaller systems, a smaller batch, short budgets
QUICK_OVERRIDES: dict = {
    "structures": {"count": 16, "max_size": 16},
    "capacity": {"max_atoms": 96, "max_systems": 8},
    "stages": [{"n_steps": 150}, {"n_steps": 20}],
    "report": {"record_every": 2},
}


def demo_config(quick: bool = False, output_dir: str | os.PathLike = "outputs") -> dict:
    """The demo's configuration as a plain dict (output paths under ``output_dir``)."""
    cfg = copy.deepcopy(DEMO_CONFIG)
    if quick:
        for key, value in QUICK_OVERRIDES.items():
            if key == "stages":
                for stage, extra in zip(cfg["stages"], value, strict=True):
                    stage.update(extra)
            else:
                cfg[key].update(value)
    out = os.fspath(output_dir)
    for o in cfg["outputs"]:
        o["path"] = os.path.join(out, o["path"])
    cfg["report"]["plot"] = os.path.join(out, cfg["report"]["plot"])
    return cfg


def _cluster(atoms, rng, vacuum: float = 6.0):
    """A non-periodic cluster centred in a box with ``vacuum`` Å on each side."""
    atoms = atoms.copy()
    atoms.rotate(float(rng.uniform(0, 360)), rng.normal(size=3), center="COP")
    atoms.center(vacuum=vacuum)
    atoms.pbc = False
    return atoms


def make_structures(n: int, seed: int = 0, rattle: float = 0.15, max_size: int = 32):
    """``n`` perturbed argon structures of at most ``max_size`` atoms, half clusters, half crystals.

    Clusters: icosahedra (13), truncated and full octahedra (13, 19), decahedra (13, 23), in a
    vacuum box without periodicity. Crystals: fcc (cubic cells of 4-32 atoms, primitive 2x2x2
    supercells) and hcp, periodic, with lattice constants spread around argon's (5.26 Å).
    Positions get Gaussian noise of ``rattle`` Å. Each ``atoms.info["structure"]`` names it.
    """
    from ase.build import bulk
    from ase.cluster import Decahedron, Icosahedron, Octahedron

    rng = np.random.default_rng(seed)
    clusters = [
        ("icosahedron", lambda: Icosahedron("Ar", 2)),
        ("octahedron", lambda: Octahedron("Ar", 3)),
        ("trunc-octahedron", lambda: Octahedron("Ar", 3, cutoff=1)),
        ("decahedron", lambda: Decahedron("Ar", 2, 2, 0)),
        ("decahedron", lambda: Decahedron("Ar", 3, 1, 0)),
    ]

    def fcc_cubic(reps):
        return lambda a: bulk("Ar", "fcc", a=a, cubic=True) * reps

    crystals = [
        ("fcc-cubic", fcc_cubic((1, 1, 1))),
        ("fcc-cubic", fcc_cubic((2, 1, 1))),
        ("fcc-cubic", fcc_cubic((2, 2, 1))),
        ("fcc-cubic", fcc_cubic((2, 2, 2))),
        ("fcc-primitive", lambda a: bulk("Ar", "fcc", a=a) * (2, 2, 2)),
        ("hcp", lambda a: bulk("Ar", "hcp", a=a / 2**0.5, c=a / 2**0.5 * 1.633) * (2, 2, 1)),
        ("hcp", lambda a: bulk("Ar", "hcp", a=a / 2**0.5, c=a / 2**0.5 * 1.633) * (2, 2, 2)),
    ]
    clusters = [(name, f) for name, f in clusters if len(f()) <= max_size]
    crystals = [(name, f) for name, f in crystals if len(f(5.26)) <= max_size]
    if not clusters and not crystals:
        raise ValueError(f"make_structures: no structure has at most max_size={max_size} atoms.")
    out = []
    for i in range(n):
        if (i % 2 == 0 and clusters) or not crystals:
            name, make = clusters[int(rng.integers(len(clusters)))]
            atoms = _cluster(make(), rng)
        else:
            name, make = crystals[int(rng.integers(len(crystals)))]
            atoms = make(float(rng.uniform(5.15, 5.45)))
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        atoms.info["structure"] = name
        out.append(atoms)
    return out


def run_demo(
    quick: bool = False,
    output_dir: str | os.PathLike = "outputs",
    progress: bool = True,
    echo=print,
    overwrite: bool = False,
    resume: bool = False,
):
    """Run the demo; returns the :class:`~fused_dynamics.cli.RunResult`.

    Outputs that exist in ``output_dir`` are refused (``ConfigError``) unless ``overwrite``
    (replace the files) or ``resume`` (skip the systems already written).
    """
    from .cli import execute
    from .config import validate_config

    cfg = validate_config(demo_config(quick, output_dir), base_dir=".", source="demo")
    if not progress:
        cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"progress": False})})
    title = "fused_dynamics demo" + (" (--quick)" if quick else "")
    return execute(cfg, Path("."), echo=echo, title=title, overwrite=overwrite, resume=resume)


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
    from .cli import app

    cmd = ["demo", "--output-dir", args.output_dir]
    for flag in ("quick", "no_progress", "overwrite", "resume"):
        cmd += [f"--{flag.replace('_', '-')}"] if getattr(args, flag) else []
    try:
        app(cmd, prog_name="fused-dynamics")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
