"""The embedded-atom method (EAM), tabulated as in LAMMPS and evaluated as ASE's ``EAM``.

``E = Σ_i F_{s_i}(ρ_i) + ½ Σ_{i≠j} φ_{s_i s_j}(r_ij)``, ``ρ_i = Σ_{j≠i} f_{s_j}(r_ij)``
(M. S. Daw and M. I. Baskes, Phys. Rev. B 29, 6443 (1984)), over pairs closer than the cutoff.
The tables are those of the LAMMPS potential files (``pair_style eam`` funcfl ``.eam``,
``eam/alloy`` setfl ``.alloy``, ``eam/fs`` ``.fs``: https://docs.lammps.org/pair_eam.html), read
with ASE's own reader, and every tabulated function is interpolated exactly as
:class:`ase.calculators.eam.EAM` does (:func:`spline_table`), so energies, forces and stresses
equal ASE's to rounding (``tests/test_eam.py``).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers as _Z_OF_SYMBOL
from scipy.interpolate import InterpolatedUnivariateSpline, PPoly

from ..batch import Batch
from .graph import Graph, GraphModel, neighbor_graph
from .pair_sums import poison_systems
from .species import _species_converter, _symbols, atom_species, check_batch_species

__all__ = ["EAM", "spline_table"]


def spline_table(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-grid-interval cubic coefficients of ASE's spline through ``(x, y)``, shape (n-1, 4).

    ASE interpolates every table with ``scipy.interpolate.InterpolatedUnivariateSpline(x, y,
    k=3)`` (FITPACK's interpolating cubic spline: knots at the data points except the second
    and the second to last, i.e. "not-a-knot" ends) and evaluates it with the default ``ext=0``:
    outside ``[x[0], x[-1]]`` the end pieces' cubics are continued. The same spline is built
    here, converted to its polynomial pieces (``PPoly.from_spline``) and re-expanded about each
    grid point: row ``k`` holds ``c`` with ``y(x) = c0 + c1 u + c2 u² + c3 u³``, ``u = x - x[k]``,
    for ``x`` in ``[x[k], x[k+1]]`` (and beyond the ends, rows 0 and n-2). ``x`` must be a
    uniform grid (as the tables of the file formats are).
    """
    x = np.asarray(x, np.float64)
    spline = InterpolatedUnivariateSpline(x, np.asarray(y, np.float64), k=3)
    pieces = PPoly.from_spline(spline._eval_args)
    left = x[:-1]
    which = np.searchsorted(pieces.x, 0.5 * (left + x[1:]), side="right") - 1
    c = pieces.c[::-1, which].T  # (n-1, 4), lowest power first, about pieces.x[which]
    d = left - pieces.x[which]  # Taylor shift to the grid point
    return np.stack(
        [
            c[:, 0] + d * (c[:, 1] + d * (c[:, 2] + d * c[:, 3])),
            c[:, 1] + d * (2 * c[:, 2] + 3 * d * c[:, 3]),
            c[:, 2] + 3 * d * c[:, 3],
            c[:, 3],
        ],
        axis=-1,
    )


def _evaluate(table: jax.Array, index: tuple, x: jax.Array, first: int, dx: float) -> jax.Array:
    """Piecewise cubics ``table[*index]`` (table (..., M, 4)) on the grid ``(first + k) dx``.

    ``index``: species indices selecting one function per entry of ``x``. The piece is
    ``k = floor(x / dx) - first`` clipped to ``[0, M - 1]`` (the end pieces continued); its
    grid point ``(first + k) dx`` is computed as ASE's grid ``np.arange(n) * dx`` is.
    """
    m = table.shape[-2]
    k = jnp.clip(jnp.floor(x / dx) - first, 0, m - 1).astype(jnp.int32)
    c = table[(*index, k)].astype(x.dtype)
    u = x - (k + first).astype(x.dtype) * dx
    return c[..., 0] + u * (c[..., 1] + u * (c[..., 2] + u * c[..., 3]))


class EAM(GraphModel):
    """Embedded-atom method potential for one or several elements (setfl, funcfl, fs tables).

    ``E = Σ_i F_{s_i}(ρ_i) + ½ Σ_i Σ_{j≠i} φ_{s_i s_j}(r_ij)`` for ``r_ij < cutoff`` within each
    system, with ``ρ_i = Σ_{j≠i} f_{s_j}(r_ij)`` (eam, eam/alloy) or ``f_{s_j s_i}(r_ij)``
    (eam/fs, first index the neighbor's species, as ASE). Energies in eV, lengths in Å,
    densities in the file's units; forces ``-dE/dr`` (eV/Å) and stress (eV/Å³) come from the
    model protocol's reverse pass (:class:`~fused_dynamics.models.graph.GraphModel`).

    Interpolation (that of :class:`ase.calculators.eam.EAM`, :func:`spline_table`): each function
    is ASE's cubic spline through its table, stored as one cubic per grid interval and evaluated
    at ``x`` with the piece ``floor(x / dx)`` (minus one for ``φ``, whose grid starts at ``dr``);
    beyond the table (``ρ`` past ``nrho`` points, ``r`` past ``nr`` points or below the first
    point) the end cubic is continued, as FITPACK does. ``F`` and ``f`` are splines of the
    tables on ``ρ = k drho``, ``r = k dr`` (``k = 0, 1, ...``); ``φ`` is the spline of
    ``(r φ)(r) / r`` on ``r = dr, 2 dr, ...`` (the files store ``r φ``; ASE drops the ``r = 0``
    point, so ``r < dr`` is extrapolated). Pairs at ``r >= cutoff`` contribute nothing, whatever
    the tables hold there.

    Parameters
    ----------
    cutoff : float
        Static. Å.
    embedding : Array, shape (K, nrho - 1, 4)
        Cubic coefficients of ``F_s(ρ)`` (eV) per ``ρ`` interval (:func:`spline_table`).
    density : Array, shape (K, nr - 1, 4) or (K, K, nr - 1, 4)
        Cubic coefficients of ``f_s(r)``, or of ``f_{s s'}(r)`` (eam/fs).
    phi : Array, shape (K, K, nr - 2, 4)
        Cubic coefficients of ``φ_{ss'}(r)`` (eV), symmetric in ``s, s'``.
    drho, dr : float
        Static. Table steps of ``ρ`` and ``r`` (Å).
    species : tuple of int
        Static. Atomic numbers (or symbols) of the K elements, in table order.
    images : tuple of 3 int, optional
        Static, dense path: see :class:`~fused_dynamics.models.graph.GraphModel`.

    The coefficient arrays are the model's (differentiable, trainable) parameters; build them
    with :meth:`from_file` or :meth:`from_tables`.

    Raises
    ------
    ValueError
        At construction: inconsistent shapes, ``cutoff``, ``dr`` or ``drho`` not > 0, species not
        distinct elements. At a call or before a run (:meth:`check_batch`): an atom of an
        element not in ``species``, naming the element and the system slot (inside ``jax.jit``
        an ``EquinoxRuntimeError``, a :class:`RuntimeError`, with the same information).
    """

    cutoff: float = eqx.field(static=True)
    embedding: jax.Array = eqx.field(converter=jnp.asarray)
    density: jax.Array = eqx.field(converter=jnp.asarray)
    phi: jax.Array = eqx.field(converter=jnp.asarray)
    drho: float = eqx.field(static=True)
    dr: float = eqx.field(static=True)
    species: tuple[int, ...] = eqx.field(static=True, converter=_species_converter)

    def __check_init__(self):
        k = len(self.species)
        shapes = {n: tuple(getattr(self, n).shape) for n in ("embedding", "density", "phi")}
        nr = shapes["density"][-2] + 1 if len(shapes["density"]) >= 2 else 0
        ok = (
            len(shapes["embedding"]) == 3
            and shapes["embedding"][::2] == (k, 4)
            and shapes["density"] in ((k, nr - 1, 4), (k, k, nr - 1, 4))
            and shapes["phi"] == (k, k, nr - 2, 4)
        )
        if not ok:
            raise ValueError(
                f"EAM: for {k} species ({_symbols(self.species)}) the coefficients must have "
                "shapes embedding (K, nrho-1, 4), density (K, nr-1, 4) or (K, K, nr-1, 4), phi "
                f"(K, K, nr-2, 4); got {shapes}."
            )
        for name in ("cutoff", "dr", "drho"):
            value = getattr(self, name)
            if not (isinstance(value, float) and np.isfinite(value) and value > 0):
                raise ValueError(f"EAM: {name} must be a finite float > 0, got {value!r}.")
        if len(set(self.species)) != k or not all(isinstance(z, int) for z in self.species):
            raise ValueError(f"EAM: species must be distinct elements, got {self.species!r}.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tables(
        cls,
        species,
        embedding,
        density,
        rphi,
        *,
        drho: float,
        dr: float,
        cutoff: float,
        images=None,
    ) -> EAM:
        """A model from the tables of a potential file, splined as ASE does.

        Parameters
        ----------
        species : sequence of str or int
            The K elements, in table order.
        embedding : array, shape (K, nrho)
            ``F_s(k drho)`` in eV.
        density : array, shape (K, nr) or (K, K, nr)
            ``f_s(k dr)``, or ``f_{s s'}(k dr)`` (eam/fs, first index the neighbor's species).
        rphi : array, shape (K, K, nr)
            ``r φ_{ss'}(r)`` in eV Å at ``r = k dr``; the upper triangle ``[s, s']``, ``s <= s'``
            is used (ASE's reader fills that one).
        drho, dr, cutoff : float
            Table steps (ρ units, Å) and cutoff (Å).
        images : tuple of 3 int, optional
            See the class.
        """
        emb = np.asarray(embedding, np.float64)
        dens = np.asarray(density, np.float64)
        rphi = np.asarray(rphi, np.float64)
        k, nr = len(emb), dens.shape[-1]
        rho_grid = np.arange(emb.shape[-1]) * float(drho)
        r = np.arange(nr) * float(dr)
        phi = np.empty((k, k, nr - 2, 4))
        for i in range(k):
            for j in range(i, k):
                phi[i, j] = phi[j, i] = spline_table(r[1:], rphi[i, j, 1:] / r[1:])
        dens_tab = np.stack([spline_table(r, d) for d in dens.reshape(-1, nr)])
        return cls(
            cutoff=float(cutoff),
            embedding=jnp.asarray(np.stack([spline_table(rho_grid, e) for e in emb])),
            density=jnp.asarray(dens_tab.reshape(dens.shape[:-1] + (nr - 1, 4))),
            phi=jnp.asarray(phi),
            drho=float(drho),
            dr=float(dr),
            species=tuple(species),
            images=images,
        )

    @classmethod
    def from_file(cls, path, *, images=None) -> EAM:
        """A model from a LAMMPS EAM potential file, read by :class:`ase.calculators.eam.EAM`.

        The form follows ASE from the suffix: ``.eam`` (funcfl, one element; ASE converts the
        effective charge ``Z(r)`` to ``r φ = 27.2 · 0.529 · Z²``, Hartree · Bohr), ``.alloy``
        (setfl), ``.fs`` (Finnis–Sinclair). ``.adp`` is refused (angular terms not implemented).

        Raises
        ------
        ValueError
            For an ``.adp`` potential; ASE's own errors for an unreadable file.
        """
        from ase.calculators.eam import EAM as AseEAM

        calc = AseEAM(potential=str(path))
        if calc.form not in ("eam", "alloy", "fs"):
            raise ValueError(
                f"EAM.from_file: {path}: form {calc.form!r} is not supported (eam, alloy, fs)."
            )
        return cls.from_tables(
            tuple(int(_Z_OF_SYMBOL[e]) for e in calc.elements),
            calc.embedded_data,
            calc.density_data,
            calc.rphi_data,
            drho=calc.drho,
            dr=calc.dr,
            cutoff=calc.cutoff,
            images=images,
        )

    # ------------------------------------------------------------------ species
    def _matrix_names(self) -> str:
        return "embedding, density, phi"

    def check_batch(self, batch: Batch) -> None:
        """Host-side: every occupied atom is of one of ``species`` (ValueError naming the
        element and the system slot otherwise)."""
        try:
            check_batch_species(self, batch)
        except ValueError as err:  # keep what and where; replace the pair-potential hint
            found = str(err).split(" The model's species")[0]
            raise ValueError(
                f"{found} The potential has tables for ({_symbols(self.species)}) only; use a "
                "potential file covering every element present or leave such systems out."
            ) from None

    def prepare(self, batch: Batch) -> EAM:
        if not isinstance(batch.atomic_numbers, jax.core.Tracer):
            self.check_batch(batch)
        return super().prepare(batch)

    # ------------------------------------------------------------------ energy
    def energy(self, batch: Batch) -> jax.Array:
        # the species lookup carries the unknown-element error on the positions the graph uses
        batch, species = atom_species(self, batch)
        graph = neighbor_graph(batch, self.cutoff, self.images)
        return poison_systems(batch, self._energy(batch, graph, species), graph.invalid)

    def graph_energy(self, batch: Batch, graph: Graph) -> jax.Array:
        """Energy of each system in eV, shape (S,) (0 for empty slots)."""
        batch, species = atom_species(self, batch)
        return self._energy(batch, graph, species)

    def _energy(self, batch: Batch, graph: Graph, species: jax.Array) -> jax.Array:
        n, s = batch.max_atoms, batch.max_systems
        si = jnp.take(species, graph.senders, mode="fill", fill_value=0)
        sj = jnp.take(species, graph.receivers, mode="fill", fill_value=0)
        r = graph.lengths
        dens_index = (sj,) if self.density.ndim == 3 else (sj, si)
        rho = graph.sum_to_senders(_evaluate(self.density, dens_index, r, 0, self.dr), n)
        embed = _evaluate(self.embedding, (species,), rho, 0, self.drho)
        embed = jnp.where(batch.atom_mask, embed, 0.0)
        pair = _evaluate(self.phi, (si, sj), r, 1, self.dr)
        pair = jnp.where(graph.mask, 0.5 * pair, 0.0)
        pair = jax.ops.segment_sum(pair, graph.system, num_segments=s + 1)[:s]
        return batch.sum_atoms(embed) + pair
