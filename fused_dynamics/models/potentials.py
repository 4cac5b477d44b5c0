"""The pair potentials: Lennard-Jones, Morse and soft spheres, with ASE's cutoff switches.

Each gives ``pair_energy`` (``φ(r)`` for ``r < cutoff``, per species pair when its parameters are
matrices) and the rules of its parameters; everything else is
:class:`~fused_dynamics.models.pair_potential.PairPotential`'s.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..validation import Rule, is_traced, non_negative, positive
from .pair_potential import PairPotential
from .species import _gather, _matrix_converter, _ndim, _static_matrix_converter

__all__ = ["LennardJones", "Morse", "SoftSphere"]


def _switch_r2(r: jax.Array, cutoff: float, onset: float) -> jax.Array:
    """ASE's (and JAX-MD's) C¹ switch in r²: 1 below ``onset``, 0 at ``cutoff``."""
    r2, rc2, ro2 = r * r, cutoff**2, onset**2
    s = (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r2 < ro2, 1.0, s)


def _switch_quintic(r: jax.Array, cutoff: float, onset: float) -> jax.Array:
    """ASE's ``MorsePotential`` C² switch: 1 below ``onset``, 0 at ``cutoff``."""
    s = 1.0 - (r - onset) / (cutoff - onset)
    return jnp.where(s >= 1.0, 1.0, 6.0 * s**5 - 15.0 * s**4 + 10.0 * s**3)


_LJ_MIXING = {
    "lorentz_berthelot": {"sigma": "arithmetic", "epsilon": "geometric"},
    "geometric": {"sigma": "geometric", "epsilon": "geometric"},
}


class LennardJones(PairPotential):
    """Lennard-Jones ``φ(r) = 4ε[(σ/r)^12 - (σ/r)^6]``.

    Parameters
    ----------
    sigma : float or (K, K) array
        Å, finite and > 0. A matrix gives one value per species pair (with ``species``).
    epsilon : float or (K, K) array
        Well depth in eV, finite and >= 0 (0: the pair does not interact). A negative ε is
        refused: it turns the well into a barrier and the core into an attraction that diverges
        to -∞ at r -> 0, which no relaxation or dynamics survives (for a purely repulsive
        model use :class:`SoftSphere`).
    cutoff : float
        Å, finite and > 0; pairs at ``r >= cutoff`` do not interact.
    shift : bool, default True
        Shift ``φ`` to zero at the cutoff (ASE's ``LennardJones(smooth=False)``), for each
        species pair with its own parameters. Ignored when ``switch_onset`` is given.
    switch_onset : float, optional
        Å, finite, >= 0 and < ``cutoff``. Multiply ``φ`` by the C¹ switch of ASE's
        ``LennardJones(smooth=True, ro=switch_onset)`` (the same form as JAX-MD's
        ``multiplicative_isotropic_cutoff``).
    species : sequence of str or int, optional
        Elements naming the rows of ``sigma`` / ``epsilon`` given as symmetric (K, K) matrices
        (see :class:`PairPotential`). :meth:`~PairPotential.from_pairs` builds them from a table
        keyed by element pairs, optionally with Lorentz–Berthelot or geometric mixing::

            LennardJones.from_pairs(
                {"Ar": (3.405, 0.0104), "Kr": (3.65, 0.014)},
                mixing="lorentz_berthelot", cutoff=8.5,
            )
    """

    sigma: float | jax.Array = eqx.field(converter=_matrix_converter)
    epsilon: float | jax.Array = eqx.field(converter=_matrix_converter)
    cutoff: float = eqx.field(static=True)
    shift: bool = eqx.field(static=True, default=True)
    switch_onset: float | None = eqx.field(static=True, default=None)

    _parameters: ClassVar[dict[str, tuple[Rule, str]]] = {
        "sigma": (positive(), "Å"),
        "epsilon": (non_negative(), "eV"),
    }
    _mixing: ClassVar[dict[str, dict[str, str]]] = _LJ_MIXING

    def pair_energy(self, r, si=None, sj=None):
        sigma, epsilon = _gather(self.sigma, si, sj), _gather(self.epsilon, si, sj)

        def lj(r):
            c6 = (sigma / r) ** 6
            return 4.0 * epsilon * (c6 * c6 - c6)

        if self.switch_onset is not None:
            return lj(r) * _switch_r2(r, self.cutoff, self.switch_onset)
        if self.shift:
            return lj(r) - lj(jnp.asarray(self.cutoff, r.dtype))
        return lj(r)


class Morse(PairPotential):
    """Morse ``φ(r) = D[e^{-2α(r - r0)} - 2e^{-α(r - r0)}]``.

    Parameters
    ----------
    D : float or (K, K) array
        Well depth in eV, finite and >= 0 (a negative D turns the well into a barrier and is
        refused, as LennardJones's negative ε).
    alpha : float or (K, K) array
        Stiffness in 1/Å, finite and > 0.
    r0 : float or (K, K) array
        Equilibrium distance in Å, finite and > 0. ASE's ``MorsePotential`` has
        ``epsilon = D`` and ``rho0 = alpha * r0``.
    cutoff : float
        Å, finite and > 0.
    shift : bool, default True
        Shift ``φ`` to zero at the cutoff, per species pair (ignored when ``switch_onset`` is
        given).
    switch_onset : float, optional
        Å, finite, >= 0 and < ``cutoff``. Multiply ``φ`` by ASE's quintic switch between
        ``switch_onset`` and ``cutoff`` (``MorsePotential(rcut1=switch_onset / r0,
        rcut2=cutoff / r0)``).
    species : sequence of str or int, optional
        Elements naming the rows of parameters given as symmetric (K, K) matrices (see
        :class:`PairPotential`; :meth:`~PairPotential.from_pairs` takes ``(D, alpha, r0)`` per
        pair; Morse has no mixing rule).
    """

    D: float | jax.Array = eqx.field(converter=_matrix_converter)
    alpha: float | jax.Array = eqx.field(converter=_matrix_converter)
    r0: float | jax.Array = eqx.field(converter=_matrix_converter)
    cutoff: float = eqx.field(static=True)
    shift: bool = eqx.field(static=True, default=True)
    switch_onset: float | None = eqx.field(static=True, default=None)

    _parameters: ClassVar[dict[str, tuple[Rule, str]]] = {
        "D": (non_negative(), "eV"),
        "alpha": (positive(), "1/Å"),
        "r0": (positive(), "Å"),
    }

    def pair_energy(self, r, si=None, sj=None):
        d, alpha, r0 = (_gather(p, si, sj) for p in (self.D, self.alpha, self.r0))

        def morse(r):
            e = jnp.exp(-alpha * (r - r0))
            return d * e * (e - 2.0)

        if self.switch_onset is not None:
            return morse(r) * _switch_quintic(r, self.cutoff, self.switch_onset)
        if self.shift:
            return morse(r) - morse(jnp.asarray(self.cutoff, r.dtype))
        return morse(r)


class SoftSphere(PairPotential):
    """Soft sphere ``φ(r) = ε/α (1 - r/σ)^α`` for ``r < σ`` (JAX-MD's ``soft_sphere``).

    Parameters
    ----------
    sigma : float or (K, K) array
        Contact distance in Å, finite and > 0; also the cutoff (the largest entry for a
        matrix). Static: it cannot be traced (vmap over ``epsilon`` or ``alpha`` instead).
    epsilon : float or (K, K) array
        eV, finite and >= 0 (a negative ε would make the core attractive).
    alpha : float or (K, K) array, default 2.0
        Exponent, finite and > 0.
    species : sequence of str or int, optional
        Elements naming the rows of parameters given as symmetric (K, K) matrices (see
        :class:`PairPotential`); :meth:`~PairPotential.from_pairs` takes
        ``(sigma, epsilon, alpha)`` per pair, or ``(sigma, epsilon)`` with ``alpha=`` a
        keyword, and mixes ``sigma`` and ``epsilon`` as :class:`LennardJones` does.
    """

    sigma: float | tuple[tuple[float, ...], ...] = eqx.field(
        static=True, converter=_static_matrix_converter
    )
    epsilon: float | jax.Array = eqx.field(default=1.0, converter=_matrix_converter)
    alpha: float | jax.Array = eqx.field(default=2.0, converter=_matrix_converter)

    _parameters: ClassVar[dict[str, tuple[Rule, str]]] = {
        "sigma": (positive(), "Å"),
        "epsilon": (non_negative(), "eV"),
        "alpha": (positive(), "dimensionless"),
    }
    _mixing: ClassVar[dict[str, dict[str, str]]] = _LJ_MIXING

    def __check_init__(self):
        if is_traced(self.sigma):
            raise ValueError(
                "SoftSphere: sigma sets the cutoff and is static, so it cannot be traced "
                "(jax.vmap/jax.grad over epsilon or alpha instead)."
            )

    @property
    def cutoff(self) -> float:
        if _ndim(self.sigma) == 2:
            return float(np.max(self.sigma))
        return float(self.sigma)

    def pair_energy(self, r, si=None, sj=None):
        epsilon, alpha = _gather(self.epsilon, si, sj), _gather(self.alpha, si, sj)
        if _ndim(self.sigma) == 0:
            return epsilon / alpha * (1.0 - r / self.sigma) ** alpha
        # per-pair contact distances below the cutoff (the largest one): zero beyond σ_ij, and
        # a safe base there so that (1 - r/σ)^α and its derivatives stay finite
        sigma = _gather(self.sigma, si, sj)
        inside = r < sigma
        x = jnp.where(inside, 1.0 - r / sigma, 1.0)
        return jnp.where(inside, epsilon / alpha * x**alpha, 0.0)
