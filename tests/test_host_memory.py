"""fd.reuse_host_memory (docs/concepts.md, "Inflight batching and sinks"): glibc keeps the host
memory a compiled program frees, so its next call does not fault it in again.

The A/B runs in fresh processes, since the settings only reach threads that have no arena yet.
It reads the allocator's own account (``malloc_stats``: arenas, blocks served by ``mmap``) and
counts minor page faults (``getrusage``), not time, so it holds on a loaded machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

import fused_dynamics as fd
from fused_dynamics import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A program whose temporary exceeds glibc's largest mmap threshold (32 MiB): 8 M float64
# (64 MB) kept whole by an optimization barrier, then summed; called 20 times. Then glibc's
# malloc_stats (on stderr) lists the arenas and the blocks it served with mmap.
_PROBE = r"""
import ctypes, json, resource
from fused_dynamics import host_memory
applied = host_memory.reuse_host_memory_if_asked()
import jax
jax.config.update("jax_enable_x64", True)
f = jax.jit(lambda x: jax.lax.optimization_barrier(x * 2.0).sum())
x = jax.random.normal(jax.random.key(0), (8 * 1024 * 1024,))
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults,
                  "settings": host_memory.host_memory_settings()}), flush=True)
ctypes.CDLL("libc.so.6").malloc_stats()
"""


def _clean_env(reuse: str) -> dict:
    """The environment of a probe: the variable set, and none of the ways a user may have set
    the allocator already (glibc's variables and tunables, another malloc preloaded)."""
    env = dict(os.environ, FUSED_DYNAMICS_REUSE_HOST_MEMORY=reuse, JAX_PLATFORMS="cpu")
    for var in (
        "MALLOC_ARENA_MAX",
        "MALLOC_MMAP_MAX_",
        "MALLOC_TRIM_THRESHOLD_",
        "GLIBC_TUNABLES",
        "LD_PRELOAD",
    ):
        env.pop(var, None)
    return env


def _probe(reuse: str) -> dict:
    env = _clean_env(reuse)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["arenas"] = len(re.findall(r"^Arena \d+:", out.stderr, re.M))
    res["max_mmap_bytes"] = int(re.search(r"max mmap bytes\s*=\s*(\d+)", out.stderr).group(1))
    return res


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's; elsewhere the call returns False")
def test_freed_temporaries_are_reused_without_page_faults():
    default, reused = _probe("0"), _probe("1")
    assert not default["applied"] and default["settings"] is None
    assert reused["applied"]
    assert reused["settings"] == {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}
    # The allocator's account, exact: without the settings XLA's worker threads have arenas of
    # their own and the 64 MB block is served by mmap; with them, one arena, and the only
    # mmap-served blocks are the few megabytes that imports allocated before the settings.
    assert default["arenas"] > 1 and default["max_mmap_bytes"] >= 64 * 2**20, default
    assert reused["arenas"] == 1 and reused["max_mmap_bytes"] < 64 * 2**20, reused
    # Without the settings every call maps its temporary afresh and faults it in again (16,900
    # faults a call with 4 KiB pages; with transparent huge pages far fewer, but never none).
    # With them, a call faults only when the heap grows because small allocations split the
    # freed block; that stops after some of the first calls (at most 7 of 20 in every probe
    # run while writing this test), so after the first two calls the total is at most 0.6 of
    # the default's.
    assert min(default["faults"][2:]) > 0, default
    assert sum(reused["faults"][2:]) < 0.6 * sum(default["faults"][2:]), (default, reused)


def test_it_refuses_once_the_backend_has_started(monkeypatch):
    jnp.zeros(1).block_until_ready()  # this process has computed: the backend is up
    assert host_memory.backend_started()
    if host_memory.host_memory_settings() is not None:
        pytest.skip("this process was started with the settings made")
    if not GLIBC:
        assert fd.reuse_host_memory() is False
        return
    with pytest.raises(RuntimeError, match="before JAX's first computation"):
        fd.reuse_host_memory()
    # what the programs call: a warning when asked, no error, and nothing changed either way
    monkeypatch.setenv(host_memory.ENV_REUSE, "1")
    with pytest.warns(RuntimeWarning, match="were not made: .*before JAX's first computation"):
        assert host_memory.reuse_host_memory_if_asked() is False
    monkeypatch.setenv(host_memory.ENV_REUSE, "0")
    assert host_memory.reuse_host_memory_if_asked() is False
    assert host_memory.host_memory_settings() is None


# Another thread allocates before the call: glibc gives it an arena of its own, which XLA's
# threads would later be handed (a reviewer measured 26 of 95 calls still faulting after one
# such thread, and every call after 12, while the call reported the settings made).
_THREAD_FIRST = r"""
import json, threading, warnings
from fused_dynamics import host_memory
counts = [host_memory.malloc_arena_count()]
t = threading.Thread(target=lambda: bytearray(1 << 20)); t.start(); t.join()
counts.append(host_memory.malloc_arena_count())
try:
    host_memory.reuse_host_memory()
    error = None
except RuntimeError as exc:
    error = str(exc)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    asked = host_memory.reuse_host_memory_if_asked()
print(json.dumps({"counts": counts, "error": error, "asked": asked,
                  "warnings": [str(w.message) for w in caught],
                  "settings": host_memory.host_memory_settings()}))
"""


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_it_refuses_once_another_thread_has_an_arena():
    env = _clean_env("1")
    out = subprocess.run(
        [sys.executable, "-c", _THREAD_FIRST], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # importing fused_dynamics (and jax) allocates from the main thread only: one arena; the
    # thread's 1 MiB block gives it a second
    assert res["counts"] == [1, 2], res
    assert res["error"] is not None and "already has 2 arenas" in res["error"], res
    assert res["asked"] is False and res["settings"] is None, res
    assert len(res["warnings"]) == 1 and "already has 2 arenas" in res["warnings"][0], res


@pytest.mark.parametrize(
    ("value", "asked"),
    [(v, True) for v in ("1", "yes", "ON", "on", "TRUE", " true ")]
    + [(v, False) for v in ("", " ", "0", "no", "OFF", "off", "false", " 0 ")],
)
def test_the_values_that_ask_and_those_that_do_not(monkeypatch, value, asked):
    calls = []
    monkeypatch.setattr(host_memory, "reuse_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv(host_memory.ENV_REUSE, value)
    made = host_memory.reuse_host_memory_if_asked()
    assert calls == ([1] if asked else []) and made == asked


@pytest.mark.parametrize("value", ["maybe", "2", "enable"])
def test_an_unknown_value_of_the_variable_is_refused(monkeypatch, value):
    monkeypatch.setenv(host_memory.ENV_REUSE, value)
    with pytest.raises(ValueError, match=f"FUSED_DYNAMICS_REUSE_HOST_MEMORY is '{value}'"):
        host_memory.reuse_host_memory_if_asked()


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
@pytest.mark.parametrize("program", ["fused_dynamics.cli", "fused_dynamics.demo"])
@pytest.mark.parametrize(
    ("asked", "made"), [("1", True), ("True", True), ("0", False), ("", False)]
)
def test_the_command_line_makes_the_settings_only_when_asked(program, asked, made):
    # each program is run as `python -m` runs it (its __main__ block), with --help so that no
    # job starts; a program that only validated the variable would leave the settings unmade
    script = (
        "import runpy, sys\n"
        "from fused_dynamics import host_memory\n"
        f"sys.argv = [{program!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_module({program!r}, run_name='__main__', alter_sys=True)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(host_memory.host_memory_settings())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=_clean_env(asked),  # no GLIBC_TUNABLES, LD_PRELOAD or MALLOC_* of the user's
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout.lower(), out.stdout[-2000:]  # --help answered: no job ran
    last = out.stdout.strip().splitlines()[-1]
    expected = {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}
    assert last == (repr(expected) if made else "None"), last


@pytest.mark.parametrize("program", ["fused_dynamics.cli", "fused_dynamics.demo"])
def test_the_command_line_refuses_an_unknown_value_with_exit_2(program):
    env = dict(os.environ, FUSED_DYNAMICS_REUSE_HOST_MEMORY="yes please", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", program, "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "FUSED_DYNAMICS_REUSE_HOST_MEMORY is 'yes please'" in out.stderr, out.stderr


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_a_setting_refused_after_another_was_made_is_reported_as_made_in_part(monkeypatch):
    # glibc makes M_ARENA_MAX, then refuses M_MMAP_MAX: the error, the warning and
    # host_memory_settings() all say that M_ARENA_MAX is in force and the others are not.
    # mallopt is faked (this test process keeps its allocator), as are the checks that run
    # before it (this process has computed and has threads).
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1 if len(calls) == 1 else 0

    monkeypatch.setattr(host_memory, "_mallopt", mallopt)
    monkeypatch.setattr(host_memory, "backend_started", lambda: False)
    monkeypatch.setattr(host_memory, "malloc_arena_count", lambda: 1)
    monkeypatch.setattr(host_memory, "_made", {})
    monkeypatch.setattr(host_memory, "_complete", False)
    with pytest.raises(
        OSError, match="refused M_MMAP_MAX = 0; made before it, and still in force: M_ARENA_MAX = 1"
    ):
        fd.reuse_host_memory()
    assert calls == [(-8, 1), (-4, 0)]
    assert host_memory.host_memory_settings() == {"M_ARENA_MAX": 1}
    monkeypatch.setenv(host_memory.ENV_REUSE, "1")
    with pytest.warns(RuntimeWarning, match="were made only in part: .*in force: M_ARENA_MAX = 1"):
        assert host_memory.reuse_host_memory_if_asked() is False
    assert calls[2:] == [(-4, 0)]  # the second call tried only the setting not made
    assert host_memory.host_memory_settings() == {"M_ARENA_MAX": 1}
    monkeypatch.setenv(host_memory.ENV_REUSE, "0")
    assert host_memory.reuse_host_memory_if_asked() is False  # not in force: not all made


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_a_first_setting_refused_is_reported_as_not_made(monkeypatch):
    monkeypatch.setattr(host_memory, "_mallopt", lambda param, value: 0)
    monkeypatch.setattr(host_memory, "backend_started", lambda: False)
    monkeypatch.setattr(host_memory, "malloc_arena_count", lambda: 1)
    monkeypatch.setattr(host_memory, "_made", {})
    monkeypatch.setattr(host_memory, "_complete", False)
    monkeypatch.setenv(host_memory.ENV_REUSE, "1")
    with pytest.warns(RuntimeWarning, match="were not made: .*refused M_ARENA_MAX = 1; none was"):
        assert host_memory.reuse_host_memory_if_asked() is False
    assert host_memory.host_memory_settings() is None
