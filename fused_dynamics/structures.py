"""Structure generators: built-in sets of structures made without a download.

``structures.generate = "argon"`` in a run configuration (and the demo) uses
:func:`make_structures`. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import numpy as np
from ase.build import bulk
from ase.cluster import Decahedron, Icosahedron, Octahedron

__all__ = ["make_structures"]


def _cluster(atoms, rng, vacuum: float = 6.0):
    """A non-periodic cluster centred in a box with ``vacuum`` Å on each side."""
    atoms = atoms.copy()
    atoms.rotate(float(rng.uniform(0, 360)), rng.normal(size=3), center="COP")
    atoms.center(vacuum=vacuum)
    atoms.pbc = False
    return atoms


def make_structures(n: int, seed: int = 0, rattle: float = 0.15, max_size: int = 32):
    """``n`` perturbed argon structures of at most ``max_size`` atoms, half clusters, half crystals.

    Clusters: icosahedra (13), truncated and full octahedra (13, 19), decahedra (13, 23), in a
    vacuum box without periodicity. Crystals: fcc (cubic cells of 4-32 atoms, primitive 2x2x2
    supercells) and hcp, periodic, with lattice constants spread around argon's (5.26 Å).
    Positions get Gaussian noise of ``rattle`` Å. Each ``atoms.info["structure"]`` names it.
    """
    rng = np.random.default_rng(seed)
    clusters = [
        ("icosahedron", lambda: Icosahedron("Ar", 2)),
        ("octahedron", lambda: Octahedron("Ar", 3)),
        ("trunc-octahedron", lambda: Octahedron("Ar", 3, cutoff=1)),
        ("decahedron", lambda: Decahedron("Ar", 2, 2, 0)),
        ("decahedron", lambda: Decahedron("Ar", 3, 1, 0)),
    ]

    def fcc_cubic(reps):
        return lambda a: bulk("Ar", "fcc", a=a, cubic=True) * reps

    crystals = [
        ("fcc-cubic", fcc_cubic((1, 1, 1))),
        ("fcc-cubic", fcc_cubic((2, 1, 1))),
        ("fcc-cubic", fcc_cubic((2, 2, 1))),
        ("fcc-cubic", fcc_cubic((2, 2, 2))),
        ("fcc-primitive", lambda a: bulk("Ar", "fcc", a=a) * (2, 2, 2)),
        ("hcp", lambda a: bulk("Ar", "hcp", a=a / 2**0.5, c=a / 2**0.5 * 1.633) * (2, 2, 1)),
        ("hcp", lambda a: bulk("Ar", "hcp", a=a / 2**0.5, c=a / 2**0.5 * 1.633) * (2, 2, 2)),
    ]
    clusters = [(name, f) for name, f in clusters if len(f()) <= max_size]
    crystals = [(name, f) for name, f in crystals if len(f(5.26)) <= max_size]
    if not clusters and not crystals:
        raise ValueError(f"make_structures: no structure has at most max_size={max_size} atoms.")
    out = []
    for i in range(n):
        if (i % 2 == 0 and clusters) or not crystals:
            name, make = clusters[int(rng.integers(len(clusters)))]
            atoms = _cluster(make(), rng)
        else:
            name, make = crystals[int(rng.integers(len(crystals)))]
            atoms = make(float(rng.uniform(5.15, 5.45)))
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        atoms.info["structure"] = name
        out.append(atoms)
    return out
