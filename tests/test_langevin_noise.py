"""The Langevin thermostat's random numbers (``NVTLangevin`` docstring): the stream it
documents, bit for bit; deviates whose distribution is the standard normal and that do not
correlate across components, atoms or steps; a system's deviates independent of its slot, its
padding and its neighbours.

Statistical tolerances: n samples of a standard normal have a sample mean with standard error
1/sqrt(n) and a sample variance with 1/sqrt(n/2); a correlation coefficient of independent
samples has standard error 1/sqrt(n). Each check allows 5 standard errors (a false failure has
probability below 1e-6), and the Kolmogorov-Smirnov test asks p > 1e-3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from jax.extend.random import threefry_2x32
from scipy import stats

import fused_dynamics as fd
from fused_dynamics.stages.langevin import standard_normal

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0)


def _stage(seed=7):
    return fd.NVTLangevin(LJ, dt=2.0, temperature=40.0, friction=0.02, seed=seed)


def _gas(n: int, seed: int) -> Atoms:
    rng = np.random.default_rng(seed)
    return Atoms(f"Ar{n}", positions=rng.uniform(0.0, 30.0, size=(n, 3)))


def _noise(stage, batch, steps):
    return np.asarray(stage._noise(batch, jnp.asarray(steps, jnp.int32)))


def test_the_transform_is_jax_random_normal_in_float32():
    key = jax.random.PRNGKey(3)
    bits = jax.random.bits(key, (4096,), jnp.uint32)
    got = standard_normal(bits)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, jax.random.normal(key, (4096,), jnp.float32))


def test_the_float32_deviates_have_mean_0_and_variance_1_over_all_their_values():
    """Every one of the 2**23 values the transform takes (the top 23 bits), equally likely:
    the exact mean and variance of the deviates (docs/stages/langevin.md: -3.3e-7 and
    1 - 1.1e-7), well within 1e-6 of the standard normal's."""
    bits = jnp.arange(2**23, dtype=jnp.uint32) << jnp.uint32(9)
    z = np.asarray(standard_normal(bits), np.float64)
    assert abs(z.mean()) < 1e-6 and abs(z.var() - 1.0) < 1e-6
    assert -5.5 < z.min() < -5.3 and 5.1 < z.max() < 5.3


def test_the_documented_stream_bit_for_bit():
    """Atom i of system ``sid`` at its step k: the Threefry-2x32 words of the counters (i, 0)
    and (i, 1) under ``fold_in(fold_in(PRNGKey(seed), sid), k)``, the first three made
    normal."""
    stage = _stage(seed=11)
    batch = fd.Batch.from_atoms([_gas(5, 0), _gas(3, 1)], system_ids=[4, 9], dtype=jnp.float64)
    z = _noise(stage, batch, [2, 6])
    for slot, (sid, k) in enumerate(((4, 2), (9, 6))):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(11), sid), k)
        rows = np.flatnonzero(np.asarray(batch.system_idx) == slot)
        for i, row in enumerate(rows):
            c = jnp.asarray([i, i, 0, 1], jnp.uint32)
            want = standard_normal(threefry_2x32(key, c)[:3]).astype(jnp.float64)
            np.testing.assert_array_equal(z[row], np.asarray(want))
    assert z.dtype == np.float64


def test_a_systems_deviates_do_not_depend_on_slot_padding_or_neighbours():
    """The same system (id 5, step 3) alone, and in the third slot after two others with spare
    atom rows and slots: the same deviates, bit for bit."""
    stage = _stage()
    mine = _gas(6, 2)
    alone = fd.Batch.from_atoms([mine], system_ids=[5])
    crowd = fd.Batch.from_atoms(
        [_gas(4, 3), _gas(9, 4), mine],
        system_ids=[1, 2, 5],
        max_atoms=30,
        max_systems=5,
        max_atoms_per_system=12,
    )
    a = _noise(stage, alone, [3])
    b = _noise(stage, crowd, [8, 1, 3, 0, 0])
    rows = np.asarray(crowd.system_idx) == 2
    np.testing.assert_array_equal(b[rows], a[np.asarray(alone.system_idx) == 0])
    assert np.all(b[~np.asarray(crowd.atom_mask)] == 0.0)  # padded rows get no noise


def test_deviates_are_standard_normal_and_uncorrelated():
    """2,000 atoms x 3 components x 20 steps of one system: mean 0, variance 1, normal by a
    Kolmogorov-Smirnov test; no correlation between the components of an atom, between
    neighbouring atoms, or between consecutive steps of an atom."""
    stage = _stage(seed=2)
    batch = fd.Batch.from_atoms([_gas(2000, 5)], dtype=jnp.float64)
    z = np.stack([_noise(stage, batch, [k]) for k in range(20)])  # (steps, atoms, 3)
    x = z.ravel()
    n = x.size
    assert abs(x.mean()) < 5.0 / np.sqrt(n)
    assert abs(x.var() - 1.0) < 5.0 * np.sqrt(2.0 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-3

    def corr(a, b):
        return abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    pairs = [
        (z[..., 0], z[..., 1]),  # words of one counter pair: (i, 0)a and (i, 1)a
        (z[..., 0], z[..., 2]),  # words of one hash: (i, 0)a and (i, 0)b
        (z[:, :-1], z[:, 1:]),  # neighbouring atoms
        (z[:-1], z[1:]),  # consecutive steps
    ]
    for a, b in pairs:
        assert corr(a, b) < 5.0 / np.sqrt(a.size), a.shape
