"""Per-system observables against ASE, and Maxwell-Boltzmann initial velocities."""

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units

import fused_dynamics as fd
from fused_dynamics import observables as obs

# Kinetic energy and temperature are the same sums as ASE's in a different order (ASE forms
# 0.5 p.v from stored momenta): rounding only, ~1e-16 relative; 1e-12 leaves a wide margin while
# any missing or extra atom (>= 1 / 64 of the sum here) fails.
RTOL = 1e-12


def systems():
    rng = np.random.default_rng(0)
    out = [
        ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 1)),
        ase.build.bulk("NaCl", "rocksalt", a=5.6, cubic=True),
        ase.build.molecule("CH3CH2OH"),
        ase.build.bulk("Ar", "fcc", a=5.3),  # one atom
    ]
    out[2].center(vacuum=3.0)
    for atoms in out:
        atoms.set_velocities(rng.normal(scale=0.02, size=(len(atoms), 3)))
    return out


def padded(atoms_list, **kw):
    n = sum(len(a) for a in atoms_list)
    kw = {"max_atoms": n + 6, "max_systems": len(atoms_list) + 2, **kw}
    return fd.Batch.from_atoms(atoms_list, **kw)


def garbage_in_padding(batch):
    """Fill padding atoms with huge velocities and masses: they must never count."""
    pad = ~batch.atom_mask
    return batch.replace(
        velocities=jnp.where(pad[:, None], 1e3, batch.velocities),
        masses=jnp.where(pad, 1e3, batch.masses),
        forces=jnp.where(pad[:, None], 1e3, batch.forces),
    )


def test_kinetic_energy_and_temperature_match_ase():
    atoms_list = systems()
    batch = garbage_in_padding(padded(atoms_list))
    ke, t = obs.kinetic_energy(batch), obs.temperature(batch)
    k = len(atoms_list)
    np.testing.assert_allclose(ke[:k], [a.get_kinetic_energy() for a in atoms_list], rtol=RTOL)
    np.testing.assert_allclose(t[:k], [a.get_temperature() for a in atoms_list], rtol=RTOL)
    np.testing.assert_array_equal(ke[k:], 0.0)
    np.testing.assert_array_equal(t[k:], 0.0)
    np.testing.assert_array_equal(
        obs.degrees_of_freedom(batch), [3.0 * len(a) for a in atoms_list] + [0.0, 0.0]
    )
    assert fd.kinetic_energy is obs.kinetic_energy and fd.temperature is obs.temperature


def test_fmax_ignores_padding():
    atoms_list = systems()
    batch = padded(atoms_list)
    forces = np.random.default_rng(1).normal(size=(batch.max_atoms, 3))
    batch = garbage_in_padding(batch.replace(forces=jnp.asarray(forces)))
    norms = np.linalg.norm(forces, axis=1)
    idx = np.asarray(batch.system_idx)
    expected = [norms[idx == s].max() for s in range(len(atoms_list))] + [0.0, 0.0]
    np.testing.assert_array_equal(obs.fmax(batch), expected)  # a max: exact
    np.testing.assert_array_equal(
        obs.fmax(batch, jnp.asarray(2 * forces)), 2 * np.asarray(expected)
    )


def test_pressure_is_virial_plus_ideal_gas():
    atoms_list = systems()[:3]
    batch = garbage_in_padding(padded(atoms_list))
    stress = np.random.default_rng(2).normal(scale=1e-3, size=(batch.max_systems, 3, 3))
    stress = jnp.asarray(stress + np.swapaxes(stress, 1, 2))
    # No stress: an ideal gas, P V = N kB T exactly (with ASE's 3N degrees of freedom).
    p0 = obs.pressure(batch.replace(stress=jnp.zeros_like(stress)))
    for s, atoms in enumerate(atoms_list):
        expected = len(atoms) * units.kB * atoms.get_temperature() / atoms.get_volume()
        np.testing.assert_allclose(p0[s], expected, rtol=RTOL)
    p = obs.pressure(batch.replace(stress=stress))
    p_static = obs.pressure(batch.replace(stress=stress), include_kinetic=False)
    np.testing.assert_allclose(p_static[:3], -np.trace(stress[:3], axis1=1, axis2=2) / 3, rtol=RTOL)
    np.testing.assert_allclose(p[:3], p_static[:3] + p0[:3], rtol=RTOL)
    np.testing.assert_array_equal(p[3:], 0.0)


# ---------------------------------------------------------------------------- initial velocities
def test_initialize_velocities_momentum_and_exact_temperature():
    atoms_list = systems()
    batch = garbage_in_padding(padded(atoms_list))
    targets = jnp.asarray([300.0, 50.0, 1200.0, 10.0, 77.0, 5.0])  # one per slot, empties too
    new = fd.initialize_velocities(batch, targets, jax.random.key(0))
    v = np.asarray(new.velocities)
    m = np.asarray(new.masses)
    idx = np.asarray(new.system_idx)
    for s, atoms in enumerate(atoms_list[:3]):
        sel = idx == s
        momentum = (m[sel, None] * v[sel]).sum(axis=0)
        scale = (m[sel, None] * np.abs(v[sel])).sum()  # what rounding is relative to
        assert np.all(np.abs(momentum) <= 1e-13 * scale), momentum
        # Rescaled to the target exactly, up to rounding of one square root and a few sums.
        ref = atoms.copy()
        ref.set_velocities(v[sel])
        np.testing.assert_allclose(ref.get_temperature(), targets[s], rtol=RTOL)
        np.testing.assert_allclose(obs.temperature(new)[s], targets[s], rtol=RTOL)
    # One atom and zero total momentum leave no thermal motion: its velocity is zero.
    np.testing.assert_array_equal(v[idx == 3], 0.0)
    np.testing.assert_array_equal(v[idx == batch.max_systems], 0.0)  # padding
    np.testing.assert_array_equal(obs.temperature(new)[4:], 0.0)  # empty slots


def test_initialize_velocities_do_not_depend_on_the_slot():
    a, b, c, _ = systems()
    key = jax.random.key(42)
    first = fd.Batch.from_atoms([a, b, c], system_ids=[10, 11, 12])
    # Same systems and ids, other slots, other order, other capacities, other neighbours.
    second = fd.Batch.from_atoms(
        [c, ase.build.molecule("H2O"), a, b],
        max_atoms=60,
        max_systems=6,
        max_atoms_per_system=40,
        system_ids=[12, 99, 10, 11],
    )
    t1 = jnp.asarray([300.0, 500.0, 700.0])
    t2 = jnp.asarray([700.0, 1.0, 300.0, 500.0, 0.0, 0.0])
    v1 = np.asarray(fd.initialize_velocities(first, t1, key).velocities)
    v2 = np.asarray(fd.initialize_velocities(second, t2, key).velocities)
    i1, i2 = np.asarray(first.system_idx), np.asarray(second.system_idx)
    # Same draws; the per-system sums (momentum, kinetic energy) add the same numbers in the
    # same order, only the reduction's layout differs: equal to rounding (1e-13 relative).
    for s1, s2 in [(0, 2), (1, 3), (2, 0)]:
        np.testing.assert_allclose(v2[i2 == s2], v1[i1 == s1], rtol=1e-13, atol=0)
    other = np.asarray(fd.initialize_velocities(first, t1, jax.random.key(43)).velocities)
    assert np.all(other != v1)


def test_initialize_velocities_scalar_temperature_under_jit():
    batch = padded(systems()[:3])
    eager = fd.initialize_velocities(batch, 250.0, jax.random.key(1))
    jitted = jax.jit(fd.initialize_velocities)(batch, 250.0, jax.random.key(1))
    np.testing.assert_allclose(jitted.velocities, eager.velocities, rtol=1e-13, atol=0)
    np.testing.assert_allclose(obs.temperature(jitted)[:3], 250.0, rtol=RTOL)


def test_maxwell_boltzmann_statistics():
    # Without rescaling or momentum removal every component is N(0, kB T / m). Two species of
    # very different mass: each must show <m v_x^2> = kB T. With n samples of m v^2 / kB T
    # (chi-square, variance 2) the mean has standard deviation sqrt(2 / n); 5 sigma bounds a
    # wrong mass scaling (a factor 29 between the species here) by a huge margin, and with a
    # fixed key the outcome is deterministic.
    crystal = ase.build.bulk("LiI", "rocksalt", a=6.0, cubic=True).repeat(3)  # 216 atoms
    batch = fd.Batch.from_atoms([crystal, crystal], max_systems=3)
    t = jnp.asarray([300.0, 900.0, 0.0])
    new = fd.initialize_velocities(batch, t, jax.random.key(7), remove_com=False, rescale=False)
    v = np.asarray(new.velocities)
    idx = np.asarray(new.system_idx)
    z = np.asarray(new.atomic_numbers)
    for s in range(2):
        for number in (3, 53):
            sel = (idx == s) & (z == number)
            x = np.asarray(new.masses)[sel, None] * v[sel] ** 2 / (units.kB * float(t[s]))
            assert abs(x.mean() - 1.0) <= 5 * np.sqrt(2.0 / x.size), (s, number, x.mean())
    # Component-wise and system-wise independent draws (no two identical numbers).
    assert len(np.unique(v[idx < 2])) == v[idx < 2].size


@pytest.mark.parametrize("remove_com", [True, False])
def test_rescale_false_keeps_drawn_scale(remove_com):
    batch = padded(systems()[:2])
    kw = {"remove_com": remove_com}
    a = fd.initialize_velocities(batch, 100.0, jax.random.key(3), rescale=False, **kw)
    b = fd.initialize_velocities(batch, 400.0, jax.random.key(3), rescale=False, **kw)
    # The draw scales as sqrt(T): four times the temperature, twice the velocities.
    np.testing.assert_allclose(b.velocities, 2.0 * a.velocities, rtol=1e-14, atol=1e-300)
