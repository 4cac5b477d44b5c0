"""Test configuration: float64 everywhere (exact-agreement tests need it), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# once JAX runs, multi-threaded OpenBLAS makes the small solves of ASE's cell filters ~20x
# slower on 2 cores
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every compiled XLA:CPU executable holds a few memory mappings; a pytest worker that compiles
    thousands of programs over the whole suite reaches the kernel's ``vm.max_map_count``
    (65530) and the next compilation segfaults. Modules share few programs, so clearing costs
    little.
    """
    yield
    jax.clear_caches()
    gc.collect()
