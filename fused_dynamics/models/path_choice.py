"""Dense pairs or a neighbor list: the rule that picks a pair potential's path for a run.

A :class:`~fused_dynamics.models.pair.PairPotential` evaluates either every pair of atoms of
each system block and their periodic images (the *dense* path, the reference) or the pairs of a
Verlet neighbor list (``model.with_neighbors(skin)``; a run attaches and refreshes the list
itself). Which is faster depends on how many of the dense path's candidate pairs are real
neighbors:

* dense, per atom slot: ``A * K`` candidates, ``A`` the atom capacity of a system slot
  (``max_atoms_per_system``, the largest system) and ``K = prod(2 n_k + 1)`` the image shifts of
  the batch (:func:`~fused_dynamics.models.pair_sums.required_images_host`: 1 for clusters and
  cells wider than twice the cutoff, 27 for a cell narrower than that);
* list, per atom: ``m = min(rho * 4/3 pi (cutoff + skin)^3, n * K_i)`` expected neighbors of
  a system of ``n`` atoms at number density ``rho`` (its own ``K_i`` shifts), plus ``m0``, the
  list's own cost per atom (the displacement check, the gathers and sums over pairs) counted
  in pairs of the dense path.

The *work ratio* ``R = A^2 K / mean(n (m + m0))`` (dense pair work over list work, averaged
over the systems, which the dense path pads to ``A``) is compared with a crossover measured on
this project's fused NVE step: the list is chosen when ``R >= crossover``. :func:`path_choice`
returns the decision and a one-line reason; :func:`choose_neighbors` returns the model on that
path. See docs/models.md, "Dense pairs or a neighbor list".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..batch import Batch, complete_cell
from .pair_sums import required_images_host

__all__ = [
    "CROSSOVER",
    "DEFAULT_SKIN",
    "LIST_OVERHEAD",
    "FIT_SLOPE",
    "LIST_SETUP_SECONDS",
    "NEIGHBOR_CHOICES",
    "PAIR_SECONDS",
    "PathChoice",
    "apply_choice",
    "choose_neighbors",
    "path_choice",
    "saved_seconds",
    "work_ratio",
]

NEIGHBOR_CHOICES = ("auto", "dense", "list")
DEFAULT_SKIN = 1.0  # Å; benchmarks/results/neighbors.json: 0.5 and 1.0 within 10 % at 40 K

# The list's own cost per atom in dense-path pairs, and the work ratio R from which the list
# is chosen (module docstring); measured, see the Notes of path_choice and docs/models.md.
LIST_OVERHEAD = 11.5
CROSSOVER = 1.5
# For a run of known length (``steps``): the list's per-step speed-up fitted as FIT_SLOPE * R,
# the dense path's seconds per pair evaluation of S A^2 K and the list's extra seconds before
# the first step (allocation and compilation beyond the dense path's: 24-58 s, median 43 s,
# in the runs of the Notes of path_choice). PAIR_SECONDS was re-measured after the dense
# kernel's image shifts were summed component by component (30 Nov 2026): the full demo
# (24 slots of 32 atoms, 27 shifts, float32) ran 1,543 steps in 12.7 s after compiling,
# 12 ns per S A^2 K pair (load 8, 2 cores); the whole demo took 37-46 s dense and 88-102 s on
# the list (two interleaved rounds), so the rule keeps it dense.
FIT_SLOPE = 1.07
PAIR_SECONDS = 1.2e-8
LIST_SETUP_SECONDS = 40.0


@dataclasses.dataclass(frozen=True)
class PathChoice:
    """What :func:`path_choice` decided, and why.

    Attributes
    ----------
    path : {"dense", "list"}
    skin : float or None
        Å, the Verlet skin of the list path (None on the dense path).
    ratio : float or None
        The work ratio ``R`` (dense pair work over list pair work); None when it was not needed
        (a forced path, a model without a list path, no systems).
    reason : str
        One line: the path and why (what a run prints).
    """

    path: str
    skin: float | None
    ratio: float | None
    reason: str


def _system_arrays(systems) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Sizes (n,), completed cells (n, 3, 3), pbc (n, 3) and positions of each system.

    ``systems``: a concrete :class:`~fused_dynamics.Batch` (its occupied slots) or a sequence of
    ``ase.Atoms``.
    """
    if isinstance(systems, Batch):
        host_mask = np.asarray(systems.system_mask)
        idx = np.asarray(systems.system_idx)
        atom_mask = np.asarray(systems.atom_mask)
        pos = np.asarray(systems.positions, np.float64)
        slots = np.flatnonzero(host_mask)
        positions = [pos[atom_mask & (idx == s)] for s in slots]
        cells = np.asarray(systems.cell, np.float64)[slots].reshape(-1, 3, 3)
        pbc = np.asarray(systems.pbc, bool)[slots].reshape(-1, 3)
    else:
        positions = [np.asarray(a.get_positions(), np.float64) for a in systems]
        pbc = np.array([a.get_pbc() for a in systems], bool).reshape(-1, 3)
        cells = np.array(
            [complete_cell(a.get_cell(), p)[0] for a, p in zip(systems, pbc, strict=True)],
            np.float64,
        ).reshape(-1, 3, 3)
    sizes = np.array([len(p) for p in positions], np.int64)
    return sizes, cells, pbc, positions


def _volume(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> float:
    """Å³ a system's atoms fill: the cell's when periodic in 3 directions, else the sphere of
    the same radius of gyration (a uniform ball of radius R has R_g^2 = 3/5 R^2), at least one
    atom's 10 Å³ per atom."""
    n = len(positions)
    if np.all(pbc):
        return float(abs(np.linalg.det(cell)))
    rg2 = float(np.mean(np.sum((positions - positions.mean(axis=0)) ** 2, axis=1))) if n else 0.0
    radius = math.sqrt(5.0 / 3.0 * rg2)
    return max(4.0 / 3.0 * math.pi * radius**3, 10.0 * n)


def work_ratio(
    sizes,
    cells,
    pbc,
    cutoff: float,
    skin: float = DEFAULT_SKIN,
    *,
    volumes=None,
    max_atoms_per_system: int | None = None,
    overhead: float = LIST_OVERHEAD,
) -> float:
    """``R``, the dense path's pair work over the neighbor list's (module docstring).

    Parameters
    ----------
    sizes : array_like of int, shape (n,)
        Atoms of each system.
    cells : array_like, shape (n, 3, 3)
        Å, rows are lattice vectors (invertible: a cluster's completed cell).
    pbc : array_like of bool, shape (n, 3)
    cutoff, skin : float
        Å.
    volumes : array_like, shape (n,), optional
        Å³ each system's atoms fill (number density ``sizes / volumes``). Default: the cells'
        volumes (right for periodic systems only; give the clusters' own).
    max_atoms_per_system : int, optional
        The atom capacity of a system slot, ``A``. Default: the largest system.
    overhead : float, default :data:`LIST_OVERHEAD`
        ``m0``, the list's cost per atom beyond its pairs, in pairs of the dense path.

    Returns
    -------
    float
        ``A^2 K / mean(n_i (m_i + m0))``; ``inf`` when the list has no work at all.

    Raises
    ------
    ValueError
        No system, or shapes that do not agree.
    """
    sizes = np.asarray(sizes, np.float64).reshape(-1)
    cells = np.asarray(cells, np.float64).reshape(-1, 3, 3)
    pbc = np.asarray(pbc, bool).reshape(-1, 3)
    if not len(sizes) or len(cells) != len(sizes) or len(pbc) != len(sizes):
        raise ValueError(
            f"work_ratio: needs one size, cell and pbc per system, got {len(sizes)} sizes, "
            f"{len(cells)} cells, {len(pbc)} pbc rows"
        )
    if volumes is None:
        volumes = np.abs(np.linalg.det(cells))
    volumes = np.asarray(volumes, np.float64).reshape(-1)
    cap = float(sizes.max() if max_atoms_per_system is None else max_atoms_per_system)
    k_batch = _shifts(required_images_host(cells, pbc, float(cutoff)))
    reach = 4.0 / 3.0 * math.pi * (float(cutoff) + float(skin)) ** 3
    k_each = np.array(
        [
            _shifts(required_images_host(c[None], p[None], float(cutoff)))
            for c, p in zip(cells, pbc, strict=True)
        ]
    )
    neighbors = np.minimum(sizes / volumes * reach, sizes * k_each)
    list_work = float(np.mean(sizes * (neighbors + float(overhead))))
    if list_work <= 0.0:
        return math.inf
    return cap * cap * k_batch / list_work


def _shifts(images) -> int:
    return int(np.prod([2 * int(n) + 1 for n in images]))


def _has_list_path(model) -> bool:
    return callable(getattr(model, "with_neighbors", None)) and hasattr(model, "skin")


def path_choice(
    model,
    systems: Batch | Sequence[Any],
    *,
    neighbors: str = "auto",
    skin: float = DEFAULT_SKIN,
    max_atoms_per_system: int | None = None,
    crossover: float = CROSSOVER,
    steps: int | None = None,
    max_systems: int | None = None,
) -> PathChoice:
    """Which path a run of ``model`` on ``systems`` should take, and why.

    Parameters
    ----------
    model : Model
        A pair potential (``with_neighbors``) chooses; any other model stays on its own path.
    systems : Batch or sequence of ase.Atoms
        The structures of the run (a concrete batch: its occupied slots).
    neighbors : {"auto", "dense", "list"}, default "auto"
        ``"auto"``: the list when the work ratio ``R`` (:func:`work_ratio`) is at least
        ``crossover``; ``"dense"``, ``"list"``: that path.
    skin : float, default 1.0
        Å, the Verlet skin of the list (and of the reach counted in ``R``).
    max_atoms_per_system : int, optional
        The batch's atom capacity per system slot (default: the largest system).
    crossover : float, default :data:`CROSSOVER`
    steps : int, optional
        The most fused steps the run can take (the command line: the stages' budgets times
        the batches its structures fill). When given, ``"auto"`` keeps the dense path if the
        time the list would save over the run, ``steps * PAIR_SECONDS * S A^2 K * (1 - 1 /
        (FIT_SLOPE R))``, is below :data:`LIST_SETUP_SECONDS`, the list's longer start.
    max_systems : int, optional
        System slots ``S`` of the batch (default: the number of systems), for ``steps``.

    Returns
    -------
    PathChoice

    Raises
    ------
    ValueError
        ``neighbors`` not one of the three values, ``skin`` negative or not finite, or
        ``neighbors="list"`` for a model without a neighbor-list path.

    Notes
    -----
    Measured on 30 Nov 2026 (2-core CPU shared with other jobs, load average 7-9): the fused
    NVE step of Lennard-Jones argon (cutoff 8.5 Å and 5 Å, skin 1 Å, float64), full batches of
    about 2,048 atoms (icosahedral clusters of 13-1415 atoms, fcc crystals of 32-2048), dense
    and list runs interleaved, medians of 3-5 rounds of 20-40 steps. ``dense / list`` per step
    went from 0.76 (13-atom clusters, R = 0.53) through 1.2-1.4 (55, R = 0.83), 1.9 (147,
    R = 1.39), 4.2 (309, R = 3.0) to 18-24 (2048-atom crystals, R = 18.6; 108-atom cells with
    27 image shifts, R = 26). A least-squares fit of ``dense / list = a R`` over the 16 rows
    gives ``a = 1.07`` and ``m0 = 11.5`` (:data:`LIST_OVERHEAD`), 42 % root-mean-square error:
    break-even near ``R = 0.93``. :data:`CROSSOVER` = 1.5 takes the list only where it is
    expected to be at least about 1.6x faster per step, since its allocation and compilation
    took 35-80 s against 10-35 s for the dense path in the same runs. The table is in
    docs/models.md.
    """
    if neighbors not in NEIGHBOR_CHOICES:
        raise ValueError(
            f"neighbors must be one of {', '.join(map(repr, NEIGHBOR_CHOICES))}, got {neighbors!r}"
        )
    if isinstance(skin, bool) or not (isinstance(skin, int | float) and math.isfinite(skin)):
        raise ValueError(f"skin must be a finite number of Å >= 0, got {skin!r}")
    if skin < 0:
        raise ValueError(f"skin must be >= 0 Å, got {skin!r}")
    name = type(model).__name__
    if not _has_list_path(model):
        if neighbors == "list":
            raise ValueError(
                f"neighbors='list': {name} has no with_neighbors(skin), so a run cannot attach "
                "a list to it; use 'auto' or 'dense'"
            )
        why = f"dense pairs: {name} has no with_neighbors(skin), so a run attaches no list"
        return PathChoice("dense", None, None, why)
    if model.skin is not None and neighbors == "auto":
        return PathChoice("list", float(model.skin), None, "neighbor list: the model asks for it")
    if neighbors == "dense":
        return PathChoice("dense", None, None, "dense pairs: asked for (neighbors = dense)")
    if neighbors == "list":
        return PathChoice(
            "list",
            float(skin),
            None,
            f"neighbor list (skin {skin:g} Å): asked for (neighbors = list)",
        )
    sizes, cells, pbc, positions = _system_arrays(systems)
    if not len(sizes):
        return PathChoice("dense", None, None, "dense pairs: no systems to measure")
    volumes = [_volume(x, c, p) for x, c, p in zip(positions, cells, pbc, strict=True)]
    cap = int(sizes.max()) if max_atoms_per_system is None else int(max_atoms_per_system)
    ratio = work_ratio(
        sizes, cells, pbc, float(model.cutoff), skin, volumes=volumes, max_atoms_per_system=cap
    )
    k = _shifts(required_images_host(cells, pbc, float(model.cutoff)))
    why = (
        f"dense/list work {ratio:.1f} (up to {cap} atoms per system, {k} image "
        f"shift{'s' if k > 1 else ''}, cutoff {float(model.cutoff):g} Å)"
    )
    if ratio < crossover:
        return PathChoice("dense", None, ratio, f"dense pairs: {why} < {crossover:g}")
    if steps is not None:
        slots = len(sizes) if max_systems is None else int(max_systems)
        saved = saved_seconds(ratio, int(steps), slots, cap, k)
        if saved < LIST_SETUP_SECONDS:
            return PathChoice(
                "dense",
                None,
                ratio,
                f"dense pairs: {why} >= {crossover:g}, but in at most {int(steps)} steps the "
                f"list would save about {saved:.0f} s, less than the {LIST_SETUP_SECONDS:.0f} s "
                "more it takes to allocate and compile",
            )
    return PathChoice(
        "list", float(skin), ratio, f"neighbor list (skin {skin:g} Å): {why} >= {crossover:g}"
    )


def saved_seconds(ratio: float, steps: int, slots: int, capacity: int, shifts: int) -> float:
    """Seconds the list saves over ``steps`` steps of ``slots`` system slots of ``capacity``
    atoms and ``shifts`` image shifts at work ratio ``ratio`` (:data:`PAIR_SECONDS`,
    :data:`FIT_SLOPE`; 0 when the list is not expected to be faster)."""
    dense = steps * PAIR_SECONDS * slots * capacity * capacity * shifts
    return max(0.0, dense * (1.0 - 1.0 / (FIT_SLOPE * ratio)))


def choose_neighbors(
    model,
    systems: Batch | Sequence[Any],
    *,
    neighbors: str = "auto",
    skin: float = DEFAULT_SKIN,
    max_atoms_per_system: int | None = None,
    crossover: float = CROSSOVER,
    steps: int | None = None,
    max_systems: int | None = None,
):
    """``model`` on the path :func:`path_choice` picks for ``systems``: one call.

    Returns ``model.with_neighbors(skin)`` when the list is chosen, else the model on the dense
    path (``skin=None``; a model that had a skin is put back on the dense path only for
    ``neighbors="dense"``). A model without a neighbor-list path is returned unchanged. An
    inflight run (``FusedStage.run(sampler=...)``) then attaches the list and refreshes it in
    the compiled step; for a fixed batch attach it with ``model.attach_neighbors(batch)``.

    Parameters and errors are those of :func:`path_choice`.

    Examples
    --------
    ``model = fd.models.choose_neighbors(fd.models.LennardJones(...), structures)``
    """
    choice = path_choice(
        model,
        systems,
        neighbors=neighbors,
        skin=skin,
        max_atoms_per_system=max_atoms_per_system,
        crossover=crossover,
        steps=steps,
        max_systems=max_systems,
    )
    return apply_choice(model, choice)


def apply_choice(model, choice: PathChoice):
    """``model`` on the path of ``choice`` (host-side; unchanged without a list path)."""
    if not _has_list_path(model):
        return model
    if choice.path == "list":
        if model.skin is not None and choice.skin == model.skin:
            return model
        refresh = getattr(model, "auto_refresh", None)
        if refresh is None:
            return model.with_neighbors(choice.skin)
        return model.with_neighbors(choice.skin, auto_refresh=refresh)
    if model.skin is None:
        return model
    return dataclasses.replace(model, skin=None)
