"""fused_dynamics: batched atomistic relaxation and molecular dynamics in JAX.

Many systems share one padded :class:`Batch`; a chain of sub-stages runs as one jit-compiled step
with one model evaluation per step.
"""

from . import (
    checkpoint,
    constraints,
    driver,
    inflight,
    models,
    observables,
    pipeline,
    provenance,
    reference_data,
    sampling,
    segment,
    sharding,
    status,
    training,
)
from .batch import Batch, default_float
from .compilation_cache import enable_compilation_cache
from .convergence import ConvergenceHook, Criterion
from .driver import Run
from .fused import FusedStage, StepReport
from .hooks import (
    BiasedPotentialHook,
    ConvergedSnapshotHook,
    DynamicsStage,
    EnergyDriftMonitorHook,
    ExitReason,
    Failure,
    FreezeAtomsHook,
    Hook,
    HookContext,
    HookData,
    LoggingHook,
    MaxForceHook,
    NaNDetectorHook,
    ProgressHook,
    SnapshotHook,
    ThermalizeOnEntryHook,
    WrapPeriodicHook,
)
from .host_memory import reuse_host_memory
from .inflight import RunStats
from .models import ModelOutput, NeighborList, NeighborListHook
from .observables import initialize_velocities, kinetic_energy, temperature
from .parameters import InfoParameter, from_info
from .pipeline import DistributedPipeline
from .sampling import SizeAwareSampler
from .sharding import ShardedRun, shard, unshard
from .sinks import ExtXYZSink, HostMemory, ZarrSink, read_zarr
from .stages import (
    FIRE,
    FIRE2,
    NPH,
    NPT,
    NVE,
    GradientDescent,
    NVTLangevin,
    NVTNoseHoover,
    OptaxRelax,
    Stage,
)
from .training import TrainResult, load_model, save_model, train

__all__ = [
    "BiasedPotentialHook",
    "ConvergedSnapshotHook",
    "EnergyDriftMonitorHook",
    "ExtXYZSink",
    "FreezeAtomsHook",
    "HookContext",
    "HostMemory",
    "LoggingHook",
    "MaxForceHook",
    "NaNDetectorHook",
    "ProgressHook",
    "SnapshotHook",
    "ThermalizeOnEntryHook",
    "WrapPeriodicHook",
    "Batch",
    "RunStats",
    "ZarrSink",
    "read_zarr",
    "SizeAwareSampler",
    "inflight",
    "sampling",
    "ConvergenceHook",
    "Criterion",
    "Run",
    "RunStats",
    "checkpoint",
    "driver",
    "DynamicsStage",
    "ExitReason",
    "Failure",
    "constraints",
    "provenance",
    "status",
    "FusedStage",
    "from_info",
    "InfoParameter",
    "Hook",
    "HookData",
    "ModelOutput",
    "NeighborList",
    "NeighborListHook",
    "NVE",
    "NPH",
    "NPT",
    "FIRE",
    "FIRE2",
    "GradientDescent",
    "NVTLangevin",
    "NVTNoseHoover",
    "OptaxRelax",
    "Stage",
    "StepReport",
    "default_float",
    "enable_compilation_cache",
    "initialize_velocities",
    "kinetic_energy",
    "models",
    "observables",
    "reuse_host_memory",
    "segment",
    "temperature",
    "train",
    "TrainResult",
    "save_model",
    "load_model",
    "training",
    "reference_data",
    "pipeline",
    "sharding",
    "DistributedPipeline",
    "ShardedRun",
    "shard",
    "unshard",
]
