"""Energy models: ``model(batch) -> ModelOutput(energy, forces, stress)``."""

from .base import Model, ModelOutput
from .pair import LennardJones, Morse, PairPotential, SoftSphere, required_images

__all__ = [
    "Model",
    "ModelOutput",
    "PairPotential",
    "LennardJones",
    "Morse",
    "SoftSphere",
    "required_images",
]
