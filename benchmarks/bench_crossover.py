"""Dense pairs against the neighbor list: the measurements behind ``choose_neighbors``' rule.

``fd.models.path_choice`` picks the neighbor list when the work ratio ``R`` (dense pair work
over list work, ``fused_dynamics/models/path_choice.py``) is at least ``CROSSOVER``, with the
cost of a step per atom ``ATOM_OVERHEAD`` (``h``) and the speed-up ``FIT_SLOPE * R``. This
script measures what those constants stand for, on the current code:

* workloads: full batches of about 1,000 atoms (every slot filled) of one kind of system each:
  icosahedral argon clusters of 13-561 atoms (no image shifts) and rattled periodic fcc argon
  cells of 32-864 atoms (27 image shifts when the cell is narrower than twice the cutoff);
  Lennard-Jones argon (sigma 3.405 Å, epsilon 0.0104 eV, hard cut) at cutoff 8.5 Å, and at
  5 Å and 7.5 Å for the cells (7.5 Å on 108-atom cells is the W2 8 x 108 case of
  ``bench_peers.py``); float64; Maxwell-Boltzmann velocities at 40 K, fixed seeds;
* each path runs ``fd.NVE(model, dt=2 fs).run(batch, n_steps)``: the dense path as
  ``model.with_images(batch)``, the list as ``model.with_neighbors(1.0)`` attached with
  ``attach_neighbors`` (the run refreshes it in the compiled step), the two being what
  ``choose_neighbors`` returns;
* the first call (one step: compilation) is timed apart, then ``--rounds`` interleaved rounds
  (dense, list, dense, list, ...) of ``n_steps`` steps each; per-step medians and min-max, the
  ratio ``dense / list`` per round;
* fit: ``dense / list = a R(h)`` by least squares in log space over (a, h), ``R`` computed by
  ``work_ratio`` of ``fused_dynamics/models/path_choice.py`` as the rule computes it (``h``:
  the cost of a step per atom beyond its pairs); reported with the root-mean-square error of
  the log ratio, the ratio ``R`` at which the fit breaks even, and in how many rows the rule
  in use picked the faster path.

Run: ``.venv/bin/python benchmarks/bench_crossover.py [--quick]`` (writes
``results/crossover.json`` or ``crossover_quick.json``; ``--quick``: 2 rounds and 10 steps).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from ase.cluster import Icosahedron  # noqa: E402
from ase.md.velocitydistribution import Stationary, thermalize_momenta  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import block, git_state, save  # noqa: E402
from bench_peers import fcc_box  # noqa: E402

import fused_dynamics as fd  # noqa: E402
import fused_dynamics.models.path_choice  # noqa: E402, F401

# the module (fd.models.path_choice is also the name of its function)
pc = sys.modules["fused_dynamics.models.path_choice"]

SIGMA, EPSILON = 3.405, 0.0104
A_FCC = 5.26
DT_FS = 2.0
SKIN = pc.DEFAULT_SKIN
TARGET_ATOMS = 1000

# (kind, size parameter, cutoff Å): clusters by icosahedral shells, cells by cubic repeats
CASES = [
    ("cluster", 2, 8.5),  # 13 atoms
    ("cluster", 3, 8.5),  # 55
    ("cluster", 4, 8.5),  # 147
    ("cluster", 5, 8.5),  # 309
    ("cluster", 6, 8.5),  # 561
    ("cell", 2, 8.5),  # 32 atoms, 27 shifts
    ("cell", 3, 8.5),  # 108, 27 shifts
    ("cell", 4, 8.5),  # 256
    ("cell", 5, 8.5),  # 500
    ("cell", 6, 8.5),  # 864
    ("cell", 2, 5.0),  # 32
    ("cell", 3, 5.0),  # 108
    ("cell", 4, 5.0),  # 256
    ("cell", 3, 7.5),  # 108: bench_peers' W2 8 x 108
]


def structure(kind: str, size: int, rng):
    if kind == "cell":
        return fcc_box(size, rng, a=A_FCC, rattle=0.05, temperature_K=40.0)
    atoms = Icosahedron("Ar", noshells=size, latticeconstant=A_FCC)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    atoms.center(vacuum=10.0)
    atoms.pbc = False
    thermalize_momenta(atoms, temperature_K=40.0, rng=rng)
    Stationary(atoms)
    return atoms


def systems_of(kind: str, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    first = structure(kind, size, rng)
    count = max(1, round(TARGET_ATOMS / len(first)))
    return [first] + [structure(kind, size, rng) for _ in range(count - 1)]


def prepare(model, systems, path: str):
    """(nve, batch, seconds to attach or size the path) for ``path``."""
    batch = fd.Batch.from_atoms(systems)
    t = time.perf_counter()
    if path == "list":
        model = model.with_neighbors(SKIN)
        batch = model.attach_neighbors(batch)
    else:
        model = model.with_images(batch)
    block(batch)
    return fd.NVE(model, dt=DT_FS), batch, time.perf_counter() - t


def timed_run(nve, batch, n_steps: int) -> float:
    t = time.perf_counter()
    block(nve.run(batch, n_steps=n_steps).positions)
    return time.perf_counter() - t


def measure(kind: str, size: int, cutoff: float, rounds: int, n_steps: int) -> dict:
    systems = systems_of(kind, size)
    model = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=cutoff, shift=False)
    choice = pc.path_choice(model, systems)
    runs = {}
    for path in ("dense", "list"):
        nve, batch, setup = prepare(model, systems, path)
        first = timed_run(nve, batch, 1)  # compiles; n_steps is traced
        runs[path] = {"nve": nve, "batch": batch, "setup_s": setup, "first_call_s": first}
    per_step = {"dense": [], "list": []}
    for _ in range(rounds):
        for path in ("dense", "list"):
            r = runs[path]
            per_step[path].append(timed_run(r["nve"], r["batch"], n_steps) / n_steps)
    ratios = np.array(per_step["dense"]) / np.array(per_step["list"])
    n = len(systems[0])
    row = {
        "kind": kind,
        "atoms_each": n,
        "systems": len(systems),
        "cutoff": cutoff,
        "image_shifts": pc._shifts(
            pc.required_images_host(
                np.array([systems[0].cell[:]]), np.array([systems[0].pbc]), cutoff
            )
        ),
        "ratio_R": choice.ratio,
        "rule_chose": choice.path,
        "dense_ms": _stats(1e3 * np.array(per_step["dense"])),
        "list_ms": _stats(1e3 * np.array(per_step["list"])),
        "dense_over_list": _stats(ratios),
        "setup_s": {p: runs[p]["setup_s"] for p in runs},
        "first_call_s": {p: runs[p]["first_call_s"] for p in runs},
        "list_max_neighbors": runs["list"]["batch"].neighbors.max_neighbors,
    }
    print(
        f"{kind} {n:5d} x{len(systems):3d} rc {cutoff}: R {choice.ratio:6.2f} "
        f"dense {row['dense_ms']['median']:8.2f} ms list {row['list_ms']['median']:7.2f} ms "
        f"dense/list {row['dense_over_list']['median']:6.2f} "
        f"first call dense {row['first_call_s']['dense']:.1f} s list "
        f"{row['first_call_s']['list']:.1f} s",
        flush=True,
    )
    return row


def _stats(x) -> dict:
    x = np.asarray(x, np.float64)
    return {"median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def fit(rows) -> dict:
    """Least squares of ``log(dense/list) = log a + log R(h)`` over a grid of ``h`` (``a`` in
    closed form for each ``h``), and how the rule in use decides each row."""
    measured = np.log([r["dense_over_list"]["median"] for r in rows])
    best = None
    for h in np.arange(0.0, 200.5, 0.5):
        log_ratio = np.log([_ratio(r, h) for r in rows])
        log_a = float(np.mean(measured - log_ratio))
        rms = float(np.sqrt(np.mean((measured - log_a - log_ratio) ** 2)))
        if best is None or rms < best["rms_log"]:
            best = {"atom_overhead_h": float(h), "slope_a": float(np.exp(log_a)), "rms_log": rms}
    best["break_even_R"] = 1.0 / best["slope_a"]
    faster = [r["dense_over_list"]["median"] > 1.0 for r in rows]
    chosen = [r["rule_chose"] == "list" for r in rows]
    right = sum(f == c for f, c in zip(faster, chosen, strict=True))
    best["rule_picks_the_faster_path"] = int(right)
    best["rows"] = len(rows)
    return best


_ARRAYS: dict = {}


def _ratio(row, h: float) -> float:
    """``R`` of a row's systems with the cost per atom ``h``, as the rule computes it."""
    key = (row["kind"], row["size"], row["cutoff"])
    if key not in _ARRAYS:
        systems = systems_of(row["kind"], row["size"])
        sizes, cells, pbc, positions = pc._system_arrays(systems)
        volumes = [pc._volume(x, c, p) for x, c, p in zip(positions, cells, pbc, strict=True)]
        _ARRAYS[key] = (sizes, cells, pbc, volumes)
    sizes, cells, pbc, volumes = _ARRAYS[key]
    return pc.work_ratio(sizes, cells, pbc, row["cutoff"], SKIN, volumes=volumes, overhead=h)


def main(quick: bool, rounds: int, n_steps: int) -> dict:
    load0 = os.getloadavg()
    started = time.time()
    rows = []
    for kind, size, cutoff in CASES:
        row = measure(kind, size, cutoff, rounds, n_steps)
        row["size"] = size
        rows.append(row)
    result = {
        "workload": (
            f"fused NVE (dt {DT_FS} fs) of LJ argon, float64, full batches of about "
            f"{TARGET_ATOMS} atoms; dense path (with_images) against the neighbor list "
            f"(skin {SKIN} Å, per-atom rows, refreshed in the step); {rounds} interleaved "
            f"rounds of {n_steps} steps"
        ),
        "quick": quick,
        "rows": rows,
        "fit": fit(rows),
        "rule_in_use": {
            "ATOM_OVERHEAD": pc.ATOM_OVERHEAD,
            "FIT_SLOPE": pc.FIT_SLOPE,
            "CROSSOVER": pc.CROSSOVER,
        },
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "wall_s": time.time() - started,
        "git": git_state(),
    }
    print("fit:", result["fit"], flush=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 4)
    steps = args.steps or (10 if args.quick else 20)
    out = main(args.quick, rounds, steps)
    print(save("crossover_quick" if args.quick else "crossover", out))
