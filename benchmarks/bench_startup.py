"""W1 time to solution in a new process, with JAX's persistent compilation cache cold and warm.

What a user who starts a script (or ``fused-dynamics run``) waits for: a fresh Python process
imports, builds, compiles and relaxes one of bench_peers.py's relaxation sets
(``--relax-set``: ``w1``, issue 13's W1, 256 clusters and crystals of 13-108 atoms in seven
shapes, cutoff 7.5 Å, the default; ``peers``: half icosahedral 55-atom clusters, half 256-atom
fcc crystals, cutoff 8.5 Å), rattled 0.1 Å, LJ argon, FIRE to fmax 0.05 eV/Å, float64. Two codes,
each in its own process per measurement:

- fused_dynamics: ``FusedStage([FIRE(...)], output_stress=False).run(batch)`` on one mixed
  batch (its size buckets; no stress for the output, as JAX-MD computes none);
- JAX-MD: bench_peers.py's vmapped ``fire_descent`` loop, one jitted program per shape.

Two cache states: **cold** (JAX's persistent compilation cache on, in a new empty folder: the
first run on a machine) and **warm** (the folder the cold process of the same round filled: any
later run of the same shapes). Both codes get the same cache settings
(``fd.enable_compilation_cache(folder, min_compile_time=0.2)``; for JAX-MD the same two JAX
settings), so the warm ratio compares like with like; JAX-MD does not switch the cache on by
itself, fused_dynamics' command line does.

Rounds are interleaved (ours cold, JAX-MD cold, ours warm, JAX-MD warm; the order of the two
codes alternates between rounds), processes run one at a time. Per process: ``import_s``
(``import jax`` and the code), ``solution_s`` (from building the structures to the relaxed
energies on the host, compilation included), their sum ``total_s``. Ratios are JAX-MD's time
over ours (above 1: ours is faster), round by round, median and min–max.

Run::

    .venv-bench/bin/python benchmarks/bench_startup.py [--relax-set w1] [--relax-systems 256]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CODES = ("fused_dynamics", "jax_md")
MIN_COMPILE_TIME = 0.2  # s: the default of fd.enable_compilation_cache, for both codes


def worker(code: str, cache: str, n_systems: int, relax_set: str = "w1") -> dict:
    """One measurement, in this (new) process; returns what the parent records."""
    t0 = time.perf_counter()
    import jax

    jax.config.update("jax_enable_x64", True)
    import bench_peers as bp
    import numpy as np

    if code == "fused_dynamics":
        import fused_dynamics as fd

        fd.enable_compilation_cache(cache, min_compile_time=MIN_COMPILE_TIME)
    else:
        import jax_md  # noqa: F401  (its import is part of its time to solution)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.set_cache_dir(cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME)
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None
    )
    t1 = time.perf_counter()
    systems, cutoff = bp.relax_set(relax_set, n_systems)
    bp.CUTOFF = cutoff  # JAX-MD's pair function reads it
    if code == "fused_dynamics":
        batch = fd.Batch.from_atoms(systems)
        model = fd.models.LennardJones(
            sigma=bp.SIGMA, epsilon=bp.EPSILON, cutoff=cutoff, shift=False
        ).with_images(batch)
        fire = fd.FusedStage(  # no output stress: JAX-MD computes none (as bench_peers.py)
            [fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(bp.FMAX))],
            output_stress=False,
        )
        final = fire.run(batch, n_steps=bp.MAX_RELAX_STEPS)
        energy = (np.asarray(final.energy) / np.asarray(final.n_atoms))[bp.grouped_order(systems)]
        fmax = np.asarray(final.max_atoms_of(jax.numpy.linalg.norm(final.forces, axis=-1)))
        converged = int(np.sum(fmax <= bp.FMAX))
    else:
        energy, converged = [], 0
        for relax, pos, _ in bp.jaxmd_relax_programs(systems):
            e, done, _, _ = relax(pos, bp.MAX_RELAX_STEPS)
            energy += (np.asarray(e) / pos.shape[1]).tolist()
            converged += int(np.sum(np.asarray(done)))
        energy = np.asarray(energy)
    t2 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "solution_s": t2 - t1,
        "total_s": t2 - t0,
        "cache_hits": len(hits),
        "converged": converged,
        "systems": len(systems),
        "energy_per_atom": energy.tolist(),
    }


def measure(code: str, cache: str, n_systems: int, python: str, relax_set: str) -> dict:
    proc = subprocess.run(
        [python, __file__, "--worker", code, "--cache", cache, "--relax-systems", str(n_systems)]
        + ["--relax-set", relax_set],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{code} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spread(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": len(values),
    }


def main(args) -> dict:
    import bench_peers as bp
    from _common import git_state, save

    n = args.relax_systems

    python = sys.executable
    load0 = os.getloadavg()
    rows = {f"{code}_{state}": [] for code in CODES for state in ("cold", "warm")}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        for r in range(args.rounds):
            codes = CODES if r % 2 == 0 else CODES[::-1]
            folders = {c: os.path.join(scratch, f"{c}-{r}") for c in codes}
            for state in ("cold", "warm"):
                for code in codes:
                    rec = measure(code, folders[code], args.relax_systems, python, args.relax_set)
                    rows[f"{code}_{state}"].append(rec)
                    print(
                        f"round {r} {code:15s} {state}: import {rec['import_s']:.2f} s, "
                        f"solution {rec['solution_s']:.2f} s, cache hits {rec['cache_hits']}, "
                        f"converged {rec['converged']}/{rec['systems']}",
                        flush=True,
                    )
    reference = rows["fused_dynamics_cold"][0]["energy_per_atom"]
    diff = max(  # every process of either code against the first of ours
        abs(a - b)
        for recs in rows.values()
        for rec in recs
        for a, b in zip(rec["energy_per_atom"], reference, strict=True)
    )
    ratios = {}
    for state in ("cold", "warm"):
        a, b = rows[f"fused_dynamics_{state}"], rows[f"jax_md_{state}"]
        for key in ("total_s", "solution_s"):
            ratios[f"{state}_{key}"] = _spread([p[key] / o[key] for o, p in zip(a, b, strict=True)])
    # JAX-MD as its users run it (no cache), against ours as the command line runs it (warm)
    ratios["warm_ours_vs_cold_jax_md_total_s"] = _spread(
        [
            p["total_s"] / o["total_s"]
            for o, p in zip(rows["fused_dynamics_warm"], rows["jax_md_cold"], strict=True)
        ]
    )
    summary = {
        key: {k: _spread([rec[k] for rec in recs]) for k in ("import_s", "solution_s", "total_s")}
        for key, recs in rows.items()
    }
    payload = {
        "workload": {
            "relax": bp.relax_description(args.relax_set, *bp.relax_set(args.relax_set, n))
            + "; LJ argon (hard cut), float64; one new process per measurement",
            "relax_set": args.relax_set,
            "rounds": args.rounds,
            "min_compile_time_s": MIN_COMPILE_TIME,
        },
        "rows": rows,
        "summary": summary,
        "jax_md_over_ours": ratios,
        "sanity": {
            "max_energy_per_atom_difference_eV": diff,
            "tolerance_eV": 5e-3,
            "ok": bool(diff <= 5e-3)
            and all(rec["converged"] == rec["systems"] for recs in rows.values() for rec in recs),
        },
        "load_average": {"start": load0, "end": os.getloadavg()},
        "git": git_state(),
    }
    path = save(args.name, payload)
    for key, s in ratios.items():
        print(f"JAX-MD / ours, {key}: {s['median']:.3g} ({s['min']:.3g}-{s['max']:.3g})")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relax-set", choices=["w1", "peers"], default="w1")
    parser.add_argument("--relax-systems", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="startup")
    parser.add_argument("--worker", choices=CODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.cache, args.relax_systems, args.relax_set)))
    else:
        main(args)
