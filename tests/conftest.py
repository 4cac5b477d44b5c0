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

# The whole test session (both pytest workers and every process a test starts) shares one
# persistent compilation cache, so a program compiled by one test is loaded by the next that asks
# for it; the suite is bound by XLA compilation. A loaded program is the same executable, so no
# result changes. Made once by the first process (the xdist controller), inherited through the
# environment, removed at its exit. A size limit switches on JAX's file lock (the filelock
# package), so two processes never read an entry half written.
if "_FUSED_DYNAMICS_TEST_XLA_CACHE" not in os.environ:
    _shared = tempfile.mkdtemp(prefix="fused-dynamics-test-shared-xla-")
    os.environ["_FUSED_DYNAMICS_TEST_XLA_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = _shared
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
    atexit.register(shutil.rmtree, _shared, True)

import jax  # noqa: E402
import jax.monitoring  # noqa: E402

jax.config.update("jax_enable_x64", True)

_CACHE_EVENTS = {"hits": 0, "misses": 0}


def _count_cache_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_EVENTS["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        _CACHE_EVENTS["misses"] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def _write_cache_events() -> None:
    folder = os.environ["_FUSED_DYNAMICS_TEST_XLA_CACHE"]
    if os.path.isdir(folder):  # written whole or not at all (the controller reads it)
        name = os.path.join(folder, f"stats-{os.getpid()}")
        with open(name + ".tmp", "w") as f:
            f.write(f"{_CACHE_EVENTS['hits']} {_CACHE_EVENTS['misses']}\n")
        os.replace(name + ".tmp", name + ".txt")


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


def pytest_sessionfinish(session):
    _write_cache_events()


def pytest_terminal_summary(terminalreporter):
    """How many compilations the shared cache saved (summed over this session's processes)."""
    folder = os.environ["_FUSED_DYNAMICS_TEST_XLA_CACHE"]
    hits = misses = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith("stats-") and name.endswith(".txt"):
            with open(os.path.join(folder, name)) as f:
                h, m = f.read().split()
            hits, misses = hits + int(h), misses + int(m)
    terminalreporter.write_line(
        f"shared compilation cache: {hits} programs loaded, {misses} compiled "
        "(pytest processes; programs under 0.1 s are not kept)"
    )


# The longest test files (measured by --durations in CI), first: `make test` hands whole files
# to its two workers in collection order (--dist loadfile), so a long file collected last
# would keep one worker busy after the other has finished.
_LONGEST_FIRST = (
    "test_neighbors.py",
    "test_sharding.py",
    "test_notebooks.py",
    "test_npt.py",
    "test_fused.py",
    "test_isolation.py",
    "test_path_choice.py",
    "test_pipeline.py",
    "test_cli.py",
    "test_inflight.py",
    "test_failures.py",
    "test_run_control.py",
    "test_differentiable.py",
    "test_checkpoint_kill.py",
    "test_ml_workflow.py",
    "test_cli_resume.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order
