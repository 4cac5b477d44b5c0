"""Pipelines: ``a | b`` runs each stage on its own device group; graduates of one stage become
entries of the next through a bounded buffer (docs/semantics.md §16;
fused_dynamics/pipeline.py).

The run over device groups happens in a subprocess with 4 forced CPU devices (this process
started JAX with one). Tolerance: bitwise. A system's arithmetic in the pipeline is that of the
fused run ``fire + nvt``: its FIRE steps are the same; it leaves FIRE at rest in both; it
enters NVT with fresh stage state and forces evaluated at the same positions (the fused run's
``migration.enter``, the pipeline's admission); Langevin noise is keyed by (system_id, the
system's own step). Measured: a maximum difference of exactly 0.
"""

from __future__ import annotations

import pytest
from test_sharding import LJ, _check, _run, systems  # tests/ is on pytest's path

import fused_dynamics as fd
from fused_dynamics.pipeline import DistributedPipeline


def stages():
    relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=40)
    md = fd.NVTLangevin(LJ, dt=4.0, temperature=40.0, friction=0.02, seed=7, n_steps=12)
    return relax, md


def test_or_builds_a_pipeline_and_checks_its_arguments():
    relax, md = stages()
    for pipe in (relax | md, (relax + md) | md, (relax | md) | md):
        assert isinstance(pipe, DistributedPipeline)
    assert len((relax | md | md).stages) == 3
    pipe = relax | md
    assert pipe.is_first_stage and pipe.is_final_stage  # one process holds every stage
    assert len(pipe.stage_devices) == 2  # one device here: the stages share it
    with pytest.raises(ValueError, match="buffer_size"):
        DistributedPipeline(pipe.stages, buffer_size=0)
    with pytest.raises(ValueError, match="one non-empty group per stage"):
        pipe.with_devices([[]])
    with pytest.raises(ValueError, match="sink"):
        pipe.run(fd.SizeAwareSampler(systems(1), max_atoms=16, max_systems=1), [])


def test_fire_then_nvt_over_two_device_groups_equals_the_fused_run():
    code = """
        import numpy as np
        import fused_dynamics as fd
        from fused_dynamics.pipeline import DistributedPipeline
        from tests.test_sharding import LJ, systems, assert_same_systems
        relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=40)
        md = fd.NVTLangevin(LJ, dt=4.0, temperature=40.0, friction=0.02, seed=7, n_steps=12)
        data = systems(16, seed=2)

        def sampler():
            return fd.SizeAwareSampler(data, max_atoms=64, max_systems=4, max_atoms_per_system=16)

        ref = fd.HostMemory()
        (relax + md).run(sampler=sampler(), refill_frequency=8, sinks=[ref])
        devices = jax.devices()
        pipe = (relax | md).with_devices([devices[:2], devices[2:]])
        for size in (64, 1):
            sink = fd.HostMemory()
            with DistributedPipeline(pipe.stages, devices=pipe.stage_devices,
                                     buffer_size=size) as p:
                stats = p.run(sampler(), [sink], refill_frequency=8)
            ids = sorted(a.info["system_id"] for a in sink.atoms)
            assert ids == list(range(16)), ids  # every system exactly once
            assert max(b.peak for b in p.buffers) <= size
            worst = assert_same_systems(sink.atoms, ref.atoms, last_stages=1)
            print("buffer", size, "steps", [s.steps for s in stats], "worst", worst)
        print("ok")
        """
    print(_check(_run(code), timeout=500))
