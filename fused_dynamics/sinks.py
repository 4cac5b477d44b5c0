"""Where systems go when they leave a run: in memory, to an extxyz file or a zarr store.

A sink has ``write(atoms_list)``, ``has_room(n)`` and ``close()``. Each written ``ase.Atoms``
carries energy and forces in a ``SinglePointCalculator`` (and the stress whenever the run
computed it: see :attr:`fused_dynamics.FusedStage.needs_stress`), velocities, and in
``atoms.info``: ``system_id``, ``status`` with its name ``status_name`` (``"graduated"``,
``"stage_<k>"``), ``exit_reason`` with its name ``exit_reason_name``, ``stage_steps``,
``failure`` (names of the failure bits) and ``failure_step`` for failed systems, and what
:mod:`fused_dynamics.provenance` copies from the input (its ``info``, per-atom ``arrays``,
``source_file``, ``source_index``). Masses and a cell the run did not change are the input's
own values, whatever the run's dtype (:func:`fused_dynamics.provenance.restore_unchanged`).

Systems are written in the order they leave the run (``order="completion"``, the default) or
in input order (``order="input"`` with ``input_ids=sampler.ids``): a system that finishes
early then waits in a side file next to the output until every system before it is written,
so that an interrupted run loses nothing (:mod:`fused_dynamics.outputs.order`).

File sinks never destroy data. ``mode="x"`` (the default) refuses a path that exists,
``mode="a"`` appends to an output written before (to continue a run), ``mode="w"`` replaces
an existing extxyz *file*; a directory is never deleted or replaced. Every record is written
whole and flushed before ``write`` returns, so a crash loses only systems not yet written, and
:func:`read_extxyz_ids` / :func:`read_zarr` ignore a record cut short by a kill.

Units are ASE's (:data:`fused_dynamics.provenance.UNITS`): Å, eV, amu, eV/Å³. Every extxyz
frame carries ``units`` and ``fused_dynamics_version``; the first frame a sink writes also
carries the ``exit_reason_legend``, the ``legend`` of every code's name (JSON:
:func:`~fused_dynamics.provenance.output_legend`, from :data:`fused_dynamics.status.LEGEND`)
and whatever ``metadata`` it was given (the command line
gives the run configuration as ``run_config``, JSON). A zarr store keeps the same in its
attributes.

The sinks live in :mod:`fused_dynamics.outputs`: :mod:`~fused_dynamics.outputs.common`
(:class:`HostMemory`, :func:`check_writable`), :mod:`~fused_dynamics.outputs.extxyz`
(:class:`ExtXYZSink`, :func:`read_extxyz_ids`, :func:`set_aside_tail`) and
:mod:`~fused_dynamics.outputs.zarr_store` (:class:`ZarrSink`, :func:`read_zarr`,
:func:`zarr_ids`). Every name stays importable from here.
"""

from .batch import atoms_from_arrays
from .outputs.common import HostMemory, check_writable
from .outputs.extxyz import (
    ExtXYZSink,
    read_extxyz_frames,
    read_extxyz_ids,
    set_aside_tail,  # noqa: F401  (not in __all__, as before)
)
from .outputs.zarr_store import ZarrSink, read_zarr, zarr_ids

__all__ = [
    "HostMemory",
    "ExtXYZSink",
    "ZarrSink",
    "atoms_from_arrays",
    "check_writable",
    "read_extxyz_frames",
    "read_extxyz_ids",
    "read_zarr",
    "zarr_ids",
]
