"""Reference data made in code: an analytic Cu–Ni EAM potential file and labelled structures.

Training a machine-learned potential needs reference energies, forces and stresses. Here they
come from an EAM potential that is written, not downloaded: smooth analytic functions in the form
of Zhou, Johnson & Wadley (PRB 69, 144113 (2004): exponential densities, a Morse-like pair term)
with a ``-E sqrt(ρ/ρ_e)`` embedding, tabulated and written by ASE's own writer
(``ase.calculators.eam.EAM.write_potential``), then read by
:meth:`~fused_dynamics.models.eam.EAM.from_file` like any setfl file. It is a plausible metal, not
a fitted one: use it to exercise workflows, not to predict copper.

:func:`labelled_structures` draws the kinds of structure a training set holds (MD snapshots at
several temperatures, strained cells, vacancies, surfaces) and labels them with any model.
"""

from __future__ import annotations

import os
from pathlib import Path

import ase
import jax.numpy as jnp
import numpy as np
from ase.build import bulk, fcc100
from ase.calculators.eam import EAM as AseEAM
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers

from .batch import Batch
from .stages import NVTLangevin

__all__ = [
    "write_analytic_eam",
    "equilibrium_lattice_constant",
    "labelled_structures",
    "CUTOFF",
]

CUTOFF = 4.5  # Å, where every analytic function reaches zero smoothly

_PARAMETERS = {  # re Å, fe, rho_e, alpha, beta, A eV, B eV, E eV (embedding depth)
    "Cu": dict(re=2.556, fe=1.554, rhoe=21.2, alpha=7.67, beta=4.09, A=0.327, B=0.468, E=2.2),
    "Ni": dict(re=2.489, fe=2.007, rhoe=27.6, alpha=8.38, beta=4.48, A=0.429, B=0.633, E=2.6),
}
_DATA = {"Cu": (29, 63.546, 3.615), "Ni": (28, 58.693, 3.52)}  # Z, mass amu, fcc a Å


def _cut(r):
    """``x⁴ / (1 + x⁴)`` with ``x = (r - CUTOFF) / 0.5`` below the cutoff, 0 above: C³."""
    x = (np.asarray(r) - CUTOFF) / 0.5
    return np.where(r < CUTOFF, x**4 / (1 + x**4), 0.0)


def _density(p):
    return lambda r: p["fe"] * np.exp(-p["beta"] * (r / p["re"] - 1)) * _cut(r)


def _pair(p, q):
    m = {k: 0.5 * (p[k] + q[k]) for k in p}  # cross pairs: mean parameters

    def phi(r):
        x = r / m["re"] - 1
        return (m["A"] * np.exp(-m["alpha"] * x) - m["B"] * np.exp(-m["beta"] * x)) * _cut(r)

    return phi


def _embedding(p):
    return lambda rho: -p["E"] * np.sqrt(np.maximum(rho, 0.0) / p["rhoe"])


def write_analytic_eam(
    path: str | os.PathLike, elements=("Cu", "Ni"), *, overwrite: bool = False
) -> Path:
    """Write the analytic EAM of the module docstring as a setfl (``.alloy``) file.

    Parameters
    ----------
    path : path
        The file to write.
    elements : sequence of str
        Any of "Cu" and "Ni", in the order of the file.
    overwrite : bool, default False
        Replace an existing file.

    Returns
    -------
    Path
        ``path``. Tables: 500 points of 0.01 Å in r, 500 of 0.1 in ρ; cutoff 4.5 Å.

    Raises
    ------
    ValueError
        An element other than Cu and Ni.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    elements = list(elements)
    unknown = [e for e in elements if e not in _PARAMETERS]
    if unknown or not elements:
        raise ValueError(
            f"write_analytic_eam: elements must be taken from {sorted(_PARAMETERS)}, got "
            f"{elements}."
        )
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"write_analytic_eam: {path} exists; pass overwrite=True.")
    ps = [_PARAMETERS[e] for e in elements]
    calc = AseEAM(
        elements=elements,
        embedded_energy=np.array([_embedding(p) for p in ps], object),
        electron_density=np.array([_density(p) for p in ps], object),
        phi=np.array([[_pair(p, q) for q in ps] for p in ps], object),
        cutoff=CUTOFF,
        form="alloy",
        Z=[_DATA[e][0] for e in elements],
        mass=[_DATA[e][1] for e in elements],
        a=[_DATA[e][2] for e in elements],
        lattice=["fcc"] * len(elements),
        nr=500,
        dr=0.01,
        nrho=500,
        drho=0.1,
    )
    calc.Nelements = len(elements)
    calc.write_potential(str(path))
    return path


def _alloy(atoms: ase.Atoms, rng, elements, fraction: float) -> ase.Atoms:
    numbers = np.full(len(atoms), atomic_numbers[elements[0]])
    if len(elements) > 1:
        numbers[rng.random(len(atoms)) < fraction] = atomic_numbers[elements[1]]
    atoms.numbers = numbers
    return atoms


def equilibrium_lattice_constant(model, element: str, dtype=jnp.float64) -> float:
    """The fcc lattice constant (Å) of lowest energy of ``model`` for ``element``, to 0.005 Å.

    Scans 2.8–4.6 Å on a conventional 4-atom cell (one batch, one evaluation).
    """
    grid = np.arange(2.8, 4.6, 0.005)
    cells = [bulk(element, "fcc", a=float(a), cubic=True) for a in grid]
    energy = np.asarray(model(Batch.from_atoms(cells, dtype=dtype)).energy)
    return float(grid[int(np.nanargmin(energy))])


def _base_structures(n: int, rng, elements, fraction: float, a0: float) -> list[ase.Atoms]:
    """``n`` starting structures cycling through bulk, strained, vacancy and surface cells."""
    out = []
    for i in range(n):
        kind = ("bulk", "strained", "vacancy", "surface")[i % 4]
        if kind == "surface":
            atoms = fcc100("Cu", (2, 2, 4), a=a0, vacuum=4.0)  # 16 atoms, pbc z False
        else:
            atoms = bulk("Cu", "fcc", a=a0 * rng.uniform(0.98, 1.02), cubic=True) * (2, 2, 2)
        if kind == "strained":
            strain = rng.uniform(-0.04, 0.04, (3, 3))
            atoms.set_cell(atoms.cell @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        if kind == "vacancy":
            del atoms[int(rng.integers(len(atoms)))]
        atoms = _alloy(atoms, rng, elements, fraction)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.info["structure"] = kind
        out.append(atoms)
    return out


def labelled_structures(
    model,
    n: int,
    *,
    seed: int = 0,
    elements=("Cu", "Ni"),
    fraction: float = 0.3,
    temperatures=(300.0, 800.0, 1500.0),
    md_steps: int = 100,
    dtype=jnp.float64,
) -> list[ase.Atoms]:
    """``n`` structures labelled with ``model``'s energy, forces and stress.

    Bulk fcc cells (32 atoms) at the model's equilibrium lattice constant of the first element
    (:func:`equilibrium_lattice_constant`) ±2 %, cells under random strains up to 4 %,
    cells with a vacancy and (100) slabs (16 atoms), alloyed at random with ``fraction`` of the
    second element, are run for ``md_steps`` Langevin steps (1 fs, friction 0.02 /fs) at the
    ``temperatures`` in turn, all in one batch; the final frames are labelled by one evaluation.

    Parameters
    ----------
    model : Model
        The reference (an :class:`~fused_dynamics.models.eam.EAM` of
        :func:`write_analytic_eam`, for example).
    n : int
        Number of structures.
    seed : int
        Of the structures and the Langevin noise.
    elements : sequence of str
        One or two of the model's elements.
    dtype : float dtype
        Of the labelling (float64 needs ``jax_enable_x64``).

    Returns
    -------
    list of ase.Atoms
        Each with a :class:`~ase.calculators.singlepoint.SinglePointCalculator` holding
        ``energy`` (eV), ``forces`` (eV/Å) and, for fully periodic cells, ``stress`` (eV/Å³,
        Voigt order), and ``info["structure"]``, ``info["temperature"]``.
    """
    if n < 1:
        raise ValueError(f"labelled_structures: n must be >= 1, got {n}.")
    rng = np.random.default_rng(seed)
    a0 = equilibrium_lattice_constant(model, elements[0], dtype)
    atoms = _base_structures(n, rng, list(elements), fraction, a0)
    batch = Batch.from_atoms(atoms, dtype=dtype)
    temperature = np.resize(np.asarray(temperatures, float), n)
    md = NVTLangevin(
        model, dt=1.0, temperature=temperature, friction=0.02, seed=seed, n_steps=md_steps
    )
    final = md.run(batch)
    out = model(final)
    frames = final.to_atoms()
    energy, forces = np.asarray(out.energy), np.asarray(out.forces)
    stress = np.asarray(out.stress)
    index = np.asarray(final.system_idx)
    labelled = []
    for s, frame in enumerate(frames):
        clean = ase.Atoms(frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        results = {"energy": float(energy[s]), "forces": forces[index == s]}
        if clean.pbc.all():
            sigma = stress[s]
            results["stress"] = sigma[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        clean.calc = SinglePointCalculator(clean, **results)
        clean.info.update(structure=atoms[s].info["structure"], temperature=temperature[s])
        labelled.append(clean)
    return labelled
