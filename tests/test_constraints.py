"""Constraints (README "What is guaranteed"): ASE's FixAtoms, FixCartesian and FixCom are read
from ``Atoms.constraints``, honoured by every sub-stage, counted in the degrees of freedom, and
written back by ``to_atoms``; other constraint types are refused, never dropped."""

from __future__ import annotations

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.cluster import Icosahedron
from ase.constraints import FixAtoms, FixBondLength, FixCartesian, FixCom
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE as AseFIRE

import fused_dynamics as fd
from fused_dynamics.stages.base import select_batch

SIGMA, EPSILON, RC, RO = 3.405, 0.0104, 7.5, 6.5
LJ = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=RC, switch_onset=RO)


def ase_lj():
    return AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=RC, ro=RO, smooth=True)


def _cluster(seed, constraints):
    a = Icosahedron("Ar", 2)
    a.center(vacuum=6.0)
    a.rattle(0.1, seed=seed)
    rng = np.random.default_rng(seed)
    a.set_velocities(rng.normal(0, 0.01, (len(a), 3)))
    a.set_constraint(constraints)
    return a


def _systems():
    crystal = bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 2, 2)
    crystal.rattle(0.1, seed=4)
    crystal.set_velocities(np.random.default_rng(4).normal(0, 0.01, (len(crystal), 3)))
    crystal.set_constraint(FixAtoms(indices=[0, 5, 9]))
    return [
        _cluster(0, FixAtoms(indices=[0, 3, 7])),
        _cluster(1, [FixCartesian([2, 4], mask=(True, False, True)), FixAtoms([11])]),
        _cluster(2, FixCom()),
        _cluster(3, []),
        crystal,
    ]


def test_nve_with_constraints_matches_ase_step_by_step():
    systems = _systems()
    n, dt = 100, 5.0
    batch = fd.Batch.from_atoms(systems, max_atoms=128, max_systems=6)
    got = fd.NVE(LJ, dt=dt, n_steps=n).run(batch).to_atoms()
    for i, atoms in enumerate(systems):
        ref = atoms.copy()
        ref.calc = ase_lj()
        VelocityVerlet(ref, timestep=dt * units.fs).run(n)
        # the same float64 arithmetic up to the order of sums (segment sums vs NumPy);
        # 100 steps do not amplify 1e-16 to 1e-9 Å
        np.testing.assert_allclose(got[i].positions, ref.positions, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got[i].get_velocities(), ref.get_velocities(), atol=1e-10)
    fixed = systems[0].constraints[0].get_indices()
    np.testing.assert_array_equal(got[0].positions[fixed], systems[0].positions[fixed])
    com0 = systems[2].get_center_of_mass()
    np.testing.assert_allclose(got[2].get_center_of_mass(), com0, atol=1e-12)


def test_fire_with_constraints_matches_ase_step_by_step():
    systems = _systems()
    batch = fd.Batch.from_atoms(systems, max_atoms=128, max_systems=6)
    n = 40
    got = fd.FIRE(LJ, n_steps=n).run(batch).to_atoms()
    for i, atoms in enumerate(systems):
        ref = atoms.copy()
        ref.set_velocities(np.zeros((len(ref), 3)))
        ref.calc = ase_lj()
        AseFIRE(ref, logfile=None).run(fmax=0.0, steps=n)
        # same arithmetic up to the order of sums: observed 1e-15 Å
        np.testing.assert_allclose(got[i].positions, ref.positions, rtol=0, atol=1e-8)


def test_degrees_of_freedom_and_temperature_follow_ase():
    systems = _systems()
    batch = fd.Batch.from_atoms(systems, max_atoms=128, max_systems=6)
    dof = np.asarray(fd.observables.degrees_of_freedom(batch))[: len(systems)]
    assert dof.tolist() == [3 * 13 - 9, 3 * 13 - 4 - 3, 3 * 13 - 3, 3 * 13, 3 * 32 - 9]
    t = np.asarray(fd.temperature(batch))[: len(systems)]
    # ASE counts the removed dof the same way (Atoms.get_temperature)
    ref = [a.get_temperature() for a in systems]
    np.testing.assert_allclose(t, ref, rtol=1e-12)


def test_constraints_round_trip_through_to_atoms():
    systems = _systems()
    back = fd.Batch.from_atoms(systems).to_atoms()
    for a, b in zip(systems, back, strict=True):
        for name in ("FixAtoms", "FixCartesian", "FixCom"):
            want = [c for c in a.constraints if type(c).__name__ == name]
            have = [c for c in b.constraints if type(c).__name__ == name]
            assert len(have) == len(want)
            for x, y in zip(want, have, strict=True):
                if name == "FixCom":
                    continue
                np.testing.assert_array_equal(np.sort(x.get_indices()), np.sort(y.get_indices()))
                if name == "FixCartesian":
                    np.testing.assert_array_equal(x.mask, y.mask)


def test_unsupported_constraint_is_refused_naming_type_and_system():
    a = _cluster(0, [])
    b = _cluster(1, FixBondLength(0, 1))
    with pytest.raises(ValueError, match=r"system 1: constraint FixBondLengths? is not supported"):
        fd.Batch.from_atoms([a, b])


def test_langevin_keeps_fixed_atoms_and_initial_velocities_respect_them():
    systems = _systems()
    batch = fd.Batch.from_atoms(systems, max_atoms=128, max_systems=6)
    import jax

    warm = fd.initialize_velocities(batch, 80.0, jax.random.PRNGKey(0))
    fixed = np.asarray(batch.fixed)
    assert np.all(np.asarray(warm.velocities)[fixed] == 0.0)
    t = np.asarray(fd.temperature(warm))[: len(systems)]
    np.testing.assert_allclose(t, 80.0, rtol=1e-10)  # rescaled with the constrained dof
    md = fd.NVTLangevin(LJ, dt=5.0, temperature=80.0, friction=0.05, seed=2, n_steps=50)
    out = md.run(warm)
    pos0, pos1 = np.asarray(batch.positions), np.asarray(out.positions)
    np.testing.assert_array_equal(pos1[fixed], pos0[fixed])
    assert np.all(np.asarray(out.velocities)[fixed] == 0.0)
    assert np.abs(pos1 - pos0)[~fixed & np.asarray(batch.atom_mask)[:, None]].max() > 0.01


def _frozen_crystal():
    a = bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 2, 2)  # 32 atoms
    a.rattle(0.02, seed=7)
    return a


@pytest.mark.slow
@pytest.mark.parametrize("how", ["FixAtoms", "FreezeAtomsHook"])
def test_nose_hoover_holds_mobile_atoms_at_target(how):
    """24 of 32 atoms fixed: the thermostat acts on the 8 mobile atoms (24 dof), and the reported
    temperature is theirs. Mean over 3000 steps after 1000 of equilibration; the standard error
    of the mean of a 24-dof kinetic temperature sampled every step with correlation time ~100
    steps is ~100 K * sqrt(2/24) * sqrt(200/3000) ~ 7 K: 15% is a > 2-sigma band."""
    a = _frozen_crystal()
    frozen = np.arange(24)
    hooks = ()
    if how == "FixAtoms":
        a.set_constraint(FixAtoms(indices=frozen))
        batch = fd.Batch.from_atoms([a])
    else:
        batch = fd.Batch.from_atoms([a])
        hooks = (fd.FreezeAtomsHook.from_batch(batch, indices=frozen),)
    import jax

    batch = fd.initialize_velocities(batch, 100.0, jax.random.PRNGKey(1))
    nh = fd.NVTNoseHoover(LJ, dt=5.0, temperature=100.0, tdamp=100.0)
    fused = fd.FusedStage([(0, nh)], hooks=hooks)
    b = fused.run(batch, n_steps=1000)
    temps, mobile = [], []
    for _ in range(30):
        b = fused.run(b, n_steps=100, resume=True)
        temps.append(float(fd.temperature(b)[0]))
        v = np.asarray(b.velocities)[24:32]
        m = np.asarray(b.masses)[24:32, None]
        mobile.append(float(np.sum(m * v * v) / (24 * units.kB)))
    assert np.all(np.asarray(b.positions)[:24] == np.asarray(batch.positions)[:24])
    np.testing.assert_allclose(temps, mobile, rtol=1e-12)  # reported = the mobile atoms'
    assert abs(np.mean(temps) - 100.0) < 15.0, np.mean(temps)


def test_from_atoms_without_constraints_has_none():
    a = ase.Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.8]])
    b = fd.Batch.from_atoms([a])
    assert not np.any(np.asarray(b.fixed)) and not np.any(np.asarray(b.fix_com))
    assert fd.Batch.from_atoms([a]).to_atoms()[0].constraints == []
    assert jnp.asarray(fd.observables.degrees_of_freedom(b))[0] == 6


def test_freeze_atoms_hook_holds_in_streaming_runs_too():
    """Streaming (a batch with sinks) and inflight admission go through the same init: the
    frozen atoms' mask must survive it."""
    a = _frozen_crystal()
    batch = fd.Batch.from_atoms([a])
    hook = fd.FreezeAtomsHook.from_batch(batch, indices=np.arange(24))
    fused = fd.FusedStage([(0, fd.NVE(LJ, dt=5.0, n_steps=30))], hooks=(hook,))
    import jax

    warm = fd.initialize_velocities(batch, 50.0, jax.random.PRNGKey(3))
    sink = fd.HostMemory()
    fused.run(warm, sinks=[sink], refill_frequency=7)
    (out,) = sink.atoms
    np.testing.assert_array_equal(out.positions[:24], a.positions[:24])
    assert np.abs(out.positions[24:] - a.positions[24:]).max() > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.float16, jnp.bfloat16])
def test_keep_fixed_is_where_bit_for_bit_and_in_its_derivative(dtype):
    """``constraints.keep_fixed`` (a bitwise select, faster on XLA:CPU) equals
    ``jnp.where(fixed, old, new)`` bit for bit, signed zeros, infinities and NaN payloads
    included, and so do its first derivative (forward and reverse, under ``jit`` and ``vmap``)
    and its second; mixed dtypes fall back to ``jnp.where``."""
    rng = np.random.default_rng(0)
    n = 257
    info = np.finfo(dtype)
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, info.smallest_subnormal, -info.max, 3.5], dtype
    )
    old = rng.normal(size=(n, 3)).astype(dtype)
    new = rng.normal(size=(n, 3)).astype(dtype)
    old[: len(special), 0] = special
    new[: len(special), 1] = special[::-1]
    fixed = rng.random((n, 3)) < 0.4
    got = jax.jit(fd.constraints.keep_fixed)(fixed, old, new)
    want = np.where(fixed, old, new)
    assert got.dtype == want.dtype
    bits = np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")
    np.testing.assert_array_equal(np.asarray(got).view(bits), want.view(bits))
    batched = jax.vmap(fd.constraints.keep_fixed)(fixed[None], old[None], new[None])[0]
    np.testing.assert_array_equal(np.asarray(batched).view(bits), want.view(bits))

    old, new = rng.normal(size=(2, n, 3)).astype(dtype)  # finite, for the derivatives
    weights = rng.normal(size=(n, 3)).astype(dtype)

    def loss(f, o, x):
        return jnp.sum(weights * f(fixed, o * o, jnp.sin(x)))

    grads = jax.grad(lambda o, x: loss(fd.constraints.keep_fixed, o, x), argnums=(0, 1))
    ref = jax.grad(lambda o, x: loss(jnp.where, o, x), argnums=(0, 1))
    for g, r in zip(jax.jit(grads)(old, new), ref(old, new), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    # the derivative under vmap, and the second derivative (a Hessian-vector product)
    per_row = jax.vmap(jax.grad(lambda o, x, f: jnp.sum(fd.constraints.keep_fixed(f, o, x))))
    ref_rows = jax.vmap(jax.grad(lambda o, x, f: jnp.sum(jnp.where(f, o, x))))
    np.testing.assert_array_equal(
        np.asarray(per_row(old, new, fixed)), np.asarray(ref_rows(old, new, fixed))
    )
    v = rng.normal(size=(n, 3)).astype(dtype)

    def hvp(f):
        def inner(x):
            return jnp.vdot(jax.grad(lambda y: loss(f, old, y))(x), v)

        return jax.grad(inner)(new)

    np.testing.assert_array_equal(
        np.asarray(hvp(fd.constraints.keep_fixed)), np.asarray(hvp(jnp.where))
    )
    mixed = fd.constraints.keep_fixed(fixed, old.astype(np.float32), new.astype(np.float64))
    want_mixed = jnp.where(fixed, old.astype(np.float32), new.astype(np.float64))
    assert mixed.dtype == want_mixed.dtype
    np.testing.assert_array_equal(np.asarray(mixed), np.asarray(want_mixed))
    t_old, t_new = rng.normal(size=(2, n, 3)).astype(dtype)
    _, tangent = jax.jvp(
        lambda o, x: fd.constraints.keep_fixed(fixed, o, x), (old, new), (t_old, t_new)
    )
    np.testing.assert_array_equal(np.asarray(tangent), np.where(fixed, t_old, t_new))


def test_constraints_touch_only_the_systems_in_the_mask():
    """A system outside a half-update's mask is returned bit for bit, the velocities of its fixed
    components included (README "What is guaranteed": masking). Under ``vmap``, on a GPU and
    for a fused stage of one sub-stage every half is computed and selected, so the constraint
    must not zero velocities of systems the half did not update: a run of zero steps (the
    priming pass, which updates no system) leaves the loaded velocities as they are, as
    ``init`` does, under ``vmap`` and with one sub-stage on CPU."""
    systems = _systems()
    batch = fd.Batch.from_atoms(systems, max_atoms=128, max_systems=6)
    fixed = np.asarray(batch.fixed)
    assert np.any(np.asarray(batch.velocities)[fixed] != 0.0)  # the case under test
    mask = jnp.asarray([True, False, True, False, False, False])
    # a half-update's result, selected per system as masked_update does before constraining
    moved = select_batch(
        mask,
        batch.replace(velocities=batch.velocities + 1.0, positions=batch.positions + 0.1),
        batch,
    )
    out = fd.constraints.constrain_update(batch, moved, mask)
    outside = ~np.asarray(batch.to_atoms_axis(mask))
    inside = np.asarray(batch.to_atoms_axis(mask)) & np.asarray(batch.atom_mask)
    for name in ("velocities", "positions"):  # systems outside the mask: as they were
        np.testing.assert_array_equal(
            np.asarray(getattr(out, name))[outside], np.asarray(getattr(batch, name))[outside]
        )
    # inside, fixed components are held and stopped
    held = fixed & inside[:, None]
    assert np.all(np.asarray(out.velocities)[held] == 0.0)
    np.testing.assert_array_equal(
        np.asarray(out.positions)[held], np.asarray(batch.positions)[held]
    )

    # the entry sub-stage is MD, which keeps the loaded velocities (an optimizer's start at rest)
    fused = fd.FusedStage(
        [fd.NVTLangevin(LJ, dt=2.0, temperature=30.0, friction=0.02, seed=3), fd.FIRE(LJ)],
        output_stress=False,
    )
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), batch)
    ran = jax.vmap(lambda b: fused.run(b, n_steps=0))(stacked)
    ref = fused.init(batch)
    assert np.any(np.asarray(ref.velocities)[fixed] != 0.0)
    for k in range(2):
        np.testing.assert_array_equal(ran.velocities[k], ref.velocities)
        np.testing.assert_array_equal(ran.positions[k], ref.positions)
    # one sub-stage on CPU: its halves run with the select alone (masked_update, skip_empty=False),
    # so the priming pass computes them too, and must leave the loaded velocities
    nve = fd.NVE(LJ, dt=2.0)
    one = fd.FusedStage([nve], output_stress=False)
    ran, ref = one.run(batch, n_steps=0), one.init(batch)
    np.testing.assert_array_equal(ran.velocities, batch.velocities)
    np.testing.assert_array_equal(ran.velocities, ref.velocities)
    np.testing.assert_array_equal(ran.positions, ref.positions)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"indices": [40]}, r"indices \[40\] name no atom"),
        ({"indices": [30]}, r"indices \[30\] name no atom"),  # a padding slot
        ({"indices": [-1]}, r"indices \[-1\] name no atom"),  # would wrap to padding
        ({"indices": [1.5]}, "indices must be a sequence of integers"),
        ({"atom_mask": np.ones(31, bool)}, r"atom_mask must have shape \(32,\)"),
        ({"atom_mask": np.arange(32) == 30}, r"atom_mask is True on padding slots \[30\]"),
    ],
)
def test_freeze_atoms_hook_refuses_slots_that_hold_no_atom(kwargs, text):
    # JAX drops out-of-range scatter updates and the mask was and-ed with the occupied slots:
    # each of these froze nothing, without a word
    atoms = [Icosahedron("Ar", 2) for _ in range(2)]  # 26 atoms in 32 slots
    batch = fd.Batch.from_atoms(atoms, max_atoms=32)
    with pytest.raises(ValueError, match=f"FreezeAtomsHook.from_batch: {text}"):
        fd.FreezeAtomsHook.from_batch(batch, **kwargs)
    hook = fd.FreezeAtomsHook.from_batch(batch, indices=[0, 25])
    assert np.flatnonzero(np.asarray(hook.atom_mask)).tolist() == [0, 25]


@pytest.mark.parametrize(
    "make",
    [
        lambda: fd.NVE(LJ, dt=2.0, n_steps=15),
        lambda: fd.NVTLangevin(LJ, dt=2.0, temperature=60.0, friction=0.05, n_steps=15),
        lambda: fd.FIRE(LJ, n_steps=15),
    ],
    ids=["NVE", "Langevin", "FIRE"],
)
def test_fix_atoms_and_fix_com_hold_together(make):
    # Applied one after the other (as ASE does), the COM shift moved the fixed atom or putting
    # it back moved the COM (1e-4 to 5e-3 Å over 15 steps). Now the free atoms carry the shift:
    # the fixed atom stays bit for bit and the COM to rounding (1e-12 Å, ~1e4 ulps of 10 Å).
    a = bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 1, 1)
    a.rattle(0.1, seed=3)
    a.set_velocities(np.random.default_rng(3).normal(0, 0.005, (len(a), 3)))
    a.set_constraint([FixAtoms(indices=[5]), FixCom()])
    out = make().run(fd.Batch.from_atoms([a])).to_atoms()[0]
    assert out.info["exit_reason_name"] == "budget"
    m = a.get_masses()[:, None]
    assert np.abs((m * out.positions).sum(0) - (m * a.positions).sum(0)).max() / m.sum() < 1e-12
    assert np.array_equal(out.positions[5], a.positions[5])
    assert np.abs((m * out.get_velocities()).sum(0)).max() < 1e-12 * m.sum()
    assert not np.array_equal(out.positions[0], a.positions[0])  # the free atoms moved
