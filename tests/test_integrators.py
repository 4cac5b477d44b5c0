"""Integrators: NVE against ASE, units, energy conservation, thermostat statistics, masking.

Everything runs in float64 (tests/conftest.py). Long runs are driven inside one jit-compiled
``lax.scan`` over ``FusedStage.step`` so that Python is never called per step.

Statistical checks use fixed seeds (so they are deterministic on one platform), but every
tolerance is chosen so that it is more than 4 standard errors away from the expected value, and
the standard error itself is estimated by block averaging inside the test and asserted to be
small enough: if a platform change moved a chaotic trajectory, the check would still hold.
"""

from __future__ import annotations

import time

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.cluster import Icosahedron
from ase.md.verlet import VelocityVerlet

import fused_dynamics as fd
from fused_dynamics.stages.langevin import NVTLangevin
from fused_dynamics.stages.nose_hoover import NVTNoseHoover

SIGMA, EPSILON = 3.405, 0.0104  # argon, Å and eV
A_FCC = 5.26  # Å, argon fcc lattice constant near the LJ minimum


# ------------------------------------------------------------------------------------ helpers
def argon_fcc(rep: int, rattle: float = 0.02, seed: int = 0) -> ase.Atoms:
    atoms = bulk("Ar", "fcc", a=A_FCC, cubic=True).repeat(rep)
    atoms.rattle(rattle, seed=seed)
    return atoms


def smooth_lj(batch: fd.Batch) -> fd.models.LennardJones:
    """LJ with ASE's C¹ switch between 6.5 and 7.5 Å; with the 3×3×3 argon cell (L = 15.8 Å >
    2 × 7.5 Å) no periodic image shift is needed, so the dense path costs N × A pairs."""
    model = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=7.5, switch_onset=6.5)
    return model.with_images(batch)


def observe(stage, batch: fd.Batch, n_steps: int, every: int | None = None):
    """Run ``stage`` alone for ``n_steps`` steps inside one compiled scan.

    Returns the final batch and, for each step, the per-system temperature, kinetic energy and
    total (or, where the stage gives one, conserved) energy, shape (n_steps, S) each; plus the
    per-atom kinetic energies every ``every`` steps (default: at the end), shape
    (n_steps // every, N).
    """
    every = n_steps if every is None else every
    fused = fd.FusedStage([(0, stage)])

    @jax.jit
    def go(batch):
        batch = fused.init(batch)

        def one(carry, _):
            batch, i = carry
            batch, _ = fused.step(batch, i)
            o = stage.observables(batch, batch.stage_state[0])
            total = o.get("conserved_energy", o["energy"] + o["kinetic_energy"])
            return (batch, i + 1), (o["temperature"], o["kinetic_energy"], total)

        def chunk(carry, _):
            carry, out = jax.lax.scan(one, carry, None, length=every)
            b = carry[0]
            ke_atom = 0.5 * b.masses * jnp.sum(b.velocities**2, axis=-1)
            return carry, (out, ke_atom)

        (batch, _), (out, ke_atom) = jax.lax.scan(
            chunk, (batch, jnp.zeros((), jnp.int32)), None, length=n_steps // every
        )
        out = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
        return batch, out, ke_atom

    batch, (temp, ke, total), ke_atom = go(batch)
    return batch, np.asarray(temp), np.asarray(ke), np.asarray(total), np.asarray(ke_atom)


def block_mean_se(x: np.ndarray, n_blocks: int = 20) -> tuple[float, float]:
    """Mean of a time series and its standard error from ``n_blocks`` block means.

    Blocks are hundreds of steps long, much longer than the correlation times here (a few
    steps), so the block means are independent and their scatter gives an honest error bar.
    """
    x = x[: len(x) // n_blocks * n_blocks].reshape(n_blocks, -1)
    means = x.mean(axis=1)
    return float(means.mean()), float(means.std(ddof=1) / np.sqrt(n_blocks))


def block_var_ratio(ke: np.ndarray, expected: float, n_blocks: int = 20) -> tuple[float, float]:
    """Variance of a kinetic-energy series over ``expected``, with a block standard error."""
    x = ke[: len(ke) // n_blocks * n_blocks].reshape(n_blocks, -1)
    ratios = x.var(axis=1) / expected
    return float(ke.var() / expected), float(ratios.std(ddof=1) / np.sqrt(n_blocks))


def thermal_batch(temperatures, seed: int = 1):
    """One 108-atom argon fcc crystal per temperature, velocities drawn at that temperature."""
    atoms = [argon_fcc(3, seed=i) for i in range(len(temperatures))]
    batch = fd.Batch.from_atoms(atoms)
    t = jnp.asarray(temperatures, batch.dtype)
    return fd.initialize_velocities(batch, t, jax.random.PRNGKey(seed)), t


# ------------------------------------------------------------------------ NVE against ASE
def _ase_systems() -> list[ase.Atoms]:
    rng = np.random.default_rng(0)
    crystal = argon_fcc(2, rattle=0.05, seed=1)  # 32 atoms, cubic cell 10.5 Å < 2 rc: 1 image
    cluster = Icosahedron("Ar", noshells=2, latticeconstant=A_FCC)  # 13 atoms, no pbc
    cluster.rattle(0.05, seed=2)
    cluster.center(vacuum=5.0)
    tric = bulk("Ar", "fcc", a=A_FCC).repeat((2, 2, 2))  # 8 atoms, triclinic, several images
    tric.rattle(0.05, seed=3)
    out = []
    for atoms, t in zip((crystal, cluster, tric), (60.0, 30.0, 90.0), strict=True):
        kt_m = units.kB * t / atoms.get_masses()[:, None]
        atoms.set_velocities(rng.normal(size=(len(atoms), 3)) * np.sqrt(kt_m))
        out.append(atoms)
    return out


def test_nve_matches_ase_velocity_verlet():
    systems = _ase_systems()
    dt, n = 2.0, 200
    # capacity larger than needed on every axis: padding atoms, an empty slot, a larger A
    batch = fd.Batch.from_atoms(systems, max_atoms=70, max_systems=5, max_atoms_per_system=40)
    model = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=8.5).with_images(batch)
    final = fd.FusedStage([(0, fd.NVE(model, dt=dt))]).run(batch, n_steps=n)
    got = final.to_atoms()

    for i, atoms in enumerate(systems):
        ref = atoms.copy()
        ref.calc = AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=8.5)
        VelocityVerlet(ref, timestep=dt * units.fs).run(n)
        # 1e-9 Å: both sides do the same float64 arithmetic up to rounding (ASE propagates
        # momenta, we velocities); 200 steps of 2 fs are too short for the LJ dynamics to
        # amplify 1e-16 differences to 1e-9.
        np.testing.assert_allclose(got[i].positions, ref.positions, rtol=0, atol=1e-9)
        # velocities are ~1e-2 Å·sqrt(eV/amu); the same argument gives 1e-10 of those
        np.testing.assert_allclose(got[i].get_velocities(), ref.get_velocities(), atol=1e-10)
    # padding atoms stay exactly at rest
    pad = ~np.asarray(final.atom_mask)
    assert pad.any()
    assert np.all(np.asarray(final.velocities)[pad] == 0.0)


# --------------------------------------------------------------------------------- units
def _dimer_batch(dts=(1.0,)):
    """One non-periodic LJ dimer per entry of ``dts``, with velocities, plus a padding atom."""
    systems = []
    for k in range(len(dts)):
        atoms = ase.Atoms("Ar2", positions=[[0, 0, 0], [0.3, 0.2, 3.6 + 0.1 * k]])
        atoms.set_velocities([[0.01, -0.02, 0.005], [-0.003, 0.004, -0.01]])
        systems.append(atoms)
    batch = fd.Batch.from_atoms(systems, max_atoms=2 * len(dts) + 1)
    model = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=8.5)
    return systems, batch, model


def _ase_forces(atoms: ase.Atoms, positions: np.ndarray) -> np.ndarray:
    a = atoms.copy()
    a.positions = positions
    a.calc = AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=8.5)
    return a.get_forces()


def _hand_step(atoms, dt_fs, c1=1.0):
    """Velocity Verlet by hand with ASE's units (and an optional velocity damping c1 at mid-step,
    the deterministic part of Langevin's O step at zero temperature)."""
    h = dt_fs * units.fs  # fs -> ASE time
    m = atoms.get_masses()[:, None]
    r, v = atoms.positions, atoms.get_velocities()
    v = v + 0.5 * h * _ase_forces(atoms, r) / m
    r = r + 0.5 * h * v
    v = c1 * v
    r = r + 0.5 * h * v
    v = v + 0.5 * h * _ase_forces(atoms, r) / m
    return r, v


def _one_step(stage, batch):
    return fd.FusedStage([(0, stage)]).run(batch, n_steps=1).to_atoms()


def test_units_nve_one_step():
    systems, batch, model = _dimer_batch()
    got = _one_step(fd.NVE(model, dt=1.5), batch)[0]
    r, v = _hand_step(systems[0], 1.5)
    # 1e-13: one step, rounding only
    np.testing.assert_allclose(got.positions, r, rtol=0, atol=1e-13)
    np.testing.assert_allclose(got.get_velocities(), v, rtol=0, atol=1e-13)


def test_units_langevin_one_step():
    # friction 0: velocity Verlet, whatever the temperature; per-system time steps (S,)
    systems, batch, model = _dimer_batch(dts=(1.0, 2.5))
    stage = NVTLangevin(model, jnp.array([1.0, 2.5]), temperature=300.0, friction=jnp.zeros(2))
    got = _one_step(stage, batch)
    for atoms, out, dt in zip(systems, got, (1.0, 2.5), strict=True):
        r, v = _hand_step(atoms, dt)
        np.testing.assert_allclose(out.positions, r, rtol=0, atol=1e-13)
        np.testing.assert_allclose(out.get_velocities(), v, rtol=0, atol=1e-13)
    # zero temperature: the O step is v <- exp(-γ dt) v with γ in 1/fs and dt in fs; per-system
    # frictions (S,), and (S,) arrays throughout so that the compiled run above is reused
    frictions, dt = (0.02, 0.05), 2.0
    stage = NVTLangevin(model, jnp.array([dt, dt]), temperature=0.0, friction=jnp.array(frictions))
    got = _one_step(stage, batch)
    for atoms, out, friction in zip(systems, got, frictions, strict=True):
        r, v = _hand_step(atoms, dt, c1=np.exp(-friction * dt))
        np.testing.assert_allclose(out.positions, r, rtol=0, atol=1e-13)
        np.testing.assert_allclose(out.get_velocities(), v, rtol=0, atol=1e-13)


def _hand_nose_hoover_step(atoms, dt_fs, temperature, tdamp_fs):
    """One step of a single Nosé–Hoover thermostat by hand, with ASE's units: chain(dt/2),
    kick, drift, kick, chain(dt/2), each chain half one MTK sub-step (no Suzuki–Yoshida)."""
    h = dt_fs * units.fs
    kt = units.kB * temperature
    g = 3 * len(atoms)
    q = g * kt * (tdamp_fs * units.fs) ** 2
    m = atoms.get_masses()[:, None]
    r, v = atoms.positions, atoms.get_velocities()

    def chain(v, eta, ve, d):
        ve = ve + 0.5 * d * (np.sum(m * v**2) - g * kt) / q
        v = v * np.exp(-d * ve)
        eta = eta + d * ve
        ve = ve + 0.5 * d * (np.sum(m * v**2) - g * kt) / q
        return v, eta, ve

    v, eta, ve = chain(v, 0.0, 0.0, 0.5 * h)
    v = v + 0.5 * h * _ase_forces(atoms, r) / m
    r = r + h * v
    v = v + 0.5 * h * _ase_forces(atoms, r) / m
    v, eta, ve = chain(v, eta, ve, 0.5 * h)
    return r, v, eta, ve


def test_units_nose_hoover_one_step():
    systems, batch, model = _dimer_batch()
    kw = dict(chain_length=1, chain_steps=1, sy_order=1)
    stage = NVTNoseHoover(model, dt=2.0, temperature=50.0, tdamp=10.0, **kw)
    final = fd.FusedStage([(0, stage)]).run(batch, n_steps=1)
    got = final.to_atoms()[0]
    r, v, eta, ve = _hand_nose_hoover_step(systems[0], 2.0, 50.0, 10.0)
    assert abs(ve) > 1e-4  # the thermostat acted (the dimer is at ~20 K, not 50 K)
    # 1e-13: one step, rounding only
    np.testing.assert_allclose(got.positions, r, rtol=0, atol=1e-13)
    np.testing.assert_allclose(got.get_velocities(), v, rtol=0, atol=1e-13)
    state = final.stage_state[0]
    np.testing.assert_allclose(float(state["eta"][0, 0]), eta, rtol=1e-12)
    np.testing.assert_allclose(float(state["v_eta"][0, 0]), ve, rtol=1e-12)
    # thermostat masses: Q_1 = 3 N kT τ², Q_k = kT τ² in ASE units
    q = np.asarray(NVTNoseHoover(model, 1.0, 50.0, 25.0).masses(batch))
    kt, tau = units.kB * 50.0, 25.0 * units.fs
    np.testing.assert_allclose(q[0], [6 * kt * tau**2, kt * tau**2, kt * tau**2], rtol=1e-14)


# ------------------------------------------------------------------------- NVE drift
def test_nve_energy_drift_argon():
    batch, _ = thermal_batch([40.0])
    model = smooth_lj(batch)
    n_atoms = 108
    dt, n = 2.0, 5000  # 10 ps
    _, _, _, total, _ = observe(fd.NVE(model, dt=dt), batch, n)
    drift = np.max(np.abs(total[:, 0] - total[0, 0])) / n_atoms
    print(f"NVE max |E(t) - E(0)| over 10 ps: {drift:.2e} eV/atom")
    # 1e-4 eV/atom (the brief's bound); measured ~1e-6 with the C¹-switched LJ
    assert drift < 1e-4


# ---------------------------------------------------------------- thermostat statistics
TEMPS = [40.0, 40.0, 80.0, 80.0]  # two systems per temperature, in one batch
N_ARGON = 108


def _check_thermal(temp, ke, temps, warmup, var_expected_factor, var_tol, label):
    """Mean temperature per system within 2 %; var(KE) / canonical, pooled, within var_tol."""
    temp, ke = temp[warmup:], ke[warmup:]
    ratios = []
    for s, t0 in enumerate(temps):
        mean, se = block_mean_se(temp[:, s])
        print(f"{label} system {s}: target {t0} K, mean {mean:.3f} K (se {se:.3f} K)")
        # the 2 % tolerance is more than 4 standard errors: se < 0.5 % of the target
        assert se < 0.005 * t0
        assert abs(mean - t0) < 0.02 * t0
        # canonical: var(KE) = (3N/2) (kT)², each system at its own temperature
        expected = 1.5 * N_ARGON * (units.kB * t0) ** 2 * var_expected_factor
        ratios.append(block_var_ratio(ke[:, s], expected))
        print(f"{label} system {s}: var(KE) / canonical = {ratios[-1][0]:.3f}")
    # The ratio is dimensionless with the same expected value for every system: pool them
    # (independent trajectories), which halves the error bar of a single system.
    ratio = float(np.mean([r for r, _ in ratios]))
    se = float(np.sqrt(np.sum([e**2 for _, e in ratios])) / len(ratios))
    print(f"{label} pooled var(KE) / canonical = {ratio:.3f} (se {se:.3f})")
    assert se < var_tol / 4  # the tolerance is more than 4 standard errors
    assert abs(ratio - 1.0) < var_tol


@pytest.mark.slow
def test_langevin_canonical_two_temperatures():
    from scipy import stats

    batch, t = thermal_batch(TEMPS)
    model = smooth_lj(batch)
    # γ = 0.05/fs: velocities decorrelate in 1/γ = 20 fs = 5 steps, so 5000 steps give ~1000
    # independent temperature samples per system; σ_T / T = sqrt(2 / 3N) = 7.9 % per sample.
    stage = NVTLangevin(model, dt=4.0, temperature=t, friction=0.05, seed=3)
    start = time.perf_counter()
    final, temp, ke, _, ke_atom = observe(stage, batch, 5000, every=25)
    print(f"Langevin 5000 steps of 4 x 108 atoms: {time.perf_counter() - start:.1f} s")
    # BAOAB samples every momentum degree of freedom (the noise does not conserve the total
    # momentum), so var(KE) = (3N/2)(kT)² exactly, up to O(dt²) (~0.1 % here). Tolerance 10 %:
    # the pooled block standard error is ~1.8 %.
    _check_thermal(temp, ke, TEMPS, 1000, 1.0, 0.10, "Langevin")
    # Per-atom kinetic energies are independent Gamma(3/2, kT) in the canonical ensemble.
    # Samples 25 steps (100 fs = 5/γ) apart are independent: 160 frames x 432 atoms.
    kt_atom = np.repeat(units.kB * np.asarray(TEMPS), N_ARGON)
    x = (ke_atom[40:] / kt_atom).ravel()
    ks = stats.kstest(x, "gamma", args=(1.5, 0.0, 1.0))
    print(f"Langevin per-atom KE vs Gamma(3/2, kT): KS D = {ks.statistic:.4f}, p = {ks.pvalue:.3f}")
    # p > 1e-3: a false failure has probability 1e-3 for an exact sampler; a 1 % error in the
    # temperature would already give D ~ 0.004 and p < 1e-3 at this sample size.
    assert ks.pvalue > 1e-3
    assert np.all(np.isfinite(np.asarray(final.positions)))


@pytest.mark.slow
def test_nose_hoover_canonical_two_temperatures():
    batch, t = thermal_batch(TEMPS)
    model = smooth_lj(batch)
    stage = NVTNoseHoover(model, dt=4.0, temperature=t, tdamp=50.0, chain_length=3)
    start = time.perf_counter()
    _, temp, ke, conserved, _ = observe(stage, batch, 10000)
    print(f"Nose-Hoover 10000 steps of 4 x 108 atoms: {time.perf_counter() - start:.1f} s")
    # The velocities start with zero total momentum, which the chain (a uniform scaling) keeps,
    # so f = 3N - 3 momenta fluctuate while the chain drives 2 <KE> to g kT with g = 3N: the
    # mean temperature (3N convention) is exact and var(KE) = g² (kT)² / (2 f), a factor
    # g / f = 1.009 above (3N/2)(kT)². Tolerance 15 % (pooled block se ~2.5-3 %).
    _check_thermal(temp, ke, TEMPS, 2000, 3 * N_ARGON / (3 * N_ARGON - 3), 0.15, "NHC")
    drift = np.max(np.abs(conserved - conserved[0]), axis=0) / N_ARGON
    print(f"NHC conserved-energy drift over 40 ps: {drift} eV/atom")
    # measured ~3e-6 (40 K) and ~6e-6 eV/atom (80 K); bound 2e-5 eV/atom
    assert np.all(drift < 2e-5)


def test_nose_hoover_single_thermostat():
    temps = [40.0, 80.0]
    batch, t = thermal_batch(temps, seed=4)
    model = smooth_lj(batch)
    stage = NVTNoseHoover(model, dt=4.0, temperature=t, tdamp=50.0, chain_length=1)
    _, temp, _, conserved, _ = observe(stage, batch, 4000)
    state = stage.init_state(batch)
    assert state["eta"].shape == (2, 1)
    for s, t0 in enumerate(temps):
        # plain Nosé–Hoover drives the time average of 2 KE to g kT exactly (dv_1/dt averages
        # to zero); 2 % after a 4 ps warm-up, more than 4 block standard errors
        mean, se = block_mean_se(temp[1000:, s])
        print(f"NH (chain 1) system {s}: target {t0} K, mean {mean:.3f} K (se {se:.3f} K)")
        assert se < 0.005 * t0
        assert abs(mean - t0) < 0.02 * t0
    drift = np.max(np.abs(conserved - conserved[0]), axis=0) / N_ARGON
    print(f"NH (chain 1) conserved-energy drift over 16 ps: {drift} eV/atom")
    assert np.all(drift < 2e-5)


# -------------------------------------------------------------------------------- masking
def _small_batch(system_ids=(3, 5, 7)):
    """Small argon systems of different sizes in a padded batch (2 spare atoms, 1 empty slot).

    Every batch with three systems has the same shapes, so the tests below share compilations.
    """
    systems = {
        3: argon_fcc(1, rattle=0.1, seed=10),  # 4 atoms, periodic
        5: Icosahedron("Ar", noshells=2, latticeconstant=A_FCC),  # 13 atoms, no pbc
        7: argon_fcc(1, rattle=0.1, seed=12).repeat((2, 1, 1)),  # 8 atoms, periodic
    }
    systems[5].rattle(0.05, seed=11)
    systems[5].center(vacuum=4.0)
    atoms = [systems[i] for i in system_ids]
    n = sum(len(a) for a in atoms)
    batch = fd.Batch.from_atoms(
        atoms,
        max_atoms=n + 2,
        max_systems=len(atoms) + 1,
        max_atoms_per_system=16,
        system_ids=system_ids,
    )
    batch = fd.initialize_velocities(batch, 60.0, jax.random.PRNGKey(0))
    # cutoff 6 Å < 1.5 × 5.26 Å: one image shift along each periodic direction suffices
    model = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=6.0, images=(1, 1, 1))
    return batch, model


STAGES = {
    "langevin": lambda m: NVTLangevin(m, dt=2.0, temperature=60.0, friction=0.01, seed=5),
    "nose_hoover": lambda m: NVTNoseHoover(m, dt=2.0, temperature=60.0, tdamp=40.0),
    "nose_hoover_1": lambda m: NVTNoseHoover(
        m, dt=2.0, temperature=60.0, tdamp=40.0, chain_length=1
    ),
}


def _system_leaves(tree, s):
    return [np.asarray(x)[s] for x in jax.tree_util.tree_leaves(tree)]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_masked_systems_untouched(name):
    batch, model = _small_batch()
    stage = STAGES[name](model)
    fused = fd.FusedStage([(0, stage)])
    # a few steps first, so that the stage state (counters, chains) is not all zeros
    batch = fused.run(batch, n_steps=5)
    state = batch.stage_state[0]
    mask = jnp.array([True, False, True, False])

    @jax.jit
    def masked_step(batch, state):
        batch, state = stage.pre_update(batch, state, mask)
        return stage.post_update(fused.evaluate(batch), state, mask)

    new, new_state = masked_step(batch, state)
    in_1 = np.asarray(batch.system_idx) == 1
    pad = ~np.asarray(batch.atom_mask)
    for field in ("positions", "velocities"):
        before, after = np.asarray(getattr(batch, field)), np.asarray(getattr(new, field))
        # bit-identical outside the mask: the base class selects with where, no arithmetic
        assert np.array_equal(before[in_1], after[in_1])
        assert np.array_equal(before[pad], after[pad])
        assert not np.any(np.all(before == after, axis=-1)[~in_1 & ~pad])  # the others moved
    assert np.all(np.asarray(new.velocities)[pad] == 0.0)
    assert _same(_system_leaves(state, 1), _system_leaves(new_state, 1))
    assert not _same(_system_leaves(state, 0), _system_leaves(new_state, 0))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_trajectory_independent_of_slot_and_neighbours(name):
    n = 50
    alone, model = _small_batch(system_ids=(7,))
    shared, _ = _small_batch(system_ids=(3, 5, 7))
    out_a = fd.FusedStage([(0, STAGES[name](model))]).run(alone, n_steps=n).to_atoms()[0]
    out_b = fd.FusedStage([(0, STAGES[name](model))]).run(shared, n_steps=n).to_atoms()[2]
    assert out_a.info["system_id"] == out_b.info["system_id"] == 7
    # The random numbers are keyed by system id, the system's own step counter and the atom's
    # index inside its system, so the noise is the same; the forces are the same sums over the
    # same pairs, but in batches of different shapes, where XLA may group reductions
    # differently, so we only ask for agreement to rounding (a few ulp per step over 50 steps):
    # 1e-12. (On XLA:CPU today the two are in fact bitwise identical.)
    np.testing.assert_allclose(out_a.positions, out_b.positions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out_a.get_velocities(), out_b.get_velocities(), rtol=0, atol=1e-12)
    assert not np.allclose(out_a.positions, alone.to_atoms()[0].positions)


def test_langevin_noise_depends_on_seed_and_a_new_seed_does_not_recompile():
    from fused_dynamics import loop

    batch, model = _small_batch()
    outs, sizes = [], []
    for seed in (0, 0, 1):
        fused = fd.FusedStage([(0, NVTLangevin(model, 2.0, 60.0, 0.05, seed=seed))])
        outs.append(fused.run(batch, n_steps=3).velocities)
        sizes.append(loop.compiled_loop(fused).cache_size())
    assert np.array_equal(outs[0], outs[1])  # deterministic
    assert not np.allclose(outs[0], outs[2])  # the seed matters
    # the seed is a traced leaf (validation.seed_leaf): seed 1 runs the program seed 0 compiled
    assert sizes[2] == sizes[0]


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**31, 2**32 - 1])
def test_a_seed_kept_as_an_array_keys_the_same_stream_as_the_int(seed):
    # the stream of every seed a user ran before seeds became arrays is unchanged, bit for bit
    stage = NVTLangevin(_small_batch()[1], 2.0, 60.0, 0.05, seed=seed)
    assert stage.seed.dtype == np.uint32 and stage.seed.shape == ()
    hook = fd.ThermalizeOnEntryHook(code=1, temperature=50.0, seed=seed)
    for kept in (stage.seed, hook.seed):
        np.testing.assert_array_equal(jax.random.PRNGKey(kept), jax.random.PRNGKey(seed))


@pytest.mark.slow
def test_fused_thermostats_and_gradient():
    # All thermostats as sub-stages of one fused stage, one system in each (set by status), and a
    # gradient through three steps: friction 0 (sqrt(0) in the O step), chains of length 3 and
    # 1, empty slots and padding all stay differentiable.
    batch, model = _small_batch(system_ids=(3, 5, 7, 3))
    stay = fd.ConvergenceHook.from_fmax(-1.0)  # never holds: no migration between sub-stages
    fused = fd.FusedStage(
        [
            (0, NVTLangevin(model, 2.0, 60.0, friction=0.01, convergence_hook=stay)),
            (1, NVTLangevin(model, 2.0, 60.0, friction=0.0, convergence_hook=stay)),
            (2, NVTNoseHoover(model, 2.0, 60.0, 40.0, convergence_hook=stay)),
            (3, NVTNoseHoover(model, 2.0, 60.0, 40.0, chain_length=1)),
        ]
    )

    def final_energy(positions):
        b = fused.init(batch.replace(positions=positions))
        b = b.replace(status=jnp.array([0, 1, 2, 3, 4], jnp.int32))
        b, _ = jax.lax.scan(lambda b, i: (fused.step(b, i)[0], None), b, jnp.arange(3))
        return jnp.sum(b.energy + fd.kinetic_energy(b)), b

    g, b = jax.jit(jax.grad(final_energy, has_aux=True))(batch.positions)
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.any(np.asarray(g) != 0.0)
    # each sub-stage advanced only its own system
    assert np.asarray(b.stage_state[0]["step"]).tolist() == [3, 0, 0, 0, 0]
    assert np.asarray(b.stage_state[1]["step"]).tolist() == [0, 3, 0, 0, 0]
    eta = np.asarray(b.stage_state[2]["eta"])
    assert np.all(eta[2] != 0.0) and np.all(np.delete(eta, 2, axis=0) == 0.0)
