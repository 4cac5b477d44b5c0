"""Training energy models on reference energies, forces and stresses.

:func:`train` fits any :class:`~fused_dynamics.models.Model` (its inexact array leaves) to
structures with reference values, in padded batches of fixed capacity (one compilation), with
an optax optimiser, a train/validation split, early stopping and per-epoch metrics.
:func:`save_model` / :func:`load_model` write and restore a model from one file.
``fused-dynamics train CONFIG`` does the same from a TOML or YAML file.

Worked example (Python)
-----------------------
Reference data from a Lennard-Jones model, then a fit started from other parameters::

    import ase, numpy as np, fused_dynamics as fd
    from ase.calculators.singlepoint import SinglePointCalculator
    from fused_dynamics.models import LennardJones

    reference = LennardJones(sigma=2.5, epsilon=0.5, cutoff=6.0)
    data = []
    for d in np.linspace(2.6, 3.6, 20):
        atoms = ase.Atoms("Ar2", positions=[[0, 0, 0], [d, 0, 0]])
        out = reference(fd.Batch.from_atoms([atoms]))
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(out.energy[0]), forces=np.asarray(out.forces)
        )
        data.append(atoms)
    # (or: ase.io.write("data.extxyz", data); data = "data.extxyz")

    result = fd.train(
        LennardJones(sigma=2.3, epsilon=0.3, cutoff=6.0), data,
        epochs=100, batch_size=4, learning_rate=0.02, schedule="warmup_cosine",
        validation_fraction=0.2, patience=20, seed=0, output_dir="fit",
    )
    result.model.sigma, result.model.epsilon    # ~2.5, ~0.5
    result.best_metrics["validation"]           # energy_mae_per_atom, force_rmse, ...
    model = fd.load_model("fit/model.eqx")      # the best model, from the file alone

``fit/`` then holds ``model.eqx`` (best parameters), ``last_model.eqx``, ``metrics.json``
(summary and history), ``metrics.csv`` (one row per epoch) and ``loss.png``.

Worked example (command line)
-----------------------------
``fused-dynamics train fit.toml`` with::

    seed = 0
    dtype = "float64"                 # or "float32"
    output_dir = "fit"                # refused if it exists and is not empty (--overwrite)

    [data]
    path = "data.extxyz"              # a file, a glob, or a list of them (ase.io.read)
    index = ":"                       # ASE frame selection
    # energy_key = "dft_energy"       # atoms.info / atoms.arrays keys instead of the
    # forces_key = "dft_forces"       # calculator's results
    # stress_key = "dft_stress"

    [validation]
    fraction = 0.2                    # drawn with seed; or path = "val.extxyz"

    [model]                           # lennard_jones | morse | soft_sphere: the other
    type = "lennard_jones"            # keys are the class's constructor arguments
    sigma = 2.3
    epsilon = 0.3
    cutoff = 6.0
    # type = "nequip"; hyperparameters = {...}
    # type = "class"; import_path = "my_pkg.models:MyModel"; hyperparameters = {...}
    # type = "checkpoint"; path = "previous/model.eqx"
    # pairs = {Ar = [3.4, 0.01], "Ar-Kr" = [3.5, 0.012], Kr = [3.6, 0.014]}
    #   (with optional mixing = "lorentz_berthelot"): from_pairs, per species pair

    [loss]                            # weights of the three mean squared errors
    energy = 1.0
    forces = 1.0
    stress = 1.0

    [optimizer]
    name = "adam"                     # adam | adamw (weight_decay) | sgd
    learning_rate = 0.02
    schedule = "warmup_cosine"        # constant | warmup_cosine | plateau
    warmup_epochs = 0
    final_learning_rate = 0.0         # end of the cosine decay
    # clip_norm = 10.0                # clip gradients to this global norm
    # plateau_factor = 0.5, plateau_patience = 10 (schedule = "plateau")

    [training]
    epochs = 100
    batch_size = 4                    # structures per batch
    # max_atoms = 64                  # atom capacity (default: fits any batch)
    patience = 20                     # early stopping on the validation loss
    min_delta = 0.0

Unknown keys and bad values stop the command with exit code 2 and a message naming the key,
before anything is trained.

Loss and metrics
----------------
See :mod:`.loss`: ``w_E MSE(E/n) + w_F MSE(F components) + w_S MSE(stress components)``,
masked so that padding never contributes; metrics are the energy MAE per atom (eV/atom), force
RMSE (eV/Å) and stress RMSE (eV/Å³) on both splits.

Modules: :mod:`.data` (reading references, batches), :mod:`.loss`, :mod:`.trainer`
(:func:`train`, :func:`evaluate`, outputs), :mod:`.serialization` (model files),
:mod:`.config` (the ``train`` configuration).
"""

from .data import Capacity, Labels, Targets, make_batches, read_labels, read_structures
from .loss import LossWeights, batch_loss, error_sums, loss_from_sums, metrics_from_sums
from .serialization import load_model, read_header, save_model
from .trainer import OUTPUT_FILES, TrainResult, evaluate, make_optimizer, train

__all__ = [
    "Capacity",
    "Labels",
    "LossWeights",
    "OUTPUT_FILES",
    "Targets",
    "TrainResult",
    "batch_loss",
    "error_sums",
    "evaluate",
    "load_model",
    "loss_from_sums",
    "make_batches",
    "make_optimizer",
    "metrics_from_sums",
    "read_header",
    "read_labels",
    "read_structures",
    "save_model",
    "train",
]
