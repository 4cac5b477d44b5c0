"""Test configuration: float64 everywhere (exact-agreement tests need it), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# once JAX runs, multi-threaded OpenBLAS makes the small solves of ASE's cell filters ~20x
# slower on 2 cores
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
