"""The output stress of a run in chunks: computed for each system as it leaves the run, and for
every system the run returns (docs/semantics.md §6).

A run whose steps do not read the stress leaves it NaN during the run. A run in chunks
evaluates it only for the systems that left the run during the chunk (on CPU, each alone), so
a host visit pays for its graduates, not for the whole batch. These tests check the values,
not the cost (that is ``benchmarks/bench_inflight.py --workload w4``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics import loop

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)


def structures(seed=0):
    """A crystal, a cluster and a smaller crystal, rattled: they relax in different steps."""
    rng = np.random.default_rng(seed)
    out = [
        bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2),
        Icosahedron("Ar", 2),
        bulk("Ar", "fcc", a=5.4, cubic=True) * (1, 1, 2),
        bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 1, 1),
    ]
    for a, scale in zip(out, (0.02, 0.15, 0.05, 0.1), strict=True):
        a.positions += rng.normal(scale=scale, size=a.positions.shape)
    return out


def reference_stress(atoms) -> np.ndarray:
    """The model's stress of one structure in a batch of its own (3, 3)."""
    b = fd.Batch.from_atoms([atoms])
    return np.asarray(LJ.with_images(b)(b).stress[0])


def relax(fmax=0.02):
    return fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(fmax), n_steps=400)


def test_single_system_is_the_slot_alone():
    """``Batch.single_system`` holds exactly one slot's atoms and cell: its energy equals the
    batch's energy of that slot (the same arithmetic, 1e-12 relative: another compiled shape
    may sum in another order)."""
    systems = structures()
    b = fd.Batch.from_atoms(systems, max_systems=6)
    model = LJ.with_images(b)
    energy = np.asarray(model(b).energy)
    for slot, atoms in enumerate(systems):
        one = jax.jit(lambda b, s: b.single_system(s))(b, jnp.int32(slot))
        assert one.max_systems == 1 and int(one.n_atoms[0]) == len(atoms)
        np.testing.assert_allclose(np.asarray(one.positions[: len(atoms)]), atoms.positions)
        np.testing.assert_allclose(float(model(one).energy[0]), energy[slot], rtol=1e-12)


def test_selected_slots_get_the_batch_stress_and_the_others_keep_theirs():
    """``output_stress(fused, batch, systems)`` writes the stress of the slots in ``systems``
    (each evaluated alone on CPU) equal to the whole batch's evaluation (1e-12 relative), and
    leaves the others' stress bit for bit."""
    b = fd.Batch.from_atoms(structures(), max_systems=6)
    fused = fd.FusedStage([(0, relax())]).prepare_for_cells(np.asarray(b.cell), np.asarray(b.pbc))
    marker = jnp.full_like(b.stress, 7.0)
    b = b.replace(stress=marker)
    full = np.asarray(fused.model(b).stress)
    pick = jnp.asarray([True, False, True, False, False, False])
    out = jax.jit(lambda b, p: loop.output_stress(fused, b, p).stress)(b, pick)
    out = np.asarray(out)
    np.testing.assert_allclose(out[[0, 2]], full[[0, 2]], rtol=1e-12, atol=1e-15)
    assert np.all(out[[1, 3, 4, 5]] == 7.0)


@pytest.mark.parametrize("refill", [3, 7])
def test_inflight_writes_each_system_with_the_stress_of_its_final_structure(refill):
    """Every written frame carries the stress the model gives its final positions, evaluated
    on their own (1e-10 relative to the largest component: the frame's positions went
    through a float64 round trip, bit for bit, and the reference is another compiled shape)."""
    data = structures() * 2
    sampler = fd.SizeAwareSampler(data, max_atoms=96, max_systems=3, max_atoms_per_system=40)
    sink = fd.HostMemory()
    fd.FusedStage([(0, relax())]).run(sampler=sampler, refill_frequency=refill, sinks=[sink])
    assert sorted(a.info["system_id"] for a in sink.atoms) == list(range(len(data)))
    for frame in sink.atoms:
        got = frame.calc.results.get("stress")
        periodic = frame.pbc.all()
        if not periodic:  # a cluster without a cell: ASE's stress needs a full-rank cell
            assert got is None
            continue
        assert got is not None, f"system {frame.info['system_id']} written without stress"
        want = reference_stress(frame)
        want = -np.array([want[0, 0], want[1, 1], want[2, 2], want[1, 2], want[0, 2], want[0, 1]])
        np.testing.assert_allclose(-got, want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_a_run_stopped_by_its_step_budget_returns_every_stress():
    """A fixed batch with a host hook runs in chunks; stopped by ``n_steps`` before all have
    converged, the batch it returns carries the stress of every system (the last chunk computes
    it for those still running), equal to a whole compiled run's (1e-12 relative)."""
    seen = []

    class Count(fd.Hook):  # AFTER_STEP, every step
        def on_host(self, data):
            seen.append(1)

    systems = structures()
    b = fd.Batch.from_atoms(systems, max_systems=4)
    hooked = fd.FusedStage([(0, relax(1e-4))], hooks=[Count()])
    plain = fd.FusedStage([(0, relax(1e-4))])
    chunked = hooked.run(b, n_steps=23, refill_frequency=5)
    whole = plain.run(b, n_steps=23)
    assert seen, "the host hook did not run: the run was not in chunks"
    status = np.asarray(chunked.status)
    assert np.any(status != hooked.exit_status), "every system converged: not the case tested"
    assert np.all(np.isfinite(np.asarray(chunked.stress)))
    np.testing.assert_allclose(
        np.asarray(chunked.stress), np.asarray(whole.stress), rtol=1e-12, atol=1e-16
    )


def test_a_chunk_advanced_by_hand_leaves_every_system_with_its_stress():
    """``Run.advance`` hands the batch to the caller after every chunk: every occupied system,
    running or not, carries the stress of its current positions (1e-12 relative to the
    batch's own evaluation)."""
    b = fd.Batch.from_atoms(structures(), max_systems=4)
    run = fd.FusedStage([(0, relax(1e-4))]).start(b, refill_frequency=5)
    with run:
        run.advance()
        out = run.batch
    assert np.any(np.asarray(out.status) != run.fused.exit_status)
    want = np.asarray(run.fused.model(out).stress)
    got = np.asarray(out.stress)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-16)


@pytest.mark.slow
def test_output_stress_false_skips_the_exit_evaluation_and_nothing_else():
    """``FusedStage(output_stress=False)`` (docs/semantics.md §6) drops only the evaluation of
    the stress for what the run returns: positions, energies and forces are the default run's
    bit for bit, in a whole compiled run and in a run in chunks (a host hook); the stress is NaN
    ("not computed") and ``to_atoms`` leaves it out. A run that reads the stress
    (``always_stress``) still has it; ``+`` keeps the option; a non-bool is refused by name."""

    class Count(fd.Hook):  # a host hook: the run goes in chunks
        def on_host(self, data):
            pass

    systems = structures()
    b = fd.Batch.from_atoms(systems, max_systems=4)
    default = fd.FusedStage([(0, relax())]).run(b)
    assert np.all(np.isfinite(np.asarray(default.stress)))
    for hooks in ((), (Count(),)):
        skipped = fd.FusedStage([(0, relax())], hooks=hooks, output_stress=False)
        out = skipped.run(b, refill_frequency=7) if hooks else skipped.run(b)
        for name in ("positions", "energy", "forces"):
            np.testing.assert_array_equal(
                np.asarray(getattr(out, name)), np.asarray(getattr(default, name)), err_msg=name
            )
        assert np.all(np.isnan(np.asarray(out.stress)))
        assert all("stress" not in a.calc.results for a in out.to_atoms())
    read = fd.FusedStage([(0, relax())], always_stress=True, output_stress=False).run(b)
    np.testing.assert_allclose(
        np.asarray(read.stress), np.asarray(default.stress), rtol=1e-12, atol=1e-16
    )
    nve = fd.NVE(LJ, dt=1.0, n_steps=2)
    off, on = fd.FusedStage([(0, relax())], output_stress=False), fd.FusedStage([(0, nve)])
    assert (off + nve).output_stress is False  # either part opts the chain out
    assert (relax() + off).output_stress is False
    assert (off + on).output_stress is False and (on + off).output_stress is False
    assert (on + on).output_stress is True
    with pytest.raises(ValueError, match="output_stress must be True or False"):
        fd.FusedStage([(0, relax())], output_stress="no")
