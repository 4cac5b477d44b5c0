"""FIRE and FIRE 2.0 relaxation, per system, with optional variable cell.

Every quantity FIRE reduces (``v·F``, ``|F|``, ``|v|``, the norm of the step) is reduced per
system, and every FIRE parameter that evolves (time step, mixing ``alpha``, step counters) is a
per-system array in the stage state, so a padded batch of systems relaxes exactly as each system
would alone.

With ``cell_filter="frechet"`` the optimizer works on the generalized coordinates of
:class:`~fused_dynamics.stages.cell_filter.FrechetCellFilter`: one row per atom (positions in the
reference cell frame) plus three cell rows, and the generalized forces (transformed forces plus
the virial). FIRE's velocity of the atom rows is ``batch.velocities``; that of the cell rows lives
in the stage state. The generalized vectors and their per-system reductions are in
:mod:`fused_dynamics.stages.generalized`.

:class:`FIRE` and :class:`FIRE2` are final; what they share is :class:`AbstractFIRE`. A system
that enters either stage starts afresh: the engine gives it the stage's ``init_state`` (initial
time step and mixing, counters 0, the cell at entry as reference cell) and zero velocities.
"""

# No ``from __future__ import annotations`` here: Equinox reads ``AbstractVar`` annotations
# when the class is created, and refuses them as strings.
import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import observables as obs
from .. import validation as v
from ..batch import Batch
from .base import Stage, fs_to_ase_time, per_system, safe_sqrt
from .cell_filter import CellFilterState, FrechetCellFilter, make_cell_filter
from .generalized import Dof, cap_norm, map_dof, scale, select, vdot

__all__ = ["AbstractFIRE", "FIRE", "FIRE2", "FIREState"]

_FLAVORS = ("ase", "vv")


class FIREState(eqx.Module):
    """Per-system FIRE state (every leaf has leading axis S).

    Attributes
    ----------
    dt : Array (S,)
        Current time step.
    alpha : Array (S,)
        Current mixing coefficient.
    n_pos : Array (S,) int32
        Steps since ``v·F`` was last non-positive (ASE's ``Nsteps``).
    n_neg : Array (S,) int32
        Consecutive steps with ``v·F <= 0`` (FIRE 2.0's ``N_P<=0``).
    n_iter : Array (S,) int32
        Steps done in this stage (FIRE 2.0's ``initialdelay`` counts them). 0 on a system's
        first step: the engine gives a system that enters the stage a fresh state
        (:meth:`AbstractFIRE.init_state`) and zero velocities.
    cell : CellFilterState or None
        Reference cell (the cell at entry into the stage) and ``log F`` with a cell filter.
    cell_velocity : Array (S, 3, 3) or None
        FIRE velocity of the three cell rows with a cell filter.
    """

    dt: jax.Array
    alpha: jax.Array
    n_pos: jax.Array
    n_neg: jax.Array
    n_iter: jax.Array
    cell: CellFilterState | None = None
    cell_velocity: jax.Array | None = None


# ---------------------------------------------------------------------- shared machinery
class AbstractFIRE(Stage):
    """Abstract base of :class:`FIRE` and :class:`FIRE2`: state, generalized coordinates and
    observables.

    A subclass declares the parameters below as fields (or properties) and gives
    :meth:`_dt0`, the initial time step in the unit of its update, besides the two halves. The
    state of a system that enters the stage is :meth:`init_state` (time step ``_dt0()``,
    mixing ``astart``, counters 0, with a cell filter the current cell as reference cell and
    zero cell velocity), selected for it by the engine, which also zeroes its velocities
    (``is_optimizer``); ``n_iter == 0`` marks its first step.
    """

    dt: eqx.AbstractVar[float | jax.Array | None]
    maxstep: eqx.AbstractVar[float | jax.Array]
    dtmax: eqx.AbstractVar[float | jax.Array | None]
    Nmin: eqx.AbstractVar[int | jax.Array]
    finc: eqx.AbstractVar[float | jax.Array]
    fdec: eqx.AbstractVar[float | jax.Array]
    astart: eqx.AbstractVar[float | jax.Array]
    fa: eqx.AbstractVar[float | jax.Array]
    cell_filter: eqx.AbstractVar[str | None]
    scalar_pressure: eqx.AbstractVar[float | jax.Array]
    exp_cell_factor: eqx.AbstractVar[float | jax.Array | None]

    @abc.abstractmethod
    def _dt0(self):
        """The initial time step (scalar or (S,)) in the unit of the update."""

    @property
    def needs_stress(self) -> bool:
        return self.cell_filter is not None

    @property
    def is_optimizer(self) -> bool:
        return True

    def _filter(self) -> FrechetCellFilter | None:
        return make_cell_filter(self.cell_filter, self.scalar_pressure, self.exp_cell_factor)

    def init_state(self, batch: Batch) -> FIREState:
        """The state of systems entering the stage, from ``batch`` as it is at entry."""
        v.check_fits(self, batch.max_systems)
        filt = self._filter()
        zeros_i = jnp.zeros((batch.max_systems,), jnp.int32)
        return FIREState(
            dt=per_system(batch, self._dt0()),
            alpha=per_system(batch, self.astart),
            n_pos=zeros_i,
            n_neg=zeros_i,
            n_iter=zeros_i,
            cell=None if filt is None else filt.init_state(batch),
            cell_velocity=None if filt is None else jnp.zeros_like(batch.cell),
        )

    def _forces(self, batch: Batch, state: FIREState) -> Dof:
        filt = self._filter()
        if filt is None:
            return batch.forces, None
        return filt.generalized_forces(batch, state.cell)

    def _velocities(self, batch: Batch, state: FIREState) -> Dof:
        return batch.velocities, state.cell_velocity

    def _set_velocities(self, batch: Batch, state: FIREState, v: Dof) -> tuple[Batch, FIREState]:
        vel = jnp.where(batch.atom_mask[:, None], v[0], 0.0)
        batch = batch.replace(velocities=vel)
        if v[1] is not None:
            state = eqx.tree_at(lambda s: s.cell_velocity, state, v[1])
        return batch, state

    def _displace(self, batch: Batch, state: FIREState, d: Dof) -> tuple[Batch, FIREState]:
        filt = self._filter()
        if filt is None:
            d_atoms = jnp.where(batch.atom_mask[:, None], d[0], 0.0)
            return batch.replace(positions=batch.positions + d_atoms), state
        batch, cell_state = filt.displace(batch, state.cell, d[0], d[1])
        return batch, eqx.tree_at(lambda s: s.cell, state, cell_state)

    def _masses(self, batch: Batch) -> Dof:
        """Masses of the rows: atomic masses, and each system's mean atomic mass for the cell."""
        atoms = batch.masses[:, None]
        if self.cell_filter is None:
            return atoms, None
        total = batch.sum_atoms(jnp.where(batch.atom_mask, batch.masses, 0.0))
        mean = total / jnp.maximum(batch.n_atoms, 1).astype(batch.dtype)
        mean = jnp.where(batch.system_mask, mean, 1.0)
        return atoms, jnp.broadcast_to(mean[:, None, None], batch.cell.shape)

    def _mix(self, batch: Batch, alpha: jax.Array, v: Dof, g: Dof) -> Dof:
        """``(1 - alpha) v + alpha |v| g / |g|``, per system (``g = 0`` leaves ``(1-alpha) v``)."""
        g2 = vdot(batch, g, g)
        coef = alpha * safe_sqrt(vdot(batch, v, v)) / jnp.where(g2 > 0, safe_sqrt(g2), 1.0)
        return map_dof(jnp.add, scale(batch, 1.0 - alpha, v), scale(batch, coef, g))

    def observables(self, batch: Batch, state: Any) -> dict[str, jax.Array]:
        """The base observables; with a cell filter ``fmax`` is over atoms and cell rows.

        As ASE's filter: the largest row norm of the generalized forces, atoms (``f F``) and the
        three cell rows together, so convergence needs both small forces and small stress.
        """
        out = dict(super().observables(batch, state))
        filt = self._filter()
        if filt is not None:
            f_atoms, f_cell = filt.generalized_forces(batch, state.cell)
            atoms_max = obs.fmax(batch, f_atoms)
            cell_max = jnp.max(jnp.linalg.norm(f_cell, axis=-1), axis=-1)
            out["fmax"] = jnp.where(batch.system_mask, jnp.maximum(atoms_max, cell_max), 0.0)
            out["fmax_atoms"] = atoms_max
            out["fmax_cell"] = jnp.where(batch.system_mask, cell_max, 0.0)
        return out


def _check_fire(stage, dt_unit: str) -> None:
    """The checks FIRE and FIRE2 share (see their ``Raises`` sections)."""
    owner = type(stage).__name__
    for name in ("dt", "dtmax", "dtmin"):
        if hasattr(stage, name):
            v.check_real(
                owner,
                name,
                getattr(stage, name),
                v.positive(),
                unit=dt_unit,
                allow_none=True,
                per_system=True,
            )
    v.check_real(owner, "maxstep", stage.maxstep, v.positive(), unit="Å", per_system=True)
    v.check_integer(owner, "Nmin", stage.Nmin, 0, per_system=True)
    v.check_real(owner, "finc", stage.finc, v.Rule(1.0, lower_closed=True), per_system=True)
    v.check_real(owner, "fdec", stage.fdec, v.interval(0.0, 1.0, "right"), per_system=True)
    v.check_real(owner, "astart", stage.astart, v.interval(0.0, 1.0, "both"), per_system=True)
    v.check_real(owner, "fa", stage.fa, v.interval(0.0, 1.0, "right"), per_system=True)
    v.check_choice(owner, "cell_filter", stage.cell_filter, (None, "frechet"))
    v.check_real(
        owner, "scalar_pressure", stage.scalar_pressure, v.finite(), unit="eV/Å³", per_system=True
    )
    v.check_real(
        owner,
        "exp_cell_factor",
        stage.exp_cell_factor,
        v.positive(),
        allow_none=True,
        per_system=True,
    )


_FIRE_PER_SYSTEM = ("dt", "maxstep", "dtmax", "Nmin", "finc", "fdec", "astart", "fa")
_FIRE_PER_SYSTEM += ("scalar_pressure", "exp_cell_factor")  # those of the cell filter


# ---------------------------------------------------------------------- FIRE
class FIRE(AbstractFIRE):
    """FIRE relaxation (Bitzek et al., PRL 97, 170201 (2006)), per system.

    Parameters
    ----------
    model : Model
    dt : float or Array of shape (S,), optional
        Initial time step, finite and > 0. ``flavor="ase"``: in ASE's internal time unit
        (Å·sqrt(amu/eV)), exactly as ``ase.optimize.FIRE`` (default 0.1); it is not in fs.
        ``flavor="vv"``: in fs (default 1.0).
    maxstep : float
        Largest step of a system per iteration, in Å, finite and > 0: the norm of the whole step
        of the system (all atoms and, with a cell filter, the cell rows), as ASE's FIRE.
    dtmax : float or Array of shape (S,), optional
        Largest time step, same unit as ``dt``, finite and > 0 (default 1.0 for "ase", 10.0 fs
        for "vv").
    Nmin : int
        Steps with ``v·F > 0`` before ``dt`` may grow, an integer >= 0.
    finc, fdec : float
        Growth and shrink factors of ``dt``: ``finc >= 1`` (1: ``dt`` never grows) and
        ``0 < fdec <= 1`` (1: ``dt`` never shrinks).
    astart : float
        Initial (and reset) mixing coefficient ``alpha``, in [0, 1].
    fa : float
        Decay factor of ``alpha``, in (0, 1] (1: no decay).
    flavor : {"ase", "vv"}
        ``"ase"``: ``ase.optimize.FIRE`` step for step: mass-free Euler steps that use the forces
        of the previous evaluation; the whole update is done before the model evaluation. On a
        system's first step the velocity is zero and ``v·F`` is not tested, as ASE.
        ``"vv"``: the mass-weighted form of the paper on velocity Verlet: half kick and drift
        before the evaluation, half kick and the FIRE velocity update (mixing, time-step and
        ``alpha`` adaptation, reset on ``v·F <= 0``) after it.
    cell_filter : {None, "frechet"}
        Relax the cell too, with ASE's ``FrechetCellFilter`` parametrisation. With "vv" the cell
        rows get the system's mean atomic mass.
    scalar_pressure : float or Array of shape (S,)
        External pressure in eV/Å³ for the cell filter, finite (may be negative).
    exp_cell_factor : float or Array of shape (S,), optional
        Scale of the cell coordinates, finite and > 0 (default: the number of atoms, as ASE).
    n_steps, convergence_hook
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).
        ``fmax`` (over atoms and cell rows with a cell filter) is what a criterion on
        ``"fmax"`` tests.

    Every numeric parameter may be per system (``per_system_parameters``): a 1-D array with
    one value per occupied system or one per slot.

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).

    Notes
    -----
    ``batch.velocities`` is FIRE's velocity: mass-free in "ase" (so not a physical velocity) and
    in ASE's unit with "vv"; with a cell filter it is the velocity of the reference-frame atom
    rows. ASE's separate ``a`` argument (initial alpha) is ``astart`` here.
    """

    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)
    per_system_parameters: ClassVar[tuple[str, ...]] = _FIRE_PER_SYSTEM

    dt: float | jax.Array | None = None
    maxstep: float | jax.Array = 0.2
    dtmax: float | jax.Array | None = None
    Nmin: int | jax.Array = 5
    finc: float | jax.Array = 1.1
    fdec: float | jax.Array = 0.5
    astart: float | jax.Array = 0.1
    fa: float | jax.Array = 0.99
    flavor: str = eqx.field(static=True, default="ase")
    cell_filter: str | None = eqx.field(static=True, default=None)
    scalar_pressure: float | jax.Array = 0.0
    exp_cell_factor: float | jax.Array | None = None

    def __check_init__(self):
        v.check_choice(type(self).__name__, "flavor", self.flavor, _FLAVORS)
        _check_fire(self, "ASE time units" if self.flavor == "ase" else "fs")

    # time steps in the unit the update uses
    def _dt0(self):
        if self.flavor == "ase":
            return 0.1 if self.dt is None else self.dt
        return fs_to_ase_time(1.0 if self.dt is None else self.dt)

    def _dtmax(self):
        if self.flavor == "ase":
            return 1.0 if self.dtmax is None else self.dtmax
        return fs_to_ase_time(10.0 if self.dtmax is None else self.dtmax)

    def _adapt(self, batch, state, v, g, active):
        """FIRE's velocity and parameter update where ``active`` (S,) (ASE's branch on v·F)."""
        vf = vdot(batch, g, v)
        up = active & (vf > 0.0)
        down = active & ~(vf > 0.0)
        grow = up & (state.n_pos > self.Nmin)
        dt = jnp.where(grow, jnp.minimum(state.dt * self.finc, self._dtmax()), state.dt)
        alpha = jnp.where(grow, state.alpha * self.fa, state.alpha)
        n_pos = jnp.where(up, state.n_pos + 1, state.n_pos)
        v_mix = self._mix(batch, state.alpha, v, g)  # ASE mixes with alpha before the decay
        v = select(batch, up, v_mix, v)
        v = select(batch, down, scale(batch, jnp.zeros_like(dt), v), v)
        alpha = jnp.where(down, per_system(batch, self.astart), alpha)
        dt = jnp.where(down, dt * self.fdec, dt)
        n_pos = jnp.where(down, 0, n_pos)
        state = eqx.tree_at(lambda s: (s.dt, s.alpha, s.n_pos), state, (dt, alpha, n_pos))
        return v, state

    def first_half(self, batch, state):
        g = self._forces(batch, state)
        v = self._velocities(batch, state)
        if self.flavor == "ase":
            # as ASE: no v·F test on a system's first step in the stage (its velocity is zero)
            v, state = self._adapt(batch, state, v, g, state.n_iter > 0)
            v = map_dof(jnp.add, v, scale(batch, state.dt, g))
        else:
            m = self._masses(batch)
            v = map_dof(lambda v, g, m: v + g / m, v, scale(batch, 0.5 * state.dt, g), m)
        d = cap_norm(batch, scale(batch, state.dt, v), self.maxstep)
        batch, state = self._set_velocities(batch, state, v)
        batch, state = self._displace(batch, state, d)
        state = eqx.tree_at(lambda s: s.n_iter, state, state.n_iter + 1)
        return batch, state

    def second_half(self, batch, state):
        if self.flavor == "ase":
            return batch, state
        g = self._forces(batch, state)
        v = self._velocities(batch, state)
        m = self._masses(batch)
        v = map_dof(lambda v, g, m: v + g / m, v, scale(batch, 0.5 * state.dt, g), m)
        v, state = self._adapt(batch, state, v, g, jnp.ones_like(state.n_iter, bool))
        return self._set_velocities(batch, state, v)


# ---------------------------------------------------------------------- FIRE 2.0
class FIRE2(AbstractFIRE):
    """FIRE 2.0 (Guénolé et al., Comput. Mater. Sci. 175, 109584 (2020)), per system.

    Semi-implicit Euler with the velocity mixing inside the integrator (after the velocity
    update), the time step and ``alpha`` adapted after ``Nmin`` (the paper's ``N_delay``) steps
    with ``v·F > 0``, and on ``v·F <= 0``: the half-step correction ``x -= dt v / 2``, zero
    velocity, and, unless within the first ``Nmin`` steps (``initialdelay``), ``alpha`` reset and
    ``dt`` shrunk (never below ``dtmin``). A system stuck with ``v·F <= 0`` for more than
    ``Npneg_max`` consecutive steps stops moving (the paper's stopping criterion): the
    observable ``fire_stuck`` is 1 for it, for a custom criterion or hook to act on.

    Mass-free, as ``ase.optimize.FIRE2`` (the paper with unit masses); the whole step is done
    before the model evaluation, using the forces of the previous one. Defaults are the paper's
    (``dtmax = 10 dt``, ``dtmin = 0.02 dt``, ``N_delay = 20``, ``finc = 1.1``, ``fdec = 0.5``,
    ``alpha0 = 0.25``, ``falpha = 0.99``, ``N_P<0,max = 2000``, ``initialdelay``), with ASE's time
    scale and ``maxstep`` cap. With ``initialdelay=False`` and ``Npneg_max=None`` it is ASE's
    FIRE2 except that after a correction ASE evaluates the forces again at the corrected
    positions, while here the step uses the forces already evaluated (one model evaluation per
    step), and that ASE clamps ``dt`` to ``dtmin`` where the paper keeps it.

    Parameters
    ----------
    model : Model
    dt : float or Array of shape (S,)
        Initial time step, in ASE's internal time unit (Å·sqrt(amu/eV)), as ASE's FIRE2; not fs.
        Finite and > 0.
    maxstep : float
        Largest norm of a system's step per iteration (Å), as ASE; finite and > 0.
    dtmax, dtmin : float or Array of shape (S,)
        Bounds of the time step (same unit as ``dt``), finite and > 0, ``dtmin <= dtmax``.
    Nmin : int
        ``N_delay``, an integer >= 0.
    finc, fdec, astart, fa : float
        ``f_inc >= 1``, ``0 < f_dec <= 1``, ``alpha_0`` in [0, 1], ``f_alpha`` in (0, 1].
    Npneg_max : int or None
        Stop a system after this many consecutive steps with ``v·F <= 0`` (an integer >= 1);
        None never stops.
    initialdelay : bool
        Do not shrink ``dt`` or reset ``alpha`` during a system's first ``Nmin`` steps.
    cell_filter, scalar_pressure, exp_cell_factor
        As :class:`FIRE`.
    n_steps, convergence_hook
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).

    Every numeric parameter but ``Npneg_max`` may be per system (``per_system_parameters``).

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).
    """

    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)
    per_system_parameters: ClassVar[tuple[str, ...]] = _FIRE_PER_SYSTEM + (
        "dtmin",
        "initialdelay",
    )

    dt: float | jax.Array = 0.1
    maxstep: float | jax.Array = 0.2
    dtmax: float | jax.Array = 1.0
    dtmin: float | jax.Array = 2e-3
    Nmin: int | jax.Array = 20
    finc: float | jax.Array = 1.1
    fdec: float | jax.Array = 0.5
    astart: float | jax.Array = 0.25
    fa: float | jax.Array = 0.99
    Npneg_max: int | None = eqx.field(static=True, default=2000)
    initialdelay: bool | jax.Array = True
    cell_filter: str | None = eqx.field(static=True, default=None)
    scalar_pressure: float | jax.Array = 0.0
    exp_cell_factor: float | jax.Array | None = None

    def __check_init__(self):
        owner = type(self).__name__
        _check_fire(self, "ASE time units")
        v.check_order(owner, "dtmin", self.dtmin, "dtmax", self.dtmax)
        v.check_integer(owner, "Npneg_max", self.Npneg_max, 1, allow_none=True)
        v.check_bool(owner, "initialdelay", self.initialdelay, allow_array=True)

    def _dt0(self):
        return self.dt

    def _stuck(self, state: FIREState) -> jax.Array:
        if self.Npneg_max is None:
            return jnp.zeros_like(state.n_neg, bool)
        return state.n_neg > self.Npneg_max

    def first_half(self, batch, state):
        g = self._forces(batch, state)
        v = self._velocities(batch, state)
        active = state.n_iter > 0  # no v·F test on a system's first step in the stage
        vf = vdot(batch, g, v)
        up = active & (vf > 0.0)
        down = active & ~(vf > 0.0)

        n_pos = jnp.where(up, state.n_pos + 1, jnp.where(down, 0, state.n_pos))
        n_neg = jnp.where(up, 0, jnp.where(down, state.n_neg + 1, state.n_neg))
        grow = up & (n_pos > self.Nmin)
        dt = jnp.where(grow, jnp.minimum(state.dt * self.finc, self.dtmax), state.dt)
        alpha = jnp.where(grow, state.alpha * self.fa, state.alpha)
        # LAMMPS counts the step being made (1-based): shrinking is allowed from step N_delay on
        delay_ok = jnp.logical_not(self.initialdelay) | (state.n_iter + 1 >= self.Nmin)
        shrink = down & delay_ok
        smaller = dt * self.fdec
        dt = jnp.where(shrink & (smaller >= self.dtmin), smaller, dt)
        alpha = jnp.where(shrink, per_system(batch, self.astart), alpha)

        # half-step correction and velocity reset on v·F <= 0
        zero = jnp.zeros_like(dt)
        back = scale(batch, jnp.where(down, -0.5 * dt, zero), v)
        v = select(batch, down, scale(batch, zero, v), v)

        # semi-implicit Euler with mixing
        v = map_dof(jnp.add, v, scale(batch, dt, g))
        v = self._mix(batch, alpha, v, g)
        step = cap_norm(batch, scale(batch, dt, v), self.maxstep)
        d = map_dof(jnp.add, back, step)

        state = eqx.tree_at(
            lambda s: (s.dt, s.alpha, s.n_pos, s.n_neg, s.n_iter),
            state,
            (dt, alpha, n_pos, n_neg, state.n_iter + 1),
        )
        stuck = self._stuck(state)
        d = scale(batch, jnp.where(stuck, zero, 1.0), d)
        v = scale(batch, jnp.where(stuck, zero, 1.0), v)
        batch, state = self._set_velocities(batch, state, v)
        batch, state = self._displace(batch, state, d)
        return batch, state

    def second_half(self, batch, state):
        # the whole step is made before the evaluation, with the forces of the previous one
        return batch, state

    def observables(self, batch, state):
        out = super().observables(batch, state)
        out["fire_stuck"] = self._stuck(state).astype(batch.dtype)
        return out
