"""Overhead of the fused step over a bare model-evaluation loop (issue 13, item 4).

Workload: 64 LJ argon systems of 108 atoms (periodic fcc, rattled), float64, ``--steps`` steps
(200). Programs, each compiled once, then called in interleaved rounds (A B C ... A B C ...) in
this one process, the order rotated every round so no program always runs first:

- ``bare``: a ``lax.while_loop`` of ``--steps`` bare model evaluations on the same batch
  (energy and forces, the evaluation the fused step makes; the positions move by
  ``1e-9 * forces`` every step so nothing is hoisted out of the loop);
- ``bare_forces``: the same loop of evaluations whose energy nothing reads (XLA drops its sum:
  the evaluation a run's steps make when nothing reads the energy, docs/semantics.md §6), the
  like-for-like reference of ``fused_run``;
- ``fused``: a ``lax.while_loop`` of ``--steps`` fused FIRE + NVTLangevin steps
  (:meth:`FusedStage.step`) from a prepared batch (systems migrate from FIRE to NVT during it);
- ``fused_k``: the same with convergence observables every ``--every`` steps
  (``FusedStage(..., convergence_every=k)``);
- ``fused_hooks``: ``fused`` with 4 idle hooks (host hooks due every 10^6 steps);
- ``fused_run``: ``fused.run(batch, n_steps)`` end to end (initialisation, its priming
  evaluation and the final stress evaluation included; with no hook its steps evaluate forces
  only and the energy once at the end, docs/semantics.md §6, while ``bare`` sums the energy at
  every evaluation);
- ``fused_tape_callback``: ``fused`` with one host hook that keeps energy, fmax, temperature and
  positions every ``--tape-every`` steps (5), sent by a host callback inside the loop (what one
  compiled call does);
- ``fused_tape_recorded``: the same hook recorded into device buffers and delivered after the
  loop (what a run in chunks does, :mod:`fused_dynamics.recording`; the delivery is timed);
- ``only_fire``, ``only_langevin``, ``only_nve`` (``--breakdown``, the default): one-stage fused
  steps of each kind on the same batch, to say which part of the step costs what.

Reported per program: median, min and max seconds per step over the rounds; per round the ratio
to ``bare`` of the same round, its median and min-max (and ``fused_run`` over ``bare_forces``,
``over_bare_forces``) (targets: fused / bare <= 1.10, idle hooks
< 2 %); the ratio of the fastest calls (least disturbed on a shared machine); compile times
apart; the load average at start and end (the 2-core machine is shared).

Run: ``.venv/bin/python benchmarks/bench_fused_overhead.py [--systems 64] [--steps 200]
[--rounds 7] [--every 10] [--tape-every 5] [--no-breakdown] [--name fused_overhead]``
(``--every 0`` leaves ``fused_k`` out, ``--tape-every 0`` the two tape programs).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_state, interleaved, save  # noqa: E402

import fused_dynamics as fd  # noqa: E402
from fused_dynamics import loop, recording  # noqa: E402


def make_batch(n_systems: int, seed: int = 0) -> fd.Batch:
    rng = np.random.default_rng(seed)
    systems = []
    for _ in range(n_systems):
        a = bulk("Ar", "fcc", a=5.26, cubic=True) * (3, 3, 3)
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        systems.append(a)
    return fd.Batch.from_atoms(systems)


def make_fused(model, **options) -> fd.FusedStage:
    relax = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(0.05))
    md = fd.NVTLangevin(model, dt=2.0, temperature=40.0, friction=0.01, seed=0)
    return fd.FusedStage([(0, relax), (1, md)], **options)


def with_idle_hooks(fused: fd.FusedStage) -> fd.FusedStage:
    class Idle(fd.Hook):
        def on_host(self, data):  # never due within the run
            raise AssertionError("idle hook fired")

    for stage in (
        fd.DynamicsStage.BEFORE_STEP,
        fd.DynamicsStage.AFTER_COMPUTE,
        fd.DynamicsStage.AFTER_STEP,
        fd.DynamicsStage.ON_CONVERGE,
    ):
        fused = fused.register_fused_hook(Idle(stage=stage, every_n_steps=10**6))
    return fused


class Tape(fd.Hook):
    """Keeps what a trajectory logger keeps (host work: one list append per call)."""

    rows: list = eqx.field(static=True, default_factory=list)
    fields: tuple[str, ...] = eqx.field(
        static=True, default=("energy", "fmax", "temperature", "positions"), kw_only=True
    )

    def on_host(self, data):
        self.rows.append((data.step, data.arrays))


def recorded_loop(fused: fd.FusedStage, n_steps: int):
    """``n_steps`` fused steps in one compiled chunk that records host hooks, then the
    delivery of the records to ``on_host`` (what a run in chunks does after each chunk):
    nothing to admit, and the output stress only for systems that leave (as in ``run()``)."""
    last = jnp.asarray(False)
    chunk = jax.jit(lambda b: loop.chunk(fused, b, n_steps, last, None, n_steps))

    def run(batch):
        out, _, _, records = chunk(batch)
        recording.deliver(fused, jax.device_get(records))
        return out.positions

    return run


def step_loop(fused: fd.FusedStage, n_steps: int):
    """A compiled ``while_loop`` of ``n_steps`` fused steps; returns the final positions."""

    @jax.jit
    def run(batch):
        def body(_, b):
            return fused.step(b)[0]

        return jax.lax.fori_loop(0, n_steps, body, batch).positions

    return run


def summary(xs, scale=1.0) -> dict:
    return {
        "median": scale * statistics.median(xs),
        "min": scale * min(xs),
        "max": scale * max(xs),
    }


def main(n_systems=64, n_steps=200, rounds=7, every=10, tape_every=5, breakdown=True) -> dict:
    load_start = [round(x, 2) for x in os.getloadavg()]
    git = git_state()  # what is imported now (others may edit the tree while this runs)
    batch = make_batch(n_systems)
    model = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)
    model = model.with_images(batch)
    fused = make_fused(model)
    hooked = with_idle_hooks(fused)

    def bare_loop(energy: bool):
        """The bare loop; ``energy=False``: nothing reads the energy (XLA drops its sum)."""

        @jax.jit
        def run(batch):
            def body(i, carry):
                b, acc = carry
                out = model(b, stress=fused.needs_stress)
                b = b.replace(positions=b.positions + 1e-9 * out.forces)
                return b, (acc + jnp.sum(out.energy)) if energy else acc

            init = (batch, jnp.zeros((), batch.dtype))
            b, acc = jax.lax.fori_loop(0, n_steps, body, init)
            return acc if energy else b.positions

        return run

    prepared = fused.init(batch)
    # idle hooks with every_n_steps=10**6 are due at step 0: start at step 1 (all programs)
    prepared = prepared.replace(step_count=prepared.step_count + 1)
    programs = {
        "bare": (bare_loop(True), batch),
        "bare_forces": (bare_loop(False), batch),
        "fused": (step_loop(fused, n_steps), prepared),
        "fused_hooks": (step_loop(hooked, n_steps), prepared),
        "fused_run": (jax.jit(lambda b: fused.run(b, n_steps=n_steps).positions), batch),
    }
    if breakdown:
        md = fused.sub_stages[1][1]
        never = fd.ConvergenceHook.from_fmax(0.0)  # FIRE on every system at every step
        for name, stage in (
            ("only_fire", fd.FIRE(model, convergence_hook=never)),
            ("only_langevin", md),
            ("only_nve", fd.NVE(model, dt=2.0)),
        ):
            one = fd.FusedStage([(0, stage)])
            programs[name] = (step_loop(one, n_steps), one.init(batch))
    if tape_every:
        taped = fused.register_fused_hook(Tape(every_n_steps=tape_every))
        programs["fused_tape_callback"] = (step_loop(taped, n_steps), prepared)
        programs["fused_tape_recorded"] = (recorded_loop(taped, n_steps), prepared)
    if every:  # 0: leave the program out (a version without the option)
        programs["fused_k"] = (
            step_loop(make_fused(model, convergence_every=every), n_steps),
            prepared,
        )
    runs = {name: functools.partial(fn, arg) for name, (fn, arg) in programs.items()}
    compile_s, _, times = interleaved(runs, rounds)
    end = fused.run(batch, n_steps=n_steps)
    per_step = {name: summary(ts, 1e3 / n_steps) for name, ts in times.items()}

    def per_round(a: str, b: str) -> dict:
        """Summary of the per-round ratios of program ``a``'s time over ``b``'s."""
        return summary([x / y for x, y in zip(times[a], times[b], strict=True)])

    ratios = {name: per_round(name, "bare") for name in programs if name != "bare"}
    # best of the rounds over best of the rounds: on a shared machine the fastest call is the
    # one least disturbed by other processes
    best = {name: min(times[name]) / min(times["bare"]) for name in programs if name != "bare"}
    hook_cost = [h / f - 1.0 for h, f in zip(times["fused_hooks"], times["fused"], strict=True)]
    tape = {}
    if tape_every:  # per round: the recorded tape over the called-back one, and over no tape
        tape = {
            "recorded_over_callback": per_round("fused_tape_recorded", "fused_tape_callback"),
            "recorded_over_fused": per_round("fused_tape_recorded", "fused"),
            "callback_over_fused": per_round("fused_tape_callback", "fused"),
        }
    return {
        "workload": f"{n_systems} LJ fcc argon systems x 108 atoms, float64, {n_steps} steps",
        "command": " ".join(["benchmarks/bench_fused_overhead.py", *sys.argv[1:]]),
        "timing": f"{rounds} interleaved rounds (order rotated each round), one process",
        "atoms": int(batch.max_atoms),
        "systems_in_md_at_end": int(np.sum(np.asarray(end.status) == 1)),
        "convergence_every": every,
        "tape_every": tape_every,
        "step_ms": per_step,
        "over_bare": ratios,
        "over_bare_forces": {"fused_run": per_round("fused_run", "bare_forces")},
        "best_over_best_bare": best,
        "idle_hook_overhead": summary(hook_cost),
        "tape": tape,
        "compile_s": compile_s,
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "targets": {"fused_over_bare": "<= 1.10", "idle_hook_overhead": "< 0.02"},
        "git": git,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--tape-every", type=int, default=5)
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--name", default="fused_overhead")
    args = p.parse_args()
    res = main(args.systems, args.steps, args.rounds, args.every, args.tape_every, args.breakdown)
    path = save(args.name, res)
    for k, v in res.items():
        print(f"{k}: {v}")
    print(f"wrote {path}")
