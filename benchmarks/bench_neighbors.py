"""Neighbor lists: O(N) scaling of an LJ NVE step, and neighbor list against dense pairs.

Model: LJ argon, sigma 3.405 Å, epsilon 0.0104 eV, cutoff 8.5 Å, hard truncation
(``fd.models.LennardJones(shift=False)``, the model of ``bench_peers.py``), float64. Structures:
periodic fcc argon (a = 5.26 Å) rattled by 0.05 Å, Maxwell-Boltzmann velocities at 40 K, fixed
seeds. MD: ``fd.NVE(model, dt=2 fs)`` through ``FusedStage.run`` (one compiled loop), the
neighbor-list model being ``model.with_neighbors(skin)`` with a half list allocated by
``model.attach_neighbors(batch)`` and a ``NeighborListHook`` (rebuilds when an atom moved more
than skin/2). In (a), times are the best of ``--repeat`` runs from the same start after a
warm-up run that compiles (compile time reported apart); rebuilds during the timed run are
counted (they are in the time), and the time of one rebuild is measured on its own.

(a) Scaling, 500 to 50,000 atoms: one system (an n x n x n cubic supercell) and many systems
    (256-atom 4x4x4 crystals, as many as make the same size). Reported: time per step,
    atom-steps/s, the log-log slope of time per step against atoms (target <= 1.1, issue 13's
    W5), and the time of one neighbor-list build. ``--quick``: one system at four sizes, 500 to
    16,384 atoms, and no many-system scaling.
(b) 16 systems of 256 atoms (the MD workload of ``bench_peers.py``), 200 steps: neighbor list
    against the dense all-pairs path (minimum image, 256 x 256 pairs per system); target:
    the neighbor list at least as fast. The programs are timed in ``--repeat`` (at least 2)
    interleaved rounds in this process, the order rotated every round: medians, min-max and
    each round's ratio. Both runs' final positions are compared.

Run: ``.venv/bin/python benchmarks/bench_neighbors.py [--quick]`` (``--quick``: (a) for one
system only, up to 16,384 atoms, fewer steps, (b) with one skin; writes
``results/neighbors_quick.json``, the full run ``neighbors.json``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import block, interleaved, save  # noqa: E402
from bench_peers import fcc_box  # noqa: E402

import fused_dynamics as fd  # noqa: E402
from fused_dynamics.models.neighbors import NeighborListHook  # noqa: E402

SIGMA, EPSILON, CUTOFF = 3.405, 0.0104, 8.5
A_FCC = 5.26
DT_FS = 2.0
MODEL = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, shift=False)


def crystal(reps: int, rng) -> object:
    return fcc_box(reps, rng, a=A_FCC, rattle=0.05, temperature_K=40.0)


def one_system(reps: int, seed: int = 0) -> fd.Batch:
    return fd.Batch.from_atoms([crystal(reps, np.random.default_rng(seed))])


def many_systems(n_systems: int, seed: int = 0) -> fd.Batch:
    rng = np.random.default_rng(seed)
    return fd.Batch.from_atoms([crystal(4, rng) for _ in range(n_systems)])


def md(model, n_steps: int, neighbors: bool) -> fd.FusedStage:
    hooks = [NeighborListHook()] if neighbors else []
    return fd.FusedStage([fd.NVE(model, dt=DT_FS, n_steps=n_steps)], hooks=hooks)


def time_run(fused, batch, repeat: int):
    """(compile seconds, best seconds, final batch) of ``fused.run(batch)``."""
    t = time.perf_counter()
    out = block(fused.run(batch))
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = block(fused.run(batch))
        best = min(best, time.perf_counter() - t)
    return max(first - best, 0.0), best, out


def build_time(nl, batch, repeat: int = 3) -> float:
    build = jax.jit(lambda nl, b: nl.build(b))
    block(build(nl, batch))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        block(build(nl, batch))
        best = min(best, time.perf_counter() - t)
    return best


SLOPE_TARGET = 1.1  # log-log slope of time per step against atoms (issue 13, W5)


def steps_for(atoms: int, quick: bool) -> int:
    # about 2e6 (quick: 5e5) atom-steps per timed run, at least 10 steps
    return int(max(10, min(200, (5e5 if quick else 2e6) / atoms)))


def scaling(kind: str, sizes, skin: float, repeat: int, quick: bool) -> dict:
    model = MODEL.with_neighbors(skin=skin)
    rows = []
    for size in sizes:
        batch = one_system(size) if kind == "one_system" else many_systems(size)
        atoms = int(batch.max_atoms)
        n_steps = steps_for(atoms, quick)
        t0 = time.perf_counter()
        batch = model.attach_neighbors(batch)
        allocate_s = time.perf_counter() - t0
        compile_s, best, out = time_run(md(model, n_steps, True), batch, repeat)
        nl = out.neighbors
        row = {
            "atoms": atoms,
            "systems": int(batch.max_systems),
            "steps": n_steps,
            "step_ms": 1e3 * best / n_steps,
            "atom_steps_per_s": atoms * n_steps / best,
            "rebuilds_in_run": int(nl.rebuilds) - int(batch.neighbors.rebuilds),
            "build_ms": 1e3 * build_time(batch.neighbors, batch),
            "pair_capacity": nl.capacity,
            "pairs": int(nl.n_pairs),
            "bin_capacity": nl.bin_capacity,
            "stencil": nl.stencil,
            "allocate_s": allocate_s,
            "compile_s": compile_s,
        }
        print(kind, row, flush=True)
        rows.append(row)
    x = np.log([r["atoms"] for r in rows])
    slope = float(np.polyfit(x, np.log([r["step_ms"] for r in rows]), 1)[0])
    build_slope = float(np.polyfit(x, np.log([r["build_ms"] for r in rows]), 1)[0])
    return {"rows": rows, "slope": slope, "build_slope": build_slope}


def versus_dense(n_steps: int, skins, repeat: int) -> dict:
    """Dense pairs against a neighbor list per skin: each program compiled by a first run, then
    ``max(repeat, 2)`` interleaved rounds in this process (the order rotated every round), each
    round's ratio dense / neighbor list; medians and min-max."""
    batch = many_systems(16)
    dense = MODEL.with_images(batch)
    runs = {"dense": functools.partial(md(dense, n_steps, False).run, batch)}
    for skin in skins:
        model = MODEL.with_neighbors(skin=skin)
        with_nl = model.attach_neighbors(batch)
        runs[f"skin_{skin}"] = functools.partial(md(model, n_steps, True).run, with_nl)
    first, outs, walls = interleaved(runs, max(repeat, 2))
    t_dense = statistics.median(walls["dense"])
    out_dense = outs["dense"]
    result = {
        "workload": f"16 fcc argon systems x 256 atoms, {n_steps} NVE steps, float64",
        "timing": f"{len(walls['dense'])} interleaved rounds (order rotated), one process; "
        "medians, ratios per round",
        "dense": {
            "step_ms": 1e3 * t_dense / n_steps,
            "step_ms_min_max": [1e3 * min(walls["dense"]) / n_steps,
                                1e3 * max(walls["dense"]) / n_steps],
            "atom_steps_per_s": batch.max_atoms * n_steps / t_dense,
            "compile_s": max(first["dense"] - min(walls["dense"]), 0.0),
            "images": list(dense.images),
        },
        "neighbor_list": {},
    }  # fmt: skip
    for skin in skins:
        name = f"skin_{skin}"
        t = statistics.median(walls[name])
        ratios = [d / w for d, w in zip(walls["dense"], walls[name], strict=True)]
        out = outs[name]
        result["neighbor_list"][name] = {
            "skin": skin,
            "step_ms": 1e3 * t / n_steps,
            "step_ms_min_max": [1e3 * min(walls[name]) / n_steps, 1e3 * max(walls[name]) / n_steps],
            "atom_steps_per_s": batch.max_atoms * n_steps / t,
            "speedup_over_dense": statistics.median(ratios),
            "speedup_over_dense_rounds": ratios,
            "rebuilds_in_run": int(out.neighbors.rebuilds) - 1,
            "pair_capacity": out.neighbors.capacity,
            "compile_s": max(first[name] - min(walls[name]), 0.0),
            "max_position_difference_from_dense": float(
                np.abs(np.asarray(out.positions - out_dense.positions)).max()
            ),
        }
        print("versus dense", skin, result["neighbor_list"][name], flush=True)
    best = max(result["neighbor_list"].values(), key=lambda r: r["speedup_over_dense"])
    result["best_speedup_over_dense"] = best["speedup_over_dense"]
    result["best_speedup_over_dense_rounds"] = best["speedup_over_dense_rounds"]
    return result


def main(quick: bool, repeat: int, skin: float) -> dict:
    load0 = os.getloadavg()
    # quick: four sizes of one system and one skin against the dense path, no many-system
    # scaling (each size compiles its own program: about 20 s of a quick run each)
    if quick:
        reps = [5, 8, 12, 16]  # 500 .. 16,384 atoms
        counts = []
    else:
        reps = [5, 6, 8, 10, 13, 16, 20, 23]  # 500 .. 48,668 atoms
        counts = [2, 4, 8, 16, 32, 64, 128, 196]  # 512 .. 50,176 atoms
    one = scaling("one_system", reps, skin, repeat, quick)
    many = scaling("many_systems", counts, skin, repeat, quick) if counts else None
    versus = versus_dense(50 if quick else 200, [0.5] if quick else [0.5, 1.0], repeat)
    return {
        "workload": (
            "LJ argon (sigma 3.405 Å, epsilon 0.0104 eV, cutoff 8.5 Å, hard cut), fcc a=5.26 Å "
            f"rattled 0.05 Å, 40 K, NVE dt={DT_FS} fs, float64; half neighbor list, skin "
            f"{skin} Å, NeighborListHook"
        ),
        "quick": quick,
        "scaling": {"one_system": one, **({"many_systems": many} if many else {})},
        "versus_dense": versus,
        "targets": {"slope": f"<= {SLOPE_TARGET}", "neighbor_list_over_dense": ">= 1"},
        "met": {
            "slope_one_system": one["slope"] <= SLOPE_TARGET,
            **({"slope_many_systems": many["slope"] <= SLOPE_TARGET} if many else {}),
            "neighbor_list_at_least_as_fast": versus["best_speedup_over_dense"] >= 1.0,
        },
        "load_average": {"start": load0, "end": os.getloadavg()},
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--skin", type=float, default=1.0)
    args = p.parse_args()
    res = main(args.quick, args.repeat, args.skin)
    path = save("neighbors_quick" if args.quick else "neighbors", res)
    for k in ("scaling", "versus_dense", "met"):
        print(k, res[k] if k != "scaling" else {n: v["slope"] for n, v in res[k].items()})
    print(f"wrote {path}")
