"""Pair potentials: a dense all-pairs-within-system path and a neighbor-list path.

The dense path pairs every atom with every atom of its own system (the ``max_atoms_per_system``
block of the batch) and with their periodic images: ``O(N * A * K)`` work for N atom slots, A atoms
per system and K image shifts. It is exact for any cell (triclinic, mixed periodicity, cells
smaller than twice the cutoff) and is the reference for the neighbor-list path.

The neighbor-list path (``model.with_neighbors(skin=...)``) sums the same ``pair_energy`` over
the pairs of ``batch.neighbors`` (a :class:`~fused_dynamics.models.neighbors.NeighborList`):
``O(N)`` work per step. Displacements are ``r_j - r_i + shift @ cell`` with the batch's (strained)
cell, so forces and stress come from the same autodiff pass as on the dense path.

Several species: every parameter of :class:`LennardJones`, :class:`Morse` and
:class:`SoftSphere` is either a scalar (the same for all pairs) or a symmetric (K, K) matrix whose
rows and columns are the elements ``species=(Z1, ..., ZK)`` (atomic numbers or symbols);
``from_pairs`` builds such a model from a table keyed by element pairs, with optional mixing rules.
Each atom's atomic number is mapped to its row through a static lookup table, and the pair's
parameters are gathered for the pair's two species on both paths.

Every parameter is checked when the model is built (``__check_init__``): a wrong value raises a
:class:`ValueError` naming the class, the parameter, the value and the rule. Traced parameters
(under ``jax.vmap``, ``jax.grad``) have their shapes checked, not their values.

Layout: :mod:`.pair_potential` (the base class :class:`PairPotential`), :mod:`.potentials`
(:class:`LennardJones`, :class:`Morse`, :class:`SoftSphere`), :mod:`.pair_sums` (the dense and
neighbor-list sums, :func:`required_images`) and :mod:`.species` (per-species-pair parameter
tables, checks and mixing rules). Every name stays importable from here.
"""

from .pair_potential import PairPotential
from .pair_sums import required_images
from .potentials import LennardJones, Morse, SoftSphere
from .species import MIXING_RULES  # noqa: F401  (a constant of this module before the split)

__all__ = ["PairPotential", "LennardJones", "Morse", "SoftSphere", "required_images"]
