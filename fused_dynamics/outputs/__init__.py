"""The sinks of :mod:`fused_dynamics.sinks`, one module per kind of output.

:mod:`.common` (:class:`~fused_dynamics.sinks.HostMemory` and the safety checks the file sinks
share), :mod:`.extxyz` (:class:`~fused_dynamics.sinks.ExtXYZSink`, reading and repairing its
files) and :mod:`.zarr_store` (:class:`~fused_dynamics.sinks.ZarrSink`,
:func:`~fused_dynamics.sinks.read_zarr`), and :mod:`.order` (writing in input order,
``order="input"``). Import them from :mod:`fused_dynamics.sinks`, which describes what every
sink writes.
"""
