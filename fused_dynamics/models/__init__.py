"""Energy models: ``model(batch) -> ModelOutput(energy, forces, stress)``.

``NequIP`` is imported on first use: it needs e3nn-jax (with sympy and flax), whose import
costs more than a second, and most runs use another model.
"""

from typing import TYPE_CHECKING

from . import neighbors
from .base import Model, ModelOutput
from .eam import EAM
from .energy_function import EnergyFunctionModel
from .graph import Graph, GraphModel, neighbor_graph
from .neighbors import NeighborList, NeighborListHook
from .pair import LennardJones, Morse, PairPotential, SoftSphere, required_images
from .path_choice import choose_neighbors, path_choice

if TYPE_CHECKING:  # for type checkers and the API docs; imported on first use (__getattr__)
    from .nequip import NequIP

__all__ = [
    "Model",
    "ModelOutput",
    "Graph",
    "GraphModel",
    "neighbor_graph",
    "PairPotential",
    "LennardJones",
    "Morse",
    "SoftSphere",
    "required_images",
    "neighbors",
    "NeighborList",
    "NeighborListHook",
    "EAM",
    "EnergyFunctionModel",
    "NequIP",
    "choose_neighbors",
    "path_choice",
]


def __getattr__(name: str):
    if name == "NequIP":  # imported lazily (module docstring)
        from .nequip import NequIP

        return NequIP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
