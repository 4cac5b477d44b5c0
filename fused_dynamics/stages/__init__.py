"""Sub-stages: integrators and optimizers as pure, per-system-masked half-updates."""

from .base import Stage, fs_to_ase_time, select_batch, select_state
from .nve import NVE

__all__ = ["Stage", "NVE", "fs_to_ase_time", "select_batch", "select_state"]
