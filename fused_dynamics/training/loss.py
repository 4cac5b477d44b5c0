"""The training loss and the error metrics, computed only over real, labelled entries.

For a batch with reference values (:class:`~fused_dynamics.training.data.Targets`) the loss is
the weighted sum of three mean squared errors, as in the training of NequIP (S. Batzner et al.,
Nat. Commun. 13, 2453 (2022)) and MACE (I. Batatia et al., NeurIPS 2022)::

    L = w_E * mean_s ((E_s - E_s^ref) / n_s)^2          energy per atom, eV²/atom²
      + w_F * mean_{i,a} (F_ia - F_ia^ref)^2            force components, (eV/Å)²
      + w_S * mean_{s,a,b} (σ_sab - σ_sab^ref)^2        all 9 stress components, (eV/Å³)²

Each mean runs over the entries that exist and are labelled (``Targets.*_mask``: occupied
slots, real atoms, structures with a usable stress); padding and empty slots never contribute,
and a batch with no entry of a kind contributes 0 for it. Errors are masked *before* they are
squared, so the model's values at padding cannot reach the loss or its gradient.

:func:`error_sums` returns the sums behind each mean, so that metrics over a whole data set
(many batches) are exact means, not means of batch means.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..batch import Batch
from .data import Targets

__all__ = ["LossWeights", "batch_loss", "error_sums", "loss_from_sums", "metrics_from_sums"]

SUM_KEYS = ("e_abs", "e_sq", "e_count", "f_sq", "f_count", "s_sq", "s_count")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms of the loss (dimensionless; see the module docstring).

    Attributes
    ----------
    energy : float, default 1.0
        Weight of the energy-per-atom MSE (eV²/atom²).
    forces : float, default 1.0
        Weight of the force-component MSE ((eV/Å)²).
    stress : float, default 1.0
        Weight of the stress-component MSE ((eV/Å³)²); 0 skips computing the stress.
    """

    energy: float = 1.0
    forces: float = 1.0
    stress: float = 1.0

    def __post_init__(self):
        for name in ("energy", "forces", "stress"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v >= 0):
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {v!r}.")

    @classmethod
    def of(cls, value) -> LossWeights:
        """``LossWeights`` from an instance, a mapping ``{energy, forces, stress}`` or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"energy", "forces", "stress"}
            if unknown:
                raise ValueError(
                    f"unknown loss weight(s) {sorted(unknown)}; allowed: energy, forces, stress"
                )
            return cls(**{k: float(v) for k, v in value.items()})
        raise TypeError(f"weights must be LossWeights or a dict, got {type(value).__name__}.")


def error_sums(model, batch: Batch, targets: Targets, with_stress: bool) -> dict[str, jax.Array]:
    """Sums of errors of ``model`` on one batch, over real labelled entries only.

    Parameters
    ----------
    model : Model
        Called as ``model(batch, stress=with_stress)``.
    batch : Batch
    targets : Targets
        Laid out like ``batch``.
    with_stress : bool
        Compute the stress (else the stress sums are 0).

    Returns
    -------
    dict of scalar Array
        ``e_abs`` = Σ|ΔE/n| (eV/atom), ``e_sq`` = Σ(ΔE/n)², ``e_count`` structures with an
        energy; ``f_sq`` = ΣΔF² over force components, ``f_count`` their number; ``s_sq`` =
        ΣΔσ² over the 9 stress components, ``s_count`` their number.
    """
    out = model(batch, stress=with_stress)
    dtype = out.energy.dtype
    n = jnp.maximum(batch.n_atoms, 1).astype(dtype)
    e_mask = targets.energy_mask & batch.system_mask
    de = jnp.where(e_mask, (out.energy - targets.energy) / n, 0.0)
    f_mask = (targets.forces_mask & batch.atom_mask)[:, None]
    df = jnp.where(f_mask, out.forces - targets.forces, 0.0)
    sums = {
        "e_abs": jnp.sum(jnp.abs(de)),
        "e_sq": jnp.sum(de * de),
        "e_count": jnp.sum(e_mask).astype(dtype),
        "f_sq": jnp.sum(df * df),
        "f_count": 3.0 * jnp.sum(f_mask).astype(dtype),
    }
    if with_stress:
        s_mask = (targets.stress_mask & batch.system_mask)[:, None, None]
        ds = jnp.where(s_mask, out.stress - targets.stress, 0.0)
        sums["s_sq"] = jnp.sum(ds * ds)
        sums["s_count"] = 9.0 * jnp.sum(s_mask).astype(dtype)
    else:
        sums["s_sq"] = jnp.zeros((), dtype)
        sums["s_count"] = jnp.zeros((), dtype)
    return sums


def loss_from_sums(sums, weights: LossWeights):
    """The loss (see the module docstring) from :func:`error_sums` (or their totals)."""

    def mean(total, count):
        return total / jnp.maximum(count, 1.0)

    return (
        weights.energy * mean(sums["e_sq"], sums["e_count"])
        + weights.forces * mean(sums["f_sq"], sums["f_count"])
        + weights.stress * mean(sums["s_sq"], sums["s_count"])
    )


def batch_loss(params, static, batch: Batch, targets: Targets, weights: LossWeights, with_stress):
    """Loss of the model ``eqx.combine(params, static)`` on one batch, and its error sums.

    Differentiable in ``params`` (the model's inexact array leaves, ``eqx.partition`` with
    ``eqx.is_inexact_array``). Returns ``(loss, sums)``.
    """
    model = eqx.combine(params, static)
    sums = error_sums(model, batch, targets, with_stress)
    return loss_from_sums(sums, weights), sums


def metrics_from_sums(sums, weights: LossWeights) -> dict[str, float]:
    """Metrics of a data set from its summed :func:`error_sums` (host floats).

    Returns
    -------
    dict
        ``loss``; ``energy_mae_per_atom`` and ``energy_rmse_per_atom`` (eV/atom),
        ``force_rmse`` (eV/Å), ``stress_rmse`` (eV/Å³); NaN for a kind with no labelled
        entry.
    """
    s = {k: float(v) for k, v in sums.items()}

    def ratio(a, b):
        return a / b if b > 0 else float("nan")

    return {
        "loss": float(loss_from_sums(s, weights)),
        "energy_mae_per_atom": ratio(s["e_abs"], s["e_count"]),
        "energy_rmse_per_atom": float(np.sqrt(ratio(s["e_sq"], s["e_count"]))),
        "force_rmse": float(np.sqrt(ratio(s["f_sq"], s["f_count"]))),
        "stress_rmse": float(np.sqrt(ratio(s["s_sq"], s["s_count"]))),
    }
