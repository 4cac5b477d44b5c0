"""Test configuration: float64 everywhere (exact-agreement tests need it), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# once JAX runs, multi-threaded OpenBLAS makes the small solves of ASE's cell filters ~20x
# slower on 2 cores
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# the command line keeps compiled programs on disk by default (docs/command-line.md): a test
# run's go to a folder of this process's own (each pytest worker makes its own, and the
# commands its tests start inherit it), removed at exit, never into the user's cache.
# _FUSED_DYNAMICS_TEST_CACHE marks a folder made here, so a worker does not reuse the one its
# parent made (JAX writes entries without a lock).
if os.environ.get("_FUSED_DYNAMICS_TEST_CACHE") or "FUSED_DYNAMICS_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="fused-dynamics-test-xla-")
    os.environ["FUSED_DYNAMICS_CACHE_DIR"] = os.environ["_FUSED_DYNAMICS_TEST_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

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


@pytest.fixture(autouse=True)
def _persistent_cache_restored():
    """A test that switches JAX's persistent compilation cache on (an in-process command-line
    run does) leaves the tests after it as they were: compiling in memory only."""
    from fused_dynamics.compilation_cache import cache_settings, restore_cache_settings

    before = cache_settings()
    yield
    restore_cache_settings(before)
