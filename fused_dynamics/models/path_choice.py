"""Dense pairs or a neighbor list: the rule that picks a pair potential's path for a run.

A :class:`~fused_dynamics.models.pair.PairPotential` evaluates either every pair of atoms of
each system block and their periodic images (the *dense* path, the reference) or the pairs of a
Verlet neighbor list (``model.with_neighbors(skin)``; a run attaches and refreshes the list
itself). Which is faster depends on how many of the dense path's candidate pairs are real
neighbors. Per system slot, in pair evaluations:

* dense: ``A^2 K + h A``, ``A`` the atom capacity of a system slot (``max_atoms_per_system``,
  the largest system), ``K = prod(2 n_k + 1)`` the image shifts of the batch
  (:func:`~fused_dynamics.models.pair_sums.required_images_host`: 1 for clusters and cells
  wider than twice the cutoff, 27 for a cell narrower than that) and ``h`` the cost of a step
  per atom beyond its pairs (the integrator, the gathers and sums), counted in pairs;
* list: ``mean(n) (W + h)``: the list sums forces along per-atom rows of one width ``W`` for
  the whole batch, set by its densest system: ``W = 1.15 max(m) + 2`` (the list's default
  margin), with ``m = min(rho * 4/3 pi (cutoff + skin)^3, n * K_i)`` the expected neighbors of
  a system of ``n`` atoms at number density ``rho`` (its own ``K_i`` shifts).

The *work ratio* ``R`` is the first over the second, and the list is chosen when
``R >= crossover``; the constants were fitted to this project's fused NVE step
(``benchmarks/bench_crossover.py``). :func:`path_choice` returns the decision and a one-line
reason; :func:`choose_neighbors` returns the model on that path. See docs/models.md, "Dense
pairs or a neighbor list".
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
    "ATOM_OVERHEAD",
    "CROSSOVER",
    "DEFAULT_SKIN",
    "FIT_SLOPE",
    "LIST_SETUP_SECONDS",
    "NEIGHBOR_CHOICES",
    "PAIR_SECONDS",
    "PathChoice",
    "ROW_MARGIN",
    "apply_choice",
    "choose_neighbors",
    "has_list_path",
    "path_choice",
    "saved_seconds",
    "work_ratio",
]

NEIGHBOR_CHOICES = ("auto", "dense", "list")
DEFAULT_SKIN = 1.0  # Å; benchmarks/results/neighbors.json: 0.5 and 1.0 within 10 % at 40 K

# Fitted on 4 Dec 2026 (the Notes of path_choice; benchmarks/bench_crossover.py):
# ATOM_OVERHEAD is ``h`` (module docstring), FIT_SLOPE ``a`` in ``dense / list = a R`` per step,
# and the list is taken from ``R >= CROSSOVER`` (an expected gain of about 1.4x per step).
# ROW_MARGIN is NeighborList's default margin on the widest row.
ATOM_OVERHEAD = 59.0
FIT_SLOPE = 1.19
CROSSOVER = 1.2
ROW_MARGIN = 1.15
# For a run of known length (``steps``): the dense path's seconds per unit of its work
# ``A^2 K + h A`` per slot (7.3 ns median, 6.5-9.5 ns in 12 of the 14 rows; 3.6-3.8 ns on
# 108-atom cells without image shifts, float64) and the list's extra seconds before the first
# step (attaching the list and compiling its step beyond the dense path's: 3.3-4.8 s, median
# 4.4 s), measured in the same runs.
PAIR_SECONDS = 7.5e-9
LIST_SETUP_SECONDS = 5.0


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
    return max(4.0 / 3.0 * math.pi * radius**3, 10.0 * max(n, 1))


def work_ratio(
    sizes,
    cells,
    pbc,
    cutoff: float,
    skin: float = DEFAULT_SKIN,
    *,
    volumes=None,
    max_atoms_per_system: int | None = None,
    overhead: float = ATOM_OVERHEAD,
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
    overhead : float, default :data:`ATOM_OVERHEAD`
        ``h``, the cost of a step per atom beyond its pairs, in pairs (on both paths).

    Returns
    -------
    float
        ``(A^2 K + h A) / (mean(n_i) (W + h))`` with ``W = ROW_MARGIN max(m_i) + 2``;
        ``inf`` when the list has no work at all.

    Raises
    ------
    ValueError
        No system, shapes that do not agree, ``max_atoms_per_system`` below the largest system,
        or ``overhead`` negative or not finite.
    """
    sizes = np.asarray(sizes, np.float64).reshape(-1)
    cells = np.asarray(cells, np.float64).reshape(-1, 3, 3)
    pbc = np.asarray(pbc, bool).reshape(-1, 3)
    if not len(sizes) or len(cells) != len(sizes) or len(pbc) != len(sizes):
        raise ValueError(
            f"work_ratio: needs one size, cell and pbc per system, got {len(sizes)} sizes, "
            f"{len(cells)} cells, {len(pbc)} pbc rows"
        )
    if not math.isfinite(float(overhead)) or float(overhead) < 0:
        raise ValueError(f"work_ratio: overhead must be a finite number >= 0, got {overhead!r}")
    if max_atoms_per_system is not None and max_atoms_per_system < sizes.max():
        raise ValueError(
            f"work_ratio: max_atoms_per_system ({max_atoms_per_system}) is below the largest "
            f"system ({int(sizes.max())} atoms)"
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
    # a singular cell (volume 0; the run fails that system) gives inf here, bounded by its
    # dense count: no warning for it
    with np.errstate(divide="ignore"):
        neighbors = np.minimum(sizes / volumes * reach, sizes * k_each)
    width = ROW_MARGIN * float(neighbors.max()) + 2.0
    list_work = float(np.mean(sizes)) * (width + float(overhead))
    if list_work <= 0.0:
        return math.inf
    return _dense_work(cap, k_batch, float(overhead)) / list_work


def _dense_work(capacity: float, shifts: int, overhead: float) -> float:
    """The dense path's work per system slot, ``A^2 K + h A``, in pair evaluations."""
    return capacity * capacity * shifts + overhead * capacity


def _shifts(images) -> int:
    return int(np.prod([2 * int(n) + 1 for n in images]))


def has_list_path(model) -> bool:
    """Whether ``model`` can take a neighbor list (``with_neighbors(skin)`` and a ``skin``)."""
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
        time the list would save over the run, ``steps * PAIR_SECONDS * S (A^2 K + h A) * (1 - 1 /
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
    Measured on 4 Dec 2026 (``benchmarks/bench_crossover.py``; 2-core CPU, load average
    1.2-1.7, nothing else running): the fused NVE step of Lennard-Jones argon (float64, skin
    1 Å), full batches of about 1,000 atoms of one kind each (icosahedral clusters of 13-561
    atoms at cutoff 8.5 Å; fcc cells of 32-864 atoms at 8.5 Å, of 32-256 at 5 Å, of 108 at
    7.5 Å), dense and list runs interleaved, medians of 4 rounds of 20 steps. ``dense / list``
    per step (results/crossover.json) went from 0.65 (108-atom cells at 7.5 Å, R = 1.17) and
    1.2-1.5 (13- and 55-atom clusters, R = 0.92-0.95) through 1.6 (147-atom clusters,
    R = 1.22) and 2.2 (256-atom cells, R = 1.8) to 20 (108-atom cells at 8.5 Å, 27 image
    shifts, R = 17). A least-squares fit of ``log(dense / list) = log(a R)`` over the 14 rows
    is flat in ``h``: four runs gave ``h`` = 59-83 and ``a`` = 1.19-1.25, root-mean-square
    error 0.25-0.28 in the log (the rule before, ``A^2 K / mean(n (m + m0))``, re-fitted to
    the same rows: 0.43). The constants are those of the third run (:data:`ATOM_OVERHEAD` 59,
    :data:`FIT_SLOPE` 1.19; results/crossover_fit.json); with them the rule picked the faster
    path in 11 of the 14 rows of the fourth (results/crossover.json).
    :data:`CROSSOVER` = 1.2 keeps the dense path for the 108-atom cells at 7.5 Å, and for three
    rows the list ran 1.2-1.7x faster (13- and 55-atom clusters, 32-atom cells at 5 Å), where
    the list's start costs about 4.4 s more. The table is in docs/models.md.
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
    if not has_list_path(model):
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
    if not ratio >= crossover:  # a ratio that is not a number (no density) keeps the reference
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
    atoms and ``shifts`` image shifts at work ratio ``ratio``: the dense path's
    ``PAIR_SECONDS * slots * (capacity^2 shifts + ATOM_OVERHEAD capacity)`` per step times
    ``1 - 1 / (FIT_SLOPE ratio)`` (0 when the list is not expected to be faster)."""
    dense = steps * PAIR_SECONDS * slots * _dense_work(capacity, shifts, ATOM_OVERHEAD)
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
    if not has_list_path(model):
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
