"""Langevin dynamics (NVT) with the BAOAB splitting."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from ase import units

from .. import segment
from .. import validation as v
from ..batch import Batch
from .base import Stage, fs_to_ase_time, per_system, safe_sqrt
from .verlet import drift, kick

__all__ = ["NVTLangevin"]


class NVTLangevin(Stage):
    """Langevin dynamics with the BAOAB splitting of Leimkuhler and Matthews.

    One step is ``B A O A`` in :meth:`first_half` (using the forces of the previous step), the
    model evaluation, then ``B`` in :meth:`second_half`:

    - B: ``v += ½ dt F / m``
    - A: ``r += ½ dt v``
    - O: the exact Ornstein–Uhlenbeck update ``v <- c1 v + sqrt((1 - c1²) kT / m) ξ`` with
      ``c1 = exp(-γ dt)`` and ``ξ`` standard normal.

    With ``friction=0`` the O step is the identity and the step is velocity Verlet.

    Random numbers do not depend on the slot a system occupies nor on its neighbours in the
    batch: the normal deviates of atom ``i`` (its index inside its own system) of the system
    with ``system_id`` ``sid`` at that system's ``k``-th step in this stage are drawn from
    ``fold_in(fold_in(fold_in(PRNGKey(seed), sid), k), i)``. The per-system step counter ``k``
    is the stage state (``{"step": (S,) int32}``), advanced only for the systems the stage
    updates and reset to 0 with the rest of the state for a new occupant of the slot. Two
    Langevin sub-stages of one fused stage each count from 0, so give them different seeds
    unless they should share a noise sequence.

    Parameters
    ----------
    model : Model
    dt : float or Array of shape (S,)
        Time step in fs, finite and > 0.
    temperature : float or Array of shape (S,)
        Target temperature in K, finite and >= 0 (0: friction only, no noise).
    friction : float or Array of shape (S,)
        Friction coefficient ``γ`` in 1/fs, finite and >= 0 (0: velocity Verlet). ASE's
        ``Langevin(friction=...)`` takes ASE's inverse time unit instead:
        ``friction_ase = friction / ase.units.fs``.
    seed : int, default 0
        Seed of the random stream, an integer in [0, 2**32) (larger ones would collide without
        ``jax_enable_x64``). Kept as a 0-d ``uint32`` array, a pytree leaf: a new seed reuses
        the compiled program, and seeds can be vmapped over for ensembles.
    n_steps, convergence_hook
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).

    Notes
    -----
    ``dt``, ``temperature`` and ``friction`` are per system when arrays: one value per occupied
    system or one per slot (``per_system_parameters``).
    """

    per_system_parameters: ClassVar[tuple[str, ...]] = ("dt", "temperature", "friction")
    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)

    dt: float | jax.Array
    temperature: float | jax.Array
    friction: float | jax.Array
    seed: int | jax.Array = eqx.field(default=0, converter=v.seed_leaf)

    def __check_init__(self):
        owner = type(self).__name__
        v.check_real(owner, "dt", self.dt, v.positive(), unit="fs", per_system=True)
        v.check_real(
            owner, "temperature", self.temperature, v.non_negative(), unit="K", per_system=True
        )
        v.check_real(
            owner, "friction", self.friction, v.non_negative(), unit="1/fs", per_system=True
        )
        v.check_integer(owner, "seed", self.seed, 0, v.SEED_LIMIT - 1, allow_array=True)

    def init_state(self, batch: Batch) -> dict[str, jax.Array]:
        v.check_fits(self, batch.max_systems)
        return {"step": jnp.zeros((batch.max_systems,), jnp.int32)}

    # ----------------------------------------------------------- pieces
    def _half_dt(self, batch: Batch) -> jax.Array:
        """Half the time step per system in ASE units, shape (S,)."""
        return 0.5 * per_system(batch, fs_to_ase_time(jnp.asarray(self.dt, batch.dtype)))

    def _noise(self, batch: Batch, step: jax.Array) -> jax.Array:
        """Standard normal deviates, shape (N, 3), keyed by system id, step and local index."""
        s = batch.max_systems
        # Threefry whatever jax_default_prng_impl says (the keys of PRNGKey under the default)
        base = jax.random.key(self.seed, impl="threefry2x32")

        def system_key(sid, k):
            key = jax.random.fold_in(base, sid.astype(jnp.uint32))
            return jax.random.fold_in(key, k.astype(jnp.uint32))

        keys = jax.vmap(system_key)(batch.system_id, step)  # (S,) typed keys
        atom_keys = keys[jnp.clip(batch.system_idx, 0, s - 1)]
        local = segment.local_index(batch.system_idx, s)
        dtype = batch.dtype

        def draw(key, i):
            return jax.random.normal(jax.random.fold_in(key, i.astype(jnp.uint32)), (3,), dtype)

        z = jax.vmap(draw)(atom_keys, local)
        return jnp.where(batch.atom_mask[:, None], z, 0.0)

    def _ou(self, batch: Batch, step: jax.Array) -> Batch:
        dt = fs_to_ase_time(per_system(batch, self.dt))
        gamma = per_system(batch, self.friction) / units.fs
        kt = units.kB * per_system(batch, self.temperature)
        c1 = batch.to_atoms_axis(jnp.exp(-gamma * dt))[:, None]
        one_minus_c1sq = batch.to_atoms_axis(-jnp.expm1(-2.0 * gamma * dt))
        sigma = safe_sqrt(one_minus_c1sq * batch.to_atoms_axis(kt) / batch.masses)[:, None]
        v = c1 * batch.velocities + sigma * self._noise(batch, step)
        return batch.replace(velocities=jnp.where(batch.atom_mask[:, None], v, 0.0))

    # ----------------------------------------------------------- the two halves
    def first_half(self, batch, state):
        half = self._half_dt(batch)
        batch = drift(kick(batch, half), half)
        batch = self._ou(batch, state["step"])
        return drift(batch, half), {"step": state["step"] + 1}

    def second_half(self, batch, state):
        return kick(batch, self._half_dt(batch)), state
