"""XLA options chosen per model and batch shape (docs/models.md, "float32 on the CPU").

XLA:CPU (jaxlib 0.10) hands float32 reduce-windows to the YNNPACK library by default; on the
dense pair kernel's 36-atom tiles (108-atom systems) that made float32 steps twice as slow as
float64 ones, while on 32-atom tiles the library is the faster. A pair potential asks for the
library's matrix products only where its innermost sums (a tile's atoms, or a row's atom slots)
are wider than 32 and not a multiple of 32.
These tests check the programs the engine compiles, not timings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

import fused_dynamics as fd
from fused_dynamics import loop
from fused_dynamics.compiled import filter_compile, library_products_only
from fused_dynamics.models import blocked
from fused_dynamics.models.base import _evaluate_jit

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")

PRODUCTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
XLA_DEFAULT = {  # what jaxlib 0.10.1 does when nothing is asked
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
    "LIBRARY_FUSION_TYPE_REDUCE"
}


def _batch(dtype, cells=3, n_systems=3, max_atoms_per_system=None):
    rng = np.random.default_rng(0)
    systems = []
    for _ in range(n_systems):
        a = bulk("Ar", "fcc", a=5.26, cubic=True) * (cells, cells, cells)
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        systems.append(a)
    if max_atoms_per_system is None:
        return fd.Batch.from_atoms(systems, dtype=dtype)
    return fd.Batch.from_atoms(  # room for larger systems: slots mostly padding
        systems,
        dtype=dtype,
        max_atoms=3 * sum(map(len, systems)),
        max_systems=3 * n_systems,
        max_atoms_per_system=max_atoms_per_system,
    )


def dense_layout_of(batch):
    model = _model(batch)
    shifts = blocked.image_shifts(tuple(model.images), np.dtype(batch.dtype))
    a = batch.max_atoms_per_system
    return blocked.dense_layout(batch.max_systems, batch.max_atoms, a, len(shifts))


def _model(batch, cutoff=7.5):
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=cutoff, shift=False)
    return lj.with_images(batch)


def _skip_unless_the_library_reduces(model, batch):
    """Skip where XLA's default program (a plain ``jax.jit``) makes no library call here."""
    if "ynn_fusion" not in jax.jit(lambda b: model(b).forces).lower(batch).compile().as_text():
        pytest.skip("this jaxlib does not send float32 reduce-windows to YNNPACK")


def _run_program_text(fused, batch) -> str:
    options = loop.LoopOptions(resume=False, max_steps=None)
    limit = jnp.asarray(5, jnp.int32)
    return loop.compiled_loop(fused).lower(fused, batch, limit, options).compile().as_text()


def test_library_products_only_compiles():
    options = library_products_only()
    assert options in ({}, PRODUCTS_ONLY)  # known to this jaxlib, or XLA's defaults
    assert float(jax.jit(lambda x: x * 2).lower(1.0).compile(options or None)(3.0)) == 6.0


def test_which_batches_ask_for_it():
    if not library_products_only():
        pytest.skip("this jaxlib does not know the option")
    f32_108 = _batch(jnp.float32)  # tiles of 36 atoms
    assert _model(f32_108).compiler_options(f32_108) == PRODUCTS_ONLY
    f64_108 = _batch(jnp.float64)  # float64 never goes to the library
    assert _model(f64_108).compiler_options(f64_108) == {}
    f32_256 = _batch(jnp.float32, cells=4, n_systems=2)  # tiles of 32: the library is faster
    assert _model(f32_256, cutoff=8.5).compiler_options(f32_256) == {}
    listed = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5).with_neighbors()
    assert listed.compiler_options(f32_108) == {}  # the neighbor-list path
    # the rows layout (slots mostly padding): its sums run over the atom slots of a system
    for slots, asked in ((108, True), (128, False)):
        rows = _batch(jnp.float32, cells=2, n_systems=4, max_atoms_per_system=slots)
        assert dense_layout_of(rows) == "rows"
        assert _model(rows).compiler_options(rows) == (PRODUCTS_ONLY if asked else {})


def test_float32_108_atom_programs_keep_tile_sums_out_of_the_library():
    batch = _batch(jnp.float32)
    model = _model(batch)
    _skip_unless_the_library_reduces(model, batch)
    fused = fd.FusedStage([fd.NVE(model, dt=2.0)])
    assert "ynn_fusion" not in _run_program_text(fused, batch)
    # model(batch) called outside a trace compiles the same way
    assert "ynn_fusion" not in _evaluate_jit.lower(model, batch, True).compile().as_text()
    # the user's own compile_kwargs override it key by key
    theirs = fd.FusedStage(
        [fd.NVE(model, dt=2.0)], compile_kwargs={"compiler_options": XLA_DEFAULT}
    )
    assert "ynn_fusion" in _run_program_text(theirs, batch)


def _products_only_or_skip() -> dict:
    options = library_products_only()
    if not options:
        pytest.skip("this jaxlib does not know the option")
    return options


@pytest.mark.parametrize("transform", ["jit", "grad", "vmap"])
def test_inside_another_trace(transform):
    """Inside jit, grad or vmap an engine program is traced into the caller's program without
    its options (JAX refuses them on a jit nested in jit or grad): it runs, and gives what the
    top-level program gives (float64: the option never changes a float64 program)."""
    options = _products_only_or_skip()
    batch = _batch(jnp.float64)
    model = _model(batch)
    energy = filter_compile(lambda m, b: jnp.sum(m(b).energy), options_for=lambda *_: options)
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


def test_float32_inside_a_trace_agrees_to_rounding():
    """A float32 evaluation inside the caller's jit is compiled without the option, so its sums
    may round differently (docs/models.md): the same numbers to float32 rounding of a sum of
    about 10^4 pair terms (relative 1e-5), not necessarily the same bits."""
    _products_only_or_skip()
    batch = _batch(jnp.float32)
    model = _model(batch)
    top = model(batch)
    inner = jax.jit(lambda b: model(b))(batch)
    np.testing.assert_allclose(inner.energy, top.energy, rtol=1e-5)
    np.testing.assert_allclose(inner.forces, top.forces, rtol=1e-4, atol=1e-6)


def test_sharded_chunk_asks_the_same():
    """The sharded chunk program (one-device mesh here) is compiled with the model's options,
    as a run on one device is."""
    from jax.sharding import Mesh

    from fused_dynamics import sharding

    _products_only_or_skip()
    flat = _batch(jnp.float32)
    model = _model(flat)
    _skip_unless_the_library_reduces(model, flat)
    mesh = Mesh(np.array(jax.devices()[:1]), ("systems",))
    fused = fd.FusedStage([fd.NVE(model, dt=2.0)])
    final = fused.run(flat, n_steps=2, mesh=mesh)  # a stacked batch as a run leaves it
    prepared = sharding.prepare(fused, sharding.unshard(final))
    assert "ynn_fusion" not in sharding.chunk_hlo(prepared, final, mesh)


def test_one_program_per_answer():
    """options_for is asked at every top-level call: two answers, two programs (different
    ones), and a repeated answer reuses its program."""
    options = _products_only_or_skip()
    batch = _batch(jnp.float32)
    model = _model(batch)
    _skip_unless_the_library_reduces(model, batch)
    answers = iter([{}, options, {}, options, {}, options])
    forces = filter_compile(lambda m, b: m(b).forces, options_for=lambda *_: next(answers))
    texts = [forces.lower(model, batch).compile().as_text() for _ in range(2)]
    assert "ynn_fusion" in texts[0] and "ynn_fusion" not in texts[1]
    forces(model, batch), forces(model, batch)
    assert forces.cache_size() == 2
    forces(model, batch), forces(model, batch)
    assert forces.cache_size() == 2
