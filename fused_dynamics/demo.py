"""The embedded default job: relax then simulate a set of argon structures with inflight refill.

``python -m fused_dynamics.demo`` (what ``make demo`` runs) generates perturbed LJ argon
clusters and small fcc crystals (no download), relaxes each with FIRE until fmax <= 0.05 eV/Å,
then runs NVT Langevin at 60 K for a fixed budget, all through ONE FusedStage with one model
evaluation per step and in-place refill of finished slots. Every finished system is written to
``outputs/demo.extxyz`` (readable by ``ase.io.read``) and a summary is printed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.cluster import Icosahedron

__all__ = ["make_structures", "main"]


def make_structures(n: int, seed: int = 0):
    """``n`` perturbed argon structures: icosahedral clusters and fcc crystals of 4-108 atoms."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            a = Icosahedron("Ar", int(rng.integers(2, 4))).copy()
            a.cell = np.zeros((3, 3))
        else:
            reps = tuple(int(k) for k in rng.integers(1, 4, size=3))
            a = bulk("Ar", "fcc", a=float(rng.uniform(5.2, 5.5)), cubic=True) * reps
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        out.append(a)
    return out


def main(argv=None) -> int:
    import jax

    p = argparse.ArgumentParser(description="fused_dynamics demo: FIRE -> NVT Langevin, inflight.")
    p.add_argument("--systems", type=int, default=200)
    p.add_argument("--md-steps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="a small run for tests (24 systems)")
    p.add_argument("--output", default="outputs/demo.extxyz")
    args = p.parse_args(argv)
    if args.quick:
        args.systems, args.md_steps = 24, 40

    import ase.io

    import fused_dynamics as fd
    from fused_dynamics.stages.fire import FIRE
    from fused_dynamics.stages.langevin import NVTLangevin

    structures = make_structures(args.systems)
    model = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.0, switch_onset=6.0)
    relax = FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=500)
    md = NVTLangevin(model, dt=5.0, temperature=60.0, friction=0.01, seed=0, n_steps=args.md_steps)
    fused = relax + md
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    sampler = fd.SizeAwareSampler(structures, max_atoms=1024, max_systems=24)
    print(f"jax {jax.__version__} on {jax.default_backend()}; {len(structures)} structures")
    print(fused)
    stats = fd.RunStats()
    t = time.perf_counter()
    fused.run(sampler=sampler, refill_frequency=20, sinks=[fd.ExtXYZSink(out)], stats=stats)
    wall = time.perf_counter() - t
    done = ase.io.read(out, index=":")
    reasons = np.array([a.info["exit_reason"] for a in done])
    steps = np.array([a.info["stage_steps"] for a in done])
    print(
        f"\n{len(done)} systems in {wall:.1f} s ({stats.steps} fused steps, "
        f"{stats.steps / wall:.0f} steps/s, slot utilisation {stats.utilization:.1%}, "
        f"{stats.compilations} compilation)"
    )
    print(f"{'stage':<14}{'systems':>9}{'mean steps':>12}")
    for k, (_, stage) in enumerate(fused.sub_stages):
        print(
            f"{type(stage).__name__:<14}{int(np.sum(steps[:, k] > 0)):>9}"
            f"{steps[:, k].mean():>12.1f}"
        )
    for r in fd.ExitReason:
        if np.any(reasons == r):
            print(f"  exit {r.name.lower()}: {int(np.sum(reasons == r))}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
