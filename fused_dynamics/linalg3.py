"""3x3 matrix algebra written out elementwise: determinants, inverses, vector-matrix products.

``jnp.linalg.inv`` and ``jnp.linalg.det`` of a stack of cells (S, 3, 3) go through a batched
LU factorisation: on XLA:CPU a LAPACK call plus a loop that applies the row pivots, traced again
at every place a fused step needs the inverse (fractional coordinates, image ranges, volumes,
in the forward and derivative passes). Each of those adds its own loop to the compiled program.
For 3x3 matrices the cofactor formulas are a few dozen multiplications, as accurate for the
well-conditioned matrices of simulation cells (a singular periodic cell is refused when a batch
is built), and fuse with the arithmetic around them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["det3", "inv3", "matvec3", "plane_spacing"]


def _cofactors(m: jax.Array) -> jax.Array:
    """The cofactor matrix ``C`` of ``m`` (..., 3, 3): ``inv(m) = C.T / det(m)``."""
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    rows = (
        (e * i - f * h, f * g - d * i, d * h - e * g),
        (c * h - b * i, a * i - c * g, b * g - a * h),
        (b * f - c * e, c * d - a * f, a * e - b * d),
    )
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def det3(m: jax.Array) -> jax.Array:
    """Determinants of 3x3 matrices ``m`` (..., 3, 3), shape (...,): the rule of Sarrus."""
    return _expand(m, _cofactors(m))


def _expand(m: jax.Array, c: jax.Array) -> jax.Array:
    """``det(m)`` by expansion along the first row, from its cofactors ``c``."""
    return m[..., 0, 0] * c[..., 0, 0] + m[..., 0, 1] * c[..., 0, 1] + m[..., 0, 2] * c[..., 0, 2]


def inv3(m: jax.Array) -> jax.Array:
    """Inverses of 3x3 matrices ``m`` (..., 3, 3) by cofactors, shape (..., 3, 3).

    A singular matrix gives inf or NaN entries (as ``jnp.linalg.inv`` gives inf or NaN).
    """
    c = _cofactors(m)
    return jnp.swapaxes(c, -1, -2) / _expand(m, c)[..., None, None]


def matvec3(x: jax.Array, m: jax.Array) -> jax.Array:
    """``x @ m`` for 3-vectors ``x`` (..., 3) and 3x3 matrices ``m`` (..., 3, 3), elementwise.

    Broadcasts like the operands. As a batched ``dot_general`` (``jnp.einsum("nk,nkl->nl")``
    over atoms or pairs) XLA:CPU sends it to a library as one tiny matrix product per row,
    several times slower than these three fused multiply-adds.
    """
    return x[..., 0:1] * m[..., 0, :] + x[..., 1:2] * m[..., 1, :] + x[..., 2:3] * m[..., 2, :]


def plane_spacing(cell: jax.Array) -> jax.Array:
    """Distances between the lattice planes of cells (..., 3, 3) (rows are lattice vectors),
    shape (..., 3): along lattice vector k, ``1 / |b_k|`` with ``b_k`` the k-th column of the
    inverse (the reciprocal vector without 2π). Infinite or NaN for a singular cell."""
    return 1.0 / jnp.linalg.norm(inv3(cell), axis=-2)
