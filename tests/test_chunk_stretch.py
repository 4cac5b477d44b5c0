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
