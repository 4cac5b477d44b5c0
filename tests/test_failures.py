"""Finite or failed: a system that goes wrong leaves the run FAILED with its reason, never as a
plausible number (README "What is guaranteed")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron

import fused_dynamics as fd

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5, switch_onset=6.5)
FAILED = int(fd.ExitReason.FAILED)


def _cluster(seed=0, vacuum=6.0):
    a = Icosahedron("Ar", 2)
    a.center(vacuum=vacuum)
    a.rattle(0.05, seed=seed)
    return a


def _crystal(seed=0):
    a = bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 2, 2)
    a.rattle(0.05, seed=seed)
    return a


def _overlapping():
    a = _cluster(9)
    p = a.positions.copy()
    p[1] = p[0]  # r = 0: infinite energy and forces
    a.positions = p
    return a


def test_overlapping_atoms_fail_at_the_first_evaluation_and_others_run_on():
    systems = [_cluster(0), _overlapping(), _crystal(1)]
    relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=200)
    out = relax.run(fd.Batch.from_atoms(systems))
    reason = np.asarray(out.info["exit_reason"])
    assert reason[1] == FAILED
    assert int(out.info["failure_step"][1]) == 0  # the evaluation that starts the run
    code = fd.Failure(int(out.info["failure"][1]))
    assert fd.Failure.ENERGY in code or fd.Failure.FORCES in code
    assert list(reason[[0, 2]]) == [fd.ExitReason.CONVERGED] * 2
    atoms = out.to_atoms()
    assert atoms[1].info["exit_reason_name"] == "failed"
    assert "energy" in atoms[1].info["failure"] or "forces" in atoms[1].info["failure"]
    assert not np.isfinite(atoms[1].get_potential_energy())  # never a finite energy
    assert atoms[0].info["failure"] == "" and atoms[0].info["failure_step"] == -1


def test_nan_positions_are_never_a_finite_energy():
    """A model sees NaN distances as 'beyond the cutoff'; the engine must not report 0 eV."""
    batch = fd.Batch.from_atoms([_cluster(0), _crystal(0)])
    pos = np.array(batch.positions)
    pos[3] = np.nan
    out = LJ(batch.replace(positions=jnp.asarray(pos)))
    assert np.isnan(out.energy[0]) and np.all(np.isnan(out.forces[:13]))
    assert np.isfinite(out.energy[1]) and np.all(np.isfinite(out.forces[13:]))


def test_blown_up_cluster_with_finite_numbers_is_failed_not_zero_energy():
    """A cluster integrated with an absurd time step flies apart: every number stays finite and
    its energy is a plausible 0 eV, but its atoms move tens of Å per step: it blew up. The
    default bounds fail it; the cluster next to it with a sane time step is untouched."""
    systems = [_cluster(0), _cluster(1)]
    for a in systems:
        a.set_velocities(np.random.default_rng(1).normal(0, 0.01, (len(a), 3)))
    dt = jnp.asarray([2.0, 5e4])
    out = fd.NVE(LJ, dt=dt, n_steps=20).run(fd.Batch.from_atoms(systems))
    assert int(out.info["exit_reason"][1]) == FAILED
    assert fd.Failure.DISPLACEMENT in fd.Failure(int(out.info["failure"][1]))
    assert int(out.info["exit_reason"][0]) == fd.ExitReason.BUDGET
    alone = fd.NVE(LJ, dt=2.0, n_steps=20).run(fd.Batch.from_atoms(systems[:1]))
    np.testing.assert_array_equal(out.positions[:13], alone.positions[:13])


def test_cell_shrinking_under_pressure_fails_that_system_not_the_run():
    """NPT at 800 GPa collapses one crystal below the model's static image range: it fails with
    cell_too_small (or an earlier fault of the collapse); its neighbours run to their budget."""
    systems = [_crystal(0), _crystal(1), _crystal(2)]
    npt = fd.NPT(
        LJ,
        dt=2.0,
        temperature=40.0,
        pressure=jnp.asarray([0.0, 5.0, 0.0]),
        tdamp=50.0,
        pdamp=200.0,
        n_steps=300,
    )
    out = npt.run(fd.Batch.from_atoms(systems))
    assert np.asarray(out.info["exit_reason"]).tolist() == [2, FAILED, 2]
    assert int(out.info["failure"][1]) != 0


def test_streaming_run_writes_systems_that_fail_at_the_first_evaluation():
    sink = fd.HostMemory()
    systems = [_cluster(0), _overlapping(), _cluster(2)]
    fd.FIRE(LJ, n_steps=5).run(fd.Batch.from_atoms(systems), sinks=[sink], refill_frequency=2)
    got = {a.info["system_id"]: a.info["exit_reason_name"] for a in sink.atoms}
    assert got == {0: "budget", 1: "failed", 2: "budget"}


def test_energy_drift_failure_is_named():
    hook = fd.EnergyDriftMonitorHook(threshold=1e-12, action="fail")
    fused = fd.FusedStage([(0, fd.NVE(LJ, dt=5.0, n_steps=30))], hooks=(hook,))
    a = _cluster(0)
    a.set_velocities(np.random.default_rng(0).normal(0, 0.02, (len(a), 3)))
    out = fused.run(fd.Batch.from_atoms([a])).to_atoms()[0]
    assert out.info["exit_reason_name"] == "failed"
    assert out.info["failure"] == "energy_drift"


@pytest.mark.parametrize("stage", ["NVE", "NVTLangevin"])
def test_explosion_mid_run_fails_with_its_step(stage):
    """A time step far too large for one system (per-system dt) blows it up; the run names it."""
    dt = jnp.asarray([2.0, 400.0, 2.0])
    systems = [_crystal(0), _crystal(1), _crystal(2)]
    for a in systems:
        a.set_velocities(np.random.default_rng(0).normal(0, 0.02, (len(a), 3)))
    if stage == "NVE":
        fused = fd.FusedStage([(0, fd.NVE(LJ, dt=dt, n_steps=60))], max_force=50.0)
    else:
        md = fd.NVTLangevin(LJ, dt=dt, temperature=40.0, friction=0.01, n_steps=60)
        fused = fd.FusedStage([(0, md)], max_force=50.0)
    out = fused.run(fd.Batch.from_atoms(systems))
    reason = np.asarray(out.info["exit_reason"])
    assert reason[1] == FAILED, reason
    assert 0 < int(out.info["failure_step"][1]) < 60
    assert list(reason[[0, 2]]) == [fd.ExitReason.BUDGET] * 2


@pytest.mark.slow
def test_max_force_bound_is_configurable_and_checked():
    a = _crystal(0)
    p = a.positions.copy()
    p[1] = p[0] + [2.2, 0.0, 0.0]  # close contact: |F| ~ 10 eV/Å, finite
    a.positions = p
    batch = fd.Batch.from_atoms([a, _crystal(1)])
    strict = fd.FusedStage([(0, fd.NVE(LJ, dt=1.0, n_steps=3))], max_force=1.0).run(batch)
    assert int(strict.info["exit_reason"][0]) == FAILED
    assert fd.Failure(int(strict.info["failure"][0])) == fd.Failure.MAX_FORCE
    assert int(strict.info["exit_reason"][1]) == fd.ExitReason.BUDGET
    lax = fd.FusedStage([(0, fd.NVE(LJ, dt=1.0, n_steps=3))], max_force=None).run(batch)
    assert int(lax.info["exit_reason"][0]) == fd.ExitReason.BUDGET
    with pytest.raises(ValueError, match="max_force"):
        fd.FusedStage([(0, fd.NVE(LJ, dt=1.0))], max_force=-1.0)


def test_non_finite_energy_never_converges():
    """A criterion on energy change would hold for NaN - NaN comparisons made naively."""
    crit = fd.ConvergenceHook(
        [fd.Criterion("energy_change", 1e-3), fd.Criterion("fmax", 1e3)],
    )
    systems = [_cluster(0), _overlapping()]
    out = fd.FIRE(LJ, convergence_hook=crit, n_steps=20).run(fd.Batch.from_atoms(systems))
    assert int(out.info["exit_reason"][1]) == FAILED


def test_nan_detector_fails_only_the_broken_system():
    systems = [_cluster(0), _crystal(0), _overlapping(), _cluster(1)]
    relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.01), n_steps=30)
    fused = fd.FusedStage([(0, relax)], hooks=(fd.NaNDetectorHook(warn=False),))
    out = fused.run(fd.Batch.from_atoms(systems, max_atoms=256, max_systems=5))
    failed = np.flatnonzero(np.asarray(out.info["exit_reason"]) == FAILED).tolist()
    assert failed == [2]


@pytest.mark.slow
def test_neighbor_list_overflow_without_hook_regrows_and_matches_dense():
    """No NeighborListHook and a list far too small: the engine stores its refresh, the run
    loop sees the overflow, regrows and repeats; the result equals the dense path."""
    a = bulk("Ar", "fcc", a=5.26, cubic=True) * (3, 3, 3)
    a.rattle(0.05, seed=3)
    batch = fd.Batch.from_atoms([a, _cluster(2)])
    dense = fd.FIRE(LJ, n_steps=15).run(batch)
    model = LJ.with_neighbors(1.0)
    small = model.attach_neighbors(batch, capacity=64)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        nl = fd.FIRE(model, n_steps=15).run(small)
    assert not bool(nl.neighbors.overflow)
    np.testing.assert_allclose(nl.positions, dense.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(nl.energy, dense.energy, rtol=1e-12)
    assert np.all(np.asarray(nl.info["exit_reason"]) == fd.ExitReason.BUDGET)


@pytest.mark.slow
def test_neighbor_list_overflow_that_cannot_regrow_fails_loudly():
    """Under jax.vmap the run loop cannot regrow the list: systems fail, never zero forces."""
    a = _crystal(0)
    batch = fd.Batch.from_atoms([a])
    model = LJ.with_neighbors(1.0)
    small = model.attach_neighbors(batch, capacity=16)
    fused = fd.FIRE(model, n_steps=5)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), small)
    out = jax.vmap(lambda b: fused.run(b))(stacked)
    assert np.all(np.asarray(out.info["exit_reason"]) == FAILED)
    assert np.all(np.asarray(out.info["failure"]) & int(fd.Failure.NEIGHBOR_OVERFLOW))


def test_model_call_on_an_overflowed_list_gives_nan_not_zeros():
    """Outside a run nothing can regrow the list: energy, forces and stress are NaN."""
    a = _crystal(0)
    batch = fd.Batch.from_atoms([a])
    model = LJ.with_neighbors(1.0)
    for refresh in (True, False):
        m = LJ.with_neighbors(1.0, auto_refresh=refresh)
        out = m(model.attach_neighbors(batch, capacity=16))  # overflows when it is built
        assert np.isnan(out.energy[0])
        assert np.all(np.isnan(out.forces[: len(a)]))
        assert np.all(np.isnan(out.stress[0]))


@pytest.mark.parametrize("height", [1e-3, 1e-7])
def test_a_cell_thinner_than_a_bond_fails_alone_instead_of_sizing_every_image_range(height):
    """A periodic cell 1e-3 Å high (valid, non-singular) asked cutoff / height = 7,500 image
    shifts along its axis, and the dense step compiled them for every system: the run ran out
    of memory, the sane crystal beside it with it. Cells thinner than 0.5 Å along a periodic
    axis no longer size the range: that system fails CELL_TOO_SMALL, the other runs as alone."""
    good = bulk("Ar", "fcc", a=5.3, cubic=True)
    good.rattle(0.05, seed=0)
    thin = good.copy()
    thin.set_cell([[5.3, 0, 0], [0, 5.3, 0], [0, 0, height]])
    batch = fd.Batch.from_atoms([good, thin])
    assert LJ.with_images(batch).images == LJ.with_images(fd.Batch.from_atoms([good])).images
    out = fd.FIRE(LJ, n_steps=5).run(batch)
    assert int(out.info["exit_reason"][1]) == FAILED
    assert fd.Failure.CELL_TOO_SMALL in fd.Failure(int(out.info["failure"][1]))
    assert np.isnan(float(out.energy[1]))
    assert int(out.info["exit_reason"][0]) == fd.ExitReason.BUDGET
    alone = fd.FIRE(LJ, n_steps=5).run(fd.Batch.from_atoms([good]))
    np.testing.assert_array_equal(out.positions[:4], alone.positions[:4])
    assert float(out.energy[0]) == float(alone.energy[0])


def test_an_optimizer_step_that_throws_atoms_apart_fails_instead_of_converging():
    """Gradient descent with a step size 1000x too large throws a cluster hundreds of Å apart
    in one step: forces 0, energy 0, and it was reported converged (fmax 0 <= 0.05). The
    displacement bound now holds in optimizers too; the sane cluster beside it is untouched."""
    systems = [_cluster(0), _cluster(1)]
    rule = fd.ConvergenceHook.from_fmax(0.05)
    step = jnp.asarray([2.0, 2000.0])  # Å²/eV
    out = fd.GradientDescent(LJ, step_size=step, convergence_hook=rule, n_steps=200).run(
        fd.Batch.from_atoms(systems)
    )
    assert int(out.info["exit_reason"][1]) == FAILED
    assert fd.Failure.DISPLACEMENT in fd.Failure(int(out.info["failure"][1]))
    assert int(out.info["exit_reason"][0]) != FAILED
    alone = fd.GradientDescent(LJ, step_size=2.0, convergence_hook=rule, n_steps=200).run(
        fd.Batch.from_atoms(systems[:1])
    )
    np.testing.assert_array_equal(out.positions[:13], alone.positions[:13])


@pytest.mark.parametrize("stage", ["FIRE-frechet", "NPT"])
def test_a_variable_cell_step_far_from_the_origin_is_not_a_blow_up(stage):
    """The displacement bound measures a variable-cell step net of the cell's change: atoms
    1000 Å from the origin are carried several Å in one step by a strain of a few 1e-3 (a
    review found a cell-filter FIRE failing DISPLACEMENT with the default bound when it
    counted that move). The same crystal at the origin, in the same batch, takes the same
    steps: the translation changes its energy by rounding only."""
    crystal = bulk("Ar", "fcc", a=5.6, cubic=True)  # strained: the cell moves
    crystal.rattle(0.05, seed=3)
    far = crystal.copy()
    far.positions += 1000.0
    batch = fd.Batch.from_atoms([crystal, far])
    model = LJ.with_images(batch)
    if stage == "NPT":
        run = fd.NPT(
            model, dt=2.0, temperature=50.0, pressure=0.0, tdamp=50.0, pdamp=100.0, n_steps=60
        )
    else:
        run = fd.FIRE(model, cell_filter="frechet", n_steps=60)
    out = run.run(batch)
    assert FAILED not in np.asarray(out.info["exit_reason"]).tolist(), out.info["failure"]
    cell_change = np.abs(np.asarray(out.cell[1]) - np.asarray(batch.cell[1])).max()
    assert cell_change > 0.05  # the cell did move: the far atoms were carried
    # 1000 Å positions carry ~1e-13 Å of rounding into every pair distance
    np.testing.assert_allclose(float(out.energy[1]), float(out.energy[0]), rtol=0, atol=1e-8)
