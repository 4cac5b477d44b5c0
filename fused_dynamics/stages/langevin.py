"""Langevin dynamics (NVT) with the BAOAB splitting."""

from __future__ import annotations

import functools
import math
import statistics
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from jax.extend.random import threefry2x32_p

from .. import segment
from .. import validation as v
from ..batch import Batch
from .base import Stage, fs_to_ase_time, per_system, safe_sqrt
from .verlet import drift, kick

__all__ = ["NVTLangevin"]


NORMAL_TABLE_BITS = 16  # three 16-bit indices from the two 32-bit words of one block
NOISE_TAG = 0x4C414E47  # "LANG": the noise's own keys, apart from any other draw under the seed


@functools.cache
def normal_table() -> np.ndarray:
    """The standard normal distribution in ``2^16`` equally likely values (host, read-only).

    Entry ``k`` is the mean of the standard normal over its ``k``-th quantile bin, between
    ``Φ⁻¹(k / 2^16)`` and ``Φ⁻¹((k + 1) / 2^16)`` (``statistics.NormalDist.inv_cdf``, float64),
    made exactly odd (entry ``2^16 - 1 - k`` is ``-`` entry ``k``) and scaled to unit variance
    (the bins lose 1.5e-6 of it); a tabulated normal distribution like GROMACS's
    ``TabulatedNormalDistribution`` (14 bits there). A uniform 16-bit index then gives a
    deviate by one gather, with no floating-point arithmetic whose last bits XLA:CPU could
    round differently in another program: deviates computed by arithmetic did (XLA:CPU fuses
    a multiply and an add into one FMA in some programs and not in others), and a system's
    trajectory differed in a pipeline and in a fused run. Mean 0, variance 1, fourth moment
    3 - 1.7e-4, ``|ξ| <= 4.39``.

    Returns
    -------
    numpy.ndarray, shape (2^16,) float32
        Increasing; the same array at every call.
    """
    n = 2**NORMAL_TABLE_BITS
    normal = statistics.NormalDist()
    edges = np.array([-np.inf] + [normal.inv_cdf(k / n) for k in range(1, n)] + [np.inf])
    density = np.exp(-0.5 * edges**2) / math.sqrt(2.0 * math.pi)  # 0 at the infinite edges
    mean = (density[:-1] - density[1:]) * n
    mean = 0.5 * (mean - mean[::-1])
    table = (mean / np.sqrt(np.mean(mean**2))).astype(np.float32)
    table.setflags(write=False)  # cached: shared by every caller
    return table


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
    batch, nor on the batch's dtype: the deviates of the system with ``system_id`` ``sid`` at
    that system's ``k``-th step in this stage come from the Threefry-2x32 key
    ``(k1, k2) = key_data(fold_in(fold_in(fold_in(key(seed), sid), k), NOISE_TAG))`` (``key``
    with ``impl="threefry2x32"``; the tag keeps these blocks apart from other draws under the
    same seed and ids, such as :func:`~fused_dynamics.initialize_velocities` with
    ``PRNGKey(seed)``, whose atom ``k`` has the key before the tag). Atom ``i`` (its index
    inside its own system) takes the two 32-bit words ``(w1, w2)`` of the Threefry-2x32 block
    of ``(k1, k2)`` at counter ``(i, 0)``, and its three deviates are ``T[w1 >> 16]``,
    ``T[w1 & 0xFFFF]`` and ``T[w2 >> 16]``, where ``T`` is :func:`normal_table`, the normal
    distribution in 2^16 equally likely float32 values, cast to the batch's dtype. The
    per-system step counter ``k`` is the stage state (``{"step": (S,) int32}``), advanced only
    for the systems the stage updates and reset to 0 with the rest of the state for a new
    occupant of the slot. Two Langevin sub-stages of one fused stage each count from 0, so give
    them different seeds unless they should share a noise sequence.

    Thermostat noise needs its distribution, not 53 bits: GROMACS's stochastic dynamics draws
    from a table of 2^14 values, LAMMPS's ``fix langevin`` uniform deviates. One Threefry block
    and a gather per atom cost about a quarter of ``jax.random.normal``'s float64 deviates (a key
    per atom, three 64-bit draws, a float64 ``erfinv``, 0.19 against 0.05 ms for 1,728 atoms
    on CPU): a Langevin step of 16 x 108 LJ argon atoms in float64 costs 1.15 bare model
    evaluations instead of 1.36, of 64 x 108 atoms 1.14 instead of 1.30
    (``benchmarks/bench_fused_overhead.py``'s systems, interleaved). The tails stop at 4.4
    standard deviations (a normal deviate passes that once in 9e4 draws); the canonical
    tests of ``tests/test_integrators.py`` (mean temperature, var(KE), per-atom kinetic
    energies against Gamma(3/2, kT) over 7e4 samples) hold as before.

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
        """Standard normal deviates keyed by system id, step and local index.

        The class docstring gives the stream.

        Parameters
        ----------
        batch : Batch
            The systems, their ids and atom masks.
        step : Array, shape (S,) int32
            Each slot's step counter in this stage.

        Returns
        -------
        Array, shape (N, 3), the batch's dtype
            0 on padded atom rows.
        """
        s = batch.max_systems
        # Threefry whatever jax_default_prng_impl says (the keys of PRNGKey under the default)
        base = jax.random.key(self.seed, impl="threefry2x32")

        def system_key(sid, k):
            key = jax.random.fold_in(base, sid.astype(jnp.uint32))
            return jax.random.fold_in(jax.random.fold_in(key, k.astype(jnp.uint32)), NOISE_TAG)

        keys = jax.random.key_data(jax.vmap(system_key)(batch.system_id, step))  # (S, 2)
        atom_keys = keys[jnp.clip(batch.system_idx, 0, s - 1)]
        local = segment.local_index(batch.system_idx, s).astype(jnp.uint32)
        w1, w2 = threefry2x32_p.bind(
            atom_keys[:, 0], atom_keys[:, 1], local, jnp.zeros_like(local)
        )  # the block at counter (i, 0): two words, three 16-bit indices
        low, high = (1 << NORMAL_TABLE_BITS) - 1, 32 - NORMAL_TABLE_BITS
        index = jnp.stack([w1 >> high, w1 & low, w2 >> high], axis=1).astype(jnp.int32)
        # the table as a constant of the batch's dtype (float32 values, exact in either): a
        # float32 table converted in the program changed XLA's fusions, and the select-only
        # step (GPU form) then differed from the lax.cond step in the velocities' last bit
        z = jnp.asarray(normal_table(), batch.dtype)[index]
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
