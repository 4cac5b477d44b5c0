"""A validated :class:`~fused_dynamics.config.RunConfig` turned into ``fused_dynamics`` objects:
the model, the sub-stages and the :class:`~fused_dynamics.FusedStage`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from ase.calculators.eam import EAM as AseEAM
from ase.data import atomic_numbers, chemical_symbols

from ..convergence import ConvergenceHook
from ..fused import FusedStage
from ..hooks import ThermalizeOnEntryHook
from ..models import EAM, LennardJones, Morse, SoftSphere
from ..models.path_choice import PathChoice, apply_choice, has_list_path, path_choice
from ..observables import initialize_velocities
from ..stages import FIRE, FIRE2, NPH, NPT, NVE, GradientDescent, NVTLangevin, NVTNoseHoover
from ..training import load_model, read_header
from ..training.serialization import decode_header_value
from ..validation import SEED_LIMIT
from .base import ConfigError
from .schema import InfoValue, RunConfig, entry_temperature, info_or_value

__all__ = [
    "build_fused",
    "build_model",
    "build_stages",
    "choose_model_path",
    "file_model_elements",
    "npt_classes",
    "run_steps_bound",
]


def npt_classes() -> tuple[type, type]:
    """``(NPT, NPH)``, the variable-cell stage classes (``stages[i].type`` npt and nph)."""
    return NPT, NPH


_STAGE_CLASSES = {
    "fire": FIRE,
    "fire2": FIRE2,
    "gradient_descent": GradientDescent,
    "nve": NVE,
    "nvt_langevin": NVTLangevin,
    "nvt_nose_hoover": NVTNoseHoover,
    "npt": NPT,
    "nph": NPH,
}
_MODEL_CLASSES = {"lennard_jones": LennardJones, "morse": Morse, "soft_sphere": SoftSphere}


def build_model(cfg: RunConfig):
    """The energy model of a configuration.

    Scalar form: one set of parameters, with ``species=model.species`` when given (the model
    then refuses other elements itself). ``model.pairs``: ``cls.from_pairs`` with the table,
    ``mixing`` and the shared keys. Which structures a model applies to is checked by
    :func:`check_structure_species`.
    """
    m = cfg.model
    if m.type in ("eam", "trained"):
        return _file_model(m)
    cls = _MODEL_CLASSES[m.type]
    kwargs: dict[str, Any] = {}
    if m.images is not None:
        kwargs["images"] = tuple(m.images)
    if m.type != "soft_sphere":
        kwargs.update(cutoff=m.cutoff, shift=m.shift)
        if m.switch_onset is not None:
            if m.switch_onset >= m.cutoff:
                raise ConfigError(
                    f"model.switch_onset: {m.switch_onset} must be smaller than cutoff {m.cutoff}"
                )
            kwargs["switch_onset"] = m.switch_onset
    try:
        if m.pairs is None:
            params = {n: getattr(m, n) for n in m._scalar}
            if m.type == "soft_sphere":
                params.update(epsilon=m.epsilon, alpha=m.alpha)
            if m.species is not None:
                kwargs["species"] = tuple(m.species)
            return cls(**params, **kwargs)
        table = m.pair_table()
        if m.type == "soft_sphere":
            for shared in ("epsilon", "alpha"):
                if not any(shared in v for v in table.values()):
                    kwargs[shared] = getattr(m, shared)
        return cls.from_pairs(table, mixing=m.mixing, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def run_steps_bound(cfg: RunConfig, n_structures: int, structures=()) -> int | None:
    """The most fused steps a run can take: every stage's budget (``n_steps``; the largest
    of ``structures``' own for ``{info = KEY}``) times the batches its structures fill
    (``ceil(n / capacity.max_systems)``); None when a stage has no budget. An upper bound:
    systems that converge leave early and free their slots."""
    budgets = [_largest_budget(sc.n_steps, structures) for sc in cfg.stages]
    if any(b is None for b in budgets):
        return None
    batches = -(-max(int(n_structures), 1) // cfg.capacity.max_systems)
    return batches * sum(budgets)


def _largest_budget(n_steps, structures) -> int | None:
    """``n_steps``, or for ``{info = KEY}`` the largest whole value the structures carry."""
    if not isinstance(n_steps, InfoValue):
        return n_steps
    values = []
    for atoms in structures:
        value = atoms.info.get(n_steps.info)
        if isinstance(value, int | float | np.integer | np.floating) and np.isfinite(value):
            values.append(int(value))
    return max(values) if values else None


def choose_model_path(
    cfg: RunConfig,
    model,
    structures,
    max_atoms_per_system: int | None = None,
    resumed_layout: dict | None = None,
) -> tuple[Any, PathChoice]:
    """The model on the path ``model.neighbors`` asks for, and the choice with its reason.

    ``"auto"`` applies :func:`~fused_dynamics.models.path_choice.path_choice` to the run's
    structures, the batch's atom capacity per system and slots, and the most steps the run can
    take (:func:`run_steps_bound`) (docs/models.md, "Dense pairs or a neighbor list");
    ``"dense"`` and ``"list"`` force a path, ``model.skin`` (Å) is the list's skin. Host-side,
    before anything compiles. ``resumed_layout`` (the ``layout`` of the checkpoint a
    ``--resume`` continues): under ``"auto"`` the run keeps the path that checkpoint was
    written on (a list and its skin, or dense pairs), so that a rule that changed between
    versions cannot make the checkpoint unreadable.

    Raises
    ------
    ConfigError
        Naming ``model.neighbors`` when ``"list"`` is asked of a model without a neighbor-list
        path (``eam``, ``trained``).
    """
    m = cfg.model
    if resumed_layout is not None and m.neighbors == "auto" and has_list_path(model):
        listed = resumed_layout.get("neighbors")
        if listed is None:
            why = "dense pairs: the checkpoint being resumed was written on them"
            choice = PathChoice("dense", None, None, why)
        else:
            skin = float(listed["static"]["skin"])
            why = f"neighbor list (skin {skin:g} Å): the checkpoint being resumed was written on it"
            choice = PathChoice("list", skin, None, why)
        return apply_choice(model, choice), choice
    try:
        choice = path_choice(
            model,
            structures,
            neighbors=m.neighbors,
            skin=float(m.skin),
            max_atoms_per_system=max_atoms_per_system,
            steps=run_steps_bound(cfg, len(structures), structures),
            max_systems=min(cfg.capacity.max_systems, len(structures)),
        )
    except ValueError as exc:
        raise ConfigError(
            f"model.neighbors: {exc} (model.type = {m.type!r}); set model.neighbors = 'auto' "
            "or 'dense'"
        ) from None
    return apply_choice(model, choice), choice


def file_model_elements(m) -> list[str] | None:
    """The elements a model file (``model.type`` eam or trained) has parameters for.

    Read from the file's header without building the model (no JAX array is made, so it may run
    before the dtype is configured). None: a trained model without a species list.

    Raises
    ------
    ConfigError
        Naming ``model.file`` when the file cannot be read as that type.
    """
    try:
        if m.type == "eam":
            return [str(e) for e in AseEAM(potential=m.file).elements]
        header = read_header(m.file)
    except Exception as exc:  # ASE raises many kinds for a malformed file
        message = f"model.file: cannot read {m.file!r} as a {m.type} model: {exc}"
        raise ConfigError(message) from None
    values = header.get("hyperparameters") or {}
    species = decode_header_value(values.get("species"))
    if species is None:
        return None
    out = []
    for z in np.asarray(species).reshape(-1).tolist():
        if isinstance(z, int) and 0 < z < len(chemical_symbols):
            out.append(chemical_symbols[z])
        elif isinstance(z, str) and z in atomic_numbers:
            out.append(z)
        else:
            raise ConfigError(f"model.file: {m.file!r} lists an unknown species {z!r}")
    return out


def _file_model(m):
    try:
        if m.type == "eam":
            model = EAM.from_file(m.file)
        else:
            model = load_model(m.file)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"model.file: cannot load {m.file!r}: {exc}") from None
    if m.images is not None:
        if not hasattr(model, "images"):
            raise ConfigError(
                f"model.images: the {type(model).__name__} in {m.file!r} has no image range; "
                "remove model.images"
            )
        model = dataclasses.replace(model, images=tuple(m.images))
    return model


def _derived_seed(cfg: RunConfig, offset: int) -> int:
    """The run's seed plus ``offset``, wrapped into the seeds' range [0, 2**32) (the same
    numbers as before for every run seed below 2**32 - offset)."""
    return (cfg.seed + offset) % SEED_LIMIT


def build_stages(cfg: RunConfig, model=None) -> list:
    """The sub-stages of a configuration, in order, all sharing one model."""
    model = build_model(cfg) if model is None else model
    stages = []
    for i, sc in enumerate(cfg.stages):
        kwargs = sc.stage_kwargs()
        if sc.type == "nvt_langevin" and "seed" not in kwargs:
            kwargs["seed"] = _derived_seed(cfg, i)
        criteria = []
        if sc.fmax is not None:
            criteria.append({"key": "fmax", "threshold": info_or_value(sc.fmax)})
        for c in sc.criteria or ():
            criteria.append(c.model_dump(exclude_none=True))
        try:
            hook = ConvergenceHook(criteria) if criteria else None
            stage = _STAGE_CLASSES[sc.type](
                model, n_steps=info_or_value(sc.n_steps), convergence_hook=hook, **kwargs
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"stages[{i}] ({sc.type}): {exc}") from exc
        stages.append(stage)
    return stages


def build_fused(cfg: RunConfig, model=None, hooks=(), first_hooks=()):
    """The :class:`~fused_dynamics.FusedStage` of a configuration.

    ``first_hooks`` are fused-level hooks placed before the ones the configuration makes
    (thermalisation on entry), ``hooks`` after them.
    """
    stages = build_stages(cfg, model)
    init_fn = None
    if cfg.initial_temperature is not None:
        key = jax.random.PRNGKey(cfg.seed)
        temperature = float(cfg.initial_temperature)

        def init_fn(batch, key=key, temperature=temperature):
            return initialize_velocities(batch, temperature, key)

    entry = []
    for i in range(1, len(cfg.stages)):
        t = entry_temperature(cfg, i)
        if t is not None:
            entry.append(
                ThermalizeOnEntryHook(
                    code=i, temperature=info_or_value(t), seed=_derived_seed(cfg, 1000 + i)
                )
            )
    return FusedStage(
        list(enumerate(stages)),
        init_fn=init_fn,
        hooks=tuple(first_hooks) + tuple(entry) + tuple(hooks),
        convergence_every=cfg.convergence_every,
    )
