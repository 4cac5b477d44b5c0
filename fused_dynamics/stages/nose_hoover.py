"""Nosé–Hoover chain thermostat (NVT), Martyna–Tuckerman–Klein, one chain per system."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase import units

from .. import observables as obs
from .. import validation as v
from ..batch import Batch
from .base import Stage, fs_to_ase_time

__all__ = ["NVTNoseHoover", "suzuki_yoshida_weights"]


def suzuki_yoshida_weights(order: int) -> tuple[float, ...]:
    """Weights of the Suzuki–Yoshida composition of order 1, 3, 5 or 7 (they sum to 1)."""
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


def _per_system(batch: Batch, x) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(x, batch.dtype), (batch.max_systems,))


class NVTNoseHoover(Stage):
    """Nosé–Hoover chain (NVT) after Martyna, Tuckerman and Klein, with one chain per system.

    Each system couples to its own chain of ``chain_length`` thermostats with positions ``η_k``
    and velocities ``v_k = p_k / Q_k`` (state ``{"eta", "v_eta"}``, shape (S, chain_length)), and
    masses ``Q_1 = g kT τ²``, ``Q_k = kT τ²`` (k ≥ 2), where ``g = 3 n_atoms`` is the package's
    count of degrees of freedom (:func:`~fused_dynamics.observables.degrees_of_freedom`) and
    ``τ = tdamp``. The chain drives the time average of ``2 KE`` to ``g kT`` exactly, so the mean
    temperature (same convention) is the target; a system whose total momentum is zero (which
    the chain's uniform scaling keeps) has only ``3 n_atoms - 3`` fluctuating momenta, and its
    kinetic-energy variance is then ``g / (g - 3)`` times the canonical ``(g/2)(kT)²``.

    One step is the symmetric Trotter splitting::

        first_half:  chain(dt/2), v += ½ dt F/m, r += dt v
        [model]
        second_half: v += ½ dt F/m, chain(dt/2)

    The chain propagator ``chain(dt/2)`` is MTK's: ``chain_steps`` multiple time steps, each a
    Suzuki–Yoshida composition of order ``sy_order`` (default 2 steps of order 3, JAX-MD's
    default); inside each sub-step the chain velocities are updated from the end of the chain
    inwards with exponential damping by the next thermostat, the particle velocities are scaled
    by ``exp(-δ v_1)``, the positions ``η`` advance, and the velocities are updated back out.

    The extended energy ``E_pot + E_kin + Σ ½ Q_k v_k² + g kT η_1 + kT Σ_{k≥2} η_k`` is conserved
    (up to the integrator's O(dt²) error); :meth:`observables` reports it as
    ``"conserved_energy"``.

    Parameters
    ----------
    model : Model
    dt : float or Array of shape (S,)
        Time step in fs, finite and > 0.
    temperature : float or Array of shape (S,)
        Target temperature in K, finite and >= 0.
    tdamp : float or Array of shape (S,)
        Thermostat time constant ``τ`` in fs, finite and > 0; ~100 dt is usual.
    chain_length : int, default 3
        Number of thermostats in each chain, an integer >= 1 (1 is plain Nosé–Hoover).
    chain_steps : int, default 2
        Multiple time steps of the chain propagator per half step, an integer >= 1.
    sy_order : {1, 3, 5, 7}, default 3
        Order of the Suzuki–Yoshida composition of each chain sub-step.
    n_steps, convergence_hook
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).

    ``dt``, ``temperature`` and ``tdamp`` are per system when arrays: one value per occupied
    system or one per slot (``per_system_parameters``).

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).
    """

    per_system_parameters: ClassVar[tuple[str, ...]] = ("dt", "temperature", "tdamp")

    dt: float | jax.Array
    temperature: float | jax.Array
    tdamp: float | jax.Array
    chain_length: int = eqx.field(static=True, default=3)
    chain_steps: int = eqx.field(static=True, default=2, kw_only=True)
    sy_order: int = eqx.field(static=True, default=3, kw_only=True)

    def __check_init__(self):
        owner = type(self).__name__
        v.check_stage(self)
        v.check_real(owner, "dt", self.dt, v.positive(), unit="fs", per_system=True)
        v.check_real(
            owner, "temperature", self.temperature, v.non_negative(), unit="K", per_system=True
        )
        v.check_real(owner, "tdamp", self.tdamp, v.positive(), unit="fs", per_system=True)
        v.check_integer(owner, "chain_length", self.chain_length, 1)
        v.check_integer(owner, "chain_steps", self.chain_steps, 1)
        v.check_choice(owner, "sy_order", self.sy_order, (1, 3, 5, 7))

    def init_state(self, batch: Batch) -> dict[str, jax.Array]:
        v.check_fits(self, batch.max_systems)
        shape = (batch.max_systems, self.chain_length)
        return {"eta": jnp.zeros(shape, batch.dtype), "v_eta": jnp.zeros(shape, batch.dtype)}

    # ----------------------------------------------------------- pieces
    def _kt(self, batch: Batch) -> jax.Array:
        return units.kB * _per_system(batch, self.temperature)

    def _dof(self, batch: Batch) -> jax.Array:
        return obs.degrees_of_freedom(batch)

    def masses(self, batch: Batch) -> jax.Array:
        """Thermostat masses ``Q``, shape (S, chain_length), in eV·(ASE time)²; 1 where they
        would vanish (empty slots, zero temperature) so that updates stay finite."""
        kt = self._kt(batch)
        tau = fs_to_ase_time(_per_system(batch, self.tdamp))
        q = kt * tau**2
        scale = jnp.ones((self.chain_length,), batch.dtype)
        q = q[:, None] * scale[None, :]
        q = q.at[:, 0].multiply(self._dof(batch))
        return jnp.where(q > 0, q, 1.0)

    def _dt(self, batch: Batch) -> jax.Array:
        return fs_to_ase_time(_per_system(batch, self.dt))

    def _kick(self, batch: Batch) -> Batch:
        half = batch.to_atoms_axis(0.5 * self._dt(batch))[:, None]
        return batch.replace(
            velocities=batch.velocities + half * batch.forces / batch.masses[:, None]
        )

    def _drift(self, batch: Batch) -> Batch:
        dt = batch.to_atoms_axis(self._dt(batch))[:, None]
        return batch.replace(positions=batch.positions + dt * batch.velocities)

    def _chain(self, batch: Batch, state, h: jax.Array) -> tuple[Batch, dict]:
        """Propagate the chains and scale the particle velocities over a time ``h`` (S,)."""
        m = self.chain_length
        kt = self._kt(batch)
        dof = self._dof(batch)
        q = self.masses(batch)
        ke2 = 2.0 * obs.kinetic_energy(batch)  # 2 KE, (S,)
        eta = state["eta"]
        v = [state["v_eta"][:, k] for k in range(m)]
        scale_total = jnp.ones_like(ke2)

        def force(k, v, ke2):
            if k == 0:
                return (ke2 - dof * kt) / q[:, 0]
            return (q[:, k - 1] * v[k - 1] ** 2 - kt) / q[:, k]

        def damped(k, v, ke2, d):
            # v_k <- e^{-d/4 v_{k+1}} (e^{-d/4 v_{k+1}} v_k + d/2 G_k), the last one undamped
            g = force(k, v, ke2)
            if k == m - 1:
                return v[k] + 0.5 * d * g
            a = jnp.exp(-0.25 * d * v[k + 1])
            return a * (a * v[k] + 0.5 * d * g)

        def sub_step(carry, w):
            # one MTK sub-step of length d = w h: a lax.scan body, so that the chain_steps x
            # sy_order sub-steps compile once rather than unrolled
            v, eta, ke2, scale_total = carry
            v = list(v)
            d = w * h
            for k in reversed(range(m)):
                v[k] = damped(k, v, ke2, d)
            s = jnp.exp(-d * v[0])
            scale_total = scale_total * s
            ke2 = ke2 * s * s
            eta = eta + d[:, None] * jnp.stack(v, axis=-1)
            for k in range(m):
                v[k] = damped(k, v, ke2, d)
            return (tuple(v), eta, ke2, scale_total), None

        weights = np.tile(np.asarray(suzuki_yoshida_weights(self.sy_order)), self.chain_steps)
        weights = jnp.asarray(weights / self.chain_steps, batch.dtype)
        (v, eta, _, scale_total), _ = jax.lax.scan(
            sub_step, (tuple(v), eta, ke2, scale_total), weights
        )

        velocities = batch.velocities * batch.to_atoms_axis(scale_total)[:, None]
        return batch.replace(velocities=velocities), {"eta": eta, "v_eta": jnp.stack(v, axis=-1)}

    # ----------------------------------------------------------- the two halves
    def first_half(self, batch, state):
        batch, state = self._chain(batch, state, 0.5 * self._dt(batch))
        batch = self._kick(batch)
        return self._drift(batch), state

    def second_half(self, batch, state):
        batch = self._kick(batch)
        return self._chain(batch, state, 0.5 * self._dt(batch))

    # ----------------------------------------------------------- observables
    def chain_energy(self, batch: Batch, state) -> jax.Array:
        """Kinetic plus potential energy of each system's chain in eV, shape (S,)."""
        kt = self._kt(batch)
        q = self.masses(batch)
        kinetic = 0.5 * jnp.sum(q * state["v_eta"] ** 2, axis=-1)
        eta = state["eta"]
        potential = kt * (self._dof(batch) * eta[:, 0] + jnp.sum(eta[:, 1:], axis=-1))
        return jnp.where(batch.system_mask, kinetic + potential, 0.0)

    def observables(self, batch, state):
        out = super().observables(batch, state)
        out["conserved_energy"] = (
            batch.energy + out["kinetic_energy"] + self.chain_energy(batch, state)
        )
        return out
