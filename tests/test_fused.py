"""FusedStage behaviour, point by point against docs/semantics.md (§1...§13, §18)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics.hooks import DynamicsStage as DS

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.0, images=(0, 0, 0))


class Descent(fd.Stage):
    """A minimal optimizer used to exercise the engine: r += step * F."""

    step_size: float = 0.5

    @property
    def is_optimizer(self):
        return True

    def first_half(self, batch, state):
        return batch.replace(positions=batch.positions + self.step_size * batch.forces), state

    def second_half(self, batch, state):
        return batch, state


def clusters(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = Icosahedron("Ar", 2) if k % 2 == 0 else bulk("Ar", "fcc", a=5.3, cubic=True)
        a = a.copy()
        a.pbc = False
        a.cell = np.zeros((3, 3))
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        out.append(a)
    return out


def batch_of(atoms, **kw):
    return fd.Batch.from_atoms(atoms, **kw)


# ----------------------------------------------------------------------------- §1 §2 §3
def test_plus_assigns_codes_and_is_left_associative():
    a, b, c = Descent(LJ), fd.NVE(LJ, dt=1.0, n_steps=3), fd.NVE(LJ, dt=2.0, n_steps=2)
    ab = a + b
    assert ab.codes == (0, 1) and ab.exit_status == 2 and ab.entry_status == 0
    abc = ab + c
    assert abc.codes == (0, 1, 2) and abc.exit_status == 3
    # inputs untouched: composition returns new values
    assert ab.codes == (0, 1) and len(ab.sub_stages) == 2
    assert [s for _, s in abc.sub_stages] == [a, b, c]
    text = repr(abc)
    assert "Descent" in text and "NVE, n_steps=3" in text and "exit_status=3" in text


def test_sub_stages_must_share_one_model():
    other = fd.models.LennardJones(sigma=3.0, epsilon=0.0104, cutoff=7.0)
    with pytest.raises(ValueError, match="sub-stage 1.*different model"):
        Descent(LJ) + fd.NVE(other, dt=1.0)
    # an equal model built separately is the same model
    twin = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.0, images=(0, 0, 0))
    assert (Descent(LJ) + fd.NVE(twin, dt=1.0)).exit_status == 2


def test_bad_codes_are_rejected_at_construction():
    with pytest.raises(ValueError, match="entry_status 5"):
        fd.FusedStage([(0, Descent(LJ))], entry_status=5)
    with pytest.raises(ValueError, match="distinct"):
        fd.FusedStage([(0, Descent(LJ)), (0, Descent(LJ))])
    with pytest.raises(ValueError, match="exit_status 1 is also"):
        fd.FusedStage([(0, Descent(LJ)), (1, Descent(LJ))], exit_status=1)
    with pytest.raises(TypeError, match="expected a Stage"):
        fd.FusedStage([(0, LJ)])


def test_entry_status_is_applied():
    fused = fd.FusedStage([(0, Descent(LJ)), (1, fd.NVE(LJ, dt=1.0, n_steps=2))], entry_status=1)
    out = fused.run(batch_of(clusters(2), max_systems=3))
    steps = np.asarray(out.info["stage_steps"])
    # every system skipped the relaxation and spent exactly its budget in NVE
    np.testing.assert_array_equal(steps[:2], [[0, 2], [0, 2]])
    np.testing.assert_array_equal(np.asarray(out.status)[:2], [2, 2])


# ----------------------------------------------------------------------------- §5 §10 §11
def _reference(atoms, stages_and_steps):
    """Run one system alone through stages one after another, each for a fixed count."""
    b = batch_of([atoms])
    for stage, k in stages_and_steps:
        f = fd.FusedStage([(0, dataclass_replace(stage, n_steps=k, convergence_hook=None))])
        b = f.run(b)
        if stage.is_optimizer:  # a system leaves an optimizer at rest
            b = b.replace(velocities=jnp.zeros_like(b.velocities))
    return b


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.parametrize("relax_kind", [pytest.param("descent", marks=pytest.mark.slow), "fire"])
def test_fused_chain_equals_each_system_alone(relax_kind):
    """Relax until fmax <= 0.002, then NVE for 7 steps: each system exactly as if alone."""
    atoms = clusters(3)
    conv = fd.ConvergenceHook.from_fmax(0.002)
    if relax_kind == "fire":
        relax = fd.FIRE(LJ, convergence_hook=conv)
    else:
        relax = Descent(LJ, step_size=0.3, convergence_hook=conv)
    md = fd.NVE(LJ, dt=2.0, n_steps=7)
    fused = relax + md
    out = fused.run(batch_of(atoms, max_atoms=60, max_systems=4))
    steps = np.asarray(out.info["stage_steps"])
    assert np.all(steps[:3, 1] == 7)
    assert np.all(steps[:3, 0] > 1), "the relaxation should take several steps"
    assert len(set(steps[:3, 0])) > 1, "systems should converge at different steps"
    np.testing.assert_array_equal(np.asarray(out.info["exit_reason"])[:3], fd.ExitReason.BUDGET)
    final = out.to_atoms()
    for k, a in enumerate(atoms):
        ref = _reference(a, [(relax, int(steps[k, 0])), (md, 7)]).to_atoms()[0]
        # float64; the same operations on the same numbers, only batched: agreement to 1e-10 Å
        np.testing.assert_allclose(final[k].positions, ref.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(final[k].get_velocities(), ref.get_velocities(), atol=1e-10)


def test_system_leaves_an_optimizer_at_rest():
    """FIRE's velocities are mass-free bookkeeping: they must not leak into MD."""
    fused = fd.FIRE(LJ, n_steps=3) + fd.NVE(LJ, dt=1.0, n_steps=1)
    state = fused.init(batch_of(clusters(1)))
    step = jax.jit(fused.step)
    for k in range(2):
        state, _ = step(state, k)
    assert float(jnp.abs(state.velocities).max()) > 0.0  # FIRE is moving
    state, _ = step(state, 2)  # budget spent: migrates to NVE
    assert int(state.status[0]) == 1
    assert float(jnp.abs(state.velocities).max()) == 0.0


def test_migrated_system_is_first_updated_by_new_stage_next_step():
    """§5: the stage that updates a system is fixed by its status at the start of the step."""
    b = batch_of(clusters(1))
    fused = Descent(LJ, n_steps=1) + fd.NVE(LJ, dt=1.0, n_steps=1)
    state = fused.init(b)
    step = jax.jit(fused.step)
    state, rep = step(state, 0)
    assert int(state.status[0]) == 1 and not bool(rep.graduated[0])
    np.testing.assert_array_equal(np.asarray(state.info["stage_steps"][0]), [1, 0])
    # velocities were never touched by NVE during step 0 (Descent leaves them at zero)
    assert float(jnp.abs(state.velocities).max()) == 0.0
    state, rep = step(state, 1)
    np.testing.assert_array_equal(np.asarray(state.info["stage_steps"][0]), [1, 1])
    assert bool(rep.graduated[0]) and float(jnp.abs(state.velocities).max()) > 0.0


def test_both_graduation_paths_reported_in_the_same_step():
    """§11 §12: system 0 converges, system 1 spends its budget, both in step 2."""

    def converge_system0_at_step3(batch, fields):
        return (batch.system_id == 0) & (batch.info["stage_steps"][:, 0] >= 3)

    hook = fd.ConvergenceHook(criteria=[], custom_op=converge_system0_at_step3)
    fused = fd.FusedStage([(0, fd.NVE(LJ, dt=1.0, n_steps=3, convergence_hook=hook))])
    state = fused.init(batch_of(clusters(2)))
    step = jax.jit(fused.step)
    reports = []
    for k in range(3):
        state, rep = step(state, k)
        reports.append(rep)
    np.testing.assert_array_equal(np.asarray(reports[2].graduated), [True, True])
    assert not np.any(np.asarray(reports[1].graduated))
    np.testing.assert_array_equal(np.asarray(reports[2].converged), [True, False])
    np.testing.assert_array_equal(np.asarray(reports[2].budget_spent), [True, True])
    np.testing.assert_array_equal(
        np.asarray(state.info["exit_reason"]), [fd.ExitReason.CONVERGED, fd.ExitReason.BUDGET]
    )


def test_default_criterion_only_for_non_final_stages_without_budget():
    """§10: no criterion and no budget -> fmax <= 0.05; a budget alone governs otherwise."""
    relaxed = Descent(LJ, step_size=0.3, convergence_hook=fd.ConvergenceHook.from_fmax(1e-3))
    b = relaxed.run(batch_of(clusters(2)), n_steps=500)  # forces now far below 0.05 eV/Å
    b = fd.Batch.from_atoms(b.to_atoms())
    budgeted = fd.NVE(LJ, dt=1.0, n_steps=5) + fd.NVE(LJ, dt=1.0, n_steps=3)
    out = budgeted.run(b)
    np.testing.assert_array_equal(np.asarray(out.info["stage_steps"]), [[5, 3], [5, 3]])
    free = Descent(LJ) + fd.NVE(LJ, dt=1.0, n_steps=3)
    assert free.migration_rule(0).criteria[0].key == "fmax"
    assert float(free.migration_rule(0).criteria[0].threshold) == 0.05
    assert budgeted.migration_rule(0) is None and free.migration_rule(1) is None
    out = free.run(b)
    np.testing.assert_array_equal(np.asarray(out.info["stage_steps"]), [[1, 3], [1, 3]])


def test_energy_change_criterion_is_computed():
    """§9: energy_change is |E - E_prev| within the stage; inf on a system's first step."""
    crit = fd.ConvergenceHook([{"key": "energy_change", "threshold": 1e-9}])
    fused = fd.FusedStage([(0, Descent(LJ, step_size=0.3, convergence_hook=crit))])
    out = fused.run(batch_of(clusters(2)), n_steps=2000)
    assert np.all(np.asarray(out.status) == 1)
    assert np.all(np.asarray(out.info["stage_steps"][:, 0]) > 2)


def test_criteria_combine_with_and_and_reduce_per_atom_fields():
    b = fd.FusedStage([(0, Descent(LJ))]).init(batch_of(clusters(2)))
    f = {"fmax": fd.observables.fmax(b), "energy": b.energy}
    fmax = np.asarray(f["fmax"])
    loose = float(fmax.max()) + 1.0
    both = fd.ConvergenceHook(
        [{"key": "fmax", "threshold": loose}, {"key": "energy", "threshold": -1e9}]
    )
    assert not np.any(np.asarray(both.converged(b, f)))
    # per-atom field, norm over xyz then max over atoms == fmax
    per_atom = fd.ConvergenceHook([{"key": "forces", "threshold": fmax[0], "reduce_op": "norm"}])
    np.testing.assert_array_equal(np.asarray(per_atom.converged(b, f)), fmax <= fmax[0])
    # default per-atom reduction: absolute maximum component
    comp = np.abs(np.asarray(b.forces)).max(-1)
    absmax = np.array([comp[np.asarray(b.system_idx) == s].max() for s in range(2)])
    default = fd.ConvergenceHook([{"key": "forces", "threshold": absmax[1]}])
    np.testing.assert_array_equal(np.asarray(default.converged(b, f)), absmax <= absmax[1])
    with pytest.raises(ValueError, match="reduce_op"):
        fd.ConvergenceHook([{"key": "forces", "threshold": 1.0, "reduce_op": "median"}])
    with pytest.raises(ValueError, match="criterion 0"):
        fd.ConvergenceHook([{"threshold": 1.0}])


# ----------------------------------------------------------------------------- §13
def test_run_stops_on_completion_or_on_n_steps():
    md = fd.NVE(LJ, dt=1.0, n_steps=5)
    out = md.run(batch_of(clusters(2)))
    np.testing.assert_array_equal(np.asarray(out.info["stage_steps"][:, 0]), [5, 5])
    out = md.run(batch_of(clusters(2)), n_steps=3)
    np.testing.assert_array_equal(np.asarray(out.info["stage_steps"][:, 0]), [3, 3])
    np.testing.assert_array_equal(np.asarray(out.status), [0, 0])
    # resume continues where it stopped
    out = md.run(out, resume=True)
    np.testing.assert_array_equal(np.asarray(out.info["stage_steps"][:, 0]), [5, 5])


def test_final_stage_that_never_graduates_needs_n_steps():
    with pytest.raises(ValueError, match="never graduate"):
        fd.NVE(LJ, dt=1.0).run(batch_of(clusters(1)))
    out = fd.NVE(LJ, dt=1.0).run(batch_of(clusters(1)), n_steps=4)
    assert int(out.info["stage_steps"][0, 0]) == 4


# ----------------------------------------------------------------------------- §6
class CountingLJ(fd.models.LennardJones):
    """Counts how many times its energy is traced into a program."""

    def energy(self, batch):
        COUNT.append(1)
        return super().energy(batch)


COUNT: list = []


@pytest.mark.parametrize("n_sub", [1, 2, 3])
def test_one_model_evaluation_per_step(n_sub):
    model = CountingLJ(sigma=3.405, epsilon=0.0104, cutoff=7.0, images=(0, 0, 0))
    stages = [Descent(model)] + [fd.NVE(model, dt=1.0, n_steps=2) for _ in range(n_sub - 1)]
    fused = fd.FusedStage(list(enumerate(stages)))
    state = fused.init(batch_of(clusters(2)))
    COUNT.clear()
    jaxpr = jax.make_jaxpr(fused.step)(state, 0)
    assert len(COUNT) == 1, f"the step traced the model {len(COUNT)} times"
    # and the compiled program holds one energy evaluation: count the pair-energy powers
    assert str(jaxpr).count("integer_pow[y=6]") == 1 * str(
        jax.make_jaxpr(model.energy)(state)
    ).count("integer_pow[y=6]")


# ----------------------------------------------------------------------------- hooks §4 §7 §8
class Recorder(fd.Hook):
    log: list = eqx.field(static=True)
    name: str = eqx.field(static=True, default="")

    def on_host(self, data):
        self.log.append((self.name, data.stage, data.step))


def test_hooks_fire_per_semantics_with_frequency():
    log: list = []
    points = list(DS)
    sub = Descent(LJ)
    for p in points:
        sub = sub.register_hook(Recorder(log=log, name="sub", stage=p, every_n_steps=2))
    idle = fd.NVE(LJ, dt=1.0, n_steps=100)
    for p in points:
        idle = idle.register_hook(Recorder(log=log, name="idle", stage=p, every_n_steps=1))
    fused = sub + idle
    for p in points:
        fused = fused.register_fused_hook(Recorder(log=log, name="fused", stage=p))
    jax.effects_barrier()
    fused.run(batch_of(clusters(2)), n_steps=5)
    jax.effects_barrier()

    def count(name, p):
        return sum(1 for n, s, _ in log if n == name and s == p)

    fire = {DS.BEFORE_STEP, DS.BEFORE_PRE_UPDATE, DS.AFTER_COMPUTE, DS.AFTER_POST_UPDATE}
    fire |= {DS.AFTER_STEP}
    # ON_CONVERGE fires only on steps where systems left a stage (see
    # test_on_converge_fires_when_systems_of_its_stage_left): none left the NVE stage
    assert count("idle", DS.ON_CONVERGE) == 0
    for p in points[:-1]:
        assert count("fused", p) == 5, p  # fused-level hooks fire at the other eight points
        # sub-stage hooks: the six points of §7, steps 0, 2, 4 with every_n_steps=2
        assert count("sub", p) == (3 if p in fire else 0), p
        # BEFORE_PRE_UPDATE / AFTER_POST_UPDATE fire even though no system has code 1
        assert count("idle", p) == (5 if p in fire else 0), p
    # order inside step 0 (§4)
    step0 = [(n, s) for n, s, k in log if k == 0 and s != DS.ON_CONVERGE]
    expected = [
        ("fused", DS.BEFORE_STEP),
        ("sub", DS.BEFORE_STEP),
        ("idle", DS.BEFORE_STEP),
        ("fused", DS.BEFORE_PRE_UPDATE),
        ("sub", DS.BEFORE_PRE_UPDATE),
        ("idle", DS.BEFORE_PRE_UPDATE),
        ("fused", DS.AFTER_PRE_UPDATE),
        ("fused", DS.BEFORE_COMPUTE),
        ("fused", DS.AFTER_COMPUTE),
        ("sub", DS.AFTER_COMPUTE),
        ("idle", DS.AFTER_COMPUTE),
        ("fused", DS.BEFORE_POST_UPDATE),
        ("sub", DS.AFTER_POST_UPDATE),
        ("fused", DS.AFTER_POST_UPDATE),
        ("idle", DS.AFTER_POST_UPDATE),
        ("fused", DS.AFTER_STEP),
        ("sub", DS.AFTER_STEP),
        ("idle", DS.AFTER_STEP),
    ]
    assert step0 == expected


class ConvergeLog(fd.Hook):
    log: list = eqx.field(static=True)
    name: str = eqx.field(static=True, default="")
    stage: DS = eqx.field(static=True, default=DS.ON_CONVERGE, kw_only=True)

    def on_host(self, data):
        self.log.append((self.name, data.step, data["budget_spent"].tolist()))


def test_on_converge_fires_when_systems_of_its_stage_left():
    """docs/semantics.md §7: ON_CONVERGE fires on a sub-stage only on steps where systems of
    that sub-stage converged or spent their budget, with the report of which; fused-level
    ON_CONVERGE hooks on steps where some system left any sub-stage."""
    log: list = []
    a = fd.NVE(LJ, dt=1.0, n_steps=3).register_hook(ConvergeLog(log=log, name="a"))
    b = fd.NVE(LJ, dt=1.0, n_steps=4).register_hook(ConvergeLog(log=log, name="b"))
    fused = (a + b).register_fused_hook(ConvergeLog(log=log, name="fused"))
    jax.effects_barrier()
    out = fused.run(batch_of(clusters(2), max_systems=3))
    jax.effects_barrier()
    assert int(out.step_count) == 7
    both = [True, True, False]
    # steps 0..2 in a (budget spent at step 2), 3..6 in b (spent, and graduated, at step 6)
    assert sorted(log) == sorted(
        [("fused", 2, both), ("a", 2, both), ("fused", 6, both), ("b", 6, both)]
    )


def test_hook_receives_only_requested_fields():
    seen = []

    class Peek(fd.Hook):
        def on_host(self, data):
            seen.append(sorted(data.arrays))

    fused = fd.FusedStage([(0, fd.NVE(LJ, dt=1.0, n_steps=1))])
    fused = fused.register_fused_hook(Peek(fields=("energy", "temperature")))
    fused.run(batch_of(clusters(1)))
    jax.effects_barrier()
    assert seen == [["energy", "status", "system_id", "system_mask", "temperature"]]


# ----------------------------------------------------------------------------- transformations
@pytest.mark.slow
def test_vmap_over_time_steps_equals_separate_runs():
    b = batch_of(clusters(2))
    dts = jnp.array([0.5, 1.0, 2.0, 4.0])

    def run(dt):
        return fd.NVE(LJ, dt=dt, n_steps=6).run(b).positions

    batched = jax.vmap(run)(dts)
    for k, dt in enumerate(dts):
        np.testing.assert_allclose(batched[k], run(float(dt)), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_vmap_over_langevin_temperatures_equals_separate_runs():
    b = batch_of(clusters(2))
    temps = jnp.array([20.0, 40.0, 80.0, 160.0])

    def run(t):
        md = fd.NVTLangevin(LJ, dt=2.0, temperature=t, friction=0.05, seed=3, n_steps=8)
        out = md.run(b)
        return out.positions, fd.temperature(out)

    pos, temp = jax.vmap(run)(temps)
    for k, t in enumerate(temps):
        p1, t1 = run(float(t))
        # the same program on the same numbers, batched by vmap: agreement to rounding
        np.testing.assert_allclose(pos[k], p1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(temp[k], t1, rtol=1e-12)
    # and the members differ: the temperature reached the thermostat
    assert float(jnp.abs(pos[0] - pos[3]).max()) > 1e-6


@pytest.mark.slow
def test_grad_through_a_differentiable_run_matches_finite_differences():
    b = batch_of(clusters(1))

    def final_energy(epsilon):
        model = fd.models.LennardJones(sigma=3.405, epsilon=epsilon, cutoff=7.0, images=(0, 0, 0))
        out = fd.NVE(model, dt=2.0).run(b, n_steps=10, differentiable=True)
        return out.energy[0]

    g = jax.jit(jax.grad(final_energy))(0.0104)  # one compiled program: compiles fastest
    h = 1e-7
    fd_g = (final_energy(0.0104 + h) - final_energy(0.0104 - h)) / (2 * h)
    # central difference error ~h^2 * E''' + roundoff 1e-16/1e-7: 1e-6 relative is safe
    np.testing.assert_allclose(g, fd_g, rtol=1e-6)


def test_compiles_once_for_repeated_runs():
    md = fd.NVE(LJ, dt=1.0, n_steps=3)
    from fused_dynamics import loop

    md.run(batch_of(clusters(2), max_atoms=40, max_systems=3))
    fn = loop.compiled_loop(fd.FusedStage([md]))
    before = fn.cache_size()
    md.run(batch_of(clusters(2, seed=5), max_atoms=40, max_systems=3))
    fd.NVE(LJ, dt=3.0, n_steps=3).run(batch_of(clusters(1), max_atoms=40, max_systems=3))
    assert fn.cache_size() == before


# ----------------------------------------------------------------------------- built-in hooks
def test_nan_detector_fails_one_system_and_spares_the_others():
    atoms = clusters(2)
    broken = atoms[1].copy()
    broken.positions[1] = broken.positions[0]  # r = 0: infinite energy, NaN forces
    md = fd.NVE(LJ, dt=1.0, n_steps=5).register_hook(fd.NaNDetectorHook(warn=False))
    out = md.run(batch_of([atoms[0], broken]))
    reasons = np.asarray(out.info["exit_reason"])
    assert reasons[1] == fd.ExitReason.FAILED and reasons[0] == fd.ExitReason.BUDGET
    alone = fd.NVE(LJ, dt=1.0, n_steps=5).run(batch_of([atoms[0]]))
    np.testing.assert_array_equal(
        np.asarray(out.positions)[: len(atoms[0])], np.asarray(alone.positions)
    )


def test_max_force_hook_fails_system_over_bound():
    atoms = clusters(2)
    squeezed = atoms[0].copy()
    squeezed.positions[1] = squeezed.positions[0] + [2.8, 0, 0]
    fused = fd.FusedStage([(0, fd.NVE(LJ, dt=1.0, n_steps=2))]).register_fused_hook(
        fd.MaxForceHook(max_force=1.0, warn=False)
    )
    out = fused.run(batch_of([squeezed, atoms[1]]))
    np.testing.assert_array_equal(
        np.asarray(out.info["exit_reason"]), [fd.ExitReason.FAILED, fd.ExitReason.BUDGET]
    )


def test_freeze_atoms_hook_holds_atoms():
    b = batch_of(clusters(2))
    fused = fd.FusedStage([(0, Descent(LJ, n_steps=10))])
    frozen = [0, 1, 15]
    fused = fused.register_fused_hook(fd.FreezeAtomsHook.from_batch(b, indices=frozen))
    out = fused.run(b)
    np.testing.assert_array_equal(
        np.asarray(out.positions)[frozen], np.asarray(b.positions)[frozen]
    )
    assert float(jnp.abs(out.positions - b.positions).max()) > 1e-3


def test_biased_potential_hook_adds_energy_and_forces():
    k = 0.1

    def bias(batch):
        r2 = jnp.sum(jnp.where(batch.atom_mask[:, None], batch.positions, 0.0) ** 2, -1)
        return batch.sum_atoms(0.5 * k * r2)

    b = batch_of(clusters(1))
    fused = fd.FusedStage([(0, fd.NVE(LJ, dt=1.0, n_steps=1))])
    plain = fused.step(fused.init(b), 0)[0]
    biased_fused = fused.register_fused_hook(fd.BiasedPotentialHook(bias))
    biased = biased_fused.step(fused.init(b), 0)[0]
    np.testing.assert_allclose(biased.forces, plain.forces - k * plain.positions, atol=1e-12)
    np.testing.assert_allclose(biased.energy, plain.energy + bias(plain), atol=1e-12)


def test_wrap_periodic_hook_keeps_energies():
    crystal = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    crystal.rattle(0.05, seed=2)
    crystal.positions += [7.0, -3.0, 12.0]  # far outside the cell
    model = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=5.0, images=(1, 1, 1))
    b = batch_of([crystal])
    md = fd.NVE(model, dt=2.0, n_steps=3)
    plain = md.run(b)
    wrapped = md.register_hook(fd.WrapPeriodicHook()).run(b)
    frac = np.linalg.solve(np.asarray(b.cell[0]).T, np.asarray(wrapped.positions).T).T
    assert frac.min() >= 0 and frac.max() < 1
    # energies are invariant under wrapping up to rounding of the wrapped coordinates
    np.testing.assert_allclose(wrapped.energy, plain.energy, rtol=1e-12)


def test_logging_snapshot_and_converged_snapshot_hooks(tmp_path):
    csv_path = tmp_path / "log.csv"
    frames = fd.HostMemory()
    converged = fd.HostMemory()
    relax = Descent(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05))
    relax = relax.register_hook(fd.ConvergedSnapshotHook(converged))
    fused = relax + fd.NVE(LJ, dt=1.0, n_steps=2)
    fused = fused.register_fused_hook(fd.LoggingHook(str(csv_path), every_n_steps=3))
    fused = fused.register_fused_hook(fd.SnapshotHook(frames, every_n_steps=4))
    out = fused.run(batch_of(clusters(3)))
    jax.effects_barrier()
    n = int(np.asarray(out.info["stage_steps"]).sum(axis=1).max())
    rows = csv_path.read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) - 1 == (n + 2) // 3
    # the relaxation converges each system once; written once each, with its id
    ids = sorted(a.info["system_id"] for a in converged.atoms)
    assert ids == [0, 1, 2]
    assert len(frames) > 0 and all("step" in a.info for a in frames.atoms)


def test_energy_drift_monitor_fails_only_the_drifting_system():
    """Per-system drift: dt = 1 fs conserves energy (1e-10 eV/atom measured over 30 steps), dt =
    30 fs on a compressed cluster drifts by 1.4e-4 eV/atom; the threshold 1e-5 lies between."""
    atoms = clusters(2)
    hot = atoms[1].copy()
    hot.positions *= 0.93  # compressed: large forces, poor energy conservation at 30 fs
    md = fd.NVE(LJ, dt=jnp.array([1.0, 30.0]), n_steps=30)
    md = md.register_hook(fd.EnergyDriftMonitorHook(threshold=1e-5, action="fail"))
    out = md.run(batch_of([atoms[0], hot]))
    np.testing.assert_array_equal(
        np.asarray(out.info["exit_reason"]), [fd.ExitReason.BUDGET, fd.ExitReason.FAILED]
    )
    with pytest.raises(ValueError, match="action"):
        fd.EnergyDriftMonitorHook(action="explode")


def test_progress_hook_counts_graduated_systems():
    hook = fd.ProgressHook(total=3, every_n_steps=1)
    md = fd.NVE(LJ, dt=1.0, n_steps=4).register_hook(hook)
    md.run(batch_of(clusters(3)))
    jax.effects_barrier()
    # the bar is updated at ON_CONVERGE, after migration: all three graduated at step 4
    assert hook.bar.n == 3
    hook.bar.close()


def test_a_criterion_key_no_field_gives_is_refused_when_the_stage_is_fused():
    # before, a KeyError when the run traced its step; each stage's own observables count
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5)
    hook = fd.ConvergenceHook([{"key": "fmax_typo", "threshold": 0.1}])
    with pytest.raises(ValueError, match="sub-stage 0 \\(FIRE\\): convergence criterion 0: key"):
        fd.FusedStage([fd.FIRE(lj, convergence_hook=hook)])
    for stage, key in [
        (fd.FIRE2, "fire_stuck"),
        (
            lambda m, **k: fd.NVTNoseHoover(m, dt=1.0, temperature=50.0, tdamp=100.0, **k),
            "conserved_energy",
        ),
        (fd.FIRE, "velocities"),
    ]:
        rule = fd.ConvergenceHook([{"key": key, "threshold": 1.0}])
        fd.FusedStage([stage(lj, convergence_hook=rule)])


def test_a_run_without_n_steps_that_could_never_end_is_refused():
    # a negative fmax threshold never holds: with a budget it keeps systems in the stage (a
    # documented use), without one and without run(n_steps=...) the loop would never end
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5)
    batch = fd.Batch.from_atoms([Icosahedron("Ar", 2)])
    never = fd.ConvergenceHook.from_fmax(-1.0)
    fused = fd.FusedStage([fd.FIRE(lj, convergence_hook=never), fd.NVE(lj, dt=1.0, n_steps=2)])
    with pytest.raises(ValueError, match=r"sub-stage 0 \(FIRE\) has no n_steps and its conv"):
        fused.run(batch)
    with pytest.raises(ValueError, match=r"sub-stage 0 \(FIRE\) has no n_steps"):
        fused.run(
            sampler=fd.SizeAwareSampler([Icosahedron("Ar", 2)], max_atoms=13, max_systems=1),
            sinks=[fd.HostMemory()],
        )
    out = fused.run(batch, n_steps=3)  # a run's limit ends it
    assert int(out.step_count) == 3
    kept = fd.FusedStage([fd.FIRE(lj, convergence_hook=never, n_steps=2)]).run(batch)
    assert np.asarray(kept.info["exit_reason"])[0] == int(fd.ExitReason.BUDGET)
