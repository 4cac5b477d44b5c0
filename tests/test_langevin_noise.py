"""The Langevin thermostat's random numbers (``NVTLangevin`` docstring): the stream it
documents, bit for bit, whatever ``jax_default_prng_impl`` says; deviates whose distribution is
the standard normal and that do not correlate across components, atoms or steps; a system's
deviates independent of its slot, its padding and its neighbours.

Statistical tolerances: n samples of a standard normal have a sample mean with standard error
1/sqrt(n) and a sample variance with 1/sqrt(n/2); a correlation coefficient of independent
samples has standard error 1/sqrt(n). Each check allows 5 standard errors (a false failure has
probability below 1e-6), and the Kolmogorov-Smirnov test asks p > 1e-3. The table the deviates
come from is checked exactly, over all its 2^16 values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from jax.extend.random import threefry_2x32
from scipy import stats

import fused_dynamics as fd
from fused_dynamics.stages.langevin import NOISE_TAG, normal_table

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0)


def _stage(seed=7):
    return fd.NVTLangevin(LJ, dt=2.0, temperature=40.0, friction=0.02, seed=seed)


def _gas(n: int, seed: int) -> Atoms:
    rng = np.random.default_rng(seed)
    return Atoms(f"Ar{n}", positions=rng.uniform(0.0, 30.0, size=(n, 3)))


def _noise(stage, batch, steps):
    return np.asarray(stage._noise(batch, jnp.asarray(steps, jnp.int32)))


def _documented(seed, sid, k, i):
    """Atom ``i``'s three deviates: the two words of the Threefry-2x32 block at counter
    (i, 0) under the key of system ``sid`` at its step ``k`` and the noise's tag, cut into
    16-bit indices into the table (``threefry_2x32`` pairs the count's halves: the block of
    (i, 0), words at 0 and 1)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), sid), k)
    key = jax.random.fold_in(key, 0x4C414E47)  # "LANG", NOISE_TAG
    k1, k2 = (jnp.uint32(w) for w in np.asarray(jax.random.key_data(key)))
    w1, w2 = (int(w) for w in np.asarray(threefry_2x32((k1, k2), jnp.asarray([i, 0], jnp.uint32))))
    return normal_table()[[w1 >> 16, w1 & 0xFFFF, w2 >> 16]].astype(np.float64)


def test_the_documented_stream_bit_for_bit():
    """Atom i of system ``sid`` at its step k (``NVTLangevin`` docstring): table entries picked
    by the documented Threefry words, bit for bit, the same in float64 and float32 batches,
    also when JAX's default generator is not Threefry (the stage asks for Threefry keys)."""
    stage = _stage(seed=11)
    systems = [_gas(5, 0), _gas(3, 1)]
    batch = fd.Batch.from_atoms(systems, system_ids=[4, 9], dtype=jnp.float64)
    z = _noise(stage, batch, [2, 6])
    assert z.dtype == np.float64
    before = jax.config.jax_default_prng_impl
    try:
        jax.config.update("jax_default_prng_impl", "rbg")
        z_rbg = _noise(stage, batch, [2, 6])
    finally:
        jax.config.update("jax_default_prng_impl", before)
    np.testing.assert_array_equal(z_rbg, z)
    single = fd.Batch.from_atoms(systems, system_ids=[4, 9], dtype=jnp.float32)
    z32 = _noise(stage, single, [2, 6])
    assert z32.dtype == np.float32
    np.testing.assert_array_equal(z32.astype(np.float64), z)
    for slot, (sid, k) in enumerate(((4, 2), (9, 6))):
        rows = np.flatnonzero(np.asarray(batch.system_idx) == slot)
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(z[row], _documented(11, sid, k, i))


def test_the_table_is_the_normal_distribution_in_equally_likely_bins():
    """All 2^16 entries (each as likely under uniform words): the exact distribution of the
    deviates. Entry k lies in its quantile bin [inv_cdf(k/n), inv_cdf((k+1)/n)] (the construction;
    an entry from another bin or a shifted index fails); odd and increasing; mean 0; variance
    within 1e-6 of 1 (float32 rounding of the entries is 1e-7 relative); fourth moment within
    5e-4 of 3 (the cut tails take 1.7e-4 of it); largest 4.39 (the conditional mean of the last
    bin, above Phi^-1(1 - 2^-16) = 4.17)."""
    from statistics import NormalDist

    table = normal_table().astype(np.float64)
    n = table.size
    assert n == 2**16 and normal_table().dtype == np.float32
    inner = [NormalDist().inv_cdf(k / n) for k in range(1, n)]
    lower, upper = np.array([-np.inf, *inner]), np.array([*inner, np.inf])
    assert np.all((lower <= table) & (table <= upper))
    np.testing.assert_array_equal(table, -table[::-1])
    assert np.all(np.diff(table) > 0)
    assert abs(table.mean()) < 1e-12
    assert abs(table.var() - 1.0) < 1e-6
    assert abs(np.mean(table**4) - 3.0) < 5e-4
    assert 4.3 < table.max() < 4.5


def test_the_noise_does_not_repeat_the_initial_velocities_of_the_same_seed():
    """``initialize_velocities(batch, T, PRNGKey(seed))`` draws atom k of system ``sid`` under
    ``fold_in(fold_in(PRNGKey(seed), sid), k)``, the key of that system's step k: without the
    noise's tag, atom 0's x deviate at step k was atom k's x velocity deviate to within a
    table bin (correlation 1). One system of 400 atoms, seed 0: the x deviates of atom 0 over
    steps 0..399 against the scaled x velocities of atoms 0..399 (no momentum removal or
    rescaling): |correlation| below 5 standard errors, 5 / sqrt(400)."""
    assert NOISE_TAG == 0x4C414E47
    n = 400
    batch = fd.Batch.from_atoms([_gas(n, 6)], system_ids=[4], dtype=jnp.float64)
    v = fd.initialize_velocities(
        batch, 40.0, jax.random.PRNGKey(0), remove_com=False, rescale=False
    )
    vx = np.asarray(v.velocities)[:, 0]
    stage = _stage(seed=0)
    draw = jax.jit(lambda b, k: stage._noise(b, k))
    zx = np.array([np.asarray(draw(batch, jnp.asarray([k], jnp.int32)))[0, 0] for k in range(n)])
    assert abs(np.corrcoef(vx, zx)[0, 1]) < 5.0 / np.sqrt(n)


def test_a_systems_deviates_do_not_depend_on_slot_padding_or_neighbours():
    """The same system (id 5, step 3) alone, and in the third slot after two others with spare
    atom rows and slots, eagerly and compiled: the same deviates, bit for bit."""
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
    rows = np.asarray(crowd.system_idx) == 2
    for draw in (stage._noise, jax.jit(lambda b, k: stage._noise(b, k))):
        b = np.asarray(draw(crowd, jnp.asarray([8, 1, 3, 0, 0], jnp.int32)))
        np.testing.assert_array_equal(b[rows], a[np.asarray(alone.system_idx) == 0])
        assert np.all(b[~np.asarray(crowd.atom_mask)] == 0.0)  # padded rows get no noise


def test_deviates_are_standard_normal_and_uncorrelated():
    """2,000 atoms x 3 components x 20 steps of one system: mean 0, variance 1, normal by a
    Kolmogorov-Smirnov test; no correlation between the components of an atom, between
    neighbouring atoms, or between consecutive steps of an atom."""
    stage = _stage(seed=2)
    batch = fd.Batch.from_atoms([_gas(2000, 5)], dtype=jnp.float64)
    draw = jax.jit(lambda b, k: stage._noise(b, k))
    z = np.stack([np.asarray(draw(batch, jnp.asarray([k], jnp.int32))) for k in range(20)])
    x = z.ravel()
    n = x.size
    assert abs(x.mean()) < 5.0 / np.sqrt(n)
    assert abs(x.var() - 1.0) < 5.0 * np.sqrt(2.0 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-3

    def corr(a, b):
        return abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    pairs = [
        (z[..., 0], z[..., 1]),  # components of one atom
        (z[..., 0], z[..., 2]),
        (z[:, :-1], z[:, 1:]),  # neighbouring atoms
        (z[:-1], z[1:]),  # consecutive steps
    ]
    for a, b in pairs:
        assert corr(a, b) < 5.0 / np.sqrt(a.size), a.shape
