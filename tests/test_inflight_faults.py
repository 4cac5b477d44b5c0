"""A high-throughput run with broken structures among good ones (README "What is guaranteed").

80 structures through an inflight FIRE + NVT Langevin run (12 slots, so each slot is refilled
several times), 4 of them broken in ways a real dataset has (a duplicated atom, atoms far too
close, a NaN coordinate). Each broken one is reported with its reason: FAILED (which quantity,
at which step) or REJECTED at the input; the other 76 are bit-for-bit the same as in a run of
the 76 alone, on the dense and on the neighbor-list path. Ids come from ``info["system_id"]``
(``id_key``), so the random streams of the good structures do not depend on which others are
in the file.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

import fused_dynamics as fd

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)


def _dataset():
    rng = np.random.default_rng(42)
    block = bulk("Ar", "fcc", a=5.26, cubic=True) * (3, 3, 3)
    order = np.argsort(np.linalg.norm(block.positions - block.positions.mean(0), axis=1))
    frames, broken = [], {}
    for i in range(80):
        if i % 10 == 9:
            a = bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 1, 1)  # 8 atoms, periodic
        else:
            a = block[order[: int(rng.integers(6, 20))]]
            a.center(vacuum=5.0)
        a.rattle(0.08, seed=i)
        a.info["system_id"] = 1000 + 7 * i  # ids that belong to the structure, not its index
        if i % 20 == 3:
            kind = ("duplicate", "contact", "nan")[(i // 20) % 3]
            p = a.positions.copy()
            if kind == "duplicate":
                p[1] = p[0]
            elif kind == "contact":
                p[1] = p[0] + [1.0, 0.0, 0.0]
            else:
                p[2, 1] = np.nan
            a.positions = p
            broken[a.info["system_id"]] = kind
        frames.append(a)
    return frames, broken


def _run(frames, neighbors: bool):
    model = LJ.with_neighbors(1.0) if neighbors else LJ
    relax = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=80)
    md = fd.NVTLangevin(model, dt=5.0, temperature=40.0, friction=0.02, seed=3, n_steps=20)
    fused = fd.FusedStage([(0, relax), (1, md)], max_force=1e3)
    sampler = fd.SizeAwareSampler(frames, max_atoms=160, max_systems=12, id_key="system_id")
    sink = fd.HostMemory()
    fused.run(sampler=sampler, refill_frequency=10, sinks=[sink])
    return {int(a.info["system_id"]): a for a in sink.atoms}


@pytest.mark.slow
@pytest.mark.parametrize("neighbors", [False, True], ids=["dense", "neighbors"])
def test_broken_structures_fail_alone(neighbors):
    frames, broken = _dataset()
    assert sorted(broken.values()) == ["contact", "duplicate", "duplicate", "nan"]
    good = [a for a in frames if a.info["system_id"] not in broken]
    everything = _run(frames, neighbors)
    alone = _run(good, neighbors)

    assert sorted(everything) == sorted(a.info["system_id"] for a in frames)  # each once
    for sid, kind in broken.items():
        a = everything[sid]
        if kind == "nan":  # refused before it runs, with the reason
            assert a.info["exit_reason_name"] == "rejected"
            continue
        assert a.info["exit_reason_name"] == "failed", (sid, kind, a.info)
        assert a.info["failure"], a.info
        assert a.info["failure_step"] == 0  # found by the evaluation that starts its run
        assert not np.isfinite(a.get_potential_energy()) or "max_force" in a.info["failure"]

    assert sorted(alone) == sorted(a.info["system_id"] for a in good)
    for sid, ref in alone.items():
        got = everything[sid]
        assert got.info["exit_reason"] == ref.info["exit_reason"]
        assert got.info["stage_steps"] == ref.info["stage_steps"]
        np.testing.assert_array_equal(got.positions, ref.positions)
        np.testing.assert_array_equal(got.get_velocities(), ref.get_velocities())
        np.testing.assert_array_equal(got.get_forces(), ref.get_forces())
        assert got.get_potential_energy() == ref.get_potential_energy()
