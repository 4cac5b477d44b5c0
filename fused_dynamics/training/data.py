"""Labelled structures for training: reference energies, forces and stresses in padded batches.

Reference values are read from each ``ase.Atoms``: its calculator's results (a
``SinglePointCalculator``, as ``ase.io.read`` attaches for extxyz files with energies and
forces; another calculator is asked with ``get_potential_energy()`` / ``get_forces()`` /
``get_stress()``), or, when a key is given, ``atoms.info[key]`` (energy, stress) and
``atoms.arrays[key]`` (forces). Missing values are allowed per structure and simply do not
contribute (masks). A stress is used only for a structure periodic along all three directions
with a full-rank cell (ASE's condition for a stress); elsewhere it is ignored.

Batches are built with :meth:`fused_dynamics.Batch.from_atoms` at fixed capacities, so that
every batch (a ragged last one included, whose free slots stay empty) has the same shapes and
the training step compiles once.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import Any

import ase
import ase.io
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from ..batch import Batch, _check_dtype
from ..models.host_pairs import count_pairs, host_neighbor_list

__all__ = [
    "Capacity",
    "Labels",
    "Targets",
    "make_batches",
    "read_labels",
    "read_structures",
]


@dataclasses.dataclass(frozen=True)
class Labels:
    """Reference values of one structure (``None``: not given).

    Attributes
    ----------
    energy : float or None
        Potential energy, eV.
    forces : numpy.ndarray, shape (n, 3), or None
        eV/Å.
    stress : numpy.ndarray, shape (3, 3), or None
        eV/Å³, ASE's sign convention; ``None`` also when the structure is not periodic along
        all three directions with a full-rank cell.
    """

    energy: float | None
    forces: np.ndarray | None
    stress: np.ndarray | None


class Targets(eqx.Module):
    """Reference values laid out like a :class:`~fused_dynamics.Batch` (same slots, same atoms).

    Attributes
    ----------
    energy : Array, shape (S,)
        eV; 0 where not given.
    forces : Array, shape (N, 3)
        eV/Å; 0 where not given.
    stress : Array, shape (S, 3, 3)
        eV/Å³; 0 where not given.
    energy_mask : Array, shape (S,) bool
        Occupied slots with a reference energy.
    forces_mask : Array, shape (N,) bool
        Real atoms of structures with reference forces.
    stress_mask : Array, shape (S,) bool
        Occupied slots with a usable reference stress.
    """

    energy: jax.Array
    forces: jax.Array
    stress: jax.Array
    energy_mask: jax.Array
    forces_mask: jax.Array
    stress_mask: jax.Array


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Static capacities of every training and validation batch.

    Attributes
    ----------
    max_systems : int
        Structures per batch (S).
    max_atoms : int
        Atom slots per batch (N).
    max_atoms_per_system : int
        Atoms of the largest structure.
    cutoff : float or None
        Å. For a model of the neighbor graph: every batch carries a neighbor list of its pairs
        within ``cutoff``, found on the host (:func:`~fused_dynamics.models.host_pairs.
        host_neighbor_list`), instead of the dense all-pairs graph (which for a message-passing
        network costs ``A * K`` edges per atom instead of its neighbors).
    max_pairs : int or None
        Pair capacity of those lists: the pairs of the ``max_systems`` structures with most.
    """

    max_systems: int
    max_atoms: int
    max_atoms_per_system: int
    cutoff: float | None = None
    max_pairs: int | None = None

    def with_pairs(self, atoms: Sequence[ase.Atoms], cutoff: float) -> Capacity:
        """A copy whose batches carry neighbor lists within ``cutoff`` Å (see ``cutoff``)."""
        counts = sorted(count_pairs(a, cutoff) for a in atoms)
        need = sum(counts[-self.max_systems :]) if counts else 0
        return dataclasses.replace(self, cutoff=float(cutoff), max_pairs=max(int(need), 1))

    @classmethod
    def fit(
        cls,
        sizes: Sequence[int],
        max_systems: int,
        max_atoms: int | None = None,
        max_atoms_per_system: int | None = None,
    ) -> Capacity:
        """Capacities that hold any ``max_systems`` of structures of the given sizes.

        ``max_atoms`` defaults to the sum of the ``max_systems`` largest sizes (so that any
        shuffle fits); a smaller value given is refused.

        Raises
        ------
        ValueError
            ``max_systems < 1``, or capacities smaller than the data need.
        """
        if int(max_systems) < 1:
            raise ValueError(f"batch_size must be >= 1, got {max_systems}.")
        sizes = sorted(int(n) for n in sizes)
        need = sum(sizes[-int(max_systems) :])
        a_need = sizes[-1]
        if max_atoms is None:
            max_atoms = need
        if max_atoms_per_system is None:
            max_atoms_per_system = a_need
        if int(max_atoms) < need:
            raise ValueError(
                f"max_atoms={max_atoms} cannot hold the {max_systems} largest structures "
                f"({need} atoms); give max_atoms >= {need} or a smaller batch_size."
            )
        if int(max_atoms_per_system) < a_need:
            raise ValueError(
                f"max_atoms_per_system={max_atoms_per_system} is smaller than the largest "
                f"structure ({a_need} atoms)."
            )
        return cls(int(max_systems), int(max_atoms), int(max_atoms_per_system))


def read_structures(
    paths: str | os.PathLike | Sequence[str | os.PathLike], index: str | int = ":"
) -> list[ase.Atoms]:
    """Read structures from files (or globs) with ``ase.io.read(path, index=index)``.

    Parameters
    ----------
    paths : path or sequence of paths
        Files in any format ASE reads; glob patterns expand to their sorted matches.
    index : str or int, default ":"
        ASE's frame selection (``":"`` all, ``"-1"`` the last, ``"::10"`` every tenth).

    Raises
    ------
    FileNotFoundError
        A path or pattern matches no file.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out: list[ase.Atoms] = []
    for p in paths:
        p = os.path.expanduser(os.fspath(p))
        files = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
        if not glob.has_magic(p):
            files = [p] if os.path.isfile(p) else []
        if not files:
            raise FileNotFoundError(f"no training data file matches {p!r}")
        for f in files:
            frames = ase.io.read(f, index=index)
            out.extend(frames if isinstance(frames, list) else [frames])
    return out


def _stress_matrix(value: Any) -> np.ndarray:
    s = np.asarray(value, np.float64).reshape(-1)
    if s.size == 9:
        return s.reshape(3, 3)
    if s.size == 6:  # Voigt xx yy zz yz xz xy, as ASE
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise ValueError(f"a stress must have 6 (Voigt) or 9 components, got {s.size}")


def _full_rank_periodic(atoms: ase.Atoms) -> bool:
    return bool(atoms.pbc.all()) and abs(np.linalg.det(atoms.get_cell().array)) > 1e-10


def read_labels(
    atoms: ase.Atoms,
    index: int = 0,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
) -> Labels:
    """The reference energy, forces and stress of one structure (see the module docstring).

    Raises
    ------
    ValueError
        A value of the wrong shape or not finite (naming the structure ``index``).
    """

    def from_calc(name):
        calc = atoms.calc
        if calc is None:
            return None
        if isinstance(calc, SinglePointCalculator):
            return calc.results.get(name)
        getter = {"energy": atoms.get_potential_energy, "forces": atoms.get_forces}
        getter["stress"] = atoms.get_stress
        try:
            return getter[name]()
        except Exception:  # the calculator cannot give it (no stress for a cluster, ...)
            return None

    energy = atoms.info.get(energy_key) if energy_key else from_calc("energy")
    forces = atoms.arrays.get(forces_key) if forces_key else from_calc("forces")
    stress = atoms.info.get(stress_key) if stress_key else from_calc("stress")
    try:
        if energy is not None:
            energy = float(np.asarray(energy, np.float64).reshape(()))
            if not np.isfinite(energy):
                raise ValueError(f"non-finite energy {energy}")
        if forces is not None:
            forces = np.asarray(forces, np.float64)
            if forces.shape != (len(atoms), 3):
                raise ValueError(f"forces of shape {forces.shape}, expected {(len(atoms), 3)}")
            if not np.all(np.isfinite(forces)):
                raise ValueError("non-finite forces")
        if stress is not None:
            stress = _stress_matrix(stress)
            if not np.all(np.isfinite(stress)):
                raise ValueError("non-finite stress")
            if not _full_rank_periodic(atoms):
                stress = None
    except ValueError as exc:
        raise ValueError(f"training structure {index}: {exc}") from None
    return Labels(energy, forces, stress)


def make_targets(labels: Sequence[Labels], sizes: Sequence[int], cap: Capacity, dtype) -> Targets:
    """:class:`Targets` of structures placed in slots 0, 1, ... as ``Batch.from_atoms`` does."""
    s, n = cap.max_systems, cap.max_atoms
    energy, e_mask = np.zeros(s), np.zeros(s, bool)
    forces, f_mask = np.zeros((n, 3)), np.zeros(n, bool)
    stress, s_mask = np.zeros((s, 3, 3)), np.zeros(s, bool)
    offset = 0
    for slot, (lab, size) in enumerate(zip(labels, sizes, strict=True)):
        if lab.energy is not None:
            energy[slot], e_mask[slot] = lab.energy, True
        if lab.forces is not None:
            forces[offset : offset + size] = lab.forces
            f_mask[offset : offset + size] = True
        if lab.stress is not None:
            stress[slot], s_mask[slot] = lab.stress, True
        offset += size
    return Targets(
        energy=jnp.asarray(energy, dtype),
        forces=jnp.asarray(forces, dtype),
        stress=jnp.asarray(stress, dtype),
        energy_mask=jnp.asarray(e_mask),
        forces_mask=jnp.asarray(f_mask),
        stress_mask=jnp.asarray(s_mask),
    )


def make_batches(
    atoms: Sequence[ase.Atoms],
    labels: Sequence[Labels],
    order: Sequence[int],
    cap: Capacity,
    dtype=None,
) -> list[tuple[Batch, Targets]]:
    """Padded ``(Batch, Targets)`` pairs of the structures ``order``, ``cap.max_systems`` each.

    Every pair has the shapes of ``cap``; the last one holds the remainder in its first slots
    and leaves the others empty.
    """
    dtype = _check_dtype(dtype)
    order = [int(i) for i in order]
    out = []
    for start in range(0, len(order), cap.max_systems):
        idx = order[start : start + cap.max_systems]
        chunk = [atoms[i] for i in idx]
        batch = Batch.from_atoms(
            chunk,
            max_atoms=cap.max_atoms,
            max_systems=cap.max_systems,
            dtype=dtype,
            max_atoms_per_system=cap.max_atoms_per_system,
            system_ids=idx,
        )
        if cap.cutoff is not None:
            batch = batch.replace(
                neighbors=host_neighbor_list(batch, cap.cutoff, capacity=cap.max_pairs)
            )
        targets = make_targets([labels[i] for i in idx], [len(a) for a in chunk], cap, dtype)
        out.append((batch, targets))
    return out
