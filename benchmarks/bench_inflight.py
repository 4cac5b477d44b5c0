"""Inflight batching against static batches run one after another (issue: inflight batching).

Workload: ``--systems`` (300) LJ argon systems of 8 to 128 atoms from a fixed seed: 70 %
non-periodic clusters (the k fcc sites nearest a random point, rattled by 0.05-0.25 Å) and 30 %
small periodic crystals (fcc supercells of 64-125 atoms, rattled by 0.05-0.15 Å). Every system is
relaxed with FIRE to fmax <= 0.05 eV/Å (at most 1000 steps) and then runs 200 steps of Langevin
NVT: one fused stage ``FIRE + NVTLangevin`` with one model evaluation per step. LJ: sigma 3.405 Å,
epsilon 0.0104 eV, cutoff 6.0 Å, energy shifted to zero at the cutoff (the default); with 6 Å
every cell is larger than twice the cutoff, so the dense model needs no image shifts.

- inflight: ``fused.run(sampler=fd.SizeAwareSampler(data, max_atoms, max_systems),
  refill_frequency=k, sinks=[fd.HostMemory()])`` (which returns the run's ``RunStats``): a
  finished system leaves its slot at the next refill and a queued one takes it; the chunk
  compiles once.
- static: the same capacity (``max_atoms``, ``max_systems``) filled with consecutive systems in
  dataset order (as many as fit), each batch run to completion with ``fused.run(batch)`` before
  the next: a batch takes as long as its slowest system.

Both modes use the same model: the image range the whole dataset needs and no size buckets, so
every static batch runs one compiled program (``static.compilations`` counts any other) and the
ratio measures the scheduling alone.

Timing: ``--rounds`` (2) interleaved rounds in this one process, the order alternated (inflight
then static, static then inflight, ...), so that neither mode always runs first or under the
same load.

Reported: wall times, the median of the rounds and each round's (compile excluded: both modes
are warmed up on a small dataset of the same capacity first, whose compile time is reported
apart), the throughput ratio static wall / inflight wall per round and its median (target >= 2
on CPU), slot utilisation of the inflight run (``stats.utilization``, target >= 0.9;
the same measure for the static batches), compilations during the run (``stats.compilations``).

``--workload w4`` (issue 13's W4, result ``inflight_w4[_quick].json``): ``--systems`` (2,000;
300 with ``--quick``) structures whose cost varies several-fold, relaxed tightly with FIRE alone
(fmax <= 0.005 eV/Å, at most 3000 steps), a third each: fcc crystals of 32-108 atoms rattled
by 0.01-0.1 Å, clusters of 13-108 atoms cut from fcc (the k sites nearest a random point) and
rattled by 0.02-0.3 Å, and glassy clusters of 13-108 atoms placed at random at liquid density,
so that some relax in tens of steps and others in hundreds. Budgets differ per system: each
structure carries its own FIRE budget, 5 steps per atom (65-540), in ``atoms.info["fire_budget"]``
(``n_steps=fd.from_info("fire_budget")``, which travels with the system through refills). A
static batch waits for its slowest system; the inflight run refills a slot as soon as its system
is done.
The per-system FIRE step counts (min, median, max) are reported, which is what bounds the
ratio.

Run: ``.venv/bin/python benchmarks/bench_inflight.py [--systems 300] [--quick]
[--workload w4] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_state, save  # noqa: E402

import fused_dynamics as fd  # noqa: E402
from fused_dynamics import loop  # noqa: E402

A_FCC = 5.26
CUTOFF = 6.0
A_CAP = 128  # atoms per system slot: the same static shape for the warm-up and the run
PRIMITIVE_SHAPES = [(4, 4, 4), (4, 4, 5), (4, 5, 5), (5, 5, 5)]  # 64, 80, 100, 125 atoms


def _fcc_cluster(block: Atoms, k: int, rng) -> Atoms:
    """The ``k`` sites of the fcc ``block`` nearest a random point near its centre, as a
    non-periodic cluster with ``CUTOFF`` of vacuum on every side."""
    c = block.positions.mean(axis=0) + rng.uniform(-A_FCC / 2, A_FCC / 2, size=3)
    idx = np.argsort(np.linalg.norm(block.positions - c, axis=1))[:k]
    atoms = Atoms(f"Ar{k}", positions=block.positions[idx])
    atoms.set_cell(np.ptp(atoms.positions, axis=0) + 2 * CUTOFF)
    atoms.center()
    atoms.pbc = False
    return atoms


def dataset(n: int, seed: int = 0) -> list[Atoms]:
    """Perturbed argon clusters (70 %) and small periodic crystals (30 %) of 8-128 atoms."""
    rng = np.random.default_rng(seed)
    block = bulk("Ar", "fcc", a=A_FCC, cubic=True) * (8, 8, 8)
    out = []
    for _ in range(n):
        if rng.random() < 0.7:
            k = int(rng.integers(8, 129))
            atoms = _fcc_cluster(block, k, rng)
            atoms.positions += rng.normal(scale=rng.uniform(0.05, 0.25), size=(k, 3))
        else:
            if rng.random() < 0.2:
                atoms = bulk("Ar", "fcc", a=A_FCC, cubic=True) * (3, 3, 3)  # 108 atoms
            else:
                shape = PRIMITIVE_SHAPES[int(rng.integers(len(PRIMITIVE_SHAPES)))]
                atoms = bulk("Ar", "fcc", a=A_FCC) * shape
            atoms.positions += rng.normal(scale=rng.uniform(0.05, 0.15), size=(len(atoms), 3))
            atoms.wrap()
        out.append(atoms)
    return out


def _random_cluster(k: int, rng) -> Atoms:
    """``k`` argon atoms placed at random in a sphere at liquid density, no two closer than
    3.2 Å (a glassy start: its relaxation takes many more steps than a rattled crystal's)."""
    radius = (3 * k * 45.0 / (4 * np.pi)) ** (1 / 3)  # about 45 A^3 per atom
    pos: list[np.ndarray] = []
    while len(pos) < k:
        p = rng.uniform(-radius, radius, size=3)
        if np.linalg.norm(p) <= radius and all(np.linalg.norm(p - q) >= 3.2 for q in pos):
            pos.append(p)
    atoms = Atoms(f"Ar{k}", positions=np.array(pos))
    atoms.set_cell(np.ptp(atoms.positions, axis=0) + 2 * CUTOFF)
    atoms.center()
    atoms.pbc = False
    return atoms


def dataset_w4(n: int, seed: int = 0) -> list[Atoms]:
    """W4: structures whose tight relaxation varies several-fold in cost: fcc crystals of
    32-108 atoms rattled by 0.01-0.1 Å (cheap), clusters of 13-108 atoms cut from fcc and
    rattled by 0.02-0.3 Å, and glassy random clusters of 13-108 atoms (expensive), a third
    each."""
    rng = np.random.default_rng(seed)
    block = bulk("Ar", "fcc", a=A_FCC, cubic=True) * (8, 8, 8)
    crystals = [(2, 2, 2), (2, 2, 3), (2, 3, 3), (3, 3, 3)]  # 32, 48, 72, 108 atoms (cubic)
    out = []
    for _ in range(n):
        kind = int(rng.integers(3))
        if kind == 0:
            atoms = bulk("Ar", "fcc", a=A_FCC, cubic=True) * crystals[int(rng.integers(4))]
            atoms.positions += rng.normal(scale=rng.uniform(0.01, 0.1), size=(len(atoms), 3))
            atoms.wrap()
        elif kind == 1:
            k = int(rng.integers(13, 109))
            atoms = _fcc_cluster(block, k, rng)
            atoms.positions += rng.normal(scale=rng.uniform(0.02, 0.3), size=(k, 3))
        else:
            atoms = _random_cluster(int(rng.integers(13, 109)), rng)
        atoms.info[W4_BUDGET_KEY] = W4_STEPS_PER_ATOM * len(atoms)
        out.append(atoms)
    return out


W4_BUDGET_KEY = "fire_budget"  # each W4 structure's own FIRE budget (atoms.info)
W4_STEPS_PER_ATOM = 5


WORKLOADS = {
    # name: (dataset, FIRE fmax, FIRE budget, NVT steps after it (0: none))
    "default": (dataset, 0.05, 1000, 200),
    "w4": (dataset_w4, 0.005, fd.from_info(W4_BUDGET_KEY), 0),
}


def make_fused(workload: str, images) -> fd.FusedStage:
    """The fused stage of ``workload``. Both modes get the same static model choices: the image
    range of the whole dataset (``images``) and no size buckets, so that every static batch runs
    the one compiled program and the ratio measures the scheduling, not compilations."""
    _, fmax, budget, nvt = WORKLOADS[workload]
    model = fd.models.LennardJones(
        sigma=3.405, epsilon=0.0104, cutoff=CUTOFF, images=images, size_buckets=()
    )
    relax = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(fmax), n_steps=budget)
    if not nvt:
        return fd.FusedStage([(0, relax)])
    md = fd.NVTLangevin(model, dt=2.0, temperature=30.0, friction=0.01, seed=0, n_steps=nvt)
    return relax + md


def dataset_images(data) -> tuple[int, int, int]:
    """The periodic image range every structure of ``data`` needs (what an inflight run's
    sampler fits)."""
    cells = np.array([np.asarray(a.cell) for a in data])
    pbc = np.array([a.pbc for a in data])
    model = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=CUTOFF)
    return model.with_images_for(cells, pbc).images


def static_groups(data, max_atoms, max_systems):
    """Consecutive systems, as many as fit the capacity, one batch after another."""
    groups, cur, n = [], [], 0
    for i, atoms in enumerate(data):
        if cur and (n + len(atoms) > max_atoms or len(cur) == max_systems):
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += len(atoms)
    if cur:
        groups.append(cur)
    return groups


def run_inflight(data, max_atoms, max_systems, refill, workload, images):
    fused = make_fused(workload, images)
    sampler = fd.SizeAwareSampler(
        data, max_atoms=max_atoms, max_systems=max_systems, max_atoms_per_system=A_CAP
    )
    sink = fd.HostMemory()
    t = time.perf_counter()
    stats = fused.run(sampler=sampler, refill_frequency=refill, sinks=[sink])
    wall = time.perf_counter() - t
    frames = sink.atoms
    return wall, stats, frames


def run_static(data, max_atoms, max_systems, workload, images):
    fused = make_fused(workload, images)
    programs = loop.compiled_loop(fused).cache_size()
    slot_active = slot_total = steps = 0
    graduated = 0
    t = time.perf_counter()
    for group in static_groups(data, max_atoms, max_systems):
        batch = fd.Batch.from_atoms(
            [data[i] for i in group],
            max_atoms=max_atoms,
            max_systems=max_systems,
            max_atoms_per_system=A_CAP,
            system_ids=group,
            info_keys=fd.parameters.info_keys(fused),
        )
        final = jax.block_until_ready(fused.run(batch))
        stage_steps = np.asarray(final.info["stage_steps"])
        n = int(stage_steps.sum(axis=1).max())
        steps += n
        slot_active += int(stage_steps.sum())
        slot_total += n * max_systems
        graduated += int(np.sum(np.asarray(final.status)[: len(group)] == fused.exit_status))
    wall = time.perf_counter() - t
    return wall, {
        "steps": steps,
        "utilization": slot_active / max(slot_total, 1),
        "batches": len(static_groups(data, max_atoms, max_systems)),
        "graduated": graduated,
        "compilations": loop.compiled_loop(fused).cache_size() - programs,
    }


def main(
    n_systems, max_atoms, max_systems, refill, warm_systems, workload="default", rounds=2
) -> dict:
    load0 = os.getloadavg()
    make_data, fmax, budget, nvt = WORKLOADS[workload]
    data = make_data(n_systems)
    sizes = np.array([len(a) for a in data])
    warm = data[:warm_systems]
    images = dataset_images(data)
    one_inflight = functools.partial(run_inflight, refill=refill, workload=workload, images=images)
    one_static = functools.partial(run_static, workload=workload, images=images)

    # compile: a cold and a warm run on a small dataset of the same capacity, for each mode
    cold_i, stats_cold, _ = one_inflight(warm, max_atoms, max_systems)
    hot_i, _, _ = one_inflight(warm, max_atoms, max_systems)
    cold_s, _ = one_static(warm, max_atoms, max_systems)
    hot_s, _ = one_static(warm, max_atoms, max_systems)

    # interleaved rounds in this one process, the order alternated (A B, B A, ...); the step
    # counts are the same in every round (fixed seeds, deterministic programs)
    walls_i, walls_s, stats, frames, static = [], [], None, None, None
    for r in range(rounds):
        for mode in ("inflight", "static") if r % 2 == 0 else ("static", "inflight"):
            if mode == "inflight":
                wall, stats, frames = one_inflight(data, max_atoms, max_systems)
                walls_i.append(wall)
            else:
                wall, static = one_static(data, max_atoms, max_systems)
                walls_s.append(wall)
    # per round: inflight throughput over static
    ratios = [s / i for s, i in zip(walls_s, walls_i, strict=True)]
    wall_i, wall_s = statistics.median(walls_i), statistics.median(walls_s)
    n_out = stats.written
    fire = np.array(
        [
            int(np.asarray(a.info["stage_steps"]).reshape(-1)[0])
            for a in frames
            if "stage_steps" in a.info
        ]
    )
    atom_count = int(sizes.sum())
    return {
        "workload": (
            f"{workload}: {n_systems} LJ argon systems of {sizes.min()}-{sizes.max()} atoms "
            f"(mean {sizes.mean():.0f}; clusters and periodic crystals), FIRE to fmax {fmax} "
            + (
                f"(<= {budget} steps)"
                if isinstance(budget, int)
                else f"(budget per system: {W4_STEPS_PER_ATOM} steps per atom, from atoms.info)"
            )
            + (f" + {nvt} steps NVTLangevin" if nvt else "")
            + f", cutoff {CUTOFF} A, float64"
        ),
        "systems": n_systems,
        "capacity": {"max_atoms": max_atoms, "max_systems": max_systems},
        "images": list(images),
        "refill_frequency": refill,
        "inflight": {
            "wall_s": wall_i,
            "wall_s_rounds": walls_i,
            "systems_per_s": n_systems / wall_i,
            "steps": stats.steps,
            "chunks": stats.chunks,
            "utilization": stats.utilization,
            "compilations": stats.compilations,
            "written": n_out,
            "exit_reasons": dict(
                collections.Counter(str(a.info.get("exit_reason_name")) for a in frames)
            ),
        },
        "static": {
            "wall_s": wall_s,
            "wall_s_rounds": walls_s,
            "systems_per_s": n_systems / wall_s,
            **static,
        },
        "throughput_ratio": statistics.median(ratios),
        "throughput_ratios": ratios,
        "timing": f"{rounds} interleaved rounds (inflight, static; static, inflight; ...), one "
        "process; wall_s the median of the rounds",
        "compile_s": {
            "inflight": cold_i - hot_i,
            "static": cold_s - hot_s,
            "inflight_compilations_cold": stats_cold.compilations,
            "warmup_systems": warm_systems,
        },
        "atoms": atom_count,
        "load_average": {"start": load0, "end": os.getloadavg()},
        "git": git_state(),
        "fire_steps_per_system": {
            "min": int(fire.min()),
            "median": float(np.median(fire)),
            "max": int(fire.max()),
        }
        if fire.size
        else None,
        "targets": {
            "throughput_ratio": ">= 2",
            "utilization": ">= 0.9",
            "compilations": "0 after warm-up (1 cold)",
        },
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", type=int, default=None, help="300 (2000 with --workload w4)")
    p.add_argument("--max-atoms", type=int, default=1536)
    p.add_argument("--max-systems", type=int, default=16)
    p.add_argument("--refill", type=int, default=10, help="refill_frequency (steps per chunk)")
    p.add_argument("--warm-systems", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="60 systems (300 with --workload w4)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="default")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the two modes")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    w4 = args.workload == "w4"
    if args.quick:
        args.systems = 300 if w4 else 60
    elif args.systems is None:
        args.systems = 2000 if w4 else 300
    t0 = time.perf_counter()
    res = main(
        args.systems, args.max_atoms, args.max_systems, args.refill, args.warm_systems,
        args.workload, args.rounds,
    )  # fmt: skip
    res["quick"] = bool(args.quick)
    res["total_wall_s"] = time.perf_counter() - t0
    base = "inflight" if args.workload == "default" else f"inflight_{args.workload}"
    path = save(args.name or (f"{base}_quick" if args.quick else base), res)
    for k, v in res.items():
        print(f"{k}: {v}")
    print(f"wrote {path}")
