"""How a system left a run: exit reasons and failure codes, with their names.

``batch.info["exit_reason"]`` holds an :class:`ExitReason` per system. A system that went wrong
(:class:`ExitReason.FAILED`) also has ``batch.info["failure"]``, a :class:`Failure` bit set naming
every quantity that was non-finite or out of bounds when the fault was found, and
``batch.info["failure_step"]``, the number of steps that system had taken in the run at that
moment (0: the evaluation that started the run). Outputs carry the names
(:func:`exit_reason_name`, :func:`status_name`, :func:`failure_names`) next to the codes, and
:data:`LEGEND` (the one table of every name) in their metadata.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

__all__ = [
    "ExitReason",
    "Failure",
    "exit_reason_name",
    "failure_names",
    "fresh_info",
    "status_name",
    "LEGEND",
]


class ExitReason(enum.IntEnum):
    """How a system left the run (``batch.info["exit_reason"]``)."""

    RUNNING = 0
    CONVERGED = 1
    BUDGET = 2
    FAILED = 3
    REJECTED = 4


class Failure(enum.IntFlag):
    """What made a system fail (``batch.info["failure"]``, a bit set; 0 when it did not).

    ``ENERGY``, ``FORCES``, ``STRESS`` (where computed), ``POSITIONS``, ``VELOCITIES``, ``CELL``:
    the quantity became non-finite. ``MAX_FORCE``: the largest atomic force exceeded the run's
    bound (``FusedStage(max_force=...)``). ``TEMPERATURE``: in a dynamics sub-stage, the kinetic
    temperature exceeded the run's bound (``FusedStage(max_temperature=...)``): the dynamics blew
    up even if every number is still finite. ``NEIGHBOR_OVERFLOW``: the system's pairs did not fit
    the neighbor list and could not be regrown (under a caller's transform, or a list that would
    have no int32 pair codes for it). ``CELL_TOO_SMALL``: the cell needs more periodic images than
    the model's static range (a cell that shrank during the run), or is thinner than 0.5 Å along
    a periodic axis, or singular (either path).
    ``DISPLACEMENT``: in a dynamics sub-stage, an atom moved farther in one step than the run's
    bound (``FusedStage(max_displacement=...)``). ``ENERGY_DRIFT``: an
    ``EnergyDriftMonitorHook(action="fail")`` saw the conserved quantity drift past its threshold.
    ``SIZE_BUCKET_FULL``: the model's size buckets had no place for the system (more systems
    of its size than its bucket has slots; see ``PairPotential(size_buckets=...)``).
    """

    NONE = 0
    ENERGY = 1
    FORCES = 2
    STRESS = 4
    POSITIONS = 8
    VELOCITIES = 16
    CELL = 32
    MAX_FORCE = 64
    NEIGHBOR_OVERFLOW = 128
    TEMPERATURE = 256
    CELL_TOO_SMALL = 512
    ENERGY_DRIFT = 1024
    DISPLACEMENT = 2048
    SIZE_BUCKET_FULL = 4096


def exit_reason_name(code: int) -> str:
    """Lower-case name of an exit reason code (``"converged"``, ``"failed"``, ...)."""
    try:
        return ExitReason(int(code)).name.lower()
    except ValueError:
        return f"unknown_{int(code)}"


def failure_names(code: int) -> str:
    """Comma-separated lower-case names of the bits of a failure code (``""`` for none)."""
    code = int(code)
    return ",".join(f.name.lower() for f in Failure if f and code & f)


def status_name(code: int, num_sub_stages: int | None = None) -> str:
    """Name of a status code (docs/semantics.md §1-§2) of a fused stage of ``num_sub_stages``.

    ``"stage_<k>"`` for a system in sub-stage ``k`` (``0 <= k < num_sub_stages``) and
    ``"graduated"`` at the default exit status ``num_sub_stages`` (the system left the run:
    every written system of a run has it, whatever its exit reason). Without
    ``num_sub_stages`` (a frame without ``stage_steps``) only ``"stage_<k>"`` can be said;
    negative codes are ``"unknown_<code>"``.
    """
    code = int(code)
    if code < 0 or (num_sub_stages is not None and code > num_sub_stages):
        return f"unknown_{code}"
    if num_sub_stages is not None and code == num_sub_stages:
        return "graduated"
    return f"stage_{code}"


#: The legend written into output metadata: code -> name for exit reasons and failure bits, and
#: how status codes are named (:func:`status_name`).
LEGEND = {
    "exit_reason": {int(r): r.name.lower() for r in ExitReason},
    "failure": {int(f): f.name.lower() for f in Failure if f},
    "status": {
        "stage_<k>": "status k < number of sub-stages: in sub-stage k",
        "graduated": "status = number of sub-stages (len(stage_steps)): left the run",
    },
}


def fresh_info(num_systems: int, num_sub_stages: int, dtype) -> dict[str, jax.Array]:
    """Per-system bookkeeping of a fresh batch (every leaf has leading axis S)."""
    return {
        "stage_steps": jnp.zeros((num_systems, num_sub_stages), jnp.int32),
        "prev_energy": jnp.full((num_systems,), jnp.inf, dtype),
        "exit_reason": jnp.zeros((num_systems,), jnp.int32),  # ExitReason.RUNNING
        "failure": jnp.zeros((num_systems,), jnp.int32),  # Failure.NONE
        "failure_step": jnp.full((num_systems,), -1, jnp.int32),
    }
