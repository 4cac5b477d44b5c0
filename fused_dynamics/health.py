"""Finite or failed: the per-system check that moves a system that went wrong out of a run.

See :class:`~fused_dynamics.FusedStage` (``max_force``, ``max_displacement``,
``max_temperature``) and :class:`~fused_dynamics.Failure` for the codes; docs/semantics.md §17.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import observables
from .batch import Batch
from .models.cell_list import thin_systems
from .models.neighbors import NeighborList
from .status import ExitReason, Failure

__all__ = ["system_failures", "fail_failed", "fail_non_finite_energy"]


def system_failures(
    fused, batch: Batch, displacement: jax.Array | None = None, energy: bool = True
) -> jax.Array:
    """Failure code of every slot of ``batch`` under ``fused``'s bounds (0: healthy).

    Per-system reductions only, so one system's values never decide another's code.

    Parameters
    ----------
    fused : FusedStage
    batch : Batch
    displacement : Array, shape (N, 3), optional
        How far the sub-stages moved each atom in this step (Å; net of the cell's change in a
        variable-cell sub-stage), checked against ``max_displacement`` in every sub-stage.
    energy : bool
        Static. False: the energy was not evaluated (NaN, "not computed") and is not checked
        here; the run checks it at its end (:func:`fail_non_finite_energy`).

    Returns
    -------
    Array, shape (S,) int32
        A :class:`~fused_dynamics.Failure` bit set per slot.
    """
    dynamics = [c for c, st in fused.sub_stages if not st.is_optimizer]
    in_dynamics = jnp.isin(batch.status, jnp.asarray(dynamics or [fused.exit_status]))
    in_dynamics = in_dynamics & bool(dynamics)

    def bad_rows(x):
        return ~jnp.all(jnp.isfinite(x), axis=-1)

    f = jnp.where(jnp.isfinite(batch.forces), batch.forces, 0.0)
    too_big = (
        jnp.sum(f * f, axis=-1) > fused.max_force**2
        if fused.max_force is not None
        else jnp.zeros_like(batch.atom_mask)
    )
    far = jnp.zeros_like(batch.atom_mask)
    if displacement is not None and fused.max_displacement is not None:
        # every sub-stage, optimizers too: a step that long has blown up either way (ASE's
        # optimizers step at most 0.2 Å; a gradient descent with too large a step threw a
        # cluster 380 Å apart, to zero forces, "converged")
        far = jnp.sum(displacement**2, axis=-1) > fused.max_displacement**2
    per_atom = (
        (bad_rows(batch.forces), Failure.FORCES),
        (bad_rows(batch.positions), Failure.POSITIONS),
        (bad_rows(batch.velocities), Failure.VELOCITIES),
        (too_big, Failure.MAX_FORCE),
        (far, Failure.DISPLACEMENT),
    )
    # one per-system reduction for every per-atom check
    flags = jnp.stack([bad for bad, _ in per_atom], axis=-1) & batch.atom_mask[:, None]
    counts = batch.sum_atoms(flags.astype(jnp.int32))  # (S, 5)
    checks = [(counts[:, k] > 0, bit) for k, (_, bit) in enumerate(per_atom)]
    if energy:
        checks.append((~jnp.isfinite(batch.energy), Failure.ENERGY))
    checks.append((~jnp.all(jnp.isfinite(batch.cell), axis=(-2, -1)), Failure.CELL))
    if fused.needs_stress:
        checks.append((~jnp.all(jnp.isfinite(batch.stress), axis=(-2, -1)), Failure.STRESS))
    if fused.max_temperature is not None:
        hot = in_dynamics & ~(observables.temperature(batch) <= fused.max_temperature)
        checks.append((hot, Failure.TEMPERATURE))
    checks.append((fused.model.system_faults(batch), None))
    if isinstance(batch.neighbors, NeighborList):
        # Pairs were dropped: every result since is suspect. A concrete run regrows the list
        # and repeats the work from its last good state (discarding this); a traced one (vmap,
        # grad, a caller's jit) cannot, and its systems end FAILED instead of wrong.
        overflow = jnp.broadcast_to(batch.neighbors.overflow, batch.energy.shape)
        checks.append((overflow, Failure.NEIGHBOR_OVERFLOW))
        # left out of the build (they would size the stencil of every system): no pairs
        checks.append((thin_systems(batch), Failure.CELL_TOO_SMALL))
        checks.append((batch.neighbors.excluded(batch), Failure.NEIGHBOR_OVERFLOW))
    code = jnp.zeros(batch.energy.shape, jnp.int32)
    for bad, bit in checks:
        code = code | (bad if bit is None else jnp.where(bad, int(bit), 0))
    return jnp.where(batch.system_mask, code, 0)


def fail_failed(
    fused, batch: Batch, info: dict, status, running, steps, displacement=None, energy=True
):
    """Move the ``running`` systems whose :func:`system_failures` code is set out of the run
    (``energy``: as there).

    Returns
    -------
    status : Array, shape (S,) int32
        ``exit_status`` for the systems that failed.
    info : dict
        With ``exit_reason`` FAILED, ``failure`` (the code) and ``failure_step`` (``steps``).
    """
    code = jnp.where(running, system_failures(fused, batch, displacement, energy), 0)
    failed = code != 0
    info = dict(info)
    info["exit_reason"] = jnp.where(failed, int(ExitReason.FAILED), info["exit_reason"])
    info["failure"] = jnp.where(failed, code, info["failure"]).astype(jnp.int32)
    info["failure_step"] = jnp.where(failed, steps, info["failure_step"]).astype(jnp.int32)
    status = jnp.where(failed, fused.exit_status, status).astype(jnp.int32)
    return status, info


def fail_non_finite_energy(fused, batch: Batch) -> Batch:
    """After a run whose steps did not evaluate the energy (``FusedStage.needs_energy`` false),
    with ``batch.energy`` now that of the final positions: every occupied system whose energy
    is not finite leaves the run FAILED with :attr:`Failure.ENERGY` (added to the bits of a
    system that had failed already, which keeps its failure step; the others' failure step is
    their step count). The per-step check would have stopped such a system at the step its
    energy went bad; forces, positions and velocities were still checked at every step.
    """
    bad = batch.system_mask & ~jnp.isfinite(batch.energy)
    info = dict(batch.info)
    before = info["exit_reason"] == int(ExitReason.FAILED)
    steps = jnp.sum(info["stage_steps"], axis=-1)
    info["exit_reason"] = jnp.where(bad, int(ExitReason.FAILED), info["exit_reason"]).astype(
        jnp.int32
    )
    info["failure"] = jnp.where(bad, info["failure"] | int(Failure.ENERGY), info["failure"])
    info["failure"] = info["failure"].astype(jnp.int32)
    info["failure_step"] = jnp.where(bad & ~before, steps, info["failure_step"]).astype(jnp.int32)
    info["prev_energy"] = jnp.where(bad & ~before, jnp.inf, info["prev_energy"])  # moved on
    status = jnp.where(bad, fused.exit_status, batch.status).astype(jnp.int32)
    return batch.replace(status=status, info=info)
