"""fused_dynamics: batched atomistic relaxation and molecular dynamics in JAX.

Many systems share one padded :class:`Batch`; a chain of sub-stages runs as one jit-compiled step
with one model evaluation per step.
"""

from . import models, segment
from .batch import Batch, default_float
from .models import ModelOutput

__all__ = ["Batch", "ModelOutput", "default_float", "models", "segment"]
