"""Outputs in input order (``order="input"``, fused_dynamics.outputs.order; docs/semantics.md
§15 for how systems leave an inflight run).

One small inflight FIRE run (float64, 7-atom Lennard-Jones argon clusters, two slots) whose
systems finish out of order: system 0 is rattled hard and relaxes for a dozen steps while the
others converge at once; one system fails (two atoms 0.5 Å apart: a force past the run's bound)
and one is rejected (a NaN position). The same compiled program is run three times (the whole
run, then a run interrupted by a sink and its continuation). The rest touches no compiled code.
"""

from __future__ import annotations

import os

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics.inspection import summarize_output
from fused_dynamics.outputs.order import pending_path
from fused_dynamics.run_outputs import OutputPlan, TeeSink, _plan_one
from fused_dynamics.sinks import read_zarr

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)


def cluster(seed: int, amp: float = 0.05) -> ase.Atoms:
    a = Icosahedron("Ar", 2)[:7]
    a.center(vacuum=5.0)
    a.rattle(amp, seed=seed)
    return a


def structures() -> list[ase.Atoms]:
    """Eight inputs; ids 0..7 in this order. 3 fails, 5 is rejected, 0 finishes late."""
    frames = [cluster(0, 0.3), cluster(1, 0.02), cluster(2, 0.02), cluster(3), cluster(4)]
    frames += [cluster(5, 0.02), cluster(6), cluster(7)]
    frames[3].positions[1] = frames[3].positions[0] + [0.5, 0.0, 0.0]
    frames[5].positions[2, 0] = np.nan
    return frames


FUSED = fd.FusedStage(
    [fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=40)]
)


def sampler(frames=None) -> fd.SizeAwareSampler:
    return fd.SizeAwareSampler(
        frames or structures(), max_atoms=14, max_systems=2, max_atoms_per_system=7
    )


def run(sinks, s=None):
    s = s or sampler()
    FUSED.run(sampler=s, refill_frequency=2, sinks=sinks, dtype=np.float64)
    return s


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The whole run, written in completion order (memory) and in input order (both files)."""
    d = tmp_path_factory.mktemp("order")
    s = sampler()
    ids = s.ids
    memory = fd.HostMemory()
    xyz = fd.ExtXYZSink(d / "input.extxyz", order="input", input_ids=ids)
    store = fd.ZarrSink(d / "input.zarr", order="input", input_ids=ids)
    run([TeeSink([memory, xyz, store])], s)
    return d, memory, ids


def _ids(frames):
    return [int(a.info["system_id"]) for a in frames]


def test_input_order_of_a_run_whose_systems_finish_out_of_order(finished_run):
    d, memory, ids = finished_run
    completion = _ids(memory.atoms)
    assert sorted(completion) == list(range(8)) and completion != sorted(completion)
    assert completion.index(0) > completion.index(1)  # the point of the test: 0 finished late
    by_id = {int(a.info["system_id"]): a for a in memory.atoms}
    assert by_id[3].info["exit_reason_name"] == "failed"
    assert by_id[5].info["exit_reason_name"] == "rejected"
    xyz = ase.io.read(d / "input.extxyz", index=":")
    store = read_zarr(d / "input.zarr")
    assert _ids(xyz) == _ids(store) == ids.tolist() == list(range(8))
    # nothing waits any more: the side files are gone once their systems are written
    assert not os.path.lexists(pending_path(d / "input.extxyz"))
    assert not os.path.lexists(pending_path(d / "input.zarr"))
    for a in store:  # the same systems: zarr holds float64 exactly
        ref = by_id[int(a.info["system_id"])]
        np.testing.assert_array_equal(a.positions, ref.positions)
        assert a.info["exit_reason_name"] == ref.info["exit_reason_name"]
    for a in xyz:  # extxyz prints positions with 8 decimals (ASE's format)
        ref = by_id[int(a.info["system_id"])]
        np.testing.assert_allclose(a.positions, ref.positions, rtol=0, atol=5e-9)


class _StopAfter:
    """A sink that passes systems on to ``sink`` and interrupts the run after ``n`` writes."""

    def __init__(self, sink, n):
        self.sink, self.n, self.seen = sink, n, []

    def has_room(self, n=1):
        return True

    def write(self, frames):
        self.sink.write(frames)
        self.seen += _ids(frames)
        if len(self.seen) >= self.n:
            raise KeyboardInterrupt

    def close(self):
        self.sink.close()


def test_an_interrupted_run_loses_nothing_and_continues_in_input_order(tmp_path, finished_run):
    path = tmp_path / "run.extxyz"
    s = sampler()
    stop = _StopAfter(fd.ExtXYZSink(path, order="input", input_ids=s.ids), n=3)
    with pytest.raises(KeyboardInterrupt):
        run([stop], s)
    written = _ids(ase.io.read(path, index=":")) if path.exists() else []
    waiting = _ids(ase.io.read(pending_path(path), index=":", format="extxyz"))
    # every system the run finished is on disk: the in-order prefix, or waiting beside it
    assert sorted(written + waiting) == sorted(stop.seen) and len(stop.seen) >= 3
    assert written == list(range(len(written))) and waiting and min(waiting) > len(written)
    # a resumed sink counts the waiting systems as held; the run skips them and finishes
    again = fd.ExtXYZSink(path, mode="a", order="input", input_ids=s.ids)
    assert sorted(again.system_ids()) == sorted(stop.seen)
    rest = sampler()
    rest.skip(again.system_ids())
    run([again], rest)
    final = ase.io.read(path, index=":")
    assert _ids(final) == list(range(8)) and not os.path.lexists(pending_path(path))
    ref = {int(a.info["system_id"]): a for a in finished_run[1].atoms}
    for a in final:  # a system that waited on disk is the one the run computed
        np.testing.assert_allclose(
            a.positions, ref[int(a.info["system_id"])].positions, rtol=0, atol=5e-9
        )


# ============================================================================ no compiled code
def frame(sid: int) -> ase.Atoms:
    a = ase.Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.0 + 0.1 * sid]], cell=[10, 10, 10])
    a.set_velocities(np.full((2, 3), 0.01 * sid))
    a.calc = SinglePointCalculator(a, energy=-0.1 * sid, forces=np.full((2, 3), 0.01))
    a.info.update(system_id=sid, status=1, exit_reason=1, stage_steps=[sid])
    return a


def _read(kind, path):
    return read_zarr(path) if kind == "zarr" else ase.io.read(path, index=":")


@pytest.mark.parametrize("kind", ["extxyz", "zarr"])
def test_waiting_systems_are_on_disk_and_read_back_by_a_continuing_sink(tmp_path, kind):
    cls = fd.ZarrSink if kind == "zarr" else fd.ExtXYZSink
    path = tmp_path / f"o.{kind}"
    ids = [0, 1, 2, 3, 4]
    sink = cls(path, order="input", input_ids=ids)
    sink.write([frame(2)])
    assert not path.exists() or _ids(_read(kind, path)) == []  # 0 and 1 not there yet
    sink.write([frame(0), frame(4)])
    assert _ids(_read(kind, path)) == [0]
    assert _ids(_read(kind, pending_path(path))) == [2, 4]
    assert sorted(sink.system_ids()) == [0, 2, 4] and len(sink) == 3
    assert summarize_output(path)["waiting"]["systems"] == 2  # inspect says what waits
    del sink  # a killed run: nothing more is written
    with pytest.raises(FileExistsError, match="mode='a'"):  # never written over
        cls(path, order="input", input_ids=ids)
    again = cls(path, mode="a", order="input", input_ids=ids)
    assert sorted(again.system_ids()) == [0, 2, 4]
    again.write([frame(3), frame(1)])
    back = _read(kind, path)
    assert _ids(back) == ids and not os.path.lexists(pending_path(path))
    np.testing.assert_array_equal(back[4].get_velocities(), frame(4).get_velocities())
    assert back[2].info["exit_reason_name"] == "converged"


def test_a_system_that_never_comes_holds_the_rest_back_until_finish(tmp_path):
    path = tmp_path / "o.extxyz"
    sink = fd.ExtXYZSink(path, order="input", input_ids=[0, 1, 2, 3])
    sink.write([frame(3), frame(0), frame(9)])  # 9 is no input: written as it comes
    sink.write([frame(2)])
    assert _ids(ase.io.read(path, index=":")) == [9, 0]
    sink.close()  # closing keeps the waiting systems on disk (a run that was interrupted)
    assert _ids(ase.io.read(pending_path(path), index=":", format="extxyz")) == [3, 2]
    sink.finish()  # the run is over: the rest in input order, without 1
    assert _ids(ase.io.read(path, index=":")) == [9, 0, 2, 3]
    assert not os.path.lexists(pending_path(path))


def test_order_is_checked_and_memory_keeps_input_order():
    with pytest.raises(ValueError, match=r"order='input' needs input_ids.*sampler.ids"):
        fd.ExtXYZSink("never.extxyz", order="input")
    with pytest.raises(ValueError, match=r"order must be one of \('completion', 'input'\)"):
        fd.HostMemory(order="sorted")
    with pytest.raises(ValueError, match="input_ids repeat an id"):
        fd.ExtXYZSink("never.extxyz", order="input", input_ids=[0, 1, 0])
    memory = fd.HostMemory(order="input", input_ids=[4, 2, 0])
    memory.write([frame(0), frame(7)])
    memory.write([frame(2), frame(4)])
    assert _ids(memory.atoms) == [4, 2, 0, 7]


def test_plan_counts_waiting_systems_as_held(tmp_path):
    path = tmp_path / "o.extxyz"
    fd.ExtXYZSink(path, order="input", input_ids=[0, 1, 2]).write([frame(2)])
    assert not path.exists()  # only the side file: the output is still there for the plan
    plan = OutputPlan("outputs[0].path", path, "extxyz", order="input")
    with pytest.raises(Exception, match=r"exists.*--resume"):
        _plan_one(plan, overwrite=False, resume=False)
    _plan_one(plan, overwrite=False, resume=True)
    assert plan.action == "resume" and plan.written == {2}
    sink = fd.ExtXYZSink(path, mode="a", order="input", input_ids=[0, 1, 2])
    sink.write([frame(1), frame(0)])
    assert _ids(ase.io.read(path, index=":")) == [0, 1, 2]


def test_open_sink_of_an_output_in_input_order_needs_the_input_ids(tmp_path):
    from fused_dynamics.config import ConfigError, validate_config
    from fused_dynamics.run_outputs import open_sink

    ase.io.write(tmp_path / "in.extxyz", [cluster(0), cluster(1)])
    cfg = validate_config(
        {
            "structures": {"path": "in.extxyz"},
            "model": {"type": "lennard_jones", "sigma": 3.4, "epsilon": 0.01, "cutoff": 6.0},
            "stages": [{"type": "fire", "fmax": 0.05, "n_steps": 5}],
            "outputs": [{"type": "extxyz", "path": "o.extxyz"}],
            "capacity": {"max_atoms": 14, "max_systems": 2},
        },
        base_dir=tmp_path,
    )
    plan = OutputPlan("outputs[0].path", tmp_path / "o.extxyz", "extxyz", order="input")
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.path: .*input_ids=sampler.ids"):
        open_sink(plan, cfg, print)
    sink = open_sink(plan, cfg, print, input_ids=[0, 1])
    sink.write([frame(1)])
    sink.write([frame(0)])
    out = ase.io.read(tmp_path / "o.extxyz", index=":")
    assert _ids(out) == [0, 1] and "run_config" in out[0].info  # the run's record comes first
