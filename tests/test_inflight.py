"""Inflight batching: samplers, in-place refill without recompilation, sinks.

docs/semantics.md §14, §15.
"""

from __future__ import annotations

import warnings

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics.stages.fire import FIRE
from fused_dynamics.stages.langevin import NVTLangevin

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)


def dataset(n: int, seed: int = 0, max_atoms: int = 64) -> list[ase.Atoms]:
    """Perturbed argon clusters (13 or 55 atoms, fragments) and small periodic crystals."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = rng.integers(3)
        if kind == 0:
            a = Icosahedron("Ar", 2).copy()
            keep = rng.integers(8, 14)
            a = a[:keep]
            a.cell = np.zeros((3, 3))
        elif kind == 1:
            a = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)  # 32 atoms, periodic
            a = a[: rng.integers(24, 33)]
        else:
            a = bulk("Ar", "fcc", a=5.3, cubic=True) * tuple(rng.integers(1, 3, size=3))
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        assert 1 <= len(a) <= max_atoms
        out.append(a)
    return out


def stages(n_md=30):
    relax = FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=300)
    md = NVTLangevin(LJ, dt=4.0, temperature=40.0, friction=0.02, seed=7, n_steps=n_md)
    return relax + md


def alone(fused, atoms, index):
    """One system run alone, with its dataset index as system_id (keys its Langevin noise)."""
    # one capacity for every reference run, so they share one compilation; padding does not
    # change a system's numbers (tests/test_models.py)
    b = fd.Batch.from_atoms(
        [atoms], max_atoms=64, max_systems=1, max_atoms_per_system=64, system_ids=[index]
    )
    out = fused.run(b)
    a = out.to_atoms()[0]
    a.info["stage_steps"] = np.asarray(out.info["stage_steps"][0]).tolist()
    return a


# 300 systems through 12 slots: each slot is refilled ~25 times (60 systems: ~5), with systems
# of 8-64 atoms taking the atoms other sizes freed, so slot reuse, shifting atom offsets and the
# sampler's size-aware choice from a large pending pool are all exercised; 1000 systems (~80
# refills a slot) proved nothing more for 3x the time.
@pytest.mark.parametrize("n_systems", [60, pytest.param(300, marks=pytest.mark.slow)])
def test_every_system_once_and_equal_to_running_alone(n_systems):
    data = dataset(n_systems, seed=1)
    fused = stages()
    sampler = fd.SizeAwareSampler(data, max_atoms=256, max_systems=12, max_atoms_per_system=64)
    sink = fd.HostMemory()
    stats = fused.run(sampler=sampler, refill_frequency=10, sinks=[sink])
    assert isinstance(stats, fd.RunStats)
    ids = [a.info["system_id"] for a in sink.atoms]
    assert sorted(ids) == list(range(n_systems)), "each dataset index exactly once"
    # one compilation of the chunk for the whole run (none if this process already compiled
    # the same shapes, as when the 60-system case ran first)
    assert stats.compilations <= 1, "at most one compilation of the chunk for the whole run"
    print(f"utilization {stats.utilization:.3f} over {stats.steps} steps")
    rng = np.random.default_rng(3)
    for index in rng.choice(n_systems, size=min(20, n_systems), replace=False):
        got = sink.atoms[ids.index(index)]
        ref = alone(fused, data[index], int(index))
        # float64; a system sees the same operations on the same numbers in any slot or
        # atom offset, and Langevin noise is keyed by (system_id, its own step): 1e-10 Å
        np.testing.assert_allclose(got.positions, ref.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got.get_velocities(), ref.get_velocities(), atol=1e-10)
        assert got.info["stage_steps"] == ref.info["stage_steps"]


@pytest.mark.slow
def test_utilization_high_with_long_md_budget():
    """Slot utilisation: with budgets much longer than the refill period, slots stay busy."""
    data = dataset(60, seed=2)
    sink = fd.HostMemory()
    stats = stages(n_md=200).run(
        sampler=fd.SizeAwareSampler(data, max_atoms=256, max_systems=8),
        refill_frequency=5,
        sinks=[sink],
    )
    assert len(sink) == 60
    # the tail (the last systems finishing while no new ones come) is the only idle time
    assert stats.utilization >= 0.9, stats


def test_larger_system_takes_atoms_freed_by_smaller_ones():
    small = [a for a in dataset(40, seed=4) if len(a) <= 16][:6]
    big = bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 2, 2)
    data = small + [big]
    capacity = sum(len(a) for a in small[:4])
    assert len(big) <= capacity < len(big) + sum(len(a) for a in small[:4])
    sink = fd.HostMemory()
    fd.NVE(LJ, dt=2.0, n_steps=5).run(
        sampler=fd.SizeAwareSampler(data, max_atoms=capacity, max_systems=4),
        refill_frequency=5,
        sinks=[sink],
    )
    assert sorted(a.info["system_id"] for a in sink.atoms) == list(range(len(data)))


def test_system_too_big_is_rejected_and_written(caplog):
    data = dataset(5, seed=5)
    huge = bulk("Ar", "fcc", a=5.3, cubic=True) * (4, 4, 4)  # 256 atoms
    data.insert(2, huge)
    for i, a in enumerate(data):
        a.info["name"] = f"input {i}"
    sink = fd.HostMemory()
    with caplog.at_level("WARNING", logger="fused_dynamics"):
        sampler = fd.SizeAwareSampler(data, max_atoms=100, max_systems=4)
    assert "system 2 has 256 atoms" in caplog.text
    fd.NVE(LJ, dt=2.0, n_steps=3).run(sampler=sampler, refill_frequency=5, sinks=[sink])
    by_id = {a.info["system_id"]: a for a in sink.atoms}
    assert sorted(by_id) == list(range(6))
    assert by_id[2].info["exit_reason"] == fd.ExitReason.REJECTED
    assert all(by_id[i].info["exit_reason"] == fd.ExitReason.BUDGET for i in (0, 1, 3, 4, 5))
    # names with the codes, and the input's info and index on every record, rejected or not
    assert [by_id[i].info["exit_reason_name"] for i in range(6)] == ["budget"] * 2 + [
        "rejected"
    ] + ["budget"] * 3
    assert all(by_id[i].info["name"] == f"input {i}" for i in range(6))
    assert all(by_id[i].info["source_index"] == i for i in range(6))
    assert len(by_id[2]) == 256 and "has 256 atoms" in by_id[2].info["rejected"]


def test_bad_dataset_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        fd.SizeAwareSampler(tmp_path / "missing.xyz", max_atoms=10, max_systems=2)
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\nan xyz file\n")
    with pytest.raises(ValueError, match="cannot read"):
        fd.SizeAwareSampler(garbage, max_atoms=10, max_systems=2)
    with pytest.raises(ValueError, match="empty"):
        fd.SizeAwareSampler([], max_atoms=10, max_systems=2)
    with pytest.raises(ValueError, match="cannot write"):
        fd.ExtXYZSink(tmp_path / "no" / "such" / "dir" / "out.xyz")
    with pytest.raises(ValueError, match="cannot write"):
        fd.ZarrSink(tmp_path / "no" / "such" / "out.zarr")


def test_dataset_from_file_and_both_file_sinks(tmp_path):
    data = dataset(9, seed=6)
    path = tmp_path / "in.extxyz"
    ase.io.write(path, data)
    xyz, zarr_path = tmp_path / "out.xyz", tmp_path / "out.zarr"
    sinks = [fd.ExtXYZSink(xyz, capacity=4), fd.ZarrSink(zarr_path)]
    stages(n_md=5).run(
        sampler=fd.SizeAwareSampler(path, max_atoms=128, max_systems=3),
        refill_frequency=4,
        sinks=sinks,
    )
    first = ase.io.read(xyz, index=":")
    rest = fd.read_zarr(zarr_path)
    assert len(first) == 4 and len(rest) == 5  # the first sink with room takes each system
    ids = sorted(a.info["system_id"] for a in first + rest)
    assert ids == list(range(9))
    for a in first + rest:
        assert np.isfinite(a.get_potential_energy())
        assert len(a.info["stage_steps"]) == 2 and a.info["status"] == 2


def test_all_sinks_full_raises_without_losing_written():
    sink = fd.HostMemory(capacity=3)
    with pytest.raises(RuntimeError, match="Every sink is full"):
        fd.NVE(LJ, dt=2.0, n_steps=2).run(
            sampler=fd.SizeAwareSampler(dataset(6, seed=7), max_atoms=256, max_systems=6),
            refill_frequency=5,
            sinks=[sink],
        )
    assert len(sink) == 3


def test_fixed_batch_streams_graduates_to_sinks():
    data = dataset(4, seed=8)
    relax = FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.02))
    fused = fd.FusedStage([(0, relax)])
    sink = fd.HostMemory()
    order = []

    class Order:
        def has_room(self, n=1):
            return True

        def write(self, frames):
            order.extend(a.info["system_id"] for a in frames)

        def close(self):
            pass

    final = fused.run(fd.Batch.from_atoms(data), refill_frequency=3, sinks=[Order(), sink])
    assert sorted(order) == [0, 1, 2, 3] and len(sink) == 0
    steps = np.asarray(final.info["stage_steps"][:, 0])
    # written in the order they graduated: the chunk of 3 steps in which each graduated
    chunk = (steps[order] - 1) // 3
    assert np.all(np.diff(chunk) >= 0), (order, steps)


def test_no_recompilation_across_runs_of_same_capacity():
    fused = stages(n_md=3)
    from fused_dynamics import driver

    fused.run(
        sampler=fd.SizeAwareSampler(
            dataset(8, seed=9), max_atoms=128, max_systems=4, max_atoms_per_system=64
        ),
        refill_frequency=4,
        sinks=[fd.HostMemory()],
    )
    before = driver.compiled_chunk(fused).cache_size()
    stats = fused.run(
        sampler=fd.SizeAwareSampler(
            dataset(12, seed=10), max_atoms=128, max_systems=4, max_atoms_per_system=64
        ),
        refill_frequency=4,
        sinks=[fd.HostMemory()],
    )
    assert driver.compiled_chunk(fused).cache_size() == before and stats.compilations == 0


def test_refills_are_admitted_by_the_next_chunk(monkeypatch):
    """docs/semantics.md §14: a run driven to its end refills slots on the host and the next
    compiled chunk admits the new systems; the first batch is admitted by a call of the same
    chunk program that takes no step. So the standalone admission program never runs (nor
    compiles); every system still reaches the sink once."""
    from fused_dynamics import inflight

    calls = []
    admit = inflight.admit

    def counting(fused, batch, new):
        calls.append(int(np.sum(np.asarray(new))))
        return admit(fused, batch, new)

    monkeypatch.setattr(inflight, "admit", counting)
    data = dataset(14, seed=3)
    sink = fd.HostMemory()
    stats = stages(n_md=3).run(
        sampler=fd.SizeAwareSampler(data, max_atoms=128, max_systems=4, max_atoms_per_system=64),
        refill_frequency=4,
        sinks=[sink],
    )
    assert sorted(a.info["system_id"] for a in sink.atoms) == list(range(len(data)))
    assert stats.written == len(data) and stats.chunks > 3
    assert calls == []


def _sparse_then_dense() -> list[ase.Atoms]:
    """8 small clusters, then 4 compressed crystals: more pairs per atom and more atoms per
    bin than anything in the first batch (fcc at a = 4.9 A instead of a relaxed ~5.3 A)."""
    out = []
    for k in range(8):
        a = Icosahedron("Ar", 2)[: 8 + k % 5]
        a.positions += np.random.default_rng(k).normal(scale=0.08, size=a.positions.shape)
        out.append(a)
    for k in range(4):
        a = bulk("Ar", "fcc", a=4.9, cubic=True) * (1, 1, 4)
        a.rattle(0.05, seed=k)
        out.append(a)
    return out


@pytest.mark.slow
def test_an_inflight_neighbor_list_is_sized_for_the_whole_dataset_before_compiling():
    """docs/semantics.md §14: the first list of an inflight run covers the needs of the
    dataset packed as the refills bring it (SizeAwareSampler.preview_batches), so a denser
    structure arriving later does not overflow it (before: a grown list and a recompiled run)."""
    listed = LJ.with_neighbors(skin=0.5)
    atoms = _sparse_then_dense()

    def sampler():
        return fd.SizeAwareSampler(atoms, max_atoms=48, max_systems=4, max_atoms_per_system=16)

    first = sampler().initial_batch()

    def overflows(nl, systems) -> bool:  # a list of nl's capacities, built on these systems
        b = fd.Batch.from_atoms(systems, max_atoms=48, max_systems=4, max_atoms_per_system=16)
        sizes = {"stencil": nl.stencil, "bin_capacity": nl.bin_capacity}
        return bool(listed.neighbor_list(b, nl.capacity, **sizes).overflow)

    dense = atoms[8:11]  # three crystals: a window of the queue as the refills bring it
    # a mix no window holds: a cluster that outlived its neighbours beside two late crystals
    straddle = [atoms[4], atoms[9], atoms[11]]
    blind = listed.neighbor_list(first)
    assert overflows(blind, dense) and overflows(blind, straddle)  # sized on the first batch
    rest = list(sampler().preview_batches())
    assert [int(np.sum(b.system_mask)) for b in rest] == [4, 4, 3, 1]  # 12, in order
    sized = listed.neighbor_list(first, more_batches=rest)
    assert not overflows(sized, dense) and not overflows(sized, straddle)
    # a whole run: no overflow warning (an overflow would grow the list and recompile)
    sink = fd.HostMemory()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fd.NVE(listed, dt=4.0, n_steps=4).run(sampler=sampler(), refill_frequency=4, sinks=[sink])
    assert sorted(a.info["system_id"] for a in sink.atoms) == list(range(12))
