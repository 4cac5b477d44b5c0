"""Training energy models on reference energies, forces and stresses: :func:`train`.

stub
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
