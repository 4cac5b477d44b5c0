"""The elementwise 3x3 determinant and inverse (fused_dynamics/linalg3.py) against NumPy's LU
(float64): relative agreement to 1e-13 on simulation cells (cubic, triclinic, slab cells with a
long vacuum axis, clusters' completed cells) and random well-conditioned matrices, the same
derivative as ``jnp.linalg.det``, and NaN/inf for a singular matrix, never a finite number."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ase.build import bulk, fcc111

from fused_dynamics.linalg3 import det3, inv3

jax.config.update("jax_enable_x64", True)


def _cells():
    rng = np.random.default_rng(3)
    cells = [
        bulk("Ar", "fcc", a=5.26, cubic=True).cell.array * 4,
        bulk("Ar", "fcc", a=5.26).cell.array,  # primitive: triclinic
        fcc111("Cu", size=(3, 3, 4), vacuum=12.0).cell.array,  # hexagonal slab, long z
        np.diag([1.0, 1.0, 40.0]),  # a cluster's completed cell (unit rows, one given)
    ]
    cells += list(rng.normal(size=(200, 3, 3)) + 4.0 * np.eye(3))
    return np.stack(cells)


def test_equal_numpys_lu_to_rounding():
    # float64; the cofactor formulas and LU round differently: 1e-13 of the largest entry
    cells = _cells()
    want_inv, want_det = np.linalg.inv(cells), np.linalg.det(cells)
    got_inv, got_det = np.asarray(inv3(cells)), np.asarray(det3(cells))
    scale = np.abs(want_inv).max(axis=(-2, -1), keepdims=True)
    assert np.all(np.abs(got_inv - want_inv) <= 1e-13 * scale)
    assert np.all(np.abs(got_det - want_det) <= 1e-13 * np.abs(want_det))
    # and it is an inverse
    eye = np.einsum("nij,njk->nik", cells, got_inv)
    np.testing.assert_allclose(eye, np.broadcast_to(np.eye(3), eye.shape), atol=1e-13)


def test_derivative_of_the_determinant_is_jnps():
    cells = _cells()
    got = jax.grad(lambda c: jnp.sum(det3(c)))(jnp.asarray(cells))
    want = jax.grad(lambda c: jnp.sum(jnp.linalg.det(c)))(jnp.asarray(cells))
    scale = np.abs(np.asarray(want)).max(axis=(-2, -1), keepdims=True)
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= 1e-12 * scale)


def test_a_singular_matrix_is_never_a_finite_inverse():
    singular = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]])
    assert det3(singular) == 0.0
    assert not np.all(np.isfinite(np.asarray(inv3(singular))))
