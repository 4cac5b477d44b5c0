"""Constant pressure: NPT (MTK barostat with Nosé–Hoover chains) and NPH (barostat only).

The equations of motion, the conserved quantity and the splitting are in
:mod:`fused_dynamics.stages.mtk`, with :class:`AbstractMTK`, the barostat both stages share.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax

from .. import validation as v
from .mtk import COUPLINGS, AbstractMTK, NPTState, cell_basis

__all__ = ["AbstractMTK", "NPT", "NPH", "NPTState", "COUPLINGS", "cell_basis"]


class NPT(AbstractMTK):
    """Isothermal–isobaric MD: MTK barostat with Nosé–Hoover chains, variable cell, per system.

    Parameters
    ----------
    model : Model
        For variable-cell runs a :class:`~fused_dynamics.models.PairPotential` needs an image
        range that covers the smallest cell the run reaches (``model.with_images(batch)`` or
        ``images=(n, n, n)``); a cell that shrinks below it raises at run time.
    dt : float or Array of shape (S,)
        Time step in fs, finite and > 0.
    temperature : float or Array of shape (S,)
        Target temperature in K, finite and > 0 (the thermostat and barostat masses are
        proportional to it, so 0 is refused).
    pressure : float or Array of shape (S,)
        Target (external) pressure in eV/Å³ (``ase.units.GPa`` converts), finite; it may be
        negative (tension). Hydrostatic.
    tdamp : float or Array of shape (S,)
        Thermostat time scale in fs (typically 100 dt), finite and > 0:
        ``Q_1 = N_f kT tdamp²``, ``Q_j = kT tdamp²``.
    pdamp : float or Array of shape (S,)
        Barostat time scale in fs (typically 1000 dt), finite and > 0:
        ``W = (N_f + 3) kT pdamp²`` for ``isotropic``, a third of that per direction otherwise
        (ASE's choice); barostat chain masses ``R_1 = k kT pdamp²``, ``R_j = kT pdamp²``.
    coupling : {"isotropic", "anisotropic", "triclinic"}, default "isotropic"
        Which cell degrees of freedom move: the volume only (shape kept), the three orthogonal
        axes (an orthorhombic cell stays orthorhombic), or the six entries of the
        lower-triangular cell (ASE's standard form; no rotation).
    chain_length : int, default 3
        Length of both Nosé–Hoover chains, an integer >= 1.
    thermostat : bool, default True
        False leaves out both chains (as :class:`NPH`); then ``tdamp`` must be None and
        ``temperature`` (optional) only sets the barostat mass.
    n_steps, convergence_hook
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).

    Notes
    -----
    ``dt``, ``temperature``, ``pressure``, ``tdamp`` and ``pdamp`` are per system when arrays:
    one value per occupied system or one per slot (``per_system_parameters``).

    Per-system observables add ``conserved_energy`` (the extended energy ``H`` of the module
    docstring), ``pressure`` (instantaneous, with the kinetic part) and ``volume``.
    The degrees of freedom are ``N_f = 3 n_atoms`` (ASE's convention, no centre-of-mass
    correction), so the time-averaged :func:`~fused_dynamics.observables.temperature` equals the
    target.
    """

    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)

    per_system_parameters: ClassVar[tuple[str, ...]] = (
        "dt",
        "temperature",
        "pressure",
        "tdamp",
        "pdamp",
    )

    dt: float | jax.Array
    temperature: float | jax.Array | None
    pressure: float | jax.Array
    tdamp: float | jax.Array | None
    pdamp: float | jax.Array
    coupling: str = eqx.field(static=True, default="isotropic")
    chain_length: int = eqx.field(static=True, default=3)
    thermostat: bool = eqx.field(static=True, default=True, kw_only=True)

    def __check_init__(self):
        owner = type(self).__name__
        v.check_bool(owner, "thermostat", self.thermostat)
        if self.thermostat:
            for name in ("temperature", "tdamp"):
                if getattr(self, name) is None:
                    raise ValueError(
                        f"{owner}: {name} must be > 0 and finite, got None (it is required "
                        "with the thermostat; use NPH for none)."
                    )
            v.check_real(
                owner, "temperature", self.temperature, v.positive(), unit="K", per_system=True
            )
            v.check_real(owner, "tdamp", self.tdamp, v.positive(), unit="fs", per_system=True)
        else:
            v.check_real(
                owner,
                "temperature",
                self.temperature,
                v.positive(),
                unit="K",
                allow_none=True,
                per_system=True,
            )
            if self.tdamp is not None:
                raise ValueError(
                    f"{owner}: tdamp must be None without a thermostat, got {self.tdamp!r}."
                )
        v.check_integer(owner, "chain_length", self.chain_length, 1)

    def _temperature_parameter(self):
        return self.temperature


class NPH(AbstractMTK):
    """Isenthalpic MD: the MTK barostat of :class:`NPT` without thermostats.

    Parameters
    ----------
    model : Model
        See :class:`NPT` for the image range of pair potentials.
    dt : float or Array of shape (S,)
        Time step in fs, finite and > 0.
    pressure : float or Array of shape (S,)
        Target pressure in eV/Å³, finite.
    pdamp : float or Array of shape (S,)
        Barostat time scale in fs, finite and > 0: ``W = (N_f + 3) k_B T_m pdamp²`` (a third
        per direction for ``anisotropic`` / ``triclinic``).
    coupling : {"isotropic", "anisotropic", "triclinic"}, default "isotropic"
    mass_temperature : float or Array of shape (S,), optional
        ``T_m`` of the barostat mass, in K, finite and > 0 (nothing is thermostatted). Default:
        each system's instantaneous temperature when it enters the stage, at least 1 K.
    n_steps, convergence_hook, hooks
        See :class:`~fused_dynamics.stages.base.Stage` (``n_steps``: None or an integer >= 1).

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range (the message names the class, the
        parameter, the value and the rule).

    Notes
    -----
    ``dt``, ``pressure``, ``pdamp`` and ``mass_temperature`` are per system when arrays: one
    value per occupied system or one per slot (``per_system_parameters``).

    The conserved quantity is the enthalpy-like ``U + KE + Σ p_k²/2W + P_ext V``.
    """

    reads_energy: ClassVar[bool] = False  # the updates read forces only (Stage.reads_energy)

    per_system_parameters: ClassVar[tuple[str, ...]] = (
        "dt",
        "pressure",
        "pdamp",
        "mass_temperature",
    )

    dt: float | jax.Array
    pressure: float | jax.Array
    pdamp: float | jax.Array
    coupling: str = eqx.field(static=True, default="isotropic")
    mass_temperature: float | jax.Array | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        v.check_real(
            type(self).__name__,
            "mass_temperature",
            self.mass_temperature,
            v.positive(),
            unit="K",
            allow_none=True,
            per_system=True,
        )

    # no thermostat: the fields of AbstractMTK that NPT sets, fixed here
    @property
    def tdamp(self) -> None:
        return None

    @property
    def chain_length(self) -> int:
        return 1

    @property
    def thermostat(self) -> bool:
        return False

    @property
    def temperature(self) -> float | jax.Array | None:
        """``mass_temperature`` (the temperature of the barostat mass, not a target)."""
        return self.mass_temperature

    def _temperature_parameter(self):
        return self.mass_temperature
