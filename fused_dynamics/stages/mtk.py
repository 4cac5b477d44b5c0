"""The Martyna–Tobias–Klein barostat with Nosé–Hoover chains, shared by NPT and NPH.

Equations of motion (row vectors, ASE's cell convention: rows are lattice vectors), per system,
with ``L = Σ_k (p_k / W) E_k`` the barostat rate built from the barostat momenta ``p_k`` on the
allowed cell directions ``E_k`` (see ``coupling``) and ``N_f = 3 n_atoms``::

    dr/dt    = v + r L
    dp/dt    = F - p (L + tr(L)/N_f) - (p_η1 / Q_1) p
    dcell/dt = cell L
    dp_k/dt  = <E_k, V (P_int - P_ext 1) + (Σ m v²/N_f) 1> - (p_ξ1 / R_1) p_k
    P_int    = Σ m v vᵀ / V - σ                 (σ: the model's stress, ASE sign)

plus a Nosé–Hoover chain on the particles (η, driving ``Σ m v²`` to ``N_f kT``) and one on the
barostat (ξ, driving ``Σ p_k²/W`` to ``n_k kT``). The extended energy

    H = U + KE + Σ p_k²/2W + P_ext V + Σ p_η²/2Q + N_f kT η_1 + kT Σ_{j>1} η_j
          + Σ p_ξ²/2R + n_k kT ξ_1 + kT Σ_{j>1} ξ_j

is conserved, and the invariant measure is the isothermal–isobaric one (Martyna, Tobias, Klein,
J. Chem. Phys. 101, 4177 (1994); Tuckerman et al., J. Phys. A 39, 5629 (2006)).

The step is the time-reversible factorization of Tuckerman et al. (2006), the one ASE's
``IsotropicMTKNPT`` / ``MTKNPT`` use, with the chains integrated by the fourth-order
Suzuki–Yoshida scheme (the package's one chain propagator,
:func:`~fused_dynamics.stages.chains.nose_hoover_chain`, shared with ``NVTNoseHoover``)::

    first_half:  NHC_baro(dt/2)  NHC_part(dt/2)  p_cell(dt/2)  p(dt/2)  [r, cell](dt)
    model evaluation (energy, forces, stress)
    second_half: p(dt/2)  p_cell(dt/2)  NHC_part(dt/2)  NHC_baro(dt/2)

Positions and cell move together under the exact flow of ``dr/dt = v + r L``,
``dcell/dt = cell L`` (``r e^{L t} + v t φ₁(L t)``, ``cell e^{L t}``), and momenta under the
exact flow of ``dp/dt = F - p K`` with frozen forces.

With ``coupling="isotropic"`` (and ``"anisotropic"`` on an orthorhombic cell) one step is the same
map as ASE's ``IsotropicMTKNPT`` (``MaskedMTKNPT(mask=(True, True, True))``) given the same masses
(ASE's isotropic barostat chain has ``R_1 = 9 kT pdamp²``, ours ``1 kT pdamp²``: one cell degree of
freedom). ``"triclinic"`` differs from ASE's ``MTKNPT``, which moves a symmetric 3x3 rate: here the
six lower-triangular entries move, so the cell never rotates and keeps ASE's standard form.

A system that is not periodic along all three lattice vectors (a cluster in a vacuum box, a
slab) keeps its cell: its barostat force is zero and its barostat chain has no degrees of
freedom and is held still, so it runs at fixed cell (NPT: Nosé–Hoover chain NVT, NPH: NVE). A
pressure on a box that is not a period has no meaning, and a slab's in-plane pressure would
need a cell mask that this barostat does not have; LAMMPS refuses ``fix npt`` on a
non-periodic dimension instead.

:class:`~fused_dynamics.stages.npt.NPT` and :class:`~fused_dynamics.stages.npt.NPH` (in
:mod:`fused_dynamics.stages.npt`) are final; the barostat they share is :class:`AbstractMTK`,
here.
"""

# No ``from __future__ import annotations`` here: Equinox reads ``AbstractVar`` annotations
# when the class is created, and refuses them as strings.
import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from ase import units

from .. import observables as obs
from .. import validation as v
from ..batch import Batch
from . import chains
from .base import Stage, fs_to_ase_time, per_system

__all__ = ["AbstractMTK", "NPTState", "COUPLINGS", "cell_basis"]

COUPLINGS = ("isotropic", "anisotropic", "triclinic")

# Suzuki–Yoshida order of the chains: 3 sub-steps, Yoshida's fourth-order scheme, as ASE
_SY_ORDER = 3

_SY = chains.suzuki_yoshida_weights(_SY_ORDER)

# Lowest temperature used for NPH's barostat mass, so a system at rest still gets a finite mass.
_MIN_MASS_TEMPERATURE = 1.0


class NPTState(eqx.Module):
    """Per-system state of ``NPT`` / ``NPH``; every leaf has leading axis S.

    Attributes
    ----------
    p_cell : Array, shape (S, k)
        Barostat momenta along the ``k`` cell directions of the coupling (1, 3 or 6), eV·(ASE
        time) units such that ``p_cell / W`` is a strain rate.
    eta, p_eta : Array, shape (S, M)
        Particle thermostat chain positions and momenta.
    xi, p_xi : Array, shape (S, M)
        Barostat thermostat chain positions and momenta.
    kT : Array, shape (S,)
        Target ``k_B T`` in eV (NPH: the temperature that sets the barostat mass).
    pressure : Array, shape (S,)
        Target pressure ``P_ext`` in eV/Å³.
    W : Array, shape (S,)
        Barostat mass.
    Q, R : Array, shape (S, M)
        Particle and barostat chain masses.
    """

    p_cell: jax.Array
    eta: jax.Array
    p_eta: jax.Array
    xi: jax.Array
    p_xi: jax.Array
    kT: jax.Array
    pressure: jax.Array
    W: jax.Array
    Q: jax.Array
    R: jax.Array


def cell_basis(coupling: str, dtype=None) -> jax.Array:
    """The cell directions ``E_k`` a coupling lets move, shape (k, 3, 3).

    ``isotropic``: the identity (one log-volume degree of freedom); ``anisotropic``: the three
    diagonal entries; ``triclinic``: the six lower-triangular entries (ASE's standard cell, ``a``
    along x and ``b`` in the xy plane, stays in that form and the cell never rotates).
    """
    if coupling == "isotropic":
        entries = [((0, 0), (1, 1), (2, 2))]
    elif coupling == "anisotropic":
        entries = [((i, i),) for i in range(3)]
    elif coupling == "triclinic":
        entries = [((i, j),) for i, j in ((0, 0), (1, 1), (2, 2), (1, 0), (2, 0), (2, 1))]
    else:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}.")
    basis = jnp.zeros((len(entries), 3, 3), dtype)
    for k, ij in enumerate(entries):
        for i, j in ij:
            basis = basis.at[k, i, j].set(1.0)
    return basis


class AbstractMTK(Stage):
    """Abstract base of :class:`NPT` and :class:`NPH`: the MTK barostat, with or without chains.

    Everything of the step (module docstring) is here; a subclass declares the fields below (or
    properties) and gives :meth:`_temperature_parameter`, the temperature in K (scalar or per
    system) that sets the target ``kT`` and the masses, or None for each system's
    instantaneous temperature (at least 1 K) when it enters the stage.

    Attributes
    ----------
    dt, pressure, pdamp, coupling
        As :class:`NPT`.
    tdamp : float, Array of shape (S,) or None
        Thermostat time scale in fs; None without a thermostat.
    chain_length : int
        Length of both chains (1 without a thermostat).
    thermostat : bool
        Whether the particle and barostat chains act.
    """

    dt: eqx.AbstractVar[float | jax.Array]
    pressure: eqx.AbstractVar[float | jax.Array]
    tdamp: eqx.AbstractVar[float | jax.Array | None]
    pdamp: eqx.AbstractVar[float | jax.Array]
    coupling: eqx.AbstractVar[str]
    chain_length: eqx.AbstractVar[int]
    thermostat: eqx.AbstractVar[bool]

    def __check_init__(self):
        # the checks NPT and NPH share (Equinox runs this after the subclass's own)
        owner = type(self).__name__
        v.check_real(owner, "dt", self.dt, v.positive(), unit="fs", per_system=True)
        v.check_real(owner, "pressure", self.pressure, v.finite(), unit="eV/Å³", per_system=True)
        v.check_real(owner, "pdamp", self.pdamp, v.positive(), unit="fs", per_system=True)
        v.check_choice(owner, "coupling", self.coupling, COUPLINGS)

    @abc.abstractmethod
    def _temperature_parameter(self):
        """The temperature (K) of ``kT`` and the masses, or None for the one at entry."""

    # ------------------------------------------------------------------ helpers
    def _dt(self, batch: Batch) -> jax.Array:
        return per_system(batch, fs_to_ase_time(jnp.asarray(self.dt, batch.dtype)))

    @property
    def n_cell_dof(self) -> int:
        return {"isotropic": 1, "anisotropic": 3, "triclinic": 6}[self.coupling]

    @staticmethod
    def _n_dof(batch: Batch) -> jax.Array:
        return jnp.maximum(obs.degrees_of_freedom(batch), 1.0)

    def _n_cell_dof(self, batch: Batch) -> jax.Array:
        """Cell degrees of freedom of each system, (S,): none for a system that is not
        periodic along every lattice vector (its cell is held; module docstring)."""
        periodic = jnp.all(batch.pbc, axis=-1)
        return jnp.where(periodic, float(self.n_cell_dof), 0.0).astype(batch.dtype)

    # ------------------------------------------------------------------ state
    def init_state(self, batch: Batch) -> NPTState:
        v.check_fits(self, batch.max_systems)
        s, dtype = batch.max_systems, batch.dtype
        m = int(self.chain_length)
        n_dof = self._n_dof(batch)
        temperature = self._temperature_parameter()
        if temperature is None:  # at entry into the stage (the engine calls init_state then)
            t = jnp.maximum(obs.temperature(batch), _MIN_MASS_TEMPERATURE)
        else:
            t = per_system(batch, temperature)
        kT = units.kB * t
        tau_p = per_system(batch, fs_to_ase_time(jnp.asarray(self.pdamp, dtype)))
        w = (n_dof + 3.0) * kT * tau_p**2
        if self.coupling != "isotropic":
            w = w / 3.0
        chain_dof = jnp.ones((s, m), dtype).at[:, 0].set(self.n_cell_dof)
        r = chain_dof * (kT * tau_p**2)[:, None]
        if self.thermostat:
            tau_t = per_system(batch, fs_to_ase_time(jnp.asarray(self.tdamp, dtype)))
            q_dof = jnp.ones((s, m), dtype).at[:, 0].set(n_dof)
            q = q_dof * (kT * tau_t**2)[:, None]
        else:
            q = jnp.ones((s, m), dtype)
        zeros = jnp.zeros((s, m), dtype)
        return NPTState(
            p_cell=jnp.zeros((s, self.n_cell_dof), dtype),
            eta=zeros,
            p_eta=zeros,
            xi=zeros,
            p_xi=zeros,
            kT=kT,
            pressure=per_system(batch, self.pressure),
            W=w,
            Q=q,
            R=r,
        )

    # ------------------------------------------------------------------ sub-steps
    def _rate(self, batch: Batch, state: NPTState) -> jax.Array:
        """The barostat rate ``L = Σ_k (p_k/W) E_k``, shape (S, 3, 3)."""
        basis = cell_basis(self.coupling, batch.dtype)
        return jnp.einsum("sk,kij->sij", state.p_cell / state.W[:, None], basis)

    def _kick_cell(self, batch: Batch, state: NPTState, delta: jax.Array) -> NPTState:
        """``p_k += δ <E_k, V (P_int - P_ext) + (Σ m v² / N_f) 1>``."""
        mv = jnp.where(batch.atom_mask[:, None], batch.masses[:, None] * batch.velocities, 0.0)
        k2 = batch.sum_atoms(mv[:, :, None] * batch.velocities[:, None, :])  # (S, 3, 3)
        volume = jnp.where(batch.system_mask, batch.volume, 1.0)
        eye = jnp.eye(3, dtype=batch.dtype)
        two_ke = jnp.trace(k2, axis1=-2, axis2=-1)
        force = (
            k2
            - volume[:, None, None] * batch.stress
            - (state.pressure * volume)[:, None, None] * eye
            + (two_ke / self._n_dof(batch))[:, None, None] * eye
        )
        g = jnp.einsum("sij,kij->sk", force, cell_basis(self.coupling, batch.dtype))
        g = jnp.where(jnp.all(batch.pbc, axis=-1)[:, None], g, 0.0)  # non-periodic: held
        return eqx.tree_at(lambda st: st.p_cell, state, state.p_cell + delta[:, None] * g)

    def _kick_particles(self, batch: Batch, state: NPTState, delta: jax.Array) -> Batch:
        """Exact flow of ``dp/dt = F - p (L + tr(L)/N_f)`` for time ``δ`` with frozen forces."""
        rate = self._rate(batch, state)
        tr = jnp.trace(rate, axis1=-2, axis2=-1) / self._n_dof(batch)
        k = rate + tr[:, None, None] * jnp.eye(3, dtype=batch.dtype)
        e, phi = self._exp_phi(-k * delta[:, None, None])
        e, phi = batch.to_atoms_axis(e), batch.to_atoms_axis(phi * delta[:, None, None])
        accel = batch.forces / batch.masses[:, None]
        v = jnp.einsum("ni,nij->nj", batch.velocities, e) + jnp.einsum("ni,nij->nj", accel, phi)
        return batch.replace(velocities=v)

    def _drift(self, batch: Batch, state: NPTState, delta: jax.Array) -> Batch:
        """Exact flow of ``dr/dt = v + r L``, ``dcell/dt = cell L`` for time ``δ``."""
        e, phi = self._exp_phi(self._rate(batch, state) * delta[:, None, None])
        cell = jnp.einsum("sij,sjk->sik", batch.cell, e)
        e_at = batch.to_atoms_axis(e)
        phi_at = batch.to_atoms_axis(phi * delta[:, None, None])
        r = jnp.einsum("ni,nij->nj", batch.positions, e_at) + jnp.einsum(
            "ni,nij->nj", batch.velocities, phi_at
        )
        return batch.replace(positions=r, cell=cell)

    def _exp_phi(self, a: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``e^A`` and ``φ₁(A) = Σ_j A^j/(j+1)!`` of a batch of 3x3 matrices (S, 3, 3)."""
        if self.coupling != "triclinic":  # diagonal: exact elementwise
            d = jnp.diagonal(a, axis1=-2, axis2=-1)
            return _diag(jnp.exp(d)), _diag(_exprel(d))
        s = a.shape[0]
        aug = jnp.zeros((s, 6, 6), a.dtype)
        aug = aug.at[:, :3, :3].set(a).at[:, :3, 3:].set(jnp.eye(3, dtype=a.dtype))
        ex = jax.scipy.linalg.expm(aug)
        return ex[:, :3, :3], ex[:, :3, 3:]

    def _thermostat_particles(self, batch: Batch, state: NPTState, delta) -> tuple:
        mv2 = jnp.where(batch.atom_mask, batch.masses * jnp.sum(batch.velocities**2, axis=-1), 0.0)
        two_ke = batch.sum_atoms(mv2)
        p_eta, eta, scale = chains.nose_hoover_chain(
            state.p_eta,
            state.eta,
            state.Q,
            two_ke,
            self._n_dof(batch),
            state.kT,
            delta,
            _SY,
            unroll=True,
        )
        v = batch.velocities * batch.to_atoms_axis(scale)[:, None]
        state = eqx.tree_at(lambda st: (st.p_eta, st.eta), state, (p_eta, eta))
        return batch.replace(velocities=v), state

    def _thermostat_cell(self, batch: Batch, state: NPTState, delta) -> NPTState:
        two_ke = jnp.sum(state.p_cell**2, axis=-1) / state.W
        n = self._n_cell_dof(batch)
        p_xi, xi, scale = chains.nose_hoover_chain(
            state.p_xi, state.xi, state.R, two_ke, n, state.kT, delta, _SY, unroll=True
        )
        # a held cell has no barostat chain: its links stay put (driven by -kT alone they
        # would drift without bound, cancelling in the conserved energy but not in float32)
        periodic = jnp.all(batch.pbc, axis=-1)[:, None]
        p_xi = jnp.where(periodic, p_xi, state.p_xi)
        xi = jnp.where(periodic, xi, state.xi)
        return eqx.tree_at(
            lambda st: (st.p_xi, st.xi, st.p_cell),
            state,
            (p_xi, xi, state.p_cell * scale[:, None]),
        )

    # ------------------------------------------------------------------ the two halves
    def first_half(self, batch, state):
        dt = self._dt(batch)
        half = 0.5 * dt
        if self.thermostat:
            state = self._thermostat_cell(batch, state, half)
            batch, state = self._thermostat_particles(batch, state, half)
        state = self._kick_cell(batch, state, half)
        batch = self._kick_particles(batch, state, half)
        return self._drift(batch, state, dt), state

    def second_half(self, batch, state):
        half = 0.5 * self._dt(batch)
        batch = self._kick_particles(batch, state, half)
        state = self._kick_cell(batch, state, half)
        if self.thermostat:
            batch, state = self._thermostat_particles(batch, state, half)
            state = self._thermostat_cell(batch, state, half)
        return batch, state

    # ------------------------------------------------------------------ observables
    def conserved_energy(self, batch: Batch, state: NPTState) -> jax.Array:
        """The extended energy ``H`` (module docstring) of each system in eV, shape (S,)."""
        volume = jnp.where(batch.system_mask, batch.volume, 0.0)
        h = (
            batch.energy
            + obs.kinetic_energy(batch)
            + 0.5 * jnp.sum(state.p_cell**2, axis=-1) / state.W
            + state.pressure * volume
        )
        if self.thermostat:
            n_dof = self._n_dof(batch)
            h = h + chains.chain_energy(state.p_eta, state.eta, state.Q, n_dof, state.kT)
            n_cell = self._n_cell_dof(batch)
            h = h + chains.chain_energy(state.p_xi, state.xi, state.R, n_cell, state.kT)
        return jnp.where(batch.system_mask, h, 0.0)

    @property
    def needs_stress(self) -> bool:
        return True

    def observables(self, batch, state):
        out = super().observables(batch, state)
        out["conserved_energy"] = self.conserved_energy(batch, state)
        out["pressure"] = obs.pressure(batch)
        out["volume"] = jnp.where(batch.system_mask, batch.volume, 0.0)
        return out


def _diag(d: jax.Array) -> jax.Array:
    return d[..., :, None] * jnp.eye(d.shape[-1], dtype=d.dtype)


def _exprel(x: jax.Array) -> jax.Array:
    """``(e^x - 1)/x``, finite and accurate at and near 0."""
    small = jnp.abs(x) < 1e-4
    xs = jnp.where(small, 1.0, x)
    series = 1.0 + x / 2.0 + x * x / 6.0 + x * x * x / 24.0
    return jnp.where(small, series, jnp.expm1(xs) / xs)
