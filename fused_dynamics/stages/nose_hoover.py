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
from . import chains
from .base import Stage, fs_to_ase_time, per_system
from .chains import suzuki_yoshida_weights
from .verlet import drift, kick

__all__ = ["NVTNoseHoover", "suzuki_yoshida_weights"]


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

    The chain propagator ``chain(dt/2)`` is MTK's, the package's one
    (:func:`~fused_dynamics.stages.chains.nose_hoover_chain`, shared with :class:`NPT`):
    ``chain_steps`` multiple time steps, each a Suzuki–Yoshida composition of order ``sy_order``
    (default 2 steps of order 3, JAX-MD's default); inside each sub-step the chain momenta are
    updated from the end of the chain inwards with exponential damping by the next thermostat,
    the positions ``η`` advance, the particle velocities are scaled by ``exp(-δ v_1)``, and the
    momenta are updated back out.

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

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).

    Notes
    -----
    ``dt``, ``temperature`` and ``tdamp`` are per system when arrays: one value per occupied
    system or one per slot (``per_system_parameters``).
    """

    per_system_parameters: ClassVar[tuple[str, ...]] = ("dt", "temperature", "tdamp")
    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)

    dt: float | jax.Array
    temperature: float | jax.Array
    tdamp: float | jax.Array
    chain_length: int = eqx.field(static=True, default=3)
    chain_steps: int = eqx.field(static=True, default=2, kw_only=True)
    sy_order: int = eqx.field(static=True, default=3, kw_only=True)

    def __check_init__(self):
        owner = type(self).__name__
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
        return units.kB * per_system(batch, self.temperature)

    def _dof(self, batch: Batch) -> jax.Array:
        return obs.degrees_of_freedom(batch)

    def masses(self, batch: Batch) -> jax.Array:
        """Thermostat masses ``Q``, shape (S, chain_length), in eV·(ASE time)²; 1 where they
        would vanish (empty slots, zero temperature) so that updates stay finite."""
        kt = self._kt(batch)
        tau = fs_to_ase_time(per_system(batch, self.tdamp))
        q = kt * tau**2
        scale = jnp.ones((self.chain_length,), batch.dtype)
        q = q[:, None] * scale[None, :]
        q = q.at[:, 0].multiply(self._dof(batch))
        return jnp.where(q > 0, q, 1.0)

    def _dt(self, batch: Batch) -> jax.Array:
        return fs_to_ase_time(per_system(batch, self.dt))

    def _chain(self, batch: Batch, state, h: jax.Array) -> tuple[Batch, dict]:
        """Propagate the chains and scale the particle velocities over a time ``h`` (S,)."""
        q = self.masses(batch)
        weights = np.tile(np.asarray(suzuki_yoshida_weights(self.sy_order)), self.chain_steps)
        p, eta, scale = chains.nose_hoover_chain(
            state["v_eta"] * q,
            state["eta"],
            q,
            2.0 * obs.kinetic_energy(batch),
            self._dof(batch),
            self._kt(batch),
            h,
            weights / self.chain_steps,
        )
        velocities = batch.velocities * batch.to_atoms_axis(scale)[:, None]
        return batch.replace(velocities=velocities), {"eta": eta, "v_eta": p / q}

    # ----------------------------------------------------------- the two halves
    def first_half(self, batch, state):
        half = 0.5 * self._dt(batch)
        batch, state = self._chain(batch, state, half)
        return drift(kick(batch, half), self._dt(batch)), state

    def second_half(self, batch, state):
        half = 0.5 * self._dt(batch)
        return self._chain(kick(batch, half), state, half)

    # ----------------------------------------------------------- observables
    def chain_energy(self, batch: Batch, state) -> jax.Array:
        """Kinetic plus potential energy of each system's chain in eV, shape (S,)."""
        q = self.masses(batch)
        energy = chains.chain_energy(
            state["v_eta"] * q, state["eta"], q, self._dof(batch), self._kt(batch)
        )
        return jnp.where(batch.system_mask, energy, 0.0)

    def observables(self, batch, state):
        out = super().observables(batch, state)
        out["conserved_energy"] = (
            batch.energy + out["kinetic_energy"] + self.chain_energy(batch, state)
        )
        return out
