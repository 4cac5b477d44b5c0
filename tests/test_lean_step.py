"""The lean fused step (issue 13, item 4): a sub-stage's half skipped on steps it holds no
system (with several sub-stages; with one, the select alone), convergence observables only when
some system is due, and criteria tested every k steps (``FusedStage(convergence_every=k)``),
against docs/semantics.md §5, §10 and §11.

Every comparison here is bitwise (float64): the lean paths skip work whose result is known (a
select with an all-False mask), so they must give the same bits.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics.stages.base import masked_update, select_batch, select_state

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.0, images=(0, 0, 0))
FMAX = 0.05  # eV/Å


def clusters(n=3, seed=0):
    """Rattled 13-atom argon icosahedra (non-periodic): FIRE relaxes each in ~20-60 steps."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = Icosahedron("Ar", 2).copy()
        a.pbc = False
        a.cell = np.zeros((3, 3))
        a.positions += rng.normal(scale=0.15, size=a.positions.shape)
        out.append(a)
    return out


@pytest.fixture(scope="module")
def padded():
    """Three clusters in four system slots and 48 atom slots (one empty slot, 9 padding rows),
    initialized for FIRE -> Langevin, with velocities so every half changes something."""
    batch = fd.Batch.from_atoms(clusters(), max_atoms=48, max_systems=4)
    fused = fd.FIRE(LJ) + fd.NVTLangevin(LJ, dt=2.0, temperature=30.0, friction=0.02, seed=3)
    batch = fused.init(batch)
    rng = np.random.default_rng(1)
    v = jnp.where(batch.atom_mask[:, None], rng.normal(scale=0.01, size=(48, 3)), 0.0)
    return fused, batch.replace(velocities=v)


def _reference(half, batch, state, mask):
    """The select the lean update replaces (the update before issue 13)."""
    from fused_dynamics import constraints

    new_batch, new_state = half(batch, state)
    new_batch = constraints.constrain_update(batch, select_batch(mask, new_batch, batch), mask)
    return new_batch, select_state(mask, new_state, state)


@pytest.mark.parametrize("which", ["none", "some", "every slot"])
def test_masked_update_equals_the_select_bitwise(padded, which):
    """§5: a sub-stage updates exactly the systems in its mask; skipping the half for an empty
    mask gives the select's bits (padding rows and the empty slot included)."""
    fused, batch = padded
    mask = {
        "none": jnp.zeros(4, bool),
        "some": jnp.array([True, False, True, False]),
        "every slot": jnp.ones(4, bool),
    }[which]
    for i, stage in enumerate(fused.stages):
        state = batch.stage_state[i]
        for half in (stage.first_half, stage.second_half):
            # both compiled: XLA:CPU may contract a*b+c differently outside a compiled program
            got = eqx.filter_jit(masked_update)(half, batch, state, mask)
            want = eqx.filter_jit(_reference)(half, batch, state, mask)
            for name in ("positions", "velocities", "cell"):
                np.testing.assert_array_equal(getattr(got[0], name), getattr(want[0], name))
            for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
                np.testing.assert_array_equal(a, b)
    if which == "none":  # nothing moved at all
        np.testing.assert_array_equal(got[0].positions, batch.positions)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_convergence_every_refused_unless_positive_integer(bad):
    with pytest.raises(ValueError, match="convergence_every"):
        fd.FusedStage([(0, fd.FIRE(LJ))], convergence_every=bad)


def test_convergence_every_is_kept_by_composition():
    fused = fd.FusedStage([(0, fd.FIRE(LJ))], convergence_every=5)
    assert (fused + fd.NVE(LJ, dt=1.0, n_steps=3)).convergence_every == 5
    assert fused.with_stress().convergence_every == 5
    assert (fd.NVE(LJ, dt=1.0, n_steps=3) + fused).convergence_every == 5
    assert fd.FusedStage([(0, fd.FIRE(LJ))]).convergence_every == 1  # the default


@pytest.fixture(scope="module")
def fmax_history():
    """fmax of each system after every FIRE step t = 1..80 of a relaxation that never stops
    (threshold -1 never holds, docs/semantics.md §9), and the positions after each step."""
    batch = fd.Batch.from_atoms(clusters())
    never = fd.FusedStage([(0, fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(-1.0)))])
    step = jax.jit(lambda b: never.step(b)[0])
    b = never.init(batch)
    fmax, positions = [], []
    for _ in range(80):
        b = step(b)
        fmax.append(np.asarray(never.fields(b)["fmax"]))
        positions.append(np.asarray(b.positions))
    return batch, np.array(fmax), np.array(positions)


@pytest.mark.parametrize("k", [1, 4])
def test_criterion_tested_every_k_steps_in_the_stage(fmax_history, k):
    """§10 with ``convergence_every=k``: a system graduates after the first step t with
    t % k == 0 (t counted in the stage) at which fmax <= 0.05 eV/Å, with the positions the
    relaxation had at that step, bit for bit (FIRE's arithmetic does not depend on k). k = 1
    is the default: after every step."""
    batch, fmax, positions = fmax_history
    steps = np.arange(1, len(fmax) + 1)
    fused = fd.FusedStage(
        [(0, fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(FMAX)))],
        convergence_every=k,
    )
    final = fused.run(batch, n_steps=len(fmax))
    taken = np.asarray(final.info["stage_steps"])[:, 0]
    for s in range(len(taken)):
        due = (fmax[:, s] <= FMAX) & (steps % k == 0)
        assert due.any(), "the relaxation must converge within the history"
        expected = int(steps[due][0])
        assert taken[s] == expected, (s, taken[s], expected)
        rows = np.asarray(batch.system_idx) == s
        np.testing.assert_array_equal(
            np.asarray(final.positions)[rows], positions[expected - 1][rows]
        )
    assert np.all(np.asarray(final.info["exit_reason"]) == int(fd.ExitReason.CONVERGED))
    if k > 1:  # some system converged between two tests, so the test really waited
        first = [int(steps[fmax[:, s] <= FMAX][0]) for s in range(len(taken))]
        assert np.any(taken > first)


# ----------------------------------------------------------------------------- the priming pass
# A run of a fixed batch makes its priming evaluation (docs/semantics.md §6) in the first
# iteration of its loop, so that its program holds one copy of the model.


def _count_model_calls(monkeypatch) -> list:
    """From now on, every call of the LJ model (traced or not) appends its ``stress`` flag to
    the returned list."""
    calls = []
    cls = type(LJ)
    original = cls.__call__

    def counting(self, batch, **kwargs):
        calls.append(kwargs.get("stress"))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    return calls


@pytest.mark.parametrize(
    ("criterion", "output_stress", "calls_expected", "energies_expected"),
    [
        ("energy_change", False, [False], 1),  # the steps evaluate the energy: one call
        ("fmax", False, [False], 2),  # forces in the loop, the energy's forward pass after it
        ("fmax", True, [False, True], 2),  # the energy comes with the exit stress
    ],
)
def test_run_program_holds_the_model_once(
    monkeypatch, criterion, output_stress, calls_expected, energies_expected
):
    """Tracing a whole run calls the model once in its loop: the loop body's evaluation also
    primes the batch. Before the priming pass, ``init`` inside the program called it a second
    time, compiled a second time. After the loop it is called once more only where the run
    computes something once for what it returns: the stress (``output_stress``), with the
    energy in the same call; where the steps skip the energy (``FusedStage.needs_energy``
    false, docs/semantics.md §6) and no stress is due, the energy's forward pass alone
    (``Model.energy``, no derivative)."""
    from fused_dynamics import loop

    calls = _count_model_calls(monkeypatch)
    energies = []
    cls = type(LJ)
    original = cls.energy

    def counting(self, batch):
        energies.append(1)
        return original(self, batch)

    monkeypatch.setattr(cls, "energy", counting)
    hook = fd.ConvergenceHook([{"key": criterion, "threshold": 1e-3}])
    fused = fd.FusedStage([fd.FIRE(LJ, convergence_hook=hook)], output_stress=output_stress)
    batch = fd.Batch.from_atoms(clusters())
    options = loop.LoopOptions(resume=False, max_steps=None)
    jax.make_jaxpr(lambda b: loop.run_loop(fused, b, 10, options).positions)(batch)
    assert calls == calls_expected
    assert len(energies) == energies_expected


def _fail_one(batch, slot):
    """``batch`` with one NaN position in system ``slot`` (it fails at the priming pass)."""
    first = int(np.flatnonzero(np.asarray(batch.system_idx) == slot)[0])
    return batch.replace(positions=batch.positions.at[first, 0].set(jnp.nan))


def test_run_of_zero_steps_is_init():
    """``run(n_steps=0)`` is the priming pass alone: the result of ``init`` (energies and
    forces to 1e-12 relative: the same model compiled in two programs, where XLA may fuse
    differently by an ulp; everything else exactly), with the system that has a NaN position
    FAILED at step 0 and the others untouched."""
    batch = _fail_one(fd.Batch.from_atoms(clusters(), max_atoms=48, max_systems=4), 1)
    fused = fd.FusedStage(
        [fd.FIRE(LJ), fd.NVTLangevin(LJ, dt=2.0, temperature=30.0, friction=0.02, seed=3)],
        output_stress=False,
    )
    ran, ref = fused.run(batch, n_steps=0), fused.init(batch)
    for name in ("energy", "forces"):
        a, b = np.asarray(getattr(ran, name)), np.asarray(getattr(ref, name))
        ok = np.isfinite(b)
        np.testing.assert_array_equal(np.isfinite(a), ok, err_msg=name)
        np.testing.assert_allclose(a[ok], b[ok], rtol=1e-12, atol=0, err_msg=name)
    for name in ("positions", "velocities", "status"):
        np.testing.assert_array_equal(getattr(ran, name), getattr(ref, name), err_msg=name)
    for key in ref.info:
        np.testing.assert_array_equal(ran.info[key], ref.info[key], err_msg=key)
    assert int(ran.step_count) == 0
    assert int(ran.info["exit_reason"][1]) == int(fd.ExitReason.FAILED)
    assert int(ran.info["failure_step"][1]) == 0
    assert np.all(np.asarray(ran.info["exit_reason"])[[0, 2]] == 0)


def test_priming_pass_leaves_no_previous_energy():
    """An energy-change criterion cannot hold on a system's first step (its previous energy is
    +inf: docs/semantics.md §9), in a run as after ``init``: with a threshold every change
    meets, every system converges on its second step, in a run and in steps by hand."""
    hook = fd.ConvergenceHook([{"key": "energy_change", "threshold": 1e9}])
    fused = fd.FusedStage([fd.FIRE(LJ, convergence_hook=hook)], output_stress=False)
    batch = fd.Batch.from_atoms(clusters())
    ran = fused.run(batch, n_steps=10)
    np.testing.assert_array_equal(ran.info["stage_steps"][:, 0], [2, 2, 2])
    assert int(ran.step_count) == 2
    by_hand = fused.init(batch)
    step = jax.jit(fused.step)
    for _ in range(2):
        by_hand, _ = step(by_hand)
    np.testing.assert_array_equal(by_hand.info["stage_steps"][:, 0], [2, 2, 2])
    np.testing.assert_array_equal(by_hand.status, ran.status)


def test_admitting_chunk_holds_the_model_once(monkeypatch):
    """A chunk that admits refilled slots primes them in its loop's first iteration: tracing
    it calls the model once for the evaluations (``output_stress=False``: no exit stress),
    where the admission used to evaluate the whole batch in a second copy."""
    from fused_dynamics import loop

    fused = fd.FusedStage([fd.FIRE(LJ)], output_stress=False)
    batch = fused.init(fd.Batch.from_atoms(clusters()))
    new = jnp.asarray([False, True, False])
    calls = _count_model_calls(monkeypatch)  # after init: only the chunk's calls count
    last = jnp.asarray(False)
    jax.make_jaxpr(lambda b: loop.chunk(fused, b, 10, last, new, None)[0].positions)(batch)
    assert calls == [False]


def test_admitting_chunk_primes_only_the_refilled_slots():
    """The priming pass of a chunk that admits slot 1 writes slot 1's energy and forces (those
    of ``init``, to 1e-12 relative: two programs) and leaves the other slots' values bit for
    bit, even where they are not what an evaluation would give (set to 7 here)."""
    from fused_dynamics import loop

    fused = fd.FusedStage([fd.FIRE(LJ)], output_stress=False)
    ref = fused.init(fd.Batch.from_atoms(clusters()))
    batch = ref.replace(energy=jnp.full(3, 7.0), forces=jnp.full_like(ref.forces, 7.0))
    new = jnp.asarray([False, True, False])
    out = loop.chunk(fused, batch, 0, jnp.asarray(False), new, None)[0]  # the priming pass
    assert int(out.step_count) == int(batch.step_count)
    mine = np.asarray(batch.system_idx) == 1
    np.testing.assert_array_equal(out.energy[jnp.asarray([0, 2])], [7.0, 7.0])
    np.testing.assert_array_equal(out.forces[~mine], batch.forces[~mine])
    np.testing.assert_allclose(out.energy[1], ref.energy[1], rtol=1e-12)
    np.testing.assert_allclose(out.forces[mine], ref.forces[mine], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_stages", [1, 2])
def test_skip_cond_only_with_several_sub_stages(monkeypatch, n_stages):
    """A sub-stage's half is skipped by a ``lax.cond`` on an empty mask only when the fused
    stage has several sub-stages: with one, the mask is rarely empty (the priming pass) and
    the cond costs more than it saves on CPU (``masked_update``), so the step is the select
    form, the one traced on a GPU. Counted in the step's jaxpr: with one sub-stage the CPU
    form has as many conds as the GPU form; with two it has more."""
    stages = [
        fd.NVE(LJ, dt=2.0),
        fd.NVTLangevin(LJ, dt=2.0, temperature=30.0, friction=0.02, seed=1),
    ]
    fused = fd.FusedStage(stages[:n_stages], output_stress=False)
    batch = fused.init(fd.Batch.from_atoms(clusters()))

    def conds():
        return str(jax.make_jaxpr(lambda b: fused.step(b)[0])(batch)).count("cond[")

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # the same on a GPU machine
    on_cpu = conds()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    on_gpu = conds()
    if n_stages == 1:
        assert on_cpu == on_gpu, (on_cpu, on_gpu)
    else:  # two halves per sub-stage, each under its cond on CPU
        assert on_cpu == on_gpu + 4, (on_cpu, on_gpu)
