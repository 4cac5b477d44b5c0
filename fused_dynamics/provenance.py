"""Provenance of written systems: what each output record carries over from its input.

Every system a run writes is built from the batch (positions, numbers, masses, velocities,
cell, pbc, energy, forces, stress and the run's bookkeeping). :func:`copy_provenance` adds
what the input structure carried and the engine does not compute, so that every result can be
traced back to its input:

- the input's ``atoms.info`` (names, ids, tags, any custom key), unchanged;
- the input's per-atom ``atoms.arrays`` (``tags``, ``initial_charges``, custom keys), except
  ``numbers``, ``positions``, ``momenta`` and ``masses``, which the engine writes itself;
- the input's calculator results, if it had any (for example reference DFT energies and forces
  read from an extxyz file), as ``input_energy``, ``input_forces``, ...;
- ``source_index`` (the frame index in its file, or the index in an in-memory list),
  ``source_file`` (when it was read from a file) and the run's ``system_id``.

Input keys that clash with a key the engine writes (:data:`ENGINE_INFO_KEYS` and the
calculator results ``energy``, ``forces``, ``stress``, ...) are kept under the prefix
``input_`` (:data:`INPUT_PREFIX`): an input ``info["energy"]`` becomes ``info["input_energy"]``
and an input ``info["system_id"]`` becomes ``info["input_system_id"]``. Nothing of the input is
dropped.

Values the run did not change are written exactly as read, whatever the run's dtype: a float32
run computes with the masses and cell rounded to float32, and :func:`copy_provenance` puts the
input's own values back where the output holds the input's value or its float32 rounding
(masses; the cell of a fixed-cell run; see :func:`restore_unchanged`). Atomic numbers and pbc
are integers and booleans and never rounded.

Exit reasons and statuses are written with their names: :func:`name_exit_reason` adds
``exit_reason_name`` (``"converged"``, ``"budget"``, ``"failed"``, ...) next to the integer
``exit_reason`` and ``status_name`` (``"graduated"``, ``"stage_<k>"``) next to ``status``.
:data:`UNITS`, :func:`exit_reason_legend` and :func:`output_legend` describe the numbers of an
output; the names come from :mod:`fused_dynamics.status` (one table).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import ase
import numpy as np

from .status import LEGEND, exit_reason_name, status_name

__all__ = [
    "batch_inputs",
    "ENGINE_ARRAY_KEYS",
    "ENGINE_INFO_KEYS",
    "INPUT_PREFIX",
    "UNITS",
    "copy_provenance",
    "exit_reason_legend",
    "name_exit_reason",
    "output_legend",
    "package_version",
    "restore_unchanged",
]

INPUT_PREFIX = "input_"

#: ``atoms.info`` keys written by the engine or the outputs; input keys of these names are kept
#: as ``input_<key>``.
ENGINE_INFO_KEYS = frozenset(
    {
        "system_id",
        "status",
        "exit_reason",
        "exit_reason_name",
        "status_name",
        "stage_steps",
        "failure",
        "failure_step",
        "source_file",
        "source_index",
        "rejected",
        "step",
        "stage",
        "stage_type",
        "units",
        "fused_dynamics_version",
        "run_config",
        "exit_reason_legend",
        "legend",
        # calculator results and the extxyz writer's own keys
        "energy",
        "free_energy",
        "stress",
        "virial",
        "pbc",
        "Lattice",
        "Properties",
    }
)

#: per-atom arrays the engine writes itself (never copied from the input)
ENGINE_ARRAY_KEYS = frozenset({"numbers", "positions", "momenta", "masses"})

# per-atom keys of calculator results in the outputs: an input array of this name is renamed
_RESULT_ARRAY_KEYS = frozenset({"forces", "energies", "stresses", "charges", "magmoms"})

#: the units of every number an output holds (ASE's)
UNITS = {
    "length": "Å",
    "energy": "eV",
    "mass": "amu",
    "time": "fs",
    "velocity": "Å·sqrt(eV/amu) (ASE's native unit)",
    "force": "eV/Å",
    "stress": "eV/Å³ (ASE's sign convention, Voigt order xx yy zz yz xz xy in extxyz)",
    "temperature": "K",
}


def package_version() -> str:
    """The installed version of fused_dynamics (``"unknown"`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fused_dynamics")
    except PackageNotFoundError:
        return "unknown"


def exit_reason_legend() -> dict[int, str]:
    """``{code: name}`` of :class:`~fused_dynamics.ExitReason`, names in lower case."""
    return dict(LEGEND["exit_reason"])


def output_legend() -> dict:
    """Every name an output uses for a code, from :data:`fused_dynamics.status.LEGEND`.

    ``{"exit_reason": {code: name}, "failure": {bit: name}, "status": {name: meaning}}``
    with string keys (JSON and zarr attributes).
    """
    return {kind: {str(k): v for k, v in table.items()} for kind, table in LEGEND.items()}


def name_exit_reason(atoms: ase.Atoms) -> ase.Atoms:
    """Add the names of the integer codes of ``atoms.info`` next to them (in place).

    ``exit_reason_name`` for ``exit_reason`` and ``status_name`` for ``status``
    (:func:`~fused_dynamics.status.status_name`, the number of sub-stages taken from
    ``stage_steps``). Returns ``atoms``. Unknown codes are named ``"unknown_<code>"``; codes
    that are absent are left out.
    """
    info = atoms.info
    code = info.get("exit_reason")
    if code is not None:
        info["exit_reason_name"] = exit_reason_name(code)
    if info.get("status") is not None:
        steps = info.get("stage_steps")
        n_sub_stages = None if steps is None else int(np.size(steps))
        info["status_name"] = status_name(info["status"], n_sub_stages)
    return atoms


def _same_or_rounded(value: np.ndarray, original: np.ndarray) -> bool:
    """``value`` is ``original`` itself or ``original`` after a float32 round trip."""
    value = np.asarray(value, np.float64)
    original = np.asarray(original, np.float64)
    if value.shape != original.shape:
        return False
    return np.array_equal(value, original) or np.array_equal(
        value, original.astype(np.float32).astype(np.float64)
    )


def restore_unchanged(source: ase.Atoms, target: ase.Atoms) -> ase.Atoms:
    """Put the input's masses and cell back on an output where the run did not change them.

    A float32 run holds ``float32(value)``; written as float64 that is ``39.94800186`` for a
    mass of ``39.948``. Where the output's masses (its cell) equal the input's, or the input's
    after a float32 round trip, the input's own float64 values are written instead: exact for
    every run with a fixed cell. A cell a variable-cell stage moved differs from the input by
    far more than a float32 rounding and is kept as computed. Modifies ``target`` in place
    and returns it.
    """
    if len(source) != len(target) or not len(target):
        return target
    if _same_or_rounded(target.get_masses(), source.get_masses()):
        target.set_masses(np.array(source.get_masses(), np.float64, copy=True))
    if _same_or_rounded(target.cell.array, source.cell.array):
        cell = np.array(source.cell.array, np.float64, copy=True)
        target.set_cell(cell)
        calc_atoms = getattr(target.calc, "atoms", None)
        if calc_atoms is not None:  # the results stay those of this structure (ASE's check_state)
            calc_atoms.set_cell(cell)
    return target


def _free_key(key: str, taken) -> str:
    """``input_<key>`` (``input_input_<key>``, ... if that is taken too)."""
    new = INPUT_PREFIX + key
    while new in taken:
        new = INPUT_PREFIX + new
    return new


def copy_provenance(
    source: ase.Atoms,
    target: ase.Atoms,
    *,
    source_index: int | None = None,
    source_file: str | os.PathLike | None = None,
    system_id: int | None = None,
) -> ase.Atoms:
    """Copy the input's ``info``, per-atom ``arrays`` and calculator results onto an output.

    Parameters
    ----------
    source : ase.Atoms
        The input structure, as it was given to the run.
    target : ase.Atoms
        The output built from the batch (same atoms in the same order). Modified in place.
    source_index : int, optional
        Frame index of the input in its file, or its index in an in-memory list; written as
        ``info["source_index"]``.
    source_file : str or path, optional
        The file it was read from; written as ``info["source_file"]``.
    system_id : int, optional
        The run's id of the system; written as ``info["system_id"]`` (else the target's is
        kept).

    Returns
    -------
    ase.Atoms
        ``target``.

    Raises
    ------
    ValueError
        When ``source`` and ``target`` differ in their number of atoms.

    Notes
    -----
    Keys of the target are never overwritten: an input key that the target already holds, or
    that the engine writes (:data:`ENGINE_INFO_KEYS`, calculator results), is stored under
    ``input_<key>``. Values are copied (arrays are not shared with the input). Masses and the
    cell the run did not change are the input's own values (:func:`restore_unchanged`).
    """
    n = len(target)
    if len(source) != n:
        raise ValueError(
            f"copy_provenance: the input has {len(source)} atoms and the output {n}; they must "
            "be the same structure"
        )
    info = target.info
    for key, value in source.info.items():
        new = key if key not in ENGINE_INFO_KEYS and key not in info else _free_key(key, info)
        info[new] = value.copy() if isinstance(value, np.ndarray) else value
    for key, value in source.arrays.items():
        if key in ENGINE_ARRAY_KEYS:
            continue
        taken = key in target.arrays or key in _RESULT_ARRAY_KEYS
        new = _free_key(key, target.arrays) if taken else key
        target.arrays[new] = np.array(value, copy=True)
    results = getattr(source.calc, "results", None) if source.calc is not None else None
    for key, value in (results or {}).items():
        value = np.array(value, copy=True)
        if value.ndim >= 1 and value.shape[0] == n and key not in ("stress",):
            target.arrays[_free_key(key, target.arrays)] = value
        else:
            info[_free_key(key, info)] = value.item() if value.ndim == 0 else value
    if source_index is not None:
        info["source_index"] = int(source_index)
    if source_file is not None:
        info["source_file"] = os.fspath(source_file)
    if system_id is not None:
        info["system_id"] = int(system_id)
    return restore_unchanged(source, target)


def batch_inputs(
    batch, inputs, *, in_order: bool = False
) -> Callable[[list[ase.Atoms]], list[ase.Atoms]]:
    """``annotate(frames)``: copy the input structures' provenance onto a batch's outputs.

    Parameters
    ----------
    batch : Batch
        Made by ``Batch.from_atoms(inputs)``: its occupied slots hold the inputs in order.
    inputs : sequence of ase.Atoms
        The structures the batch was made from, in the same order.
    in_order : bool, default False
        The frames are the batch's occupied slots in order (``Batch.to_atoms``): the k-th
        frame is the k-th input's, whatever the ids. Otherwise (a run's sinks, which write
        systems as they finish) frames are matched by their ``info["system_id"]``.

    Returns
    -------
    callable
        ``annotate(frames) -> frames``: each frame whose ``info["system_id"]`` is one of the
        batch's systems (or, ``in_order``, each frame) gets its input's ``info``, per-atom
        ``arrays`` and calculator results (:func:`copy_provenance`, with ``source_index`` its
        position in ``inputs``).

    Raises
    ------
    ValueError
        ``inputs`` does not hold one structure per occupied slot, or a structure's number of
        atoms differs from its slot's (naming the index); or, matched by id, the batch's
        system ids repeat (naming the id), so that an output could not name its input.
    """
    mask = np.asarray(batch.system_mask)
    ids = np.asarray(batch.system_id)[mask]
    sizes = np.asarray(batch.n_atoms)[mask]
    inputs = list(inputs)
    if len(inputs) != len(ids):
        raise ValueError(
            f"inputs: {len(inputs)} structures for a batch of {len(ids)} systems; give the "
            "list the batch was made from (Batch.from_atoms), in its order."
        )
    for k, (a, n) in enumerate(zip(inputs, sizes, strict=True)):
        if len(a) != int(n):
            raise ValueError(
                f"inputs[{k}] has {len(a)} atoms and the batch's system {k} has {int(n)}; give "
                "the list the batch was made from (Batch.from_atoms), in its order."
            )
    by_id = {int(sid): k for k, sid in enumerate(ids)}
    if not in_order and len(by_id) < len(ids):
        repeated = sorted({int(i) for i in ids if np.sum(ids == i) > 1})
        raise ValueError(
            f"inputs: the batch's system ids {repeated} repeat, so a written system cannot be "
            "matched to its input; give Batch.from_atoms(..., system_ids=...) distinct ids, or "
            "copy the inputs' info from Batch.to_atoms(inputs) (matched by slot)."
        )

    def annotate(frames):
        for j, a in enumerate(frames):
            k = j if in_order else by_id.get(int(a.info.get("system_id", -1)))
            if k is not None:
                copy_provenance(inputs[k], a, source_index=k, system_id=int(ids[k]))
        return list(frames)

    return annotate
