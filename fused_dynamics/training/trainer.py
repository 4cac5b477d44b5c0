"""The training loop: :func:`train`, its result and its output files."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .. import validation as v
from ..batch import Batch, _check_dtype
from ..models.graph import GraphModel
from .data import Capacity, Labels, make_batches, read_labels, read_structures
from .loss import SUM_KEYS, LossWeights, batch_loss, error_sums, metrics_from_sums
from .outputs import OUTPUT_FILES, plan_outputs, write_outputs
from .serialization import check_savable

__all__ = ["TrainResult", "train", "evaluate", "make_optimizer", "OUTPUT_FILES"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "plateau")


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : Model
        The model with the best parameters (lowest validation loss; without a validation set,
        lowest training loss evaluated after the epoch, ``train_end``).
    last_model : Model
        The model after the last epoch run.
    best_epoch : int
        Epoch (1-based) of ``model``.
    history : list of dict
        One entry per epoch: ``epoch``, ``learning_rate`` (the scale of the last step),
        ``train``, ``validation`` and ``train_end`` (dicts of
        :func:`~.loss.metrics_from_sums`): ``train`` is accumulated over the epoch's steps with
        the parameters before each update; ``validation`` is evaluated after the epoch (None
        without a validation set); ``train_end``, without a validation set only (else None),
        is the training set evaluated after the epoch: the loss of the parameters the epoch
        ends with, which selects ``model``.
    stopped_early : bool
        The training ended before ``epochs``: early stopping (``patience``), a loss that is not
        finite, or an epoch whose parameters left the model's domain (its own parameter
        checks, e.g. a negative ε; with a warning, and ``last_model`` holds them).
    train_indices, validation_indices : list of int
        The structures of each split (indices into the training data; validation structures
        given explicitly are numbered after the training data).
    files : dict of str to Path
        The files written (empty without ``output_dir``). In ``metrics.json`` a metric with
        no labelled entry (NaN in ``history``) is ``null``.
    """

    model: Any
    last_model: Any
    best_epoch: int
    history: list[dict]
    stopped_early: bool
    train_indices: list[int]
    validation_indices: list[int]
    files: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def best_metrics(self) -> dict:
        """The history entry of ``best_epoch``."""
        return self.history[self.best_epoch - 1]


def make_optimizer(
    optimizer: str | optax.GradientTransformation = "adam",
    learning_rate: float = 1e-3,
    *,
    schedule: str = "constant",
    total_steps: int = 1,
    steps_per_epoch: int = 1,
    warmup_epochs: int = 0,
    final_learning_rate: float = 0.0,
    weight_decay: float = 1e-4,
    clip_norm: float | None = None,
    plateau_factor: float = 0.5,
    plateau_patience: int = 10,
) -> optax.GradientTransformationExtraArgs:
    """The optax optimiser of :func:`train` (its update takes ``value=loss``).

    Parameters
    ----------
    optimizer : {"adam", "adamw", "sgd"} or optax.GradientTransformation
        ``optax.adam`` (D. P. Kingma, J. Ba, arXiv:1412.6980), ``optax.adamw`` (with
        ``weight_decay``) or ``optax.sgd``; an optax transformation is used as given (its
        learning rate included; ``schedule`` and ``learning_rate`` are then ignored).
    learning_rate : float
        Peak learning rate.
    schedule : {"constant", "warmup_cosine", "plateau"}
        ``warmup_cosine``: ``optax.warmup_cosine_decay_schedule`` from 0 over
        ``warmup_epochs`` to ``learning_rate``, then cosine decay to ``final_learning_rate`` at
        ``total_steps``. ``plateau``: ``optax.contrib.reduce_on_plateau`` multiplying the rate
        by ``plateau_factor`` when the training loss, averaged over an epoch, has not improved
        for ``plateau_patience`` epochs.
    clip_norm : float, optional
        Clip gradients to this global norm first (``optax.clip_by_global_norm``).

    Raises
    ------
    ValueError
        An unknown optimiser or schedule name (the message lists the allowed ones).
    """
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        lr: Any = float(learning_rate)
        if schedule == "warmup_cosine":
            warmup = int(warmup_epochs) * int(steps_per_epoch)
            lr = optax.warmup_cosine_decay_schedule(
                0.0 if warmup else lr,
                lr,
                warmup_steps=warmup,
                decay_steps=max(int(total_steps), warmup + 1),
                end_value=float(final_learning_rate),
            )
        if optimizer == "adam":
            tx = optax.adam(lr)
        elif optimizer == "adamw":
            tx = optax.adamw(lr, weight_decay=float(weight_decay))
        else:
            tx = optax.sgd(lr)
        parts = [tx]
        if schedule == "plateau":
            parts.append(
                optax.contrib.reduce_on_plateau(
                    factor=float(plateau_factor),
                    patience=int(plateau_patience),
                    accumulation_size=int(steps_per_epoch),
                )
            )
    else:
        parts = [optimizer]
    if clip_norm is not None:
        parts.insert(0, optax.clip_by_global_norm(float(clip_norm)))
    return optax.chain(*parts)


def _as_trainable(model, dtype):
    """Python float and NumPy float leaves as JAX arrays of ``dtype`` (JAX arrays are kept)."""

    def conv(x):
        if isinstance(x, float) or (
            isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.inexact)
        ):
            return jnp.asarray(x, dtype)
        return x

    return jax.tree_util.tree_map(conv, model)


@eqx.filter_jit
def _loss_and_grad(params, static, batch, targets, weights, with_stress):
    # compiled once per model structure, capacities and weights, shared by train() calls
    return jax.value_and_grad(batch_loss, has_aux=True)(
        params, static, batch, targets, weights, with_stress
    )


@eqx.filter_jit
def _apply_update(params, grads, opt_state, loss, optimizer):
    updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
    return eqx.apply_updates(params, updates), opt_state


def _train_step(params, static, opt_state, batch, targets, weights, optimizer, with_stress):
    (loss, sums), grads = _loss_and_grad(params, static, batch, targets, weights, with_stress)
    params, opt_state = _apply_update(params, grads, opt_state, loss, optimizer)
    return params, opt_state, loss, sums


@eqx.filter_jit
def _eval_step(params, static, batch, targets, with_stress):
    return error_sums(eqx.combine(params, static), batch, targets, with_stress)


def _total(sums_list) -> dict[str, float]:
    total = dict.fromkeys(SUM_KEYS, 0.0)
    for sums in jax.device_get(sums_list):
        for k in SUM_KEYS:
            total[k] += float(sums[k])
    return total


def _load(data, index, keys) -> tuple[list[ase.Atoms], list[Labels]]:
    if isinstance(data, str | os.PathLike) or (
        isinstance(data, Sequence) and data and isinstance(data[0], str | os.PathLike)
    ):
        data = read_structures(data, index=index)
    atoms = list(data)
    if not atoms:
        raise ValueError("no training structures given.")
    for i, a in enumerate(atoms):
        if not isinstance(a, ase.Atoms):
            raise TypeError(f"training structure {i}: expected ase.Atoms, got {type(a).__name__}")
    return atoms, [read_labels(a, i, *keys) for i, a in enumerate(atoms)]


def _lr_scale(opt_state) -> float:
    """The learning rate (or plateau scale) the optimiser state holds, if it tells."""
    for leaf_state in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: hasattr(x, "hyperparams") or hasattr(x, "scale")
    ):
        if hasattr(leaf_state, "scale"):
            return float(leaf_state.scale)
    return float("nan")


def _outside_domain(model) -> str | None:
    """What the model's own checks (its classes' ``__check_init__``, which a model rebuilt from
    trained leaves does not run) say of its parameters, or None when they pass."""
    for cls in reversed(type(model).__mro__):
        check = cls.__dict__.get("__check_init__")
        if check is not None:
            try:
                check(model)
            except ValueError as exc:
                return str(exc)
            except (TypeError, ArithmeticError, AssertionError) as exc:
                return f"{type(exc).__name__}: {exc}"
    return None


def _check_rates(**values) -> None:
    """The optimizer's numbers, by the rules of :func:`~fused_dynamics.validation.check_real`:
    the learning rate and a clipping norm > 0, the plateau factor in (0, 1], the others >= 0;
    all finite."""
    rules = {"learning_rate": v.positive(), "clip_norm": v.positive()}
    rules["plateau_factor"] = v.interval(0.0, 1.0, closed="right")
    for name, value in values.items():
        v.check_real("train", name, value, rules.get(name, v.non_negative()), allow_none=True)


def evaluate(
    model,
    data,
    *,
    batch_size: int = 8,
    weights=None,
    dtype=None,
    index: str | int = ":",
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on labelled structures (see :func:`~.loss.metrics_from_sums`).

    ``data``: a list of ``ase.Atoms`` with reference values, or file path(s) ``ase.io`` reads.
    """
    weights = LossWeights.of(weights)
    dtype = _check_dtype(dtype)
    atoms, labels = _load(data, index, (energy_key, forces_key, stress_key))
    cap = _with_graph(
        Capacity.fit([len(a) for a in atoms], min(batch_size, len(atoms))), model, atoms
    )
    batches = make_batches(atoms, labels, range(len(atoms)), cap, dtype)
    model = _as_trainable(model, dtype)
    model = model.prepare(Batch.from_atoms(atoms, dtype=dtype))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    with_stress = weights.stress > 0 and any(lab.stress is not None for lab in labels)
    sums = [_eval_step(params, static, b, t, with_stress) for b, t in batches]
    return metrics_from_sums(_total(sums), weights)


def _with_graph(cap: Capacity, model, atoms) -> Capacity:
    """Neighbor lists on every batch for a model of the neighbor graph, or a pair potential
    configured for neighbor lists (``with_neighbors``), see ``Capacity``."""
    if isinstance(model, GraphModel) or getattr(model, "skin", None) is not None:
        return cap.with_pairs(atoms, model.cutoff)
    return cap


def train(
    model,
    data,
    *,
    validation=None,
    validation_fraction: float = 0.1,
    epochs: int = 100,
    batch_size: int = 8,
    max_atoms: int | None = None,
    weights: LossWeights | dict | None = None,
    optimizer: str | optax.GradientTransformation = "adam",
    learning_rate: float = 1e-3,
    schedule: str = "constant",
    warmup_epochs: int = 0,
    final_learning_rate: float = 0.0,
    weight_decay: float = 1e-4,
    clip_norm: float | None = None,
    plateau_factor: float = 0.5,
    plateau_patience: int = 10,
    patience: int | None = None,
    min_delta: float = 0.0,
    seed: int | jax.Array = 0,
    dtype=None,
    index: str | int = ":",
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fit a model's parameters to reference energies, forces and stresses.

    Parameters
    ----------
    model : Model
        Any :class:`~fused_dynamics.models.Model`. Its parameters are its inexact array leaves
        (``eqx.partition(model, eqx.is_inexact_array)``; Python floats and NumPy float arrays
        become arrays of ``dtype`` first); everything else (static fields, integers) is kept.
    data : list of ase.Atoms, or path(s)
        Training structures with reference values (see :mod:`.data`), or files / globs
        ``ase.io.read(path, index=index)`` reads.
    validation : list of ase.Atoms or path(s), optional
        An explicit validation set; then ``validation_fraction`` is not used.
    validation_fraction : float, default 0.1
        Without ``validation``: this fraction of ``data`` (rounded, at least 1 structure when
        > 0 and at least one left for training) is drawn at random with ``seed`` as the
        validation set. 0: no validation set.
    epochs : int
        Passes over the training set.
    batch_size : int
        Structures per batch (the batch's system capacity S).
    max_atoms : int, optional
        Atom capacity N of every batch (default: the sum of the ``batch_size`` largest
        structures, so that any shuffle fits). All batches share the capacities, so the step
        compiles once; the last, ragged batch leaves slots empty.
    weights : LossWeights or dict, optional
        ``{energy, forces, stress}`` weights of the loss (see :mod:`.loss`), default 1 each.
    optimizer, learning_rate, schedule, warmup_epochs, final_learning_rate, weight_decay, \
clip_norm, plateau_factor, plateau_patience
        See :func:`make_optimizer`; epochs give the schedule's step counts.
    patience : int, optional
        Early stopping: stop when the validation loss (the training loss without validation
        set) has not improved by more than ``min_delta`` for this many epochs.
    seed : int or jax PRNG key
        Drives the split and the shuffling: the same seed gives the same batches.
    dtype : float dtype, optional
        Of the batches and the parameters (default: float64 with ``jax_enable_x64``).
    index : str or int, default ":"
        ASE frame selection when data are files.
    energy_key, forces_key, stress_key : str, optional
        Read references from ``atoms.info`` / ``atoms.arrays`` instead of the calculator.
    output_dir : path, optional
        Write ``model.eqx`` (best), ``last_model.eqx``, ``metrics.json``, ``metrics.csv`` and
        ``loss.png`` there.
    overwrite : bool, default False
        Replace those files when they exist (else :class:`FileExistsError` before training).
    progress : bool, default True
        A tqdm bar over epochs on stderr.
    callback : callable, optional
        Called with each epoch's history entry.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        No structures, no reference values, bad capacities or options (named), an element the
        model has no parameters for (``model.check_batch``); the first epoch's parameters
        already outside the model's domain (lower the learning rate).
    FileExistsError
        An output file exists and not ``overwrite``.

    Warns
    -----
    UserWarning
        An epoch's parameters left the model's domain (the model's own parameter checks fail
        on them): the training stops there; ``model`` is the best epoch before it.
    """
    if output_dir is not None:
        check_savable(model)  # before reading data or training, not after the last epoch
    weights = LossWeights.of(weights)
    dtype = _check_dtype(dtype)
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    if patience is not None and int(patience) < 1:
        raise ValueError(f"patience must be >= 1, got {patience}.")
    _check_rates(
        learning_rate=learning_rate, final_learning_rate=final_learning_rate,
        weight_decay=weight_decay, clip_norm=clip_norm, plateau_factor=plateau_factor,
        min_delta=min_delta,
    )  # fmt: skip
    keys = (energy_key, forces_key, stress_key)
    atoms, labels = _load(data, index, keys)
    n_data = len(atoms)
    if all(lab.energy is None and lab.forces is None and lab.stress is None for lab in labels):
        raise ValueError("the training structures carry no reference energy, forces or stress.")

    key = jax.random.key(int(seed)) if isinstance(seed, int | np.integer) else seed
    split_key, shuffle_key = jax.random.split(key)
    if validation is not None:
        v_atoms, v_labels = _load(validation, index, keys)
        train_idx = list(range(n_data))
        val_idx = list(range(n_data, n_data + len(v_atoms)))
        atoms, labels = atoms + v_atoms, labels + v_labels
    else:
        n_val = round(float(validation_fraction) * n_data)
        if validation_fraction > 0:
            n_val = min(max(n_val, 1), n_data - 1)
        perm = np.asarray(jax.random.permutation(split_key, n_data))
        val_idx = sorted(int(i) for i in perm[:n_val])
        train_idx = sorted(int(i) for i in perm[n_val:])
    if not train_idx:
        raise ValueError("no training structures left after the validation split.")

    files = plan_outputs(output_dir, overwrite)
    sizes = [len(a) for a in atoms]
    cap = Capacity.fit(sizes, min(int(batch_size), len(train_idx)), max_atoms)
    if val_idx:
        cap = Capacity.fit(sizes, cap.max_systems, cap.max_atoms)  # validation fits the same
    cap = _with_graph(cap, model, atoms)

    original = model
    model = _as_trainable(model, dtype)
    everything = Batch.from_atoms(atoms, dtype=dtype)
    model.check_batch(everything)
    model = model.prepare(everything)  # host-side static choices (image range) for all data
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(f"{type(original).__name__} has no inexact array leaves to train.")
    with_stress = weights.stress > 0 and any(labels[i].stress is not None for i in train_idx)
    val_batches = make_batches(atoms, labels, val_idx, cap, dtype) if val_idx else []

    steps_per_epoch = math.ceil(len(train_idx) / cap.max_systems)
    tx = make_optimizer(
        optimizer,
        learning_rate,
        schedule=schedule,
        total_steps=steps_per_epoch * int(epochs),
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=warmup_epochs,
        final_learning_rate=final_learning_rate,
        weight_decay=weight_decay,
        clip_norm=clip_norm,
        plateau_factor=plateau_factor,
        plateau_patience=plateau_patience,
    )
    opt_state = tx.init(params)
    schedule_fn = None
    if isinstance(optimizer, str) and schedule == "warmup_cosine":
        schedule_fn = optax.warmup_cosine_decay_schedule(
            0.0 if warmup_epochs else learning_rate,
            learning_rate,
            warmup_steps=int(warmup_epochs) * steps_per_epoch,
            decay_steps=max(
                steps_per_epoch * int(epochs), int(warmup_epochs) * steps_per_epoch + 1
            ),
            end_value=final_learning_rate,
        )

    # without a validation set the monitor is the training set evaluated after each epoch: the
    # loss of the parameters the epoch ends with, the ones `best` keeps (the epoch's
    # accumulated loss is of the parameters before each of its updates)
    end_batches = [] if val_batches else make_batches(atoms, labels, train_idx, cap, dtype)
    treedef = jax.tree_util.tree_structure(_as_trainable(original, dtype))

    def rebuild(p):  # trained leaves in the static structure of the model as given
        leaves = jax.tree_util.tree_leaves(eqx.combine(p, static))
        if len(leaves) == treedef.num_leaves:
            return jax.tree_util.tree_unflatten(treedef, leaves)
        return eqx.combine(p, static)

    history: list[dict] = []
    best = (math.inf, 0, params)
    since_best = 0
    stopped = False
    step = 0
    bar = tqdm(range(1, int(epochs) + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        order = np.asarray(
            jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), len(train_idx))
        )
        batches = make_batches(atoms, labels, [train_idx[i] for i in order], cap, dtype)
        sums = []
        for batch, targets in batches:
            params, opt_state, _, s = _train_step(
                params, static, opt_state, batch, targets, weights, tx, with_stress
            )
            sums.append(s)
            step += 1
        train_metrics = metrics_from_sums(_total(sums), weights)
        val_metrics = None
        if val_batches:
            vs = [_eval_step(params, static, b, t, with_stress) for b, t in val_batches]
            val_metrics = metrics_from_sums(_total(vs), weights)
        if isinstance(optimizer, str) and schedule == "warmup_cosine":
            lr = float(schedule_fn(step - 1))
        elif isinstance(optimizer, str):
            lr = float(learning_rate) * (_lr_scale(opt_state) if schedule == "plateau" else 1.0)
        else:
            lr = float("nan")
        end_metrics = None
        if end_batches:
            es = [_eval_step(params, static, b, t, with_stress) for b, t in end_batches]
            end_metrics = metrics_from_sums(_total(es), weights)
        entry = {"epoch": epoch, "learning_rate": lr, "train": train_metrics}
        entry["validation"] = val_metrics
        entry["train_end"] = end_metrics
        history.append(entry)
        monitored = (val_metrics or end_metrics)["loss"]
        outside = _outside_domain(rebuild(params))
        if outside is not None:  # never a candidate for the best model
            if best[1] == 0:
                raise ValueError(
                    f"training: epoch {epoch} left the model's domain ({outside}) before any "
                    "epoch stayed in it; lower the learning rate."
                )
            warnings.warn(
                f"training: epoch {epoch} left the model's domain ({outside}); stopping. "
                f"The model returned is epoch {best[1]}'s; last_model holds these parameters "
                "(lower the learning rate).",
                stacklevel=2,
            )
            if callback is not None:
                callback(copy.deepcopy(entry))
            stopped = True
            break
        if monitored < best[0] - float(min_delta):
            best, since_best = (monitored, epoch, params), 0
        else:
            since_best += 1
        bar.set_postfix(loss=f"{monitored:.3g}", best_epoch=best[1], refresh=False)
        if callback is not None:
            callback(copy.deepcopy(entry))
        if not math.isfinite(monitored):
            warnings.warn(f"training loss is not finite at epoch {epoch}; stopping.", stacklevel=2)
            stopped = True
            break
        if patience is not None and since_best >= int(patience):
            stopped = epoch < int(epochs)
            break
    bar.close()
    if best[1] == 0:  # nothing finite: keep the last
        best = (math.nan, len(history), params)

    result = TrainResult(
        model=rebuild(best[2]),
        last_model=rebuild(params),
        best_epoch=best[1],
        history=history,
        stopped_early=stopped,
        train_indices=train_idx,
        validation_indices=val_idx,
    )
    if files:
        result.files = write_outputs(result, files, overwrite)
    return result
