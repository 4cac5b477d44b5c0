"""Variable-cell relaxation: the strain parametrisation of ``ase.filters.FrechetCellFilter``.

An optimizer with a cell filter does not move atoms and cell directly. Per system it sees
*generalized* coordinates and forces, one row per atom plus three rows for the cell:

- positions: the atoms in the reference cell frame, ``x = r F^{-T}``, and
  ``exp_cell_factor * log(F)`` for the cell, where ``F`` is the deformation gradient that takes
  the reference cell to the current one (``cell = ref_cell F^T``);
- forces: ``f F`` for the atoms, and for the cell the gradient of the energy with respect to
  ``log(F)`` divided by ``exp_cell_factor``: with the virial ``W = -V (σ + p I)`` (``σ`` the
  stress, ``p`` the scalar pressure) and ``G = W F^{-T}``, the cell force is the adjoint of the
  Fréchet derivative of ``expm`` at ``log F`` applied to ``G``, i.e. ``L_exp(log(F)^T, G)``.

This is ASE's ``FrechetCellFilter`` (ase/filters.py and ase/_4/optimize/cellutil.py), except that
``log(F)`` is kept in the stage state instead of being recomputed with ``logm`` from the cell
(JAX has no ``logm``); ASE's generalized cell positions also carry a constant offset
``exp_cell_factor * ln(n_atoms) I`` that no optimizer step can see. The reference cell is the cell
a system has when it enters the owning stage (``ASE``: when the filter is built): the engine
selects the stage's ``init_state``, computed at entry, for every system that enters it.

A system that is not periodic along all three lattice vectors (a cluster in a vacuum box, a
slab) has zero cell force, so its cell never moves: a box that is not a period carries no
pressure (ASE's calculators give such a system no stress; LAMMPS refuses a barostat on a
non-periodic dimension), and the relaxation is that of the atoms alone.

Optimizers only ever move along generalized displacements (:meth:`FrechetCellFilter.displace`),
so they never need the absolute generalized positions.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import validation as v
from ..batch import Batch
from ..parameters import per_system

__all__ = ["FrechetCellFilter", "CellFilterState", "CELL_FILTERS"]

CELL_FILTERS = ("frechet",)


class CellFilterState(eqx.Module):
    """Per-system state of a cell filter (every leaf has leading axis S).

    Attributes
    ----------
    ref_cell : Array, shape (S, 3, 3)
        The reference cell (rows are lattice vectors).
    log_deform : Array, shape (S, 3, 3)
        ``log(F)``, the matrix logarithm of the deformation gradient (not scaled).
    """

    ref_cell: jax.Array
    log_deform: jax.Array


def _mT(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def _matmul3(a: jax.Array, b: jax.Array) -> jax.Array:
    # 3x3 products as broadcast-and-sum: far cheaper to compile on CPU than batched dots
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def expm3(x: jax.Array, order: int = 16, theta: float = 0.5, max_squarings: int = 40) -> jax.Array:
    """Matrix exponential of one 3x3 matrix by scaling and squaring of its Taylor series.

    ``x`` is scaled by ``2**-s`` (``s`` the least integer with ``|x| / 2**s <= theta``, ``|x|``
    the Frobenius norm), the series is summed to ``order`` terms (truncation below 1e-20
    relative at ``theta = 0.5``), and the result squared ``s`` times (at most
    ``max_squarings``). Both loops are fixed-length ``lax`` loops, so the function is cheap to
    compile and differentiable in both modes:
    ``jax.jvp(expm3, (x,), (e,))`` is the Fréchet derivative of the exponential. It agrees with
    ``scipy.linalg.expm`` and ``expm_frechet`` to about 1e-14 relative for ``|x| <= 3``.
    """
    norm = jnp.sqrt(jnp.sum(jax.lax.stop_gradient(x) ** 2))
    s = jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-300) / theta))
    s = jnp.clip(s, 0, max_squarings).astype(jnp.int32)
    y = x / (2.0 ** s.astype(x.dtype))
    eye = jnp.eye(3, dtype=x.dtype) + jnp.zeros_like(y)

    def term(k, carry):
        t, acc = carry
        t = _matmul3(t, y) / k.astype(x.dtype)
        return t, acc + t

    _, out = jax.lax.fori_loop(1, order + 1, term, (eye, eye))
    return jax.lax.fori_loop(
        0, max_squarings, lambda i, a: jnp.where(i < s, _matmul3(a, a), a), out
    )


def expm3_frechet_adjoint(x: jax.Array, g: jax.Array) -> jax.Array:
    """``sum(L_exp(x, E_mn) * g)`` for every (m, n), i.e. ``L_exp(x^T, g)`` (one 3x3 matrix)."""
    return jax.jvp(expm3, (x.T,), (g,))[1]


def _atoms_matmul(batch: Batch, x: jax.Array, m: jax.Array) -> jax.Array:
    """Row vectors ``x (N, 3)`` times their system's matrix ``m (S, 3, 3)``."""
    return jnp.einsum("ni,nij->nj", x, batch.to_atoms_axis(m))


class FrechetCellFilter(eqx.Module):
    """Generalized coordinates and forces of ASE's ``FrechetCellFilter``, per system.

    Parameters
    ----------
    scalar_pressure : float or Array of shape (S,)
        External pressure in eV/Å³ (ASE's ``scalar_pressure``), finite (may be negative); the
        relaxation then minimizes the enthalpy ``E + p V``.
    exp_cell_factor : float or Array of shape (S,), optional
        Scale of the cell coordinates, finite and > 0. Default: the number of atoms of each
        system, as ASE.

    Raises
    ------
    ValueError
        At construction, for a parameter outside its range.
    """

    per_system_parameters: ClassVar[tuple[str, ...]] = ("scalar_pressure", "exp_cell_factor")

    scalar_pressure: float | jax.Array = 0.0
    exp_cell_factor: float | jax.Array | None = None

    def __check_init__(self):
        owner = type(self).__name__
        v.check_real(
            owner,
            "scalar_pressure",
            self.scalar_pressure,
            v.finite(),
            unit="eV/Å³",
            per_system=True,
        )
        v.check_real(
            owner,
            "exp_cell_factor",
            self.exp_cell_factor,
            v.positive(),
            allow_none=True,
            per_system=True,
        )

    # ------------------------------------------------------------------ state
    def init_state(self, batch: Batch) -> CellFilterState:
        """Reference cell = the current cell, ``log F = 0``."""
        return CellFilterState(ref_cell=batch.cell, log_deform=jnp.zeros_like(batch.cell))

    # ------------------------------------------------------------------ per-system pieces
    def cell_factor(self, batch: Batch) -> jax.Array:
        """``exp_cell_factor`` of each system, shape (S,) (at least 1 for empty slots)."""
        if self.exp_cell_factor is None:
            return jnp.maximum(batch.n_atoms, 1).astype(batch.dtype)
        return per_system(batch, self.exp_cell_factor)

    def deformation(self, batch: Batch, state: CellFilterState) -> jax.Array:
        """Deformation gradient ``F = (ref_cell^{-1} cell)^T`` of each system, shape (S, 3, 3)."""
        return _mT(jnp.linalg.solve(state.ref_cell, batch.cell))

    def virial(self, batch: Batch) -> jax.Array:
        """``-V (σ + p I)`` of each system, shape (S, 3, 3) (zero for empty slots)."""
        p = per_system(batch, self.scalar_pressure)
        eye = jnp.eye(3, dtype=batch.dtype)
        volume = jnp.where(batch.system_mask, batch.volume, 1.0)
        w = -volume[:, None, None] * (batch.stress + p[:, None, None] * eye)
        return jnp.where(batch.system_mask[:, None, None], w, 0.0)

    def generalized_forces(
        self, batch: Batch, state: CellFilterState
    ) -> tuple[jax.Array, jax.Array]:
        """Forces on the generalized coordinates.

        Returns
        -------
        atoms : Array, shape (N, 3)
            ``f F`` (zero on padding).
        cell : Array, shape (S, 3, 3)
            The three cell rows of each system (zero for empty slots and for systems not
            periodic along every lattice vector: their cell is held).
        """
        deform = self.deformation(batch, state)
        f_atoms = _atoms_matmul(batch, batch.forces, deform)
        f_atoms = jnp.where(batch.atom_mask[:, None], f_atoms, 0.0)
        # ASE: ucf_cell_grad = virial @ inv(F^T)
        grad = _mT(jnp.linalg.solve(deform, _mT(self.virial(batch))))
        # <L(X, E_mn), G> over all (m, n) is the adjoint Fréchet derivative L(X^T, G).
        log_force = jax.vmap(expm3_frechet_adjoint)(state.log_deform, grad)
        f_cell = log_force / self.cell_factor(batch)[:, None, None]
        moves = batch.system_mask & jnp.all(batch.pbc, axis=-1)
        return f_atoms, jnp.where(moves[:, None, None], f_cell, 0.0)

    def displace(
        self,
        batch: Batch,
        state: CellFilterState,
        d_atoms: jax.Array,
        d_cell: jax.Array,
    ) -> tuple[Batch, CellFilterState]:
        """Move every system by a generalized displacement.

        Parameters
        ----------
        d_atoms : Array, shape (N, 3)
            Displacement of the atoms in the reference frame.
        d_cell : Array, shape (S, 3, 3)
            Displacement of the cell rows (``exp_cell_factor * log F``).

        Returns
        -------
        batch : Batch
            New positions ``(x + d) F_new^T`` and cell ``ref_cell F_new^T``.
        state : CellFilterState
        """
        deform = self.deformation(batch, state)
        log_new = state.log_deform + d_cell / self.cell_factor(batch)[:, None, None]
        deform_new = jax.vmap(expm3)(log_new)
        # reference-frame positions x = r F^{-T}, i.e. x^T = F^{-1} r^T
        x = batch.positions
        x = jnp.einsum("nij,nj->ni", batch.to_atoms_axis(jnp.linalg.inv(deform)), x)
        r_new = _atoms_matmul(batch, x + d_atoms, _mT(deform_new))
        cell_new = state.ref_cell @ _mT(deform_new)
        positions = jnp.where(batch.atom_mask[:, None], r_new, batch.positions)
        cell = jnp.where(batch.system_mask[:, None, None], cell_new, batch.cell)
        new_state = CellFilterState(ref_cell=state.ref_cell, log_deform=log_new)
        return batch.replace(positions=positions, cell=cell), new_state


def make_cell_filter(
    cell_filter: str | None,
    scalar_pressure: float | jax.Array = 0.0,
    exp_cell_factor: float | jax.Array | None = None,
) -> FrechetCellFilter | None:
    """The filter named by an optimizer's ``cell_filter`` argument (``None`` for fixed cells)."""
    if cell_filter is None:
        return None
    if cell_filter == "frechet":
        return FrechetCellFilter(scalar_pressure=scalar_pressure, exp_cell_factor=exp_cell_factor)
    raise ValueError(f"cell_filter={cell_filter!r} is not one of {CELL_FILTERS} or None.")
