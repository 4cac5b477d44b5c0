"""Sub-stages: integrators and optimizers as pure, per-system-masked half-updates."""

from .base import Stage, fs_to_ase_time, select_batch, select_state
from .cell_filter import FrechetCellFilter
from .fire import FIRE, FIRE2
from .langevin import NVTLangevin
from .nose_hoover import NVTNoseHoover
from .npt import NPH, NPT
from .nve import NVE
from .optimizers import GradientDescent, OptaxRelax

__all__ = [
    "FIRE",
    "FIRE2",
    "FrechetCellFilter",
    "GradientDescent",
    "NPH",
    "NPT",
    "NVE",
    "NVTLangevin",
    "NVTNoseHoover",
    "OptaxRelax",
    "Stage",
    "fs_to_ase_time",
    "select_batch",
    "select_state",
]
