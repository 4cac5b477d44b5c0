"""Run configuration: a TOML or YAML file validated before anything is compiled.

A configuration names the structures, the model, the chain of stages, the batch capacity, the
outputs and a few run options. :func:`load_config` reads and validates a file; every problem is
reported with the key it concerns and, where there is a fixed set, the allowed values
(:class:`ConfigError`). :func:`build_model`, :func:`build_fused` and :func:`load_structures`
turn a validated :class:`RunConfig` into ``fused_dynamics`` objects.

Example (TOML)::

    seed = 0
    dtype = "float32"            # or "float64" (turns on jax_enable_x64 before any array)
    device = "cpu"               # "cpu", "gpu", "tpu" or "auto"
    refill_frequency = 20        # steps per compiled chunk between writes and refills
    checkpoint_every = 1000      # steps between checkpoints (0: none); see below

    [structures]
    path = ["POSCAR", "cifs/*.cif", "md.extxyz"]   # or one file, or one glob (see below)
    # or: generate = "argon", count = 256, rattle = 0.15, seed = 0

    [model]
    type = "lennard_jones"       # lennard_jones | morse | soft_sphere | eam | trained
    sigma = 3.405                # Å
    epsilon = 0.0104             # eV
    cutoff = 7.5                 # Å
    switch_onset = 6.5           # Å
    # species = ["Ar"]           # the elements these parameters are for (see below)

    [capacity]
    max_atoms = 384
    max_systems = 24

    [[stages]]
    type = "fire"                # fire | fire2 | gradient_descent | nve | nvt_langevin | ...
    fmax = 0.01                  # converged at fmax <= 0.01 eV/Å (or: criteria = [...])
    n_steps = 500                # step budget per system

    [[stages]]
    type = "nvt_langevin"
    dt = 5.0                     # fs
    temperature = 60.0           # K
    friction = 0.01              # 1/fs
    n_steps = 100

    [[outputs]]                  # every output receives every system
    type = "extxyz"              # extxyz | zarr
    path = "outputs/run.extxyz"
    # stress = true              # always compute the stress, so every system carries it

    [report]
    plot = "outputs/run.png"

Relative paths are resolved against the folder of the configuration file. Units are the
package's (ASE's): Å, eV, amu, fs, K, eV/Å³. ``fused-dynamics demo --save-config job.toml``
writes a complete configuration in which every key is explained in a comment (unit, default,
allowed values; :func:`config_text`), with the example of reading one's own files.

Types are strict: a boolean or a string is never taken for a number (``cutoff = true``,
``sigma = "3.4"``), nor a float for a whole number (``max_atoms = 32.0``); the message names
the key and how to write it. Every problem found before compiling, cross-key rules included
(``switch_onset`` below ``cutoff``, the capacity against the largest structure, the elements
against the model, the output paths), exits with code 2 naming the key to change, and
``run --validate-only`` makes exactly the checks ``run`` makes before compiling
(:func:`fused_dynamics.application.preflight`).

Keys of the model
-----------------
``model.type``
    ``lennard_jones`` (``sigma`` Å, ``epsilon`` eV), ``morse`` (``D`` eV, ``alpha`` 1/Å,
    ``r0`` Å) or ``soft_sphere`` (``sigma`` Å, also the cutoff; ``epsilon`` eV, default 1;
    ``alpha``, an exponent, default 2). ``cutoff`` (Å), ``switch_onset`` (Å, below the
    cutoff), ``shift`` and ``images`` apply to every pair.
``model.species``
    A list of element symbols (``["Ar"]``): the elements the one set of parameters is for,
    the same for every pair of them. Without it the parameters are used only when all the
    structures together hold one element type (that element is implied and printed); with
    two or more elements the run is refused (exit 2) naming each element and the first
    structure (file and frame) holding it. A structure with an element not in ``species``
    is refused the same way. Every check is made before anything compiles, and by
    ``--validate-only``.
``model.pairs``
    Parameters per species pair instead of one set, a table keyed by an element (``Ar``: the
    Ar-Ar pair) or two elements joined by ``-`` (``Ar-Kr``, the same pair as ``Kr-Ar``;
    give it once). Each entry is a table of the model's parameters: ``{sigma, epsilon}``
    (Lennard-Jones; Å, eV), ``{D, alpha, r0}`` (Morse; eV, 1/Å, Å), ``{sigma, epsilon,
    alpha}`` (soft sphere; ``epsilon`` and ``alpha`` in every entry or in none, then
    ``model.epsilon`` / ``model.alpha`` for all pairs). ``epsilon`` or ``D`` = 0: the pair
    does not interact. Every pair of the listed elements must be given, unless
    ``model.mixing`` fills the cross pairs. The elements are the keys; a structure with
    another element is refused (exit 2). Excludes ``species`` and the scalar parameters::

        [model]
        type = "lennard_jones"
        cutoff = 7.5
        mixing = "lorentz_berthelot"     # optional
        [model.pairs]
        Ar = {sigma = 3.405, epsilon = 0.0104}
        Kr = {sigma = 3.65, epsilon = 0.014}
        "Ar-Kr" = {sigma = 3.5, epsilon = 0.012}   # optional with mixing

    In YAML, ``pairs: {Ar: {sigma: 3.405, epsilon: 0.0104}, ...}`` (quote ``"No"``, which
    YAML reads as false).
``model.mixing``
    With ``pairs``: ``"lorentz_berthelot"`` (``σ_ij = (σ_i + σ_j) / 2``, ``ε_ij = sqrt(ε_i
    ε_j)``) or ``"geometric"`` (``σ_ij = sqrt(σ_i σ_j)``, ``ε_ij = sqrt(ε_i ε_j)``) fills each
    unlisted pair of two different elements from their own entries; listed pairs are kept.
    Lennard-Jones and soft sphere only (soft sphere: ``alpha`` is not mixed).
``model.neighbors``, ``model.skin``
    How the pairs are found: ``"auto"`` (default) takes a Verlet neighbor list when the
    structures are large enough for it to pay and dense pairs otherwise, from the structures'
    sizes, cells and density, the cutoff and ``capacity.max_atoms_per_system``
    (:func:`fused_dynamics.models.path_choice.path_choice`; the run prints which path and
    why); ``"dense"`` every pair of each system (the reference); ``"list"`` the neighbor list,
    pair potentials only (``eam`` and ``trained`` refuse it, exit 2). ``skin`` (Å, default 1,
    >= 0) is the list's skin: pairs are kept within ``cutoff + skin`` and the list is rebuilt
    when an atom moved more than ``skin / 2``. Both paths give the same energies and forces.
``model.type = "eam"`` with ``model.file``
    An embedded-atom potential file: setfl (``.alloy``), funcfl (``.eam``) or Finnis-Sinclair
    (``.fs``), read as ASE's ``EAM`` calculator reads it (:class:`~fused_dynamics.models.EAM`).
    The file names its elements; a structure with another element is refused (exit 2, naming
    ``model.file``). ``images`` as above.
``model.type = "trained"`` with ``model.file``
    A model file written by ``fused-dynamics train`` or :func:`fused_dynamics.save_model` (an
    equivariant network, a fitted potential); its stored species list is checked the same way::

        [model]
        type = "trained"
        file = "training/model.eqx"

Keys about outputs and inputs
-----------------------------
``structures.path``
    Your own structures: a file, a glob (``*``, ``?``, ``[...]``, ``**`` for any depth), or a
    list of files and globs, each read with ``ase.io.read(index=":")`` (any format ASE reads:
    extxyz, CIF, POSCAR, ...; ``structures.format`` when the suffix does not say). They are
    read in the listed order, each file's frames in file order, a glob's matches sorted by
    name; a file named again by a later pattern is read once, where first named. The i-th
    structure so read is ``system_id`` i (unless ``id_key``). A file that does not exist or a
    glob that matches nothing is refused (exit 2) naming the pattern.
``structures.id_key``
    Take each structure's ``system_id`` from ``atoms.info[id_key]`` (an integer, unique,
    ``0 <= id < 2**31 - 1``) instead of its position in the list of structures. Random
    streams (Langevin noise, Maxwell–Boltzmann velocities) are keyed by the ``system_id``, so
    with an ``id_key`` removing or reordering structures does not change the trajectories of
    the others. Only with ``path``.
``outputs[i].path``
    A file (extxyz) or a store (zarr, a directory). A path that exists is refused unless the
    command line says ``--overwrite`` (an extxyz file is replaced) or ``--resume`` (the
    systems already in it are skipped and the rest appended). A directory is never deleted or
    replaced, so a zarr store can be resumed but not overwritten. Every output folder is
    checked for writability (a probe file is created and removed) before anything compiles.
``outputs[i].stress``
    ``true``: compute the stress at every step so every written system carries it (it costs
    about as much as the forces). Without it the stress is written only when a stage, a
    criterion or a hook needs it (NPT, NPH, variable-cell FIRE), and left out otherwise.
``stages[i].write``
    A path (``.extxyz``/``.xyz``, or ``.zarr``): each system is written there as it leaves
    this stage, converged or out of budget, with its structure, energy and forces at that
    moment (``info["stage"] = i``; ``exit_reason`` says how it left the stage). For a chain
    that relaxes then simulates, ``write`` on the relaxation stage keeps the minima. The same
    rules as for ``outputs`` apply (refused if it exists, ``--overwrite``, ``--resume``).
``report.plot``, ``report.record``
    Refused if they exist, unless ``--overwrite``; with ``--resume`` an existing one is kept
    and not rewritten.
``checkpoint_every``
    Steps between checkpoints of the run (a whole number; default 1000; ``0``: none), written
    to ``<outputs[0].path>.ckpt``, a file next to the first output. Each costs one copy of the
    batch from the device and one file write of about the batch's size (atomic: a kill leaves
    the previous checkpoint whole); a chunk of ``refill_frequency`` steps is cut short to end
    at a checkpoint step. A run that completes removes its checkpoint once every output is
    closed. A run killed or interrupted continues with ``--resume`` from its last checkpoint,
    bit for bit, into the same outputs (systems written after the checkpoint are not written
    again), provided ``structures``, ``model``, ``stages``, ``capacity``, ``seed``, ``dtype``
    and ``initial_temperature`` are unchanged (checked against the outputs and the checkpoint);
    ``report``, ``refill_frequency`` and ``checkpoint_every`` may change (a system's results
    do not depend on when chunks end). A checkpoint that exists is refused by a run without
    ``--resume`` or ``--overwrite`` (which deletes it).

What every written system carries is described in :mod:`fused_dynamics.sinks` and
:mod:`fused_dynamics.provenance` (the input's ``info`` and per-atom arrays, ``source_file``,
``source_index``, ``system_id``, ``exit_reason`` and ``exit_reason_name``, ``failure`` and
``failure_step`` for failed systems, units, the package version and the configuration).

Modules
-------
The configuration layer imports neither the application service nor the command line:
:mod:`~fused_dynamics.config.base` (:class:`ConfigError`, sections refusing unknown keys),
:mod:`~fused_dynamics.config.model_keys` (``[model]``), :mod:`~fused_dynamics.config.schema`
(the rest of :class:`RunConfig`), :mod:`~fused_dynamics.config.loading` (files, validation,
messages), :mod:`~fused_dynamics.config.inputs` (the structures and their elements),
:mod:`~fused_dynamics.config.build` (model, stages, :class:`~fused_dynamics.FusedStage`) and
:mod:`~fused_dynamics.config.writing` (a configuration written back as TOML or YAML).
"""

from __future__ import annotations

from ..hooks import ThermalizeOnEntryHook
from .base import ConfigError, output_format
from .build import build_fused, build_model, build_stages, choose_model_path, npt_classes
from .inputs import check_structure_species, load_structures, load_structures_with_sources
from .loading import format_validation_error, load_config, read_config_file, validate_config
from .model_keys import (
    MIXING_RULES,
    MODEL_TYPES,
    LennardJonesConfig,
    LennardJonesPair,
    ModelConfig,
    MorseConfig,
    MorsePair,
    PairKey,
    SoftSphereConfig,
    SoftSpherePair,
    parse_pair_key,
)
from .schema import (
    STAGE_TYPES,
    CapacityConfig,
    CriterionConfig,
    FIRE2Config,
    FIREConfig,
    GradientDescentConfig,
    InfoValue,
    NPHConfig,
    NPTConfig,
    NVEConfig,
    NVTLangevinConfig,
    NVTNoseHooverConfig,
    OutputConfig,
    ReportConfig,
    RunConfig,
    StageConfig,
    StructuresConfig,
    entry_temperature,
    resolve_structure_files,
)
from .writing import MODEL_KEYS_HELP, config_text, save_config

__all__ = [
    "ConfigError",
    "InfoValue",
    "RunConfig",
    "STAGE_TYPES",
    "MODEL_TYPES",
    "load_config",
    "validate_config",
    "read_config_file",
    "build_model",
    "check_structure_species",
    "build_stages",
    "build_fused",
    "choose_model_path",
    "load_structures",
    "load_structures_with_sources",
    "output_format",
    "npt_classes",
    "ThermalizeOnEntryHook",
    # and the schema, for type hints and tools
    "MIXING_RULES",
    "MODEL_KEYS_HELP",
    "CapacityConfig",
    "CriterionConfig",
    "FIRE2Config",
    "FIREConfig",
    "GradientDescentConfig",
    "LennardJonesConfig",
    "LennardJonesPair",
    "ModelConfig",
    "MorseConfig",
    "MorsePair",
    "NPHConfig",
    "NPTConfig",
    "NVEConfig",
    "NVTLangevinConfig",
    "NVTNoseHooverConfig",
    "OutputConfig",
    "PairKey",
    "ReportConfig",
    "SoftSphereConfig",
    "SoftSpherePair",
    "StageConfig",
    "StructuresConfig",
    "entry_temperature",
    "format_validation_error",
    "parse_pair_key",
    "resolve_structure_files",
    "config_text",
    "save_config",
]
