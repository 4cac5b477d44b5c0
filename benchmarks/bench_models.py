"""The cost of a machine-learned model in a fused run (issue: model benchmarks).

Workload: ``--systems`` (8) periodic fcc Cu crystals of 32 atoms (2x2x2 cubic cells, a = 3.615 Å,
rattled by 0.1 Å from a fixed seed), float32 throughout (``jax_enable_x64`` off), CPU.

Models: ``fd.models.LennardJones`` (Cu: sigma 2.338 Å, epsilon 0.4093 eV, dense pairs) and
``fused_dynamics.models.nequip.NequIP`` (random weights from ``key=jax.random.key(0)``) in two
sizes, "small" and "large" (hyper-parameters in the result file), on a full neighbor list
(cutoff 3.5 Å, skin 0.5 Å) that the engine refreshes before every evaluation. NequIP's
``energy_shift`` and ``energy_scale`` are fitted to ASE's EMT on the same structures
(``with_reference_energies``), so its energies are of the size of a real Cu potential's; the
network itself is untrained: every comparison here is of cost at equal size, never of numbers.

(1) ``vs_jax_md``: throughput (atom-steps/s) of a fixed FIRE -> NVT chain, ``--fire-cap`` FIRE
    steps (no system converges: fmax threshold 1e-6 eV/Å) then ``--nvt-steps`` Langevin steps
    (1 fs, 300 K), with the small NequIP: fused_dynamics as ONE ``FusedStage``
    ``(fd.FIRE(model, n_steps=k) + fd.NVTLangevin(model, n_steps=m)).run(batch)`` against
    JAX-MD's own NequIP (``jax_md.energy.nequip_neighbor_list``, the ``jax_md._nn.nequip`` flax
    model, configured like ours as far as the two allow; both configurations are recorded)
    driven by ``minimize.fire_descent`` then ``simulate.nvt_langevin``, as a JAX-MD user writes
    it: ``jax.vmap`` over the equal-size systems, sparse neighbor lists updated every step, each
    phase in one ``lax.fori_loop``, the two phases in one ``jax.jit``. Ratio:
    ``fused_over_jax_md`` = our throughput / JAX-MD's (above 1: ours is faster).
(2) ``fused_gain``: the same FIRE -> NVT chain with real convergence (FIRE to fmax <= 0.1 x the
    median initial fmax of the model, at most ``--fire-cap`` steps; then ``--nvt-steps`` NVT
    steps), run (a) as one ``FusedStage`` and (b) as ``fd.FIRE(...).run(batch)`` then
    ``fd.NVTLangevin(...).run(result)``, for LJ, the small and the large NequIP; wall time of
    each and ``separate_over_fused`` (above 1: fused is faster), with the FIRE steps per
    system (min, median, max). On a fixed batch both modes take max_i(FIRE steps) + NVT steps
    batched steps (the fused run ends when its last system ends NVT): what (b) pays more is a
    second run (one more model evaluation to prime NVT, the run's host-side set-up, the
    transfers), not idle slots; slots freed early pay off only with refills (bench_inflight.py).
    (c) ``bare``: a ``lax.fori_loop`` of as many bare model evaluations as the fused run takes
    batched steps, forces only, the neighbor list refreshed before each
    (:func:`bare_forces_loop`); ``fused_run_over_bare_forces`` = fused / bare, a time ratio
    (issue 13's target: at most 1.10) with the fused run's priming evaluation and its energy
    and stress at exit included: what the fused machinery and the integrators add to the
    model's cost, for a cheap model (LJ) and for a learned one.

Timing: every comparison in ONE process, interleaved rounds (A B, then B A, ...), ``--repeat``
rounds; medians with min and max; compilation measured by the first calls (first call minus a timed
run) and reported apart; the load average at the start and end of each section. Both codes size
their neighbor list before the timing (the untrained models compress the crystals): ours by a
first run whose grown list the timed runs start from, JAX-MD's by allocating 25 % more pairs
until its chain no longer overflows.

Run: ``.venv/bin/python benchmarks/bench_models.py [--quick]`` -> ``results/models.json``
(``--quick``: ``results/models_quick.json``: fewer steps, no large NequIP).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT

sys.path.insert(0, str(Path(__file__).parent))
from _common import block, git_state, save  # noqa: E402

import fused_dynamics as fd  # noqa: E402
from fused_dynamics.models.neighbors import NeighborList  # noqa: E402
from fused_dynamics.models.nequip import NequIP  # noqa: E402

A_CU, MASS_CU = 3.615, 63.546
CUTOFF, SKIN = 3.5, 0.5
LJ_CU = {"sigma": 2.338, "epsilon": 0.4093, "cutoff": 5.0, "switch_onset": 4.5}
DT_FS, TEMPERATURE, FRICTION = 1.0, 300.0, 0.01  # NVT Langevin: fs, K, 1/fs
FIRE_FRACTION = 0.1  # part 2: FIRE to fmax <= this x the median initial fmax of the model
DTYPE = jnp.float32
# NequIP hyper-parameters (ours); the JAX-MD configuration is derived from them in jaxmd_config
NEQUIP = {
    "small": {
        "n_layers": 2,
        "features": "16x0e+8x1o+8x2e",
        "l_max": 2,
        "n_radial": 8,
        "radial_width": 32,
        "radial_layers": 1,
        "avg_num_neighbors": 12.0,
    },
    "large": {
        "n_layers": 3,
        "features": "32x0e+16x1o+16x2e",
        "l_max": 2,
        "n_radial": 8,
        "radial_width": 64,
        "radial_layers": 2,
        "avg_num_neighbors": 12.0,
    },
}


# --------------------------------------------------------------------------- structures, models
def cu_systems(n_systems: int, seed: int = 0):
    """Rattled periodic fcc Cu, 32 atoms each, with EMT energies and forces attached."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_systems):
        a = bulk("Cu", "fcc", a=A_CU, cubic=True) * (2, 2, 2)
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        a.wrap()
        a.calc = EMT()
        a.get_potential_energy()
        out.append(a)
    return out


def make_batch(systems, neighbors: bool) -> fd.Batch:
    batch = fd.Batch.from_atoms(systems, dtype=DTYPE)
    if neighbors:
        batch = batch.replace(neighbors=NeighborList.allocate(batch, CUTOFF, SKIN, half=False))
    return batch


def nequip(size: str, systems):
    model = NequIP(
        species=["Cu"],
        cutoff=CUTOFF,
        param_dtype="float32",
        key=jax.random.key(0),
        **NEQUIP[size],
    )
    return model.with_reference_energies(systems)


def lennard_jones(batch):
    return fd.models.LennardJones(**LJ_CU).with_images(batch)


def fmax_per_system(model, batch) -> np.ndarray:
    out = model(batch)
    f = np.linalg.norm(np.asarray(out.forces), axis=-1)
    idx, mask = np.asarray(batch.system_idx), np.asarray(batch.atom_mask)
    return np.array([f[mask & (idx == s)].max() for s in range(len(np.asarray(batch.n_atoms)))])


def energy_summary(energy_per_atom, forces) -> dict:
    e = np.asarray(energy_per_atom, np.float64)
    f = np.asarray(forces, np.float64)
    return {
        "energy_per_atom_eV": {
            "mean": float(e.mean()),
            "min": float(e.min()),
            "max": float(e.max()),
        },
        "force_rms_eV_per_A": float(np.sqrt(np.mean(f * f))),
    }


# --------------------------------------------------------------------------- timing
def interleaved(runs: dict, repeat: int) -> dict:
    """Warm up every run (compile), then time them in ``repeat`` rounds A B ... B A ...

    The order is reversed every other round, so no run always goes first. ``runs`` maps a name
    to a function that runs the workload and returns a dict (or None) of things to record; the
    first call's result is kept.
    """
    out = {}
    for name, fn in runs.items():
        t = time.perf_counter()
        rec = fn()
        rec = rec if isinstance(rec, dict) else {}
        out[name] = {"warmup_s": time.perf_counter() - t, "walls_s": [], **rec}
    names = list(runs)
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = runs[name]
            t = time.perf_counter()
            fn()
            out[name]["walls_s"].append(time.perf_counter() - t)
    for rec in out.values():
        w = rec["walls_s"]
        rec["median_s"], rec["min_s"], rec["max_s"] = statistics.median(w), min(w), max(w)
        # compilation ~ warm-up minus one run
        rec["compile_s"] = max(rec["warmup_s"] - rec["median_s"], 0.0)
    return out


def spread(walls, scale: float) -> dict:
    """Median, min and max of ``scale / wall`` (a throughput) over the rounds."""
    v = [scale / w for w in walls]
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- (1) JAX-MD
def jaxmd_config(size: str, shift: float, scale: float):
    """JAX-MD's NequIP ``ConfigDict`` closest to our hyper-parameters ``NEQUIP[size]``."""
    from jax_md._nn import nequip as jm_nequip

    ours = NEQUIP[size]
    cfg = jm_nequip.default_config()
    cfg.graph_net_steps = ours["n_layers"]
    cfg.hidden_irreps = ours["features"]
    cfg.sh_irreps = "+".join(
        f"1x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(ours["l_max"] + 1)
    )
    cfg.num_basis = ours["n_radial"]
    cfg.r_max = CUTOFF
    cfg.radial_net_n_hidden = ours["radial_width"]
    cfg.radial_net_n_layers = ours["radial_layers"]
    cfg.n_elements = 1
    # ours divides neighbor sums by sqrt(avg_num_neighbors), JAX-MD by n_neighbors: same factor
    cfg.n_neighbors = math.sqrt(ours["avg_num_neighbors"])
    cfg.shift, cfg.scale = float(shift), float(scale)
    return cfg


def jaxmd_chain(systems, cfg, n_fire: int, n_nvt: int):
    """JAX-MD's NequIP driven by ``fire_descent`` then ``nvt_langevin``, vmapped over systems.

    Returns (run, info): ``run()`` does the whole chain from the same initial state.
    """
    from ase import units
    from jax_md import energy, minimize, simulate, space

    box = float(systems[0].cell[0, 0])
    disp, shift = space.periodic(box)
    pos = jnp.asarray(np.stack([a.positions % box for a in systems]), DTYPE)
    atoms = jnp.ones((pos.shape[1], 1), DTYPE)  # one-hot over the single element
    neighbor_fn, init_fn, energy_fn = energy.nequip_neighbor_list(
        disp, box, cfg, atoms=atoms, dr_threshold=SKIN
    )
    nb0 = neighbor_fn.allocate(pos[0])
    nbs = jax.vmap(lambda r: nb0.update(r))(pos)
    params = init_fn(jax.random.PRNGKey(0), pos[0], nb0)
    capacity0 = int(nb0.idx.shape[-1])

    def efn(r, neighbor, **kwargs):
        return energy_fn(params, r, neighbor)

    fire_init, fire_apply = minimize.fire_descent(efn, shift)
    kt = DTYPE(units.kB * TEMPERATURE)
    nvt_init, nvt_apply = simulate.nvt_langevin(
        efn, shift, DTYPE(DT_FS * units.fs), kt, gamma=DTYPE(FRICTION / units.fs)
    )
    mass = DTYPE(MASS_CU)

    def update(s, nb):
        return jax.vmap(lambda r, n: n.update(r))(s.position, nb)

    @jax.jit
    def chain(pos, nbs, key):
        s = jax.vmap(lambda r, n: fire_init(r, neighbor=n))(pos, nbs)

        def fire_body(i, carry):
            s, nb = carry
            nb = update(s, nb)
            return jax.vmap(lambda s, n: fire_apply(s, neighbor=n))(s, nb), nb

        s, nbs = jax.lax.fori_loop(0, n_fire, fire_body, (s, nbs))
        keys = jax.random.split(key, pos.shape[0])
        s = jax.vmap(lambda k, r, n: nvt_init(k, r, mass=mass, neighbor=n))(keys, s.position, nbs)

        def nvt_body(i, carry):
            s, nb = carry
            nb = update(s, nb)
            return jax.vmap(lambda s, n: nvt_apply(s, neighbor=n))(s, nb), nb

        s, nbs = jax.lax.fori_loop(0, n_nvt, nvt_body, (s, nbs))
        e = jax.vmap(efn)(s.position, nbs)
        return e, jnp.any(nbs.did_buffer_overflow)

    e0, g0 = jax.vmap(jax.value_and_grad(efn))(pos, nbs)
    key = jax.random.PRNGKey(1)
    # what a JAX-MD user does: run, and on an overflow allocate a larger list and run again
    # (the untrained model compresses the crystals during the chain); compilation included
    t = time.perf_counter()
    grown = 0
    while bool(block(chain(pos, nbs, key))[1]):
        grown += 1
        if grown > 6:
            raise RuntimeError("JAX-MD neighbor list keeps overflowing")
        # sparse format: extra_capacity is per atom; +25 % of the first capacity per regrowth
        extra = math.ceil(0.25 * grown * capacity0 / pos.shape[1])
        nb0 = neighbor_fn.allocate(pos[0], extra_capacity=extra)
        nbs = jax.vmap(lambda r, n=nb0: n.update(r))(pos)
    first_call_s = time.perf_counter() - t
    info = {
        "initial": energy_summary(np.asarray(e0) / pos.shape[1], -np.asarray(g0)),
        "first_calls_s": first_call_s,
        "neighbor_capacity_allocated": capacity0,
        "neighbor_capacity": int(nb0.idx.shape[-1]),
        "neighbor_list_regrown": grown,
        "config": {k: (dict(v) if hasattr(v, "items") else v) for k, v in cfg.items()},
        "model_evaluations_per_system": n_fire + n_nvt + 2,  # fire_init and nvt_init evaluate
    }

    def run():
        e, overflow = block(chain(pos, nbs, key))
        if bool(overflow):
            raise RuntimeError("JAX-MD neighbor list overflowed")
        return {"final_energy_per_atom_mean": float(np.mean(np.asarray(e)) / pos.shape[1])}

    energy_only = jax.jit(jax.vmap(efn))
    energy_forces = jax.jit(jax.vmap(jax.value_and_grad(efn)))
    model_only = {
        "jax_md_energy": lambda: block(energy_only(pos, nbs)),
        "jax_md_energy_forces": lambda: block(energy_forces(pos, nbs)),
    }
    return run, info, model_only


def chain_stages(model, fmax: float, fire_cap: int, n_nvt: int):
    """(FIRE, NVTLangevin, FIRE + NVTLangevin): FIRE to ``fmax`` or ``fire_cap`` steps, then
    ``n_nvt`` Langevin steps. ``fmax`` is a Python float, which the engine traces: every
    threshold shares one compiled program, so (1) and (2) compile the small NequIP's fused
    chain once."""
    conv = fd.ConvergenceHook.from_fmax(float(fmax))
    fire = fd.FIRE(model, n_steps=fire_cap, convergence_hook=conv)
    nvt = fd.NVTLangevin(
        model, dt=DT_FS, temperature=TEMPERATURE, friction=FRICTION, seed=0, n_steps=n_nvt
    )
    return fire, nvt, fire + nvt


def sized(fused, batch):
    """(batch, seconds, batched steps): run ``fused`` once (compiling it); when the engine grew
    the neighbor list on the way (the untrained models compress the crystals), every timed run
    starts from the grown list, marked stale so that it is rebuilt on the initial positions. As
    on the JAX-MD side, the capacity is found once, before the timing, not regrown in every
    run. The batched steps are those of this run (every timed run takes the same)."""
    t = time.perf_counter()
    final = fused.run(batch)
    block(final.positions)
    if isinstance(batch.neighbors, NeighborList):
        batch = batch.replace(neighbors=final.neighbors.invalidated())
    return batch, time.perf_counter() - t, int(np.asarray(final.step_count).max())


def fd_fixed_chain(model, batch, n_fire: int, n_nvt: int):
    """Our fused FIRE (exactly n_fire steps: nothing converges) -> NVT (n_nvt steps)."""
    fused = chain_stages(model, 1e-6, n_fire, n_nvt)[2]
    capacity0 = int(batch.neighbors.capacity)
    batch, first, _ = sized(fused, batch)
    info = {
        "first_calls_s": first,
        "neighbor_capacity_allocated": capacity0,
        "neighbor_capacity": int(batch.neighbors.capacity),
    }

    def run():
        final = fused.run(batch)
        block(final.positions)
        steps = np.asarray(final.info["stage_steps"])
        n = np.asarray(final.n_atoms)
        return {
            "stage_steps_per_system": [int(steps[:, 0].max()), int(steps[:, 1].max())],
            "final_energy_per_atom_mean": float(np.mean(np.asarray(final.energy) / n)),
            "exit_reasons": sorted({int(x) for x in np.asarray(final.info["exit_reason"])}),
        }

    return run, info


def vs_jax_md(args, systems) -> dict:
    size = "small"
    batch = make_batch(systems, neighbors=True)
    model = nequip(size, systems)
    out0 = model(batch)
    mask = np.asarray(batch.atom_mask)
    ours_initial = energy_summary(
        np.asarray(out0.energy) / np.asarray(batch.n_atoms), np.asarray(out0.forces)[mask]
    )
    cfg = jaxmd_config(size, float(model.energy_shift[0]), float(model.energy_scale[0]))
    fd_run, fd_info = fd_fixed_chain(model, batch, args.fire_cap, args.nvt_steps)
    runs = {"fused_dynamics": fd_run}
    jm_run, jm_info, jm_model_only = jaxmd_chain(systems, cfg, args.fire_cap, args.nvt_steps)
    runs["jax_md"] = jm_run
    load0 = loadavg()
    timed = interleaved(runs, args.repeat)
    load1 = loadavg()
    # one model evaluation alone (no integrator, no neighbor refresh), ours and JAX-MD's:
    # where the time of a step goes
    energy_only = jax.jit(lambda b: model.energy(b))
    energy_forces = jax.jit(lambda b: model(b, stress=False))
    model_only = {
        "fused_dynamics_energy": lambda: block(energy_only(batch)),
        "fused_dynamics_energy_forces": lambda: block(energy_forces(batch).forces),
        **jm_model_only,
    }
    evals = interleaved(model_only, 2 * args.repeat)
    load2 = loadavg()
    atom_steps = len(systems) * len(systems[0]) * (args.fire_cap + args.nvt_steps)
    for rec in timed.values():
        rec["atom_steps_per_s"] = spread(rec["walls_s"], atom_steps)
    timed["fused_dynamics"].update(
        initial=ours_initial,
        config={**model.hyperparameters(), "energy_shift": cfg.shift, "energy_scale": cfg.scale},
        model_evaluations_per_system=args.fire_cap + args.nvt_steps + 1,
        **fd_info,
    )
    timed["jax_md"].update(jm_info)
    # both compiled (and regrew their lists) before the interleaved warm-up
    for rec in timed.values():
        rec["compile_s"] = max(rec["first_calls_s"] - rec["median_s"], 0.0)
    ours, theirs = timed["fused_dynamics"]["walls_s"], timed["jax_md"]["walls_s"]
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]  # per round
    return {
        "model": f"NequIP '{size}' (random weights; shift and scale fitted to EMT)",
        "steps": {"fire": args.fire_cap, "nvt": args.nvt_steps},
        "atom_steps": atom_steps,
        "load_average": {"start": load0, "end": load1},
        "codes": timed,
        "model_evaluation_ms": {
            name: {k: 1e3 * rec[f"{k}_s"] for k in ("median", "min", "max")}
            for name, rec in evals.items()
        },
        "model_evaluation_load_average": {"start": load1, "end": load2},
        "fused_over_jax_md": {
            "of_medians": timed["jax_md"]["median_s"] / timed["fused_dynamics"]["median_s"],
            "per_round_min": min(ratios),
            "per_round_max": max(ratios),
        },
        "architecture_differences": [
            "JAX-MD's readout is two linear maps (h -> (C/2)x0e -> 0e), ours one (h -> 0e)",
            "JAX-MD's first layer sees all hidden irreps (the embedding's 1o/2e channels are "
            "zero); ours starts from the scalars only, so its first tensor product is smaller",
            "radial basis: JAX-MD's Bessel with a polynomial cutoff from r_max - 0.5 Å; ours "
            "e3nn's Bessel times NequIP's polynomial envelope (p = 6)",
            "gates: JAX-MD uses raw_swish/tanh for both the scalars and the gates; ours SiLU on "
            "scalars, sigmoid on even gates",
            "JAX-MD's FIRE (fire_descent) and ours (ASE flavour) take different steps; both do "
            "the same number of model evaluations per system up to the initial ones (ours 1, "
            "JAX-MD 2: fire_init and nvt_init each evaluate the forces)",
        ],
    }


# --------------------------------------------------------------------------- (2) fused gain
def fused_gain_case(model, batch, fire_cap: int, n_nvt: int) -> tuple[dict, dict]:
    f0 = fmax_per_system(model, batch)
    target = float(FIRE_FRACTION * np.median(f0))
    fire, nvt, fused = chain_stages(model, target, fire_cap, n_nvt)
    nl = batch.neighbors
    capacity0 = int(nl.capacity) if isinstance(nl, NeighborList) else None
    batch, first, steps = sized(fused, batch)  # steps: the batched steps of the run

    def run_fused():
        final = fused.run(batch)
        block(final.positions)
        steps = np.asarray(final.info["stage_steps"])
        return {
            "fire_steps_per_system": steps[:, 0].tolist(),
            "nvt_steps_per_system": steps[:, 1].tolist(),
            "batched_steps": int(np.asarray(final.step_count).max()),
        }

    def run_separate():
        relaxed = fire.run(batch)
        block(relaxed.positions)
        final = nvt.run(relaxed)
        block(final.positions)
        return {
            "fire_steps_per_system": np.asarray(relaxed.info["stage_steps"])[:, 0].tolist(),
            "nvt_steps_per_system": np.asarray(final.info["stage_steps"])[:, 0].tolist(),
            "batched_steps": [
                int(np.asarray(relaxed.step_count).max()),
                int(np.asarray(final.step_count).max()),
            ],
        }

    bare = bare_forces_loop(model, steps, batch)

    def run_bare():
        block(bare(batch))

    info = {
        "initial_fmax_eV_per_A": {"median": float(np.median(f0)), "max": float(f0.max())},
        "fire_fmax_target_eV_per_A": target,
        "fire_cap": fire_cap,
        "nvt_steps": n_nvt,
        "fused_first_calls_s": first,
    }
    if capacity0 is not None:
        info["neighbor_capacity"] = {
            "allocated": capacity0,
            "after_warm_up": int(batch.neighbors.capacity),
        }
    info["bare_evaluations"] = steps
    return {"fused": run_fused, "separate": run_separate, "bare": run_bare}, info


def bare_forces_loop(model, n_evaluations: int, batch):
    """A compiled ``lax.fori_loop`` of ``n_evaluations`` bare model evaluations whose energy
    nothing reads (XLA drops its sum): the positions move by ``1e-9 * forces`` each time (so
    nothing is hoisted out of the loop), and a neighbor list is refreshed before each
    evaluation (:meth:`NeighborList.update`, a rebuild only when an atom moved half the skin),
    as a run's steps refresh it; no stress (the steps of a FIRE -> NVT run read none),
    compiled with the XLA options the model asks for on ``batch``'s shapes, as the run's
    program is. The reference of "fused run / bare forces-only loop"
    (``bench_fused_overhead.py``'s ``bare_forces``) for these models."""

    def run(batch):
        def body(_, b):
            given = b
            if isinstance(b.neighbors, NeighborList):
                fresh = b.neighbors.update(b)
                b = b.replace(neighbors=fresh)
                given = b.replace(neighbors=dataclasses.replace(fresh, refreshed=True))
            out = model(given, stress=False)
            return b.replace(positions=b.positions + 1e-9 * out.forces)

        return jax.lax.fori_loop(0, n_evaluations, body, batch).positions

    return jax.jit(run, compiler_options=model.compiler_options(batch) or None)


def fused_gain(args, systems) -> dict:
    dense = make_batch(systems, neighbors=False)
    listed = make_batch(systems, neighbors=True)
    cases = {"lennard_jones": (lennard_jones(dense), dense)}
    for size in args.sizes:
        cases[f"nequip_{size}"] = (nequip(size, systems), listed)
    out = {}
    for name, (model, batch) in cases.items():
        runs, info = fused_gain_case(model, batch, args.fire_cap, args.nvt_steps)
        load0 = loadavg()
        timed = interleaved(runs, args.repeat)
        load1 = loadavg()
        # the fused chain compiled in sized() (the small NequIP's already in (1))
        first = info["fused_first_calls_s"]
        timed["fused"]["compile_s"] = max(first - timed["fused"]["median_s"], 0.0)
        fire_steps = np.asarray(timed["fused"]["fire_steps_per_system"])
        a, b = timed["fused"]["walls_s"], timed["separate"]["walls_s"]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        over_bare = [x / y for x, y in zip(a, timed["bare"]["walls_s"], strict=True)]
        out[name] = {
            **info,
            "load_average": {"start": load0, "end": load1},
            "fire_steps": {
                "min": int(fire_steps.min()),
                "median": float(np.median(fire_steps)),
                "max": int(fire_steps.max()),
            },
            "fused_step_ms": 1e3 * timed["fused"]["median_s"] / timed["fused"]["batched_steps"],
            "modes": timed,
            "separate_over_fused": {
                "of_medians": timed["separate"]["median_s"] / timed["fused"]["median_s"],
                "per_round_min": min(ratios),
                "per_round_max": max(ratios),
            },
            # time ratio (target <= 1.10): the whole fused run (its priming evaluation, the
            # energy and stress at exit included) over as many bare evaluations as it took steps
            "fused_run_over_bare_forces": {
                "of_medians": timed["fused"]["median_s"] / timed["bare"]["median_s"],
                "per_round_median": statistics.median(over_bare),
                "per_round_min": min(over_bare),
                "per_round_max": max(over_bare),
            },
        }
        if name.startswith("nequip"):
            out[name]["config"] = model.hyperparameters()
        else:
            out[name]["config"] = dict(LJ_CU)
        print(
            f"  {name}: fused {timed['fused']['median_s']:.2f} s, separate "
            f"{timed['separate']['median_s']:.2f} s, separate/fused "
            f"{out[name]['separate_over_fused']['of_medians']:.3f}, fused/bare "
            f"{out[name]['fused_run_over_bare_forces']['of_medians']:.3f}",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- main
def main(args) -> dict:
    systems = cu_systems(args.systems)
    load0 = loadavg()
    result = {
        "workload": (
            f"{args.systems} rattled fcc Cu crystals x 32 atoms, float32, CPU; FIRE -> NVT "
            f"Langevin ({DT_FS} fs, {TEMPERATURE} K)"
        ),
        "precision": "float32",
        "quick": bool(args.quick),
        "repeat": args.repeat,
        "git": git_state(),
        "versions": {"jax": jax.__version__},
        "notes": [
            "NequIP weights are random (only the per-species energy shift and scale are fitted to "
            "EMT): cost at equal size, not equal numbers",
            "timings on a shared 2-core machine: see load_average in each section",
        ],
    }
    try:
        import e3nn_jax
        import jax_md

        result["versions"].update(jax_md=jax_md.__version__, e3nn_jax=e3nn_jax.__version__)
    except Exception:  # noqa: BLE001
        pass
    if not args.no_jax_md:
        print("(1) fused_dynamics NequIP vs JAX-MD NequIP ...", flush=True)
        result["vs_jax_md"] = vs_jax_md(args, systems)
    print("(2) fused vs separate stages ...", flush=True)
    result["fused_gain"] = fused_gain(args, systems)
    result["load_average"] = {"start": load0, "end": loadavg()}
    return result


def print_table(res: dict) -> None:
    vs = res.get("vs_jax_md")
    if vs:
        print(f"\n(1) {vs['model']}: {vs['steps']['fire']} FIRE + {vs['steps']['nvt']} NVT steps")
        print(f"{'code':<16}{'atom-steps/s (median, min-max)':>36}{'compile s':>12}")
        for name, rec in vs["codes"].items():
            t = rec["atom_steps_per_s"]
            rng = f"{t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f})"
            print(f"{name:<16}{rng:>36}{rec['compile_s']:>12.1f}")
        r = vs["fused_over_jax_md"]
        print(
            f"ours / JAX-MD: {r['of_medians']:.2f} (per round {r['per_round_min']:.2f}-"
            f"{r['per_round_max']:.2f}); load {vs['load_average']['start']} -> "
            f"{vs['load_average']['end']}"
        )
        print("one model evaluation, ms (median, min-max):")
        for name, rec in vs["model_evaluation_ms"].items():
            print(f"  {name:<30}{rec['median']:>8.1f} ({rec['min']:.1f}-{rec['max']:.1f})")
    print("\n(2) fused FIRE+NVT vs FIRE.run then NVTLangevin.run (median s, min-max)")
    head = ("model", "step ms", "FIRE steps", "fused", "separate", "sep/fused")
    print(f"{head[0]:<16}{head[1]:>9}{head[2]:>14}{head[3]:>20}{head[4]:>20}{head[5]:>11}")
    for name, rec in res["fused_gain"].items():
        fs = rec["fire_steps"]
        cols = []
        for mode in ("fused", "separate"):
            m = rec["modes"][mode]
            cols.append(f"{m['median_s']:.2f} ({m['min_s']:.2f}-{m['max_s']:.2f})")
        steps = f"{fs['min']}/{fs['median']:g}/{fs['max']}"
        print(
            f"{name:<16}{rec['fused_step_ms']:>9.1f}{steps:>14}"
            f"{cols[0]:>20}{cols[1]:>20}{rec['separate_over_fused']['of_medians']:>11.3f}"
        )
    print(f"load average {res['load_average']['start']} -> {res['load_average']['end']}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, no large NequIP")
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--nvt-steps", type=int, default=None, help="NVT steps (10; quick 5)")
    p.add_argument(
        "--fire-cap", type=int, default=None, help="FIRE steps: (1) all, (2) at most (30; quick 20)"
    )
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds (3; quick 5)")
    p.add_argument("--no-jax-md", action="store_true", help="skip (1)")
    p.add_argument("--out", default=None, help="result name (models / models_quick)")
    args = p.parse_args()
    q = args.quick
    args.nvt_steps = args.nvt_steps or (5 if q else 10)
    args.fire_cap = args.fire_cap or (20 if q else 30)
    # quick: 5 rounds, since W3's runs there last 30-70 ms (LJ) and 2 rounds swung its ratio
    # from 1.31 to 0.96 between two quick runs of the same code; 5 rounds add about 10 s
    args.repeat = args.repeat or (5 if q else 3)
    args.sizes = ("small",) if q else ("small", "large")
    t0 = time.perf_counter()
    res = main(args)
    res["total_s"] = time.perf_counter() - t0
    path = save(args.out or ("models_quick" if q else "models"), res)
    print_table(res)
    print(f"total {res['total_s']:.0f} s; wrote {path}")
