"""The built-in hooks: failure detectors, monitors, constraints, snapshots, progress.

Every class here is final; the two families that share behaviour do so through an abstract base
(:class:`AbstractFailureHook`: a per-system test that fails systems; :class:`AbstractSnapshotHook`:
frames of selected systems written to a sink), following Equinox's abstract-or-final pattern.
Import them from :mod:`fused_dynamics.hooks` (or the package).
"""

# No ``from __future__ import annotations`` here: Equinox reads ``AbstractVar`` annotations
# when the class is created, and refuses them as strings.
import abc
import csv
import logging
import os
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import constraints, validation
from .batch import HOST_FIELDS, INFO_FIELDS, atoms_from_arrays
from .hooks_base import DynamicsStage, Hook, HookData, fail_systems
from .linalg3 import inv3
from .observables import initialize_velocities
from .status import ExitReason, Failure

__all__ = [
    "AbstractFailureHook",
    "AbstractSnapshotHook",
    "BiasedPotentialHook",
    "ConvergedSnapshotHook",
    "EnergyDriftMonitorHook",
    "FreezeAtomsHook",
    "LoggingHook",
    "MaxForceHook",
    "NaNDetectorHook",
    "ProgressHook",
    "SnapshotHook",
    "ThermalizeOnEntryHook",
    "WrapPeriodicHook",
]


class AbstractFailureHook(Hook):
    """Base of the hooks that move systems failing a per-system test out of the run.

    Subclasses give :meth:`bad` and the fields ``warn`` (log the failed system ids) and ``code``
    (the :class:`Failure` bits recorded in ``info["failure"]``). A failed system's status
    becomes ``exit_status`` with ``info["exit_reason"] == ExitReason.FAILED``; the other
    systems go on unaffected.
    """

    warn: eqx.AbstractVar[bool]
    code: eqx.AbstractVar[int]

    @abc.abstractmethod
    def bad(self, batch) -> jax.Array:
        """Per-system bool (S,): the occupied systems that fail the test."""

    def apply(self, batch, ctx):
        bad = self.bad(batch) & (batch.status != ctx.exit_status)
        if self.warn:
            jax.debug.callback(_warn_failed, type(self).__name__, bad, batch.system_id, ctx.step)
        return fail_systems(batch, bad, ctx.exit_status, self.code)


class NaNDetectorHook(AbstractFailureHook):
    """Move a system whose energy, forces or positions become non-finite to the failure exit.

    Its status becomes ``exit_status`` with ``info["exit_reason"] == ExitReason.FAILED``; the
    other systems go on unaffected. A warning names the system ids. Runs at ``AFTER_COMPUTE``.
    """

    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.AFTER_COMPUTE, kw_only=True)
    warn: bool = eqx.field(static=True, default=True, kw_only=True)
    code: int = eqx.field(
        static=True, default=int(Failure.ENERGY | Failure.FORCES | Failure.POSITIONS), kw_only=True
    )

    def bad(self, batch) -> jax.Array:
        atom_ok = jnp.all(jnp.isfinite(batch.forces), -1) & jnp.all(
            jnp.isfinite(batch.positions), -1
        )
        atom_bad = batch.atom_mask & ~atom_ok
        sys_bad = batch.sum_atoms(atom_bad.astype(jnp.int32)) > 0
        return batch.system_mask & (sys_bad | ~jnp.isfinite(batch.energy))


def _warn_failed(name, bad, system_id, step):
    bad = np.asarray(bad)
    if bad.any():
        ids = np.asarray(system_id)[bad].tolist()
        logging.getLogger("fused_dynamics").warning(
            "%s: systems %s failed at step %d and left the run.", name, ids, int(step)
        )


class MaxForceHook(AbstractFailureHook):
    """Fail a system whose largest atomic force exceeds ``max_force`` eV/Å (or is non-finite).

    Parameters
    ----------
    max_force : float, default 100.0
        eV/Å, > 0.
    warn : bool, default True
        Log the ids of the failed systems.
    code : int, default ``Failure.MAX_FORCE``
        Recorded in ``info["failure"]``.

    Runs at ``AFTER_COMPUTE``.
    """

    max_force: float = 100.0
    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.AFTER_COMPUTE, kw_only=True)
    warn: bool = eqx.field(static=True, default=True, kw_only=True)
    code: int = eqx.field(static=True, default=int(Failure.MAX_FORCE), kw_only=True)

    def __check_init__(self):
        if isinstance(self.max_force, bool) or not float(self.max_force) > 0:
            raise ValueError(f"MaxForceHook: max_force must be > 0 (eV/Å), got {self.max_force!r}.")

    def bad(self, batch):
        norm = jnp.where(batch.atom_mask, jnp.linalg.norm(batch.forces, axis=-1), 0.0)
        too_big = ~(batch.max_atoms_of(norm) <= self.max_force)
        return batch.system_mask & too_big


class EnergyDriftMonitorHook(Hook):
    """Per-system drift of the conserved quantity since the system started; warn or fail.

    The conserved quantity is the stage's ``conserved_energy`` observable where it has one
    (Nosé–Hoover, NPT), else potential plus kinetic energy. Drift is per atom, in eV.

    Parameters
    ----------
    threshold : float
        eV/atom.
    action : {"warn", "fail"}
    """

    threshold: float = 1e-3
    action: str = eqx.field(static=True, default="warn")
    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.AFTER_STEP, kw_only=True)

    def __check_init__(self):
        if self.action not in ("warn", "fail"):
            raise ValueError(
                f"EnergyDriftMonitorHook: action must be 'warn' or 'fail', got {self.action!r}."
            )
        if isinstance(self.threshold, bool) or not float(self.threshold) > 0:
            raise ValueError(
                f"EnergyDriftMonitorHook: threshold must be > 0 (eV/atom), got {self.threshold!r}."
            )

    def init_info(self, batch):
        return {"drift_reference": jnp.full((batch.max_systems,), jnp.nan, batch.dtype)}

    def apply(self, batch, ctx):
        f = ctx.fields(batch)
        h = f.get("conserved_energy", f["energy"] + f["kinetic_energy"])
        info = dict(batch.info)
        ref = jnp.where(jnp.isnan(info["drift_reference"]), h, info["drift_reference"])
        info["drift_reference"] = ref
        drift = jnp.abs(h - ref) / jnp.maximum(batch.n_atoms, 1)
        bad = batch.system_mask & (batch.status != ctx.exit_status) & (drift > self.threshold)
        jax.debug.callback(_warn_failed, type(self).__name__, bad, batch.system_id, ctx.step)
        batch = batch.replace(info=info)
        if self.action == "fail":
            batch = fail_systems(batch, bad, ctx.exit_status, Failure.ENERGY_DRIFT)
        return batch


class FreezeAtomsHook(Hook):
    """Hold chosen atom slots fixed: reference positions, zero velocities and forces.

    Parameters
    ----------
    atom_mask : Array, shape (N,) bool
        Which atom slots are frozen.
    positions : Array, shape (N, 3)
        Where they are held (use :meth:`from_batch`).

    When a run initializes the batch, the frozen atoms are put at ``positions`` and added to the
    batch's constraint mask ``fixed`` (:mod:`fused_dynamics.constraints`, the same mechanism as
    ASE's ``FixAtoms``): every sub-stage then leaves them in place, their forces are zero, and
    they do not count as degrees of freedom in temperatures and thermostats. Atom slots are
    fixed, so use it with a static batch: an inflight run (a sampler) refuses it, since a
    refilled system would be put at the previous occupant's positions (give ``FixAtoms``
    constraints on the ``ase.Atoms`` instead; they travel with the system).
    """

    holds_slots: ClassVar[bool] = True
    atom_mask: jax.Array
    positions: jax.Array
    stage: DynamicsStage = eqx.field(
        static=True, default=DynamicsStage.BEFORE_COMPUTE, kw_only=True
    )

    @classmethod
    def from_batch(cls, batch, indices=None, atom_mask=None) -> "FreezeAtomsHook":
        """Freeze atom slots ``indices`` (or ``atom_mask``) at their positions in ``batch``.

        Parameters
        ----------
        batch : Batch
        indices : sequence of int, optional
            Atom slots of ``batch`` (rows of ``batch.positions``), each holding an atom.
        atom_mask : array of shape (N,) bool, optional
            True for the slots to freeze, each holding an atom.

        Raises
        ------
        ValueError
            Not exactly one of ``indices`` and ``atom_mask``; an index that is not an integer,
            is negative, is past the batch's ``max_atoms`` slots or names a padding slot; a
            mask of another shape or True on a padding slot. Each would freeze nothing
            without a word.
        """
        owner = "FreezeAtomsHook.from_batch"
        if (indices is None) == (atom_mask is None):
            raise ValueError(f"{owner}: give exactly one of indices, atom_mask.")
        occupied = np.asarray(batch.atom_mask)
        if atom_mask is None:
            idx = np.asarray(indices)
            if idx.ndim > 1 or (idx.size and idx.dtype.kind not in "iu"):
                raise ValueError(
                    f"{owner}: indices must be a sequence of integers, got {indices!r}."
                )
            idx = idx.reshape(-1)
            bad = [int(i) for i in idx if not 0 <= i < batch.max_atoms or not occupied[i]]
            if bad:
                raise ValueError(
                    f"{owner}: indices {bad} name no atom: slots run from 0 to "
                    f"{batch.max_atoms - 1} and only {int(occupied.sum())} hold atoms (negative "
                    "indices are refused; padding slots hold none)."
                )
            mask = np.zeros(batch.max_atoms, bool)
            mask[idx] = True
        else:
            mask = np.asarray(atom_mask)
            if mask.shape != occupied.shape:
                raise ValueError(
                    f"{owner}: atom_mask must have shape ({batch.max_atoms},), one entry per "
                    f"atom slot, got {mask.shape}."
                )
            mask = mask.astype(bool)
            padding = np.flatnonzero(mask & ~occupied)
            if padding.size:
                raise ValueError(
                    f"{owner}: atom_mask is True on padding slots {padding.tolist()[:10]}, "
                    "which hold no atom."
                )
        return cls(atom_mask=jnp.asarray(mask), positions=batch.positions)

    def constrain(self, batch):
        m = (self.atom_mask & batch.atom_mask)[:, None]
        return batch.replace(
            positions=jnp.where(m, self.positions, batch.positions),
            velocities=jnp.where(m, 0.0, batch.velocities),
            fixed=batch.fixed | m,
        )


class BiasedPotentialHook(Hook):
    """Add a bias energy ``bias_fn(batch) -> (S,)`` to the model's result, forces by autodiff.

    Runs at ``AFTER_COMPUTE``, inside the one evaluation's step: energy and forces that the
    second halves and the convergence checks see include the bias, with the batch's constraints
    applied to the bias forces as to the model's. (Stress is not biased.)
    """

    bias_fn: Callable = eqx.field(static=True)
    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.AFTER_COMPUTE, kw_only=True)

    def apply(self, batch, ctx):
        def total(positions):
            e = self.bias_fn(batch.replace(positions=positions))
            return jnp.sum(jnp.where(batch.system_mask, e, 0.0)), e

        (_, e), g = jax.value_and_grad(total, has_aux=True)(batch.positions)
        bias = constraints.project_forces(batch, -jnp.where(batch.atom_mask[:, None], g, 0.0))
        return batch.replace(
            energy=batch.energy + jnp.where(batch.system_mask, e, 0.0),
            forces=batch.forces + bias,
        )


class WrapPeriodicHook(Hook):
    """Wrap positions into the cell along periodic directions (``AFTER_STEP``).

    Energies and forces are invariant under it (the models use fractional minimum-image
    displacements), so trajectories are unchanged up to rounding.
    """

    def apply(self, batch, ctx):
        sys = jnp.minimum(batch.system_idx, batch.max_systems - 1)
        inv = inv3(batch.cell)[sys]
        frac = jnp.einsum("ni,nij->nj", batch.positions, inv)
        pbc = batch.pbc[sys]
        frac = jnp.where(pbc, frac - jnp.floor(frac), frac)
        wrapped = jnp.einsum("ni,nij->nj", frac, batch.cell[sys])
        return batch.replace(
            positions=jnp.where(batch.atom_mask[:, None], wrapped, batch.positions)
        )


class LoggingHook(Hook):
    """Log per step: systems per status, mean/max energy, max fmax, mean temperature.

    Parameters
    ----------
    path : str, optional
        CSV file to append to (a header is written first). Without it, lines go to the
        ``fused_dynamics`` Python logger at INFO level.
    """

    path: str | None = eqx.field(static=True, default=None)
    fields: tuple[str, ...] = eqx.field(
        static=True, default=("energy", "fmax", "temperature"), kw_only=True
    )

    def on_host(self, data):
        active = data["system_mask"]
        statuses, counts = np.unique(data["status"][active], return_counts=True)
        per_status = ";".join(f"{s}:{c}" for s, c in zip(statuses, counts, strict=True))
        e = data["energy"][active]
        row = {
            "step": data.step,
            "systems_per_status": per_status,
            "energy_mean": float(e.mean()) if e.size else float("nan"),
            "energy_max": float(e.max()) if e.size else float("nan"),
            "fmax_max": float(data["fmax"][active].max()) if e.size else float("nan"),
            "temperature_mean": float(data["temperature"][active].mean())
            if e.size
            else float("nan"),
        }
        if self.path is None:
            logging.getLogger("fused_dynamics").info(" ".join(f"{k}={v}" for k, v in row.items()))
            return
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


# what a snapshot needs: the batch fields of an ase.Atoms (status and system_id are always sent)
_FRAME_FIELDS = tuple(f for f in HOST_FIELDS if f not in ("status", "system_id")) + INFO_FIELDS


class AbstractSnapshotHook(Hook):
    """Base of the hooks that write frames of some systems to a sink.

    Subclasses give the field ``sink`` (an object with ``write(list[ase.Atoms])``) and
    :meth:`select`, the slots to write from the host copies. Each frame carries the system's
    ``info``, its per-atom arrays and ``info["step"]``.
    """

    sink: eqx.AbstractVar[Any]

    @abc.abstractmethod
    def select(self, data: HookData) -> np.ndarray:
        """Per-slot bool (S,): which systems to write."""

    def on_host(self, data):
        slots = np.flatnonzero(self.select(data))
        if slots.size:
            frames = atoms_from_arrays(data.arrays, slots)
            for a in frames:
                a.info["step"] = data.step
            self.sink.write(frames)


class SnapshotHook(AbstractSnapshotHook):
    """Write frames of the active (occupied, not graduated) systems to a sink.

    Parameters
    ----------
    sink : object with ``write(list[ase.Atoms])``
        For example :class:`~fused_dynamics.sinks.HostMemory` or ``ExtXYZSink``.
    every_n_steps : int
    """

    sink: Any = eqx.field(static=True)
    fields: tuple[str, ...] = eqx.field(static=True, default=_FRAME_FIELDS, kw_only=True)

    def select(self, data: HookData) -> np.ndarray:
        return data["system_mask"] & (data["exit_reason"] == ExitReason.RUNNING)


class ConvergedSnapshotHook(AbstractSnapshotHook):
    """Write each system as it converges in a sub-stage (``ON_CONVERGE``).

    Parameters
    ----------
    sink : object with ``write(list[ase.Atoms])``
    every_n_steps : int
    """

    sink: Any = eqx.field(static=True)
    fields: tuple[str, ...] = eqx.field(static=True, default=_FRAME_FIELDS, kw_only=True)
    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.ON_CONVERGE, kw_only=True)

    def select(self, data):
        return data["converged"]


class ThermalizeOnEntryHook(Hook):
    """Draw Maxwell-Boltzmann velocities for the systems that just entered sub-stage ``code``.

    Runs at ``ON_CONVERGE``: a system that left the previous stage this step (converged or
    budget spent) and now has status ``code`` gets velocities at ``temperature`` (K), drawn
    from a key folded with its ``system_id`` (so it does not depend on its slot). Useful after
    FIRE, whose velocities are FIRE's (mass-free), not physical ones.

    Raises
    ------
    ValueError
        ``code`` not an integer >= 0, ``seed`` not an integer in [0, 2**32) (the range of
        ``NVTLangevin``'s seed: larger seeds collide without ``jax_enable_x64``), or
        ``temperature`` not a finite number >= 0 (K; one value, or one per slot).
    """

    code: int = eqx.field(static=True)
    temperature: float
    # a traced 0-d uint32 array (validation.seed_leaf): a new seed does not recompile
    seed: int | jax.Array = eqx.field(default=0, converter=validation.seed_leaf)
    stage: DynamicsStage = eqx.field(static=True, default=DynamicsStage.ON_CONVERGE, kw_only=True)

    def __check_init__(self):
        owner = type(self).__name__
        validation.check_integer(owner, "code", self.code, 0)
        validation.check_integer(
            owner, "seed", self.seed, 0, validation.SEED_LIMIT - 1, allow_array=True
        )
        validation.check_real(
            owner,
            "temperature",
            self.temperature,
            validation.non_negative(),
            unit="K",
            per_system=True,
        )

    def apply(self, batch, ctx):
        report = ctx.report
        entered = (report.converged | report.budget_spent) & (batch.status == self.code)

        def draw(batch):
            key = jax.random.PRNGKey(self.seed)
            fresh = initialize_velocities(batch, self.temperature, key)
            pick = batch.to_atoms_axis(entered)[:, None]
            return batch.replace(velocities=jnp.where(pick, fresh.velocities, batch.velocities))

        return jax.lax.cond(jnp.any(entered), draw, lambda b: b, batch)


class ProgressHook(Hook):
    """A tqdm progress bar of graduated systems (``ON_CONVERGE``: after migration)."""

    total: int | None = eqx.field(static=True, default=None)
    bar: Any = eqx.field(static=True, default=None)

    def __init__(self, total=None, *, every_n_steps: int = 10, desc: str = "graduated"):
        self.total = total
        self.bar = tqdm(total=total, desc=desc, unit="sys")
        self.every_n_steps = every_n_steps
        self.stage = DynamicsStage.ON_CONVERGE
        self.fields = ("exit_reason",)

    def on_host(self, data):
        done = int(np.sum(data["system_mask"] & (data["exit_reason"] != ExitReason.RUNNING)))
        self.bar.n = done
        self.bar.set_postfix(step=data.step, refresh=False)
        self.bar.refresh()
