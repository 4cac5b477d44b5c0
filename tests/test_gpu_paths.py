"""The GPU form of the fused step, checked on CPU.

On a GPU, ``masked_update`` (fused_dynamics/stages/base.py) applies a sub-stage's half step with
a per-system select only, without the ``lax.cond`` that skips it on CPU when the sub-stage holds
no system: a GPU reads a ``cond``'s predicate back to the host every step. Both forms must give
the same bits (``where(False, new, old)`` is ``old``; docs/semantics.md §21). The form is chosen
from ``jax.default_backend()`` while tracing, so patching it here traces the GPU form on CPU.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics.stages import base

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)


def _batch():
    rng = np.random.default_rng(5)
    systems = [Icosahedron("Ar", 2), bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 1)]
    systems.append(Icosahedron("Ar", 2)[:9])
    for a in systems:
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
    return fd.Batch.from_atoms(systems)


def _fused():
    # FIRE's systems migrate to NVT at different steps: masks of every fill occur
    relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=200)
    md = fd.NVTLangevin(LJ, dt=4.0, temperature=40.0, friction=0.02, seed=3, n_steps=30)
    return relax + md


def _trajectory(fused, batch, n_steps=60):
    """Statuses of every step and the final batch, from a jitted step called in Python (one
    small compilation instead of a run's)."""
    b = fused.init(batch)
    step = jax.jit(lambda b: fused.step(b)[0])
    statuses = []
    for _ in range(n_steps):
        b = step(b)
        statuses.append(np.asarray(b.status))
    conds = str(jax.make_jaxpr(lambda b: fused.step(b)[0])(b)).count("cond[")
    return np.array(statuses), b, conds


@pytest.mark.slow
def test_select_only_form_gives_the_bits_of_the_cond_form(monkeypatch):
    batch, fused = _batch(), _fused()
    monkeypatch.setattr(base.jax, "default_backend", lambda: "cpu")  # also on a GPU machine
    cpu_status, cpu, cpu_conds = _trajectory(fused, batch)
    monkeypatch.setattr(base.jax, "default_backend", lambda: "gpu")
    jax.clear_caches()
    gpu_status, gpu, gpu_conds = _trajectory(fused, batch)
    jax.clear_caches()

    assert gpu_conds < cpu_conds, (gpu_conds, cpu_conds)  # the GPU form was traced
    # steps where both sub-stages held systems, and steps where one held none, both occurred
    mixed = [len(set(s[:3].tolist())) > 1 for s in cpu_status]
    assert any(mixed) and not all(mixed), cpu_status
    np.testing.assert_array_equal(gpu_status, cpu_status)
    for name in ("positions", "velocities", "forces"):
        np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name), err_msg=name)
