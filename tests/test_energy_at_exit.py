"""A run whose steps read no energy evaluates forces only, and the energy once at its end
(docs/semantics.md §6): which runs do (``FusedStage.needs_energy``), that they return what a
run evaluating the energy at every step returns, and that a system whose final energy is not
finite leaves FAILED without touching the others.

Tolerances: the forces-only step and the step that also sums the energy are two compiled
programs, which XLA may fuse differently by an ulp, so trajectories compared across them agree
to 1e-12 relative (float64, a few tens of FIRE steps); statuses, step counts and exit reasons
exactly. Within one program every comparison is bitwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from test_lean_step import LJ, clusters  # tests/ is on pytest's path

import fused_dynamics as fd

FMAX = 0.05  # eV/Å
RTOL = 1e-12  # two programs (see the module docstring)


class _Reads(fd.Stage):
    """A sub-stage written outside the project: it may read the energy (the default)."""

    def first_half(self, batch, state):
        return batch, state

    def second_half(self, batch, state):
        return batch, state


def _fire(key="fmax", custom=None):
    hook = fd.ConvergenceHook([{"key": key, "threshold": FMAX}], custom_op=custom)
    return fd.FIRE(LJ, convergence_hook=hook)


@pytest.mark.parametrize(
    ("make", "needs"),
    [
        (lambda: fd.FusedStage([_fire()]), False),
        (lambda: _fire() + fd.NVTLangevin(LJ, dt=2.0, temperature=30.0, friction=0.02), False),
        (lambda: _fire() + fd.NVE(LJ, dt=2.0, n_steps=5), False),
        (lambda: _fire("temperature") + fd.NVE(LJ, dt=2.0, n_steps=5), False),
        (lambda: _fire("kinetic_energy") + fd.NVE(LJ, dt=2.0, n_steps=5), False),
        (lambda: fd.FusedStage([_fire("energy_change")]), True),
        (lambda: fd.FusedStage([_fire("energy")]), True),
        (lambda: fd.FusedStage([_fire(custom=lambda b, f: b.system_mask)]), True),
        (lambda: _fire() + fd.NVTNoseHoover(LJ, dt=2.0, temperature=30.0, tdamp=50.0), False),
        (lambda: _fire() + _Reads(LJ, n_steps=3), True),
        (lambda: fd.FusedStage([_fire()], hooks=[fd.NaNDetectorHook()]), True),
    ],
)
def test_which_runs_need_the_energy_at_every_step(make, needs):
    """Built-in sub-stages read forces only; an energy criterion (not ``kinetic_energy``), a
    custom criterion, a sub-stage the project does not know, or any hook make the steps
    evaluate the energy."""
    assert make().needs_energy is needs


def test_only_the_concrete_built_in_stages_say_they_read_no_energy():
    """The abstract bases a user may subclass (``AbstractFIRE``, ``AbstractMTK``) keep the
    default: a subclass written elsewhere may read the energy in its halves."""
    from fused_dynamics.stages.fire import AbstractFIRE
    from fused_dynamics.stages.mtk import AbstractMTK

    assert fd.Stage.reads_energy and AbstractFIRE.reads_energy and AbstractMTK.reads_energy
    concrete = (fd.FIRE, fd.FIRE2, fd.NVE, fd.NVTLangevin, fd.NVTNoseHoover, fd.NPT, fd.NPH)
    assert not any(c.reads_energy for c in concrete)
    assert not fd.GradientDescent.reads_energy and not fd.OptaxRelax.reads_energy


def _by_hand(fused, batch, n_steps):
    """``n_steps`` fused steps by hand: ``FusedStage.step`` always evaluates the energy."""
    b = fused.init(batch)
    step = jax.jit(fused.step)
    for _ in range(n_steps):
        b, _ = step(b)
    return b


def _assert_same_run(ran, ref):
    """``ran`` (a run whose steps skipped the energy) against ``ref`` (steps by hand with it):
    energies, positions and forces to ``RTOL``; statuses, per-stage steps, exit reasons and
    failures exactly; the previous energy infinite (moved on) exactly where ``ref`` has it,
    to ``RTOL`` elsewhere."""
    for name in ("energy", "positions", "forces"):
        a, b = np.asarray(getattr(ran, name)), np.asarray(getattr(ref, name))
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-14, err_msg=name)
    np.testing.assert_array_equal(ran.status, ref.status)
    for key in ("stage_steps", "exit_reason", "failure", "failure_step"):
        np.testing.assert_array_equal(ran.info[key], ref.info[key], err_msg=key)
    prev, prev_ref = np.asarray(ran.info["prev_energy"]), np.asarray(ref.info["prev_energy"])
    np.testing.assert_array_equal(np.isinf(prev), np.isinf(prev_ref))
    finite = np.isfinite(prev_ref)
    np.testing.assert_allclose(prev[finite], prev_ref[finite], rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("output_stress", [False, True])
def test_a_run_returns_what_steps_with_the_energy_give(output_stress):
    """Run to convergence (every system graduates, at different steps) with the energy at the
    end, against the same number of steps by hand with the energy at every step: energies of
    the final positions (each system's at the step it converged: it does not move after),
    positions and forces to ``RTOL``, and the stress (steps by hand compute none: the model's
    at the final positions); statuses, per-stage steps, exit reasons and the previous-energy
    bookkeeping exactly where it is infinite (moved on), to ``RTOL`` else."""
    fused = fd.FusedStage([_fire()], output_stress=output_stress)
    assert not fused.needs_energy
    batch = fd.Batch.from_atoms(clusters(), max_atoms=48, max_systems=4)
    ran = fused.run(batch, n_steps=500)
    steps = np.asarray(ran.info["stage_steps"])[:3, 0]
    assert len(set(steps.tolist())) > 1  # graduated at different steps
    ref = _by_hand(fused, batch, int(ran.step_count))
    _assert_same_run(ran, ref)
    if output_stress:
        expected = np.asarray(LJ(ref, stress=True).stress)
        np.testing.assert_allclose(ran.stress, expected, rtol=RTOL, atol=1e-14)
    else:
        assert np.all(np.isnan(np.asarray(ran.stress)[:3]))
    assert np.all(np.isfinite(np.asarray(ran.energy)[:3]))


def test_a_budget_run_of_md_returns_the_final_energy():
    """FIRE then NVE for a fixed budget (systems still running when ``n_steps`` ends the run):
    the energy returned is that of the final positions, as steps by hand give it."""
    fused = _fire() + fd.NVE(LJ, dt=2.0)
    assert not fused.needs_energy
    batch = fd.Batch.from_atoms(clusters())
    ran = fused.run(batch, n_steps=80)
    ref = _by_hand(fused, batch, 80)
    assert np.any(np.asarray(ran.status) == 1)  # some systems are in NVE at the end
    for name in ("energy", "positions", "velocities"):
        a, b = np.asarray(getattr(ran, name)), np.asarray(getattr(ref, name))
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-14, err_msg=name)
    np.testing.assert_array_equal(ran.status, ref.status)


def spring_energy(positions, mask):
    """Atoms on springs to the origin, 1 eV/Å² (padded rows left out), eV."""
    return 0.5 * jnp.sum(jnp.where(mask[:, None], positions**2, 0.0))


def _springs(positions, numbers, mask, cell, pbc):
    """:func:`spring_energy`; a system with krypton in it has a NaN energy (a constant: its
    forces stay finite)."""
    e = spring_energy(positions, mask)
    return e + jnp.where(jnp.any(mask & (numbers == 36)), jnp.nan, 0.0)


def _spring_systems(bad: bool):
    rng = np.random.default_rng(4)
    out = []
    for k in range(3):
        symbol = "Kr" if (bad and k == 1) else "Ar"
        out.append(Atoms(f"{symbol}4", positions=rng.normal(scale=0.5, size=(4, 3))))
    return out


def test_a_non_finite_final_energy_fails_that_system_alone():
    """A system whose energy is NaN while its forces are finite: the steps (forces only) do
    not see it; the check after the run does, and the system leaves FAILED (``ENERGY``) with
    its steps as failure step. The other systems converge exactly as in a run without it:
    their positions, forces and energies bit for bit (one program, per-system arithmetic)."""
    model = fd.models.EnergyFunctionModel(_springs)
    fused = fd.FusedStage([fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(1e-3))])
    assert not fused.needs_energy
    bad = fused.run(fd.Batch.from_atoms(_spring_systems(True)), n_steps=2000)
    good = fused.run(fd.Batch.from_atoms(_spring_systems(False)), n_steps=2000)
    assert int(bad.info["exit_reason"][1]) == int(fd.ExitReason.FAILED)
    assert int(bad.info["failure"][1]) & int(fd.Failure.ENERGY)
    assert int(bad.info["failure_step"][1]) == int(bad.info["stage_steps"][1, 0]) > 0
    assert int(bad.status[1]) == fused.exit_status
    assert np.isnan(float(bad.energy[1]))
    assert float(bad.info["prev_energy"][1]) == np.inf  # it moved on, as at a failing step
    for k in (0, 2):
        assert int(bad.info["exit_reason"][k]) == int(fd.ExitReason.CONVERGED)
        assert int(bad.info["failure"][k]) == 0
    rows = np.asarray(bad.system_idx) != 1
    for name in ("positions", "forces"):
        a, b = np.asarray(getattr(bad, name)), np.asarray(getattr(good, name))
        np.testing.assert_array_equal(a[rows], b[rows], err_msg=name)
    np.testing.assert_array_equal(np.asarray(bad.energy)[[0, 2]], np.asarray(good.energy)[[0, 2]])


def test_a_run_on_a_neighbor_list_returns_the_final_energy():
    """On a neighbor list (per-atom rows in the steps; the energy after the loop from the same
    list, which the last step refreshed at the final positions, so it is not rebuilt): the
    energy of the final positions as steps by hand give it, to ``RTOL``."""
    from ase.build import bulk

    rng = np.random.default_rng(2)
    systems = []
    for _ in range(2):
        a = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        systems.append(a)
    model = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0).with_neighbors(1.0)
    fused = fd.FusedStage([fd.FIRE(model)], output_stress=False)
    assert not fused.needs_energy
    batch = model.attach_neighbors(fd.Batch.from_atoms(systems))
    ran = fused.run(batch, n_steps=30)
    ref = _by_hand(fused, batch, 30)
    for name in ("energy", "positions", "forces"):
        a, b = np.asarray(getattr(ran, name)), np.asarray(getattr(ref, name))
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-14, err_msg=name)
    assert int(ran.neighbors.rebuilds) == int(ref.neighbors.rebuilds)


# ---------------------------------------------------------------- runs in chunks
# A run with a sampler, sinks, checkpoints or recorded host hooks runs in compiled chunks
# between host visits; its steps skip the energy too, and each chunk ends with one forward pass
# for the systems still in it (docs/semantics.md §6), so what the host reads has it.


def _model_energy(model, atoms) -> float:
    """``model``'s energy of one structure, alone in a batch of its own (the reference)."""
    return float(model(fd.Batch.from_atoms([atoms])).energy[0])


@pytest.mark.parametrize("every", [1, 3])
def test_a_chunked_fixed_batch_returns_what_steps_with_the_energy_give(every):
    """Chunks of ``every`` steps (systems graduate in different chunks and then wait in their
    slots; with 1, each at the end of a chunk): what the run returns equals the same steps by
    hand, which evaluate the energy at every step, to ``RTOL``; a system that left in an
    earlier chunk keeps the energy it left with (its slot's evaluations in later chunks
    computed none); records and the previous-energy bookkeeping as in the whole-run test."""
    fused = fd.FusedStage([_fire()])
    assert not fused.needs_energy
    batch = fd.Batch.from_atoms(clusters(), max_atoms=48, max_systems=4)
    sink = fd.HostMemory()
    ran = fused.run(batch, n_steps=500, refill_frequency=every, sinks=[sink])
    chunks = (np.asarray(ran.info["stage_steps"])[:3, 0] - 1) // every
    assert len(set(chunks.tolist())) > 1  # left in different chunks
    ref = _by_hand(fused, batch, int(ran.step_count))
    _assert_same_run(ran, ref)
    assert len(sink) == 3
    for atoms in sink.atoms:  # written as each left: the energy of the positions written
        e = atoms.get_potential_energy()
        assert np.isclose(e, _model_energy(LJ, atoms), rtol=RTOL, atol=1e-14), atoms.info


def test_an_inflight_run_writes_the_energy_of_each_graduate():
    """Relax then Langevin MD with a budget, 16 systems through 5 slots refilled every 7
    steps: every system written carries the model's energy of the positions written (to
    ``RTOL``: one structure alone against its slot in the batch), never NaN."""
    from test_inflight import LJ as SWITCHED
    from test_inflight import dataset, stages

    fused = stages(n_md=12)
    assert not fused.needs_energy
    data = dataset(16, seed=5)
    sampler = fd.SizeAwareSampler(data, max_atoms=160, max_systems=5, max_atoms_per_system=64)
    sink = fd.HostMemory()
    fused.run(sampler=sampler, refill_frequency=7, sinks=[sink])
    assert sorted(a.info["system_id"] for a in sink.atoms) == list(range(16))
    for atoms in sink.atoms:
        e = atoms.get_potential_energy()
        assert np.isfinite(e), atoms.info
        assert np.isclose(e, _model_energy(SWITCHED, atoms), rtol=RTOL, atol=1e-14), atoms.info


def _springs_late(positions, numbers, mask, cell, pbc):
    """:func:`_springs`, with the NaN energy of the krypton system only once its atoms are
    near the origin (after some steps of a relaxation; finite at the start)."""
    e = spring_energy(positions, mask)
    near = 2.0 * e < 0.3
    return e + jnp.where(jnp.any(mask & (numbers == 36)) & near, jnp.nan, 0.0)


def test_a_chunked_run_fails_a_non_finite_energy_at_the_end_of_its_chunk():
    """A system whose energy turns NaN (forces finite) after some steps, in a run of 5-step
    chunks: found at the end of the chunk in which it did, reported FAILED (``ENERGY``) with
    its steps (a whole number of chunks) as failure step, and written so; the others as in the
    run without it, bit for bit (one program, per-system arithmetic)."""
    model = fd.models.EnergyFunctionModel(_springs_late)
    fused = fd.FusedStage([fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(1e-3))])
    sink = fd.HostMemory()
    bad = fused.run(fd.Batch.from_atoms(_spring_systems(True)), refill_frequency=5, sinks=[sink])
    good = fused.run(  # in chunks too: the same program
        fd.Batch.from_atoms(_spring_systems(False)), refill_frequency=5, sinks=[fd.HostMemory()]
    )
    assert int(bad.info["exit_reason"][1]) == int(fd.ExitReason.FAILED)
    assert int(bad.info["failure"][1]) & int(fd.Failure.ENERGY)
    steps = int(bad.info["stage_steps"][1, 0])
    assert int(bad.info["failure_step"][1]) == steps and steps > 0 and steps % 5 == 0
    assert steps < int(good.info["stage_steps"][1, 0])  # it stopped before converging
    assert np.isnan(float(bad.energy[1]))
    # the run went on after it failed: as after a step with the energy for a system that did
    # not move on at that step, its previous energy is its energy (NaN), no longer +inf
    assert int(bad.step_count) > steps and np.isnan(float(bad.info["prev_energy"][1]))
    written = {a.info["system_id"]: a for a in sink.atoms}
    assert written[1].info["exit_reason"] == int(fd.ExitReason.FAILED)
    assert written[1].info["failure_step"] == steps
    for k in (0, 2):
        assert int(bad.info["exit_reason"][k]) == int(fd.ExitReason.CONVERGED)
    rows = np.asarray(bad.system_idx) != 1
    for name in ("positions", "forces"):
        a, b = np.asarray(getattr(bad, name)), np.asarray(getattr(good, name))
        np.testing.assert_array_equal(a[rows], b[rows], err_msg=name)
    np.testing.assert_array_equal(np.asarray(bad.energy)[[0, 2]], np.asarray(good.energy)[[0, 2]])
