"""Memory and time of a gradient through a run: the checkpointed loop against a plain scan.

``FusedStage.run(differentiable=True, checkpoints=C)`` stores C batch states and recomputes the
rest in the reverse pass (docs/differentiable.md); a ``lax.scan`` of the step stores all of
them. Memory is XLA's own account of the compiled gradient program
(``memory_analysis().temp_size_in_bytes``: deterministic, no timing); time is the wall time of
one gradient, both programs called in interleaved rounds (A B A B), median and min-max reported
with the load average.

    .venv/bin/python benchmarks/bench_differentiable.py          # results/differentiable.json
    .venv/bin/python benchmarks/bench_differentiable.py --quick  # ..._quick.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
jax.config.update("jax_enable_x64", True)

import ase.cluster  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import block, git_state, save  # noqa: E402

import fused_dynamics as fd  # noqa: E402
from fused_dynamics import loop  # noqa: E402


def _programs(n_steps: int, checkpoints: int):
    atoms = ase.cluster.Icosahedron("Ar", 2)
    atoms.rattle(0.1, seed=1)
    atoms.positions *= 1.05
    batch = fd.Batch.from_atoms([atoms], dtype=jnp.float64)

    def model(eps):
        lj = fd.models.LennardJones(sigma=3.405, epsilon=eps, cutoff=8.0)
        return lj.with_images(batch)

    fused = fd.FusedStage([fd.NVE(model(0.0104), dt=5.0)])
    start = fused.init(batch)

    def checkpointed(eps):
        f = fused.with_model(model(eps))
        out = loop.run_steps(f, start, n_steps, max_steps=n_steps, checkpoints=checkpoints)[0]
        return out.energy[0]

    def scanned(eps):
        f = fused.with_model(model(eps))
        final, _ = jax.lax.scan(lambda b, _: (f.step(b)[0], None), start, length=n_steps)
        return final.energy[0]

    return {
        "checkpointed": jax.jit(jax.grad(checkpointed)).lower(0.0104).compile(),
        "scan": jax.jit(jax.grad(scanned)).lower(0.0104).compile(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    steps = [250, 500, 1000] if args.quick else [500, 1000, 2000, 4000]
    load_start = os.getloadavg()
    rows = []
    for n in steps:
        programs = _programs(n, args.checkpoints)
        times = {name: [] for name in programs}
        for program in programs.values():  # warm-up
            block(program(0.0104))
        for _ in range(args.rounds):  # interleaved: A B A B
            for name, program in programs.items():
                t = time.perf_counter()
                block(program(0.0104))
                times[name].append(time.perf_counter() - t)
        row = {"n_steps": n}
        for name, program in programs.items():
            row[name] = {
                "temp_bytes": int(program.memory_analysis().temp_size_in_bytes),
                "seconds_median": statistics.median(times[name]),
                "seconds_min": min(times[name]),
                "seconds_max": max(times[name]),
            }
        row["memory_ratio_scan_over_checkpointed"] = (
            row["scan"]["temp_bytes"] / row["checkpointed"]["temp_bytes"]
        )
        row["time_ratio_checkpointed_over_scan"] = (
            row["checkpointed"]["seconds_median"] / row["scan"]["seconds_median"]
        )
        print(
            f"{n:>5} steps: temporaries checkpointed {row['checkpointed']['temp_bytes'] / 1e6:.3f}"
            f" MB, scan {row['scan']['temp_bytes'] / 1e6:.1f} MB; gradient time checkpointed/"
            f"scan {row['time_ratio_checkpointed_over_scan']:.2f}"
        )
        rows.append(row)
    payload = {
        "system": "13-atom argon icosahedron, LJ rc 8 Å, NVE dt 5 fs, float64",
        "checkpoints": args.checkpoints,
        "rounds": args.rounds,
        "rows": rows,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "git": git_state(),
    }
    save("differentiable_quick" if args.quick else "differentiable", payload)


if __name__ == "__main__":
    main()
