"""Cost of padding a mixed batch (issue 13, item 3): one mixed FIRE run vs one run per shape.

Workloads (``--structures``, bench_peers.py's relaxation sets with their cutoffs), LJ (sigma
3.405 Å, epsilon 0.0104 eV, hard cut), float64, FIRE to fmax < 0.05 eV/Å:

- ``peers`` (default): the relaxation set of ``bench_peers.py`` (``--systems`` 64: half rattled
  icosahedral argon clusters of 55 atoms, non-periodic, half rattled periodic fcc crystals of
  256 atoms, cutoff 8.5 Å);
- ``w1``: issue 13's W1, ``--systems`` (256) clusters and crystals of 13-108 atoms in seven
  shapes, cutoff 7.5 Å (``bench_peers.w1_systems``).

Programs, each compiled once (compile times reported apart), then called in interleaved rounds
in this one process, the order rotated every round:

- ``mixed``: one ``fd.FIRE`` run of the whole batch, one model evaluation per step for all,
  with the size buckets ``run`` fits to it (clusters paired on their 2 leading tiles of 32
  atom slots, crystals on all 8);
- ``mixed_one_bucket``: the same with ``size_buckets=()`` (every slot padded to 256 atoms and
  paired on all its tiles: the kernel before size buckets);
- ``per_shape``: one ``fd.FIRE`` run per shape (equal size and periodicity), one after the
  other, each batch padded only to its own size (what a user sorting structures by hand gets).

Reported: seconds per round (median, min-max), the per-round ratios to ``per_shape`` (target
for ``mixed``: <= 1.15), the model evaluations of each, the dense layout each batch compiled
to, and the load average at start and end (the 2-core machine is shared).

Run: ``.venv/bin/python benchmarks/bench_padding.py [--structures peers|w1] [--systems 64]
[--rounds 5] [--name padding]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_state, interleaved, save  # noqa: E402
from bench_peers import EPSILON, FMAX, MAX_RELAX_STEPS, SIGMA, relax_set  # noqa: E402

import fused_dynamics as fd  # noqa: E402
from fused_dynamics.models.blocked import dense_layout, image_shifts  # noqa: E402


def relaxation(systems, cutoff, size_buckets=None):
    """(run, batch, layout): a compiled FIRE run of ``systems`` in one batch, to fmax 0.05.

    ``size_buckets``: None fits them to the batch (what ``run`` does), ``()`` one bucket.
    """
    batch = fd.Batch.from_atoms(systems)
    model = fd.models.LennardJones(
        sigma=SIGMA, epsilon=EPSILON, cutoff=cutoff, shift=False, size_buckets=size_buckets
    )
    model = model.with_images(batch)
    if size_buckets is None:
        model = model.with_size_buckets(batch)
    fire = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(FMAX))
    n_img = (1, 1, 1) if model.images is None else tuple(model.images)
    n_shifts = len(image_shifts(n_img, np.dtype(batch.dtype)))
    layout = dense_layout(
        batch.max_systems,
        batch.max_atoms,
        batch.max_atoms_per_system,
        n_shifts,
        model.size_buckets,
    )
    if model.size_buckets:
        layout += f" in size buckets {model.size_buckets}"

    def run():
        final = jax.block_until_ready(fire.run(batch, n_steps=MAX_RELAX_STEPS))
        steps = np.asarray(final.info["stage_steps"])[:, 0]
        fmax = np.asarray(final.max_atoms_of(jnp.linalg.norm(final.forces, axis=-1)))
        return {
            "model_calls": int(steps.max()) + 1,
            "converged": int(np.sum(fmax <= FMAX)),
            "energy": np.asarray(final.energy),
        }

    return run, batch, layout


def summary(xs) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(n_systems: int = 64, rounds: int = 5, structures: str = "peers") -> dict:
    load_start = [round(x, 2) for x in os.getloadavg()]
    git = git_state()
    systems, cutoff = relax_set(structures, n_systems)
    if structures == "peers":
        workload = (
            f"{n_systems // 2} clusters x 55 + {n_systems - n_systems // 2} crystals x 256 atoms"
            f", cutoff {cutoff} A"
        )
    else:
        workload = f"{n_systems} structures of 13-108 atoms (7 shapes), cutoff {cutoff} A"
    mixed, mixed_batch, mixed_layout = relaxation(systems, cutoff)
    one_bucket, _, one_layout = relaxation(systems, cutoff, size_buckets=())
    shapes = {}
    for k, a in enumerate(systems):  # one batch per shape: equal size and periodicity
        shapes.setdefault((len(a), bool(a.pbc.any())), []).append(k)
    order = [k for ks in shapes.values() for k in ks]
    groups = [relaxation([systems[k] for k in ks], cutoff) for ks in shapes.values()]

    def per_shape():
        outs = [run() for run, _, _ in groups]
        return {
            "model_calls": sum(o["model_calls"] for o in outs),
            "converged": sum(o["converged"] for o in outs),
            "energy": np.concatenate([o["energy"] for o in outs])[np.argsort(order)],
        }

    programs = {"mixed": mixed, "per_shape": per_shape, "mixed_one_bucket": one_bucket}
    compile_s, results, times = interleaved(programs, rounds)  # compile_s: compile + one run
    # the same structures, the same FIRE: the relaxed energies agree (each run stops anywhere
    # below fmax, but the batches evaluate every system alike, so they agree closely)
    de = float(np.max(np.abs(results["mixed"]["energy"] - results["per_shape"]["energy"])))
    rounds_ratio = {
        name: [m / p for m, p in zip(times[name], times["per_shape"], strict=True)]
        for name in ("mixed", "mixed_one_bucket")
    }
    ratio = {name: summary(r) for name, r in rounds_ratio.items()}
    return {
        "workload": f"{workload}, LJ argon, float64, FIRE to fmax 0.05 eV/A",
        "command": " ".join(["benchmarks/bench_padding.py", *sys.argv[1:]]),
        "timing": f"{rounds} interleaved rounds (order rotated each round), one process",
        "layouts": {
            "mixed": (
                f"{mixed_layout} ({mixed_batch.max_systems} x {mixed_batch.max_atoms_per_system})"
            ),
            "mixed_one_bucket": one_layout,
            "per_shape": [
                f"{layout} ({b.max_systems} x {b.max_atoms_per_system})" for _, b, layout in groups
            ],
        },
        "model_calls": {name: results[name]["model_calls"] for name in programs},
        "converged": {name: results[name]["converged"] for name in programs},
        "max_energy_difference_eV": de,
        "seconds": {name: summary(ts) for name, ts in times.items()},
        "over_per_shape": ratio,
        "over_per_shape_rounds": rounds_ratio,
        "compile_and_first_run_s": compile_s,
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "targets": {"mixed over per_shape": "<= 1.15"},
        "git": git,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--structures",
        choices=["peers", "w1"],
        default="peers",
        help="peers: bench_peers.py's relaxation set (55 + 256 atoms); w1: 13-108 atoms",
    )
    p.add_argument("--name", default="padding")
    args = p.parse_args()
    res = main(args.systems, args.rounds, args.structures)
    path = save(args.name, res)
    for k, v in res.items():
        print(f"{k}: {v}")
    print(f"wrote {path}")
