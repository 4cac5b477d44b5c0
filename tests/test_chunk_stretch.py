"""A run driven to its end goes on past a chunk of ``refill_frequency`` steps while no system
graduates (docs/semantics.md §14): a host visit then has nothing to write or refill, so
skipping it changes no number, only how many compiled calls the run makes.

Every comparison here is exact: the stretched and the unstretched runs call the same compiled
chunk program (``fd.live.STRETCH = 1`` stops every chunk where it was asked to), take the same
steps and refill the same slots at the same steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_inflight import LJ, dataset, stages  # tests/ is on pytest's path

import fused_dynamics as fd
from fused_dynamics import live

STRETCH = live.STRETCH  # the default (the tests set the module's value)


def _by_id(frames):
    return sorted(frames, key=lambda a: a.info["system_id"])


def _same_frames(a, b):
    assert [x.info["system_id"] for x in a] == [y.info["system_id"] for y in b]
    for x, y in zip(a, b, strict=True):
        sid = x.info["system_id"]
        assert np.array_equal(x.positions, y.positions), sid
        assert np.array_equal(x.get_velocities(), y.get_velocities()), sid
        assert x.get_potential_energy() == y.get_potential_energy(), sid
        assert np.array_equal(x.get_forces(), y.get_forces()), sid
        assert set(x.calc.results) == set(y.calc.results), sid
        if "stress" in x.calc.results:  # periodic systems only
            assert np.array_equal(x.calc.results["stress"], y.calc.results["stress"]), sid
        for key in ("stage_steps", "exit_reason"):
            assert np.array_equal(np.asarray(x.info[key]), np.asarray(y.info[key])), (sid, key)


def _inflight(monkeypatch, stretch: int):
    monkeypatch.setattr(live, "STRETCH", stretch)
    data = dataset(12, seed=5)
    sink = fd.HostMemory()
    stats = stages(n_md=40).run(
        sampler=fd.SizeAwareSampler(data, max_atoms=128, max_systems=4, max_atoms_per_system=64),
        refill_frequency=5,
        sinks=[sink],
    )
    return stats, _by_id(sink.atoms)


def test_a_stretched_inflight_run_is_the_same_run_in_fewer_calls(monkeypatch):
    """FIRE then 40 Langevin steps, refills every 5 steps: the long NVT phases hold no
    graduation for many chunks. Every written system is bitwise the same with and without
    stretching, with the same steps and slot-steps; the stretched run makes fewer calls."""
    plain, frames = _inflight(monkeypatch, 1)
    stretched, frames_s = _inflight(monkeypatch, STRETCH)
    assert len(frames) == 12
    _same_frames(frames, frames_s)
    assert stretched.steps == plain.steps
    assert stretched.slot_steps_active == plain.slot_steps_active
    assert stretched.slot_steps_total == plain.slot_steps_total
    assert stretched.chunks < plain.chunks


@pytest.mark.parametrize("checkpoint_every", [None, 20])
def test_a_stretched_chunk_stops_at_the_budget_and_at_checkpoints(
    monkeypatch, tmp_path, checkpoint_every
):
    """NVE never graduates: with a budget of 37 steps in chunks of 10, the stretched run takes
    all 37 in one chunk (or stops at each checkpoint, every 20 steps), and the systems still
    running when the budget ends get their output stress there, as in the run that visits
    the host every 10 steps."""
    batch = fd.Batch.from_atoms(dataset(3, seed=2), max_atoms=96, max_systems=3)
    fused = fd.FusedStage([(0, fd.NVE(LJ, dt=2.0))])
    runs = {}
    for stretch in (1, STRETCH):
        monkeypatch.setattr(live, "STRETCH", stretch)
        options = {}
        if checkpoint_every is not None:
            options = dict(checkpoint=tmp_path / f"ck{stretch}.zip", checkpoint_every=20)
        sink = fd.HostMemory()
        with fused.start(batch, n_steps=37, sinks=[sink], refill_frequency=10, **options) as run:
            run.run_to_end()
        runs[stretch] = (run.stats, run.batch)
    (plain, end), (stretched, end_s) = runs[1], runs[STRETCH]
    assert plain.steps == stretched.steps == 37
    assert plain.chunks == 4
    assert stretched.chunks == (1 if checkpoint_every is None else 2)
    assert np.all(np.isfinite(np.asarray(end_s.stress)))
    for name in ("positions", "velocities", "forces", "energy", "stress"):
        assert np.array_equal(np.asarray(getattr(end, name)), np.asarray(getattr(end_s, name)))


def test_a_run_with_a_host_hook_visits_the_host_every_chunk(tmp_path, monkeypatch):
    """A host hook's records are delivered after each chunk (docs/semantics.md §14): such a
    run is not stretched, so its host visits come at the same steps as with
    ``fd.live.STRETCH = 1`` (a stretched chunk would stop only when the hook's buffer of two
    rows is full)."""
    ends = []
    collect = live.Run.collect

    def counting(self, pending):
        taken = collect(self, pending)
        ends.append(self.step_count)
        return taken

    monkeypatch.setattr(live.Run, "collect", counting)
    batch = fd.Batch.from_atoms(dataset(3, seed=2), max_atoms=96, max_systems=3)
    seen = {}
    for stretch in (1, STRETCH):
        monkeypatch.setattr(live, "STRETCH", stretch)
        log = tmp_path / f"log{stretch}.csv"
        hook = fd.LoggingHook(str(log), every_n_steps=7)
        fused = fd.FusedStage([(0, fd.NVE(LJ, dt=2.0))], hooks=[hook])
        ends.clear()
        with fused.start(batch, n_steps=37, sinks=[fd.HostMemory()], refill_frequency=10) as run:
            run.run_to_end()
        seen[stretch] = list(ends), log.read_text()
    assert seen[1] == seen[STRETCH]
    assert seen[1][0][-1] == 37 and len(seen[1][0]) >= 4


def _same_batch(a, b):
    for name in ("positions", "velocities", "forces", "energy", "stress", "status", "step_count"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert np.array_equal(x, y, equal_nan=True), name
    for key in a.info:
        x, y = np.asarray(a.info[key]), np.asarray(b.info[key])
        assert np.array_equal(x, y, equal_nan=True), key


def test_a_non_finite_energy_fails_at_the_same_boundary(monkeypatch):
    """Steps that evaluate forces only check the energy at a chunk's end (docs/semantics.md
    §6): a stretched chunk checks it at every boundary it goes on past, so a system whose
    energy turns NaN while its forces stay finite fails at the same step, with the same
    record, as in a run visiting the host every 5 steps (it failed at step 15 there; the
    unchecked stretch let it run to step 30)."""
    from test_energy_at_exit import _spring_systems, _springs_late

    model = fd.models.EnergyFunctionModel(_springs_late)
    criterion = fd.ConvergenceHook.from_fmax(1e-3)
    fused = fd.FusedStage([fd.FIRE(model, convergence_hook=criterion)])
    runs = {}
    for stretch in (1, STRETCH):
        monkeypatch.setattr(live, "STRETCH", stretch)
        batch = fd.Batch.from_atoms(_spring_systems(True))
        with fused.start(batch, refill_frequency=5, sinks=[fd.HostMemory()]) as run:
            run.run_to_end()
        runs[stretch] = run
    plain, stretched = runs[1], runs[STRETCH]
    failed = np.asarray(plain.batch.info["exit_reason"]) == int(fd.ExitReason.FAILED)
    assert failed.sum() == 1
    assert stretched.stats.chunks < plain.stats.chunks
    _same_batch(plain.batch, stretched.batch)


def test_a_neighbor_list_overflow_grows_the_list_at_the_same_chunk(monkeypatch):
    """Two argon clusters fly into each other, so their neighbor list, sized at the start,
    overflows mid-run. A grown list is stale, so the step from which a chunk is redone decides
    where the list is rebuilt: a stretched chunk that overflows is redone unstretched, and the
    run grows its list at the same chunks and ends bitwise the same as a run visiting the host
    every 5 steps."""
    import warnings

    from ase.cluster import Icosahedron

    from fused_dynamics import compiled

    model = LJ.with_neighbors(skin=0.5)
    a, b, lone = (Icosahedron("Ar", 2).copy() for _ in range(3))
    for seed, atoms in enumerate((a, b, lone)):
        atoms.rattle(0.05, seed=seed + 1)
    b.positions += (22.0, 0.0, 0.0)
    pair = a + b
    pair.set_velocities(np.repeat([[0.5, 0, 0], [-0.5, 0, 0]], 13, axis=0))
    grown_at = []
    grow = compiled.grow_neighbors

    def counting(batch, out=None):
        grown_at.append(int(np.asarray(batch.step_count)))
        return grow(batch, out)

    monkeypatch.setattr(compiled, "grow_neighbors", counting)
    fused = fd.FusedStage([fd.NVE(model, dt=4.0)])
    runs = {}
    for stretch in (1, STRETCH):
        monkeypatch.setattr(live, "STRETCH", stretch)
        grown_at.clear()
        batch = model.attach_neighbors(fd.Batch.from_atoms([pair, lone], max_atoms=64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the growth's warning
            with fused.start(batch, n_steps=60, refill_frequency=5, sinks=[fd.HostMemory()]) as run:
                run.run_to_end()
        runs[stretch] = run, list(grown_at)
    (plain, grown), (stretched, grown_s) = runs[1], runs[STRETCH]
    assert grown and grown == grown_s
    assert int(plain.batch.neighbors.rebuilds) == int(stretched.batch.neighbors.rebuilds)
    assert stretched.stats.chunks < plain.stats.chunks
    _same_batch(plain.batch, stretched.batch)
