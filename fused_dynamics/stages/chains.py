"""Nosé–Hoover chains: the one chain propagator and Suzuki–Yoshida table of the package.

:class:`~fused_dynamics.stages.nose_hoover.NVTNoseHoover` (a chain on the particles) and
:class:`~fused_dynamics.stages.npt.NPT` (a chain on the particles and one on the barostat) both
integrate their chains with :func:`nose_hoover_chain`, one chain per system, and both take their
composition weights from :func:`suzuki_yoshida_weights`.

A chain of ``M`` thermostats with positions ``η_j``, momenta ``p_j`` and masses ``Q_j`` drives
what it thermostats (``n_dof`` degrees of freedom with kinetic energy ``KE``) to ``kT``
(Martyna, Klein, Tuckerman, J. Chem. Phys. 97, 2635 (1992))::

    dη_j/dt = p_j / Q_j
    dp_1/dt = 2 KE - n_dof kT - p_1 p_2 / Q_2
    dp_j/dt = p_{j-1}² / Q_{j-1} - kT - p_j p_{j+1} / Q_{j+1}      (the last without the drag)

and scales the thermostatted momenta by ``exp(-∫ p_1/Q_1 dt)``. Its energy
``Σ p_j²/2Q_j + n_dof kT η_1 + kT Σ_{j>1} η_j`` (:func:`chain_energy`) completes a conserved
quantity.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["suzuki_yoshida_weights", "nose_hoover_chain", "chain_energy"]


def suzuki_yoshida_weights(order: int) -> tuple[float, ...]:
    """Weights of the Suzuki–Yoshida composition of order 1, 3, 5 or 7 (they sum to 1).

    ``order`` is the number of sub-steps; 3 is the fourth-order scheme of Yoshida (Phys. Lett. A
    150, 262 (1990)) that ASE's MTK integrators use, 5 and 7 are Suzuki's higher orders
    (Tuckerman, *Statistical Mechanics*, 2010, §4.12; JAX-MD's ``nose_hoover_chain``).

    Raises
    ------
    ValueError
        ``order`` is not 1, 3, 5 or 7.
    """
    if order == 1:
        return (1.0,)
    if order == 3:
        w1 = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))
        return (w1, 1.0 - 2.0 * w1, w1)
    if order == 5:
        w1 = 1.0 / (4.0 - 4.0 ** (1.0 / 3.0))
        return (w1, w1, 1.0 - 4.0 * w1, w1, w1)
    if order == 7:
        w = (0.784513610477560, 0.235573213359357, -1.17767998417887)
        w0 = 1.0 - 2.0 * sum(w)
        return (w[2], w[1], w[0], w0, w[0], w[1], w[2])
    raise ValueError(f"suzuki_yoshida_weights: order must be 1, 3, 5 or 7, got {order}.")


def nose_hoover_chain(
    p_chain: jax.Array,
    eta: jax.Array,
    masses: jax.Array,
    two_ke: jax.Array,
    n_dof: jax.Array,
    kT: jax.Array,
    delta: jax.Array,
    weights: Sequence[float],
    *,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Propagate one Nosé–Hoover chain per system for a time ``delta``.

    The time is split into sub-steps ``d = w delta``, one per weight ``w`` (a Suzuki–Yoshida
    composition, repeated and divided for multiple time steps). Each sub-step updates the chain
    momenta from the end of the chain inwards, each damped by ``exp(-d/4 p_{j+1}/Q_{j+1})``
    before and after its force ``d/2 G_j``, advances the positions ``η``, scales the
    thermostatted momenta by ``exp(-d p_1/Q_1)``, and updates the momenta back outwards (as
    ASE's ``NoseHooverChainThermostat``). The sub-steps are the body of a ``lax.scan``, so they
    compile once however many there are, or, with ``unroll``, a Python loop (for a few
    sub-steps: NPT's three, where unrolling lets XLA fuse across them).

    Parameters
    ----------
    p_chain, eta : Array, shape (S, M)
        Chain momenta (eV·(ASE time)) and positions (dimensionless).
    masses : Array, shape (S, M)
        Chain masses ``Q`` in eV·(ASE time)², > 0 (1 where they would vanish).
    two_ke : Array, shape (S,)
        Twice the kinetic energy (eV) of what the chain thermostats, at the start.
    n_dof : Array, shape (S,) or scalar
        Its number of degrees of freedom.
    kT : Array, shape (S,)
        Target ``k_B T`` in eV.
    delta : Array, shape (S,)
        The time to propagate, in ASE's time unit.
    weights : sequence of float
        Sub-step weights, summing to 1 (e.g. :func:`suzuki_yoshida_weights`).
    unroll : bool, default False
        Unroll the sub-steps in Python instead of scanning over them (same arithmetic; the
        compiled program differs, and with it the rounding of fused multiply-adds).

    Returns
    -------
    p_chain, eta : Array, shape (S, M)
    scale : Array, shape (S,)
        The factor by which the thermostatted momenta (and velocities) scale.
    """
    m = p_chain.shape[-1]
    mass = [masses[:, j] for j in range(m)]

    def sub_step(carry, w):
        p, q, scale = carry
        p, q = list(p), list(q)
        d = w * delta
        d2, d4 = 0.5 * d, 0.25 * d

        def update(j):
            if j < m - 1:
                p[j] = p[j] * jnp.exp(-d4 * p[j + 1] / mass[j + 1])
            if j == 0:
                g = scale**2 * two_ke - n_dof * kT
            else:
                g = p[j - 1] ** 2 / mass[j - 1] - kT
            p[j] = p[j] + d2 * g
            if j < m - 1:
                p[j] = p[j] * jnp.exp(-d4 * p[j + 1] / mass[j + 1])

        for j in reversed(range(m)):
            update(j)
        for j in range(m):
            q[j] = q[j] + d * p[j] / mass[j]
        scale = scale * jnp.exp(-d * p[0] / mass[0])
        for j in range(m):
            update(j)
        return (tuple(p), tuple(q), scale), None

    carry = (
        tuple(p_chain[:, j] for j in range(m)),
        tuple(eta[:, j] for j in range(m)),
        jnp.ones_like(two_ke),
    )
    if unroll:
        for w in weights:
            carry, _ = sub_step(carry, float(w))
    else:
        carry, _ = jax.lax.scan(sub_step, carry, jnp.asarray(weights, p_chain.dtype))
    p, q, scale = carry
    return jnp.stack(p, axis=-1), jnp.stack(q, axis=-1), scale


def chain_energy(
    p_chain: jax.Array, eta: jax.Array, masses: jax.Array, n_dof: jax.Array, kT: jax.Array
) -> jax.Array:
    """``Σ p_j²/2Q_j + n_dof kT η_1 + kT Σ_{j>1} η_j`` of each system's chain in eV, shape (S,)."""
    return (
        0.5 * jnp.sum(p_chain**2 / masses, axis=-1)
        + n_dof * kT * eta[:, 0]
        + kT * jnp.sum(eta[:, 1:], axis=-1)
    )
