"""Scale-out: throughput of an inflight run on 1, 2 and 4 (forced host) devices, and a
pipeline ``fire | nvt`` against the fused run ``fire + nvt`` (issue 14).

Workload: ``--systems`` (96; ``--quick``: 24) small LJ argon systems (8-13 atom clusters and
4-16 atom periodic crystals, rattled, fixed seed), each relaxed with FIRE to fmax <= 0.05 eV/Å
(at most 40 steps) then run for ``--md`` (100) steps of Langevin NVT. Sampler capacity: 64
systems of at most 16 atoms (1024 atoms) in all, spread over the devices.

Each device count runs in its own subprocess (JAX fixes the device count when it starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=D``, ``JAX_PLATFORMS=cpu``):

- ``fused``: ``fused.run(sampler=..., mesh=Mesh(D devices))``, warmed up first on 2 x capacity
  systems (compile time reported apart), then timed on the whole dataset.
- ``pipeline`` (D >= 2): ``(fire | nvt)`` over two device groups of D/2 devices each, same
  sampler, timed after the same warm-up; graduates move between the groups with
  ``jax.device_put`` (docs/semantics.md §16).

Within a subprocess the timed runs are interleaved (fused, pipeline, fused, pipeline, ...,
``--rounds`` each; median and min-max reported). The device counts cannot share a process.

Reported: wall seconds, systems per second, the ratio to one device, pipeline / fused, and the
load average (1 min) before and after every subprocess. Forced host devices share the
machine's cores: on a 2-core machine the ceiling of any speed-up is about 2x, and a loaded
machine (another process on the cores) lowers it further; the load average says how loaded.

Run: ``.venv/bin/python benchmarks/bench_scaling.py [--quick]``; writes
``results/scaling.json`` (``scaling_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

WORKER = """
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from jax.sharding import Mesh
import fused_dynamics as fd
from fused_dynamics.pipeline import DistributedPipeline
sys.path.insert(0, "tests")
from test_sharding import LJ, systems

n_systems, n_md, with_pipeline = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
rounds = int(sys.argv[4])
relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=40)
md = fd.NVTLangevin(LJ, dt=4.0, temperature=40.0, friction=0.02, seed=7, n_steps=n_md)
devices = jax.devices()
mesh = Mesh(np.array(devices), ("systems",))
warm, data = systems(128, seed=11), systems(n_systems, seed=3)


def sampler(d):
    return fd.SizeAwareSampler(d, max_atoms=1024, max_systems=64, max_atoms_per_system=16)


def fused_run(d):
    sink = fd.HostMemory()
    (relax + md).run(sampler=sampler(d), refill_frequency=20, sinks=[sink], mesh=mesh)
    assert len(sink) == len(d)


def pipeline_run(d):
    sink = fd.HostMemory()
    half = len(devices) // 2
    with DistributedPipeline((relax | md).stages, devices=[devices[:half], devices[half:]]) as p:
        p.run(sampler(d), [sink], refill_frequency=20)
    assert len(sink) == len(d)


out = {"devices": len(devices)}
modes = [("fused", fused_run)] + ([("pipeline", pipeline_run)] * with_pipeline)
warmup = {}
for name, fn in modes:
    t = time.perf_counter()
    fn(warm)
    warmup[name] = time.perf_counter() - t
walls = {name: [] for name, _ in modes}
for _ in range(rounds):  # interleaved: A B A B
    for name, fn in modes:
        t = time.perf_counter()
        fn(data)
        walls[name].append(time.perf_counter() - t)
for name, _ in modes:
    wall = float(np.median(walls[name]))
    out[name] = {
        "warmup_s": warmup[name],
        "wall_s": wall,
        "wall_s_min_max": [min(walls[name]), max(walls[name])],
        "systems_per_s": len(data) / wall,
    }
print("RESULT " + json.dumps(out))
"""


def run_worker(devices: int, n_systems: int, n_md: int, pipeline: bool, rounds: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
    load0 = os.getloadavg()[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(WORKER),
            str(n_systems),
            str(n_md),
            str(int(pipeline)),
            str(rounds),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker with {devices} devices failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    result["load_1min"] = [load0, os.getloadavg()[0]]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=int, default=96)
    parser.add_argument("--md", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each mode")
    parser.add_argument("--quick", action="store_true", help="24 systems, 50 MD steps, 1 round")
    args = parser.parse_args()
    n_systems, n_md = (24, 50) if args.quick else (args.systems, args.md)
    rounds = 1 if args.quick else args.rounds

    from _common import git_state, save  # benchmarks/ helpers (no JAX device use here)

    runs = {}
    for devices in (1, 2, 4):
        runs[devices] = run_worker(devices, n_systems, n_md, pipeline=devices >= 2, rounds=rounds)
        print(devices, "devices:", json.dumps(runs[devices]), flush=True)
    base = runs[1]["fused"]["systems_per_s"]
    summary = {f"speedup_{d}_devices": runs[d]["fused"]["systems_per_s"] / base for d in (2, 4)}
    for d in (2, 4):
        summary[f"pipeline_over_fused_{d}_devices"] = (
            runs[d]["pipeline"]["systems_per_s"] / runs[d]["fused"]["systems_per_s"]
        )
    print(json.dumps(summary, indent=2))
    payload = {
        "workload": {"systems": n_systems, "md_steps": n_md, "max_systems": 64, "max_atoms": 1024},
        "rounds": rounds,
        "runs": {str(d): r for d, r in runs.items()},
        "summary": summary,
        "cores": os.cpu_count(),
        "note": "forced host devices share the cores: on 2 cores the ceiling is about 2x",
        "git": git_state(),
    }
    path = save("scaling_quick" if args.quick else "scaling", payload)
    print("wrote", path)


if __name__ == "__main__":
    main()
