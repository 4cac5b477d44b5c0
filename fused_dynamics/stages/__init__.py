"""Sub-stages: integrators and optimizers as pure, per-system-masked half-updates.

Every class is abstract (:class:`Stage`, :class:`AbstractFIRE`, :class:`AbstractMTK`) or final
(the stages themselves), following Equinox's abstract-or-final pattern.
"""

from .base import Stage, fs_to_ase_time, per_system, select_batch, select_state
from .cell_filter import FrechetCellFilter
from .fire import FIRE, FIRE2, AbstractFIRE
from .langevin import NVTLangevin
from .mtk import AbstractMTK
from .nose_hoover import NVTNoseHoover
from .npt import NPH, NPT
from .nve import NVE
from .optimizers import GradientDescent, OptaxRelax

__all__ = [
    "AbstractFIRE",
    "AbstractMTK",
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
    "per_system",
    "select_batch",
    "select_state",
]
