"""Host hooks recorded on the device and delivered once per chunk (docs/semantics.md §7,
"When on_host runs"): the same calls with the same arrays as host callbacks, in the same order,
no callback in the compiled loop, nothing delivered twice when a chunk is redone."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics import loop
from fused_dynamics.hooks import DynamicsStage as DS

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5, switch_onset=6.5)


def clusters(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = Icosahedron("Ar", 2) if k % 2 == 0 else bulk("Ar", "fcc", a=5.3, cubic=True)
        a = a.copy()
        a.pbc, a.cell = False, np.zeros((3, 3))
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        out.append(a)
    return out


class Tape(fd.Hook):
    """Keeps every call: its name, stage, step and the arrays it received."""

    log: list = eqx.field(static=True)
    name: str = eqx.field(static=True, default="")

    def on_host(self, data):
        arrays = {k: np.array(v, copy=True) for k, v in data.arrays.items()}
        self.log.append((self.name, int(data.stage), data.step, arrays))


def chain(log):
    """FIRE (budget 7) -> NVE (budget 5) with host hooks at every kind of point: fused-level
    and sub-stage, several frequencies, and ON_CONVERGE (fires when systems leave a stage)."""
    fields = ("energy", "positions", "fmax", "exit_reason")
    relax = fd.FIRE(LJ, n_steps=7).register_hook(
        Tape(log=log, name="fire", stage=DS.AFTER_COMPUTE, every_n_steps=2, fields=fields)
    )
    relax = relax.register_hook(Tape(log=log, name="left fire", stage=DS.ON_CONVERGE))
    md = fd.NVE(LJ, dt=2.0, n_steps=5).register_hook(
        Tape(log=log, name="nve", stage=DS.AFTER_STEP, every_n_steps=3, fields=("velocities",))
    )
    fused = relax + md
    fused = fused.register_fused_hook(
        Tape(log=log, name="every step", stage=DS.BEFORE_STEP, fields=("temperature",))
    )
    return fused.register_fused_hook(Tape(log=log, name="any left", stage=DS.ON_CONVERGE))


def assert_same_calls(got, want):
    assert [c[:3] for c in got] == [c[:3] for c in want]
    for (name, _, step, a), (_, _, _, b) in zip(got, want, strict=True):
        assert sorted(a) == sorted(b), (name, step)
        for key in a:
            if a[key].dtype.kind == "f":  # two programs (one chunk, one whole-run loop) may
                # sum in another order: rounding only
                np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14)
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {step} {key}")


@pytest.mark.slow
def test_recorded_hooks_receive_what_host_callbacks_receive_in_the_same_order():
    """A concrete batch's run records its host hooks and delivers them after each chunk; under
    jax.jit the same run sends each by a host callback during the step. The calls (hook,
    stage, step, in firing order) and their arrays are identical, across chunk boundaries
    (refill_frequency=4 over 12 steps) and with a hook that fires on fewer steps than a chunk
    holds."""
    batch = fd.Batch.from_atoms(clusters(3), max_systems=4)
    recorded, called = [], []
    out = chain(recorded).run(batch, refill_frequency=4)
    jax.effects_barrier()
    ref = jax.jit(lambda b: chain(called).run(b))(batch)
    jax.effects_barrier()
    assert int(out.step_count) == int(ref.step_count) == 12
    names = {c[0] for c in called}
    assert names == {"fire", "left fire", "nve", "every step", "any left"}, names
    assert_same_calls(recorded, called)
    np.testing.assert_allclose(out.positions, ref.positions, rtol=0, atol=1e-12)


def test_the_compiled_chunk_has_no_host_callback():
    """Record mode (what a run in chunks compiles) leaves no callback in the loop; without it
    each host hook is a debug_callback."""
    fused = chain([])
    batch = fused.init(fd.Batch.from_atoms(clusters(2)))
    last = jnp.asarray(False)
    recorded = jax.make_jaxpr(lambda b: loop.chunk(fused, b, 10, last, None, 10))(batch)
    called = jax.make_jaxpr(lambda b: loop.chunk(fused, b, 10, last, None, None))(batch)
    assert "debug_callback" not in str(recorded)
    assert "debug_callback" in str(called)


@pytest.mark.slow
def test_a_chunk_longer_than_its_buffers_stops_early_and_loses_nothing():
    """Buffers are sized for refill_frequency steps; advance(n) with n larger stops when one
    fills (every_n_steps=1: 3 records), and the rest comes in the next chunks: every step is
    delivered once, in order."""
    log = []
    md = fd.NVE(LJ, dt=2.0, n_steps=10).register_hook(Tape(log=log, fields=("energy",)))
    fused = fd.FusedStage([md])
    with fused.start(fd.Batch.from_atoms(clusters(2)), refill_frequency=3) as run:
        assert run.advance(8) == 3
        while run.advance(8):
            pass
    assert [c[2] for c in log] == list(range(10))


@pytest.mark.slow
def test_a_chunk_redone_on_a_grown_neighbor_list_delivers_its_records_once():
    """A neighbor list far too small overflows in the first chunk; the run grows it and
    redoes the chunk. A host callback would have fired for the discarded attempt too; the
    recorded hook sees each step once, with the values of the kept attempt (the dense run's)."""
    a = bulk("Ar", "fcc", a=5.26, cubic=True) * (3, 3, 3)
    a.rattle(0.05, seed=3)
    batch = fd.Batch.from_atoms([a])
    model = LJ.with_neighbors(1.0)
    small = model.attach_neighbors(batch, capacity=64)
    log, ref = [], []
    fd.NVE(LJ, dt=2.0, n_steps=6).register_hook(Tape(log=ref, fields=("energy",))).run(batch)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        md = fd.NVE(model, dt=2.0, n_steps=6).register_hook(Tape(log=log, fields=("energy",)))
        md.run(small)
    assert [c[2] for c in log] == list(range(6))
    for got, want in zip(log, ref, strict=True):
        np.testing.assert_allclose(got[3]["energy"], want[3]["energy"], rtol=1e-12)


@pytest.mark.slow
def test_the_branch_free_form_records_the_same_bits(monkeypatch):
    """Off CPU a not-due step writes its record into a spill row instead of branching (a GPU
    reads a cond's predicate back to the host). Traced here on CPU by patching the backend
    JAX reports: the same calls with the same bits as the CPU form."""
    batch = fd.Batch.from_atoms(clusters(2), max_systems=3)
    cpu, gpu = [], []
    chain(cpu).run(batch, refill_frequency=4)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    chain(gpu).run(batch, refill_frequency=4)
    assert [c[:3] for c in gpu] == [c[:3] for c in cpu] and len(cpu) > 10
    for a, b in zip(gpu, cpu, strict=True):
        for key in a[3]:
            np.testing.assert_array_equal(a[3][key], b[3][key])
