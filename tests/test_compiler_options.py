"""The XLA options every engine program is compiled with (docs/models.md, "float32 on the CPU").

XLA:CPU (jaxlib 0.10) hands float32 reduce-windows to the YNNPACK library by default, which made
float32 dense-pair steps about twice as slow as float64 ones; the engine keeps that library for
matrix products only. These tests check the programs the engine compiles, not timings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

import fused_dynamics as fd
from fused_dynamics import loop
from fused_dynamics.compiled import default_compiler_options, filter_compile

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")


def _batch(dtype):
    rng = np.random.default_rng(0)
    systems = []
    for _ in range(3):
        a = bulk("Ar", "fcc", a=5.26, cubic=True) * (3, 3, 3)  # 108 atoms: sums over > 32
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        systems.append(a)
    return fd.Batch.from_atoms(systems, dtype=dtype)


def _model(batch):
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5, shift=False)
    return lj.with_images(batch)


def test_default_options_compile():
    options = default_compiler_options()
    # either this jaxlib knows the option (then it is ours) or the defaults are XLA's
    assert options in (
        {},
        {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    )
    assert float(jax.jit(lambda x: x * 2).lower(1.0).compile(options or None)(3.0)) == 6.0


def test_float32_run_program_keeps_sums_out_of_the_library():
    batch = _batch(jnp.float32)
    model = _model(batch)
    forces = jax.jit(lambda b: model(b).forces)
    if "ynn_fusion" not in forces.lower(batch).compile().as_text():
        pytest.skip("this jaxlib does not send float32 reduce-windows to YNNPACK")
    fused = fd.FusedStage([fd.NVE(model, dt=2.0)])
    options = loop.LoopOptions(resume=False, max_steps=None)
    program = loop.compiled_loop(fused).lower(fused, batch, jnp.asarray(5, jnp.int32), options)
    assert "ynn_fusion" not in program.compile().as_text()
    # and the evaluation outside a run (model(batch) called eagerly) likewise
    from fused_dynamics.models.base import _evaluate_jit

    assert "ynn_fusion" not in _evaluate_jit.lower(model, batch, True).compile().as_text()


def test_user_options_override_ours():
    batch = _batch(jnp.float32)
    model = _model(batch)
    if not default_compiler_options():
        pytest.skip("this jaxlib does not know the option")
    xla_default = {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
        "LIBRARY_FUSION_TYPE_REDUCE"
    }
    ours = filter_compile(lambda m, b: m(b).forces)
    theirs = filter_compile(lambda m, b: m(b).forces, compiler_options=xla_default)
    text = theirs.lower(model, batch).compile().as_text()
    assert "ynn_fusion" in text
    assert "ynn_fusion" not in ours.lower(model, batch).compile().as_text()


@pytest.mark.parametrize("transform", ["jit", "grad", "vmap"])
def test_inside_another_trace(transform):
    """Inside jit, grad or vmap the engine's programs are nested jits (which refuse
    compiler_options): they run there, and give what the top-level program gives (float64:
    the option never changes a float64 program)."""
    batch = _batch(jnp.float64)
    model = _model(batch)
    energy = filter_compile(lambda m, b: jnp.sum(m(b).energy))
    top = energy(model, batch)
    if transform == "jit":
        assert jax.jit(energy)(model, batch) == top
    elif transform == "grad":
        g = jax.grad(lambda p: energy(model, batch.replace(positions=p)))(batch.positions)
        np.testing.assert_array_equal(g, -model(batch).forces)
    else:
        positions = jnp.stack([batch.positions, batch.positions])
        out = jax.vmap(lambda p: energy(model, batch.replace(positions=p)))(positions)
        np.testing.assert_array_equal(out, jnp.stack([top, top]))
