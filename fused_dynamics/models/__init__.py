"""Energy models: ``model(batch) -> ModelOutput(energy, forces, stress)``."""

from . import neighbors
from .base import Model, ModelOutput
from .eam import EAM
from .energy_function import EnergyFunctionModel
from .graph import Graph, GraphModel, neighbor_graph
from .neighbors import NeighborList, NeighborListHook
from .nequip import NequIP
from .pair import LennardJones, Morse, PairPotential, SoftSphere, required_images
from .path_choice import choose_neighbors, path_choice

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
