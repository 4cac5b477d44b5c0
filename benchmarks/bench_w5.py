"""W5 of issue 13: one large LJ system at liquid density, NVE on neighbor lists, against JAX-MD.

Structure: one periodic box of ``--cells``³ fcc cubic cells (20: 32,000 atoms; ``--quick`` 15:
13,500) at the density of liquid argon near its boiling point (1.40 g/cm³, a = 5.74 Å), every
atom displaced by a normal 0.3 Å and Maxwell-Boltzmann velocities at 100 K (fixed seed): a
liquid-density start, not an equilibrated liquid (melting 32,000 atoms first would cost more
than the measurement on 2 cores). Model: LJ argon (sigma 3.405 Å, epsilon 0.0104 eV, hard cut
at 8.5 Å: bench_peers.py's), float64, velocity Verlet with dt = 2 fs.

Codes, each compiled once (compile time reported apart), then timed from the same start in
interleaved rounds (ours, each JAX-MD format, ours, ...), ``--steps`` steps per round:

- fused_dynamics: ``fd.NVE(model.with_neighbors(skin=1.0), dt).run(batch, n_steps)``: the
  half list attached once (``model.attach_neighbors``), rebuilt inside the loop when an atom
  has moved more than skin/2;
- JAX-MD 0.2.29: ``partition.neighbor_list`` with ``dr_threshold`` = the same 1.0 Å skin, in
  its ``Dense`` and ``OrderedSparse`` formats (the faster is the ratio's peer), updated every
  step (a rebuild only when an atom moved dr_threshold/2), ``smap.pair_neighbor_list`` of the
  same hard-cut LJ, ``simulate.nve``, in one ``lax.fori_loop``.

Sanity: the initial energies per atom agree to 1e-9 eV/atom; the final energies after the same
steps are reported (trajectories of different codes drift apart at round-off, so that
difference is recorded, not asserted); no list overflowed.

Reported: seconds per step (median and min-max over the rounds), atom-steps/s, the ratio
JAX-MD / ours per round (above 1: ours is faster; target >= 1.5), compile seconds, rebuilds.

Run (JAX-MD lives in the peers' venv)::

    .venv-bench/bin/python benchmarks/bench_w5.py [--quick] [--cells 20] [--steps 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ase import units  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_state, save  # noqa: E402
from bench_peers import (  # noqa: E402
    CUTOFF,
    DT_FS,
    EPSILON,
    MASS,
    SIGMA,
    _jaxmd_pair,
    fcc_box,
    version,
)

A_LIQUID = 5.74  # Å: 4 atoms per a³ at 1.40 g/cm³ (liquid argon near 87 K)
SKIN = 1.0  # Å: ours skin, JAX-MD's dr_threshold (the same list radius, cutoff + 1 Å)
ENERGY_TOL = 1e-9  # eV/atom, float64, the same structure


def liquid_density_box(cells: int, seed: int = 5):
    """One periodic fcc box at liquid density, displaced 0.3 Å, 100 K velocities."""
    rng = np.random.default_rng(seed)
    return fcc_box(cells, rng, a=A_LIQUID, rattle=0.3, temperature_K=100.0)


def ours(atoms, n_steps: int):
    import fused_dynamics as fd

    batch = fd.Batch.from_atoms([atoms])
    model = fd.models.LennardJones(
        sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, shift=False
    ).with_neighbors(skin=SKIN)
    batch = model.attach_neighbors(batch)
    nve = fd.NVE(model, dt=DT_FS)
    e0 = float(model(batch).energy[0]) / len(atoms)
    t = time.perf_counter()
    jax.block_until_ready(nve.run(batch, n_steps=1).positions)
    warm = time.perf_counter() - t

    def run():
        out = jax.block_until_ready(nve.run(batch, n_steps=n_steps))
        return {
            "final_energy_per_atom": float(out.energy[0]) / len(atoms),
            "rebuilds": int(out.neighbors.rebuilds) - int(batch.neighbors.rebuilds),
            "overflow": bool(np.any(np.asarray(out.neighbors.overflow))),
        }

    return {
        "warmup_s": warm,
        "energy0_per_atom": e0,
        "pair_capacity": batch.neighbors.capacity,
    }, run


def jax_md(atoms, n_steps: int, fmt: str):
    from jax_md import partition, simulate, smap, space

    box = float(atoms.cell[0, 0])
    disp, shift = space.periodic(box)
    metric = space.canonicalize_displacement_or_metric(disp)
    pos = jnp.asarray(atoms.positions % box)
    vel = jnp.asarray(atoms.get_velocities())
    neighbor_fn = partition.neighbor_list(
        disp, box, CUTOFF, dr_threshold=SKIN, format=getattr(partition, fmt)
    )
    energy_fn = smap.pair_neighbor_list(_jaxmd_pair(), metric)
    init_fn, apply_fn = simulate.nve(energy_fn, shift, DT_FS * units.fs)
    nbrs0 = neighbor_fn.allocate(pos)
    e0 = float(energy_fn(pos, neighbor=nbrs0)) / len(atoms)

    @jax.jit
    def simulate_n(pos, vel, nbrs, n):
        s = init_fn(jax.random.PRNGKey(0), pos, kT=0.0, mass=MASS, neighbor=nbrs)
        s = s.set(momentum=MASS * vel)

        def body(i, carry):
            s, nb = carry
            nb = nb.update(s.position)
            return apply_fn(s, neighbor=nb), nb

        s, nb = jax.lax.fori_loop(0, n, body, (s, nbrs))
        return energy_fn(s.position, neighbor=nb), nb.did_buffer_overflow

    t = time.perf_counter()
    jax.block_until_ready(simulate_n(pos, vel, nbrs0, 1))
    warm = time.perf_counter() - t

    def run():
        e, overflow = jax.block_until_ready(simulate_n(pos, vel, nbrs0, n_steps))
        return {
            "final_energy_per_atom": float(e) / len(atoms),
            "rebuilds": None,  # JAX-MD does not count them
            "overflow": bool(overflow),
        }

    return {"warmup_s": warm, "energy0_per_atom": e0}, run


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "rounds": len(xs)}


def main(cells: int, n_steps: int, rounds: int) -> dict:
    load0 = os.getloadavg()
    atoms = liquid_density_box(cells)
    n = len(atoms)
    codes = {"fused_dynamics": lambda: ours(atoms, n_steps)}
    errors = {}
    if version("jax_md") is not None:
        for fmt in ("Dense", "OrderedSparse"):
            codes[f"jax_md_{fmt.lower()}"] = lambda fmt=fmt: jax_md(atoms, n_steps, fmt)
    else:
        errors["jax_md"] = "not installed"
    prepared = {}
    for name, make in codes.items():
        print(f"preparing {name} ...", flush=True)
        try:
            prepared[name] = make()
        except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc)[:400]}"
    walls = {name: [] for name in prepared}
    last = {}
    for r in range(rounds):
        for name, (_info, run) in prepared.items():
            t = time.perf_counter()
            last[name] = run()
            walls[name].append(time.perf_counter() - t)
            print(f"  round {r + 1} {name}: {walls[name][-1]:.3g} s", flush=True)
    records = {}
    for name, (info, _run) in prepared.items():
        w = walls[name]
        records[name] = {
            **info,
            **last[name],
            "round_walls_s": w,
            "step_ms": spread([1e3 * x / n_steps for x in w]),
            "atom_steps_per_s": n * n_steps / statistics.median(w),
            "compile_s": max(info["warmup_s"] - min(w) / n_steps, 0.0),
        }
    ref = records["fused_dynamics"]
    peers = [k for k in records if k != "fused_dynamics"]
    for name in peers:
        rec = records[name]
        rec["ours_over_peer"] = spread(
            [p / o for o, p in zip(ref["round_walls_s"], rec["round_walls_s"], strict=True)]
        )
        rec["max_abs_diff_energy0_per_atom"] = abs(
            rec["energy0_per_atom"] - ref["energy0_per_atom"]
        )
        rec["abs_diff_final_energy_per_atom"] = abs(
            rec["final_energy_per_atom"] - ref["final_energy_per_atom"]
        )
    faster = min(peers, key=lambda k: statistics.median(records[k]["round_walls_s"]), default=None)
    sanity_ok = all(
        records[k]["max_abs_diff_energy0_per_atom"] <= ENERGY_TOL for k in peers
    ) and not any(rec["overflow"] for rec in records.values())
    return {
        "workload": (
            f"one periodic box of {n:,} LJ argon atoms at liquid density (fcc a = {A_LIQUID} A, "
            f"displaced 0.3 A, 100 K), cutoff {CUTOFF} A hard, neighbor lists with a {SKIN} A "
            f"skin, NVE dt {DT_FS} fs, {n_steps} steps per round, {rounds} interleaved rounds, "
            "float64"
        ),
        "atoms": n,
        "steps": n_steps,
        "codes": records,
        "faster_peer": faster,
        "ours_over_faster_peer": None if faster is None else records[faster]["ours_over_peer"],
        "target": 1.5,
        "versions": {"jax_md": version("jax_md"), "jax": jax.__version__},
        "sanity": {"energy0_tolerance_per_atom": ENERGY_TOL, "ok": bool(sanity_ok)},
        "errors": errors,
        "load_average": {"start": load0, "end": os.getloadavg()},
        "git": git_state(),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="13,500 atoms, 20 steps, 2 rounds")
    p.add_argument("--cells", type=int, default=20, help="fcc cells per edge (20: 32,000 atoms)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default=None)
    args = p.parse_args()
    if args.quick:
        args.cells, args.steps, args.rounds = 15, 20, 2
    t0 = time.perf_counter()
    res = main(args.cells, args.steps, args.rounds)
    res["total_wall_s"] = time.perf_counter() - t0
    path = save(args.name or ("w5_quick" if args.quick else "w5"), res)
    for name, rec in res["codes"].items():
        print(name, f"{rec['atom_steps_per_s']:,.0f} atom-steps/s", rec.get("ours_over_peer"))
    print("sanity", res["sanity"], "errors", res["errors"])
    print(f"wrote {path} ({res['total_wall_s']:.0f} s)")
