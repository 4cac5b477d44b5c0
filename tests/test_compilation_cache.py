"""Compiled programs kept on disk (docs/command-line.md, ``fd.enable_compilation_cache``).

A second process that finds a program in the cache must load it instead of compiling and give
the same numbers, bit for bit (the executable is the one the first process compiled); bad
folders are refused naming the parameter or the configuration key.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import jax
import pytest
from typer.testing import CliRunner

import fused_dynamics as fd
from fused_dynamics.application import check_compilation_cache, use_compilation_cache
from fused_dynamics.cli import app
from fused_dynamics.compilation_cache import cache_settings, default_cache_dir, host_tag
from fused_dynamics.config import ConfigError, load_config

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.monitoring as monitoring
    import numpy as np
    from ase.build import bulk
    import fused_dynamics as fd

    events = []
    monitoring.register_event_listener(lambda name, **kw: events.append(name))
    folder = fd.enable_compilation_cache(sys.argv[1], min_compile_time=0.0)
    systems = []
    for seed in range(3):
        atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
        atoms.rattle(0.1, seed=seed)
        systems.append(atoms)
    batch = fd.Batch.from_atoms(systems)
    model = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0)
    fire = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(0.05))
    out = fire.run(batch, n_steps=200)
    digest = hashlib.sha256(np.asarray(out.positions).tobytes()).hexdigest()
    print(json.dumps({
        "folder": str(folder),
        "hits": events.count("/jax/compilation_cache/cache_hits"),
        "digest": digest,
    }))
    """
)


def _run(folder) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name in ("JAX_COMPILATION_CACHE_MAX_SIZE", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)  # a user's default setup (the suite's shared cache sets them)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_the_programs_and_gives_the_same_bits(tmp_path):
    folder = tmp_path / "new" / "cache"  # created, parents included
    first = _run(folder)
    assert first["folder"] == str(folder.resolve())
    assert first["hits"] == 0
    entries = sorted(p.name for p in folder.iterdir())
    assert any(name.startswith("jit_inner") for name in entries), entries
    second = _run(folder)
    assert second["hits"] >= 1  # the run's program was loaded, not compiled
    assert second["digest"] == first["digest"]
    assert sorted(p.name for p in folder.iterdir()) == entries  # nothing rewritten or added


def test_bad_folders_and_times_are_refused(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("keep me")
    before = cache_settings()
    with pytest.raises(ValueError, match=r"directory .*a_file.* is a file"):
        fd.enable_compilation_cache(afile)
    with pytest.raises(ValueError, match="cannot create directory"):
        fd.enable_compilation_cache(afile / "below")
    assert afile.read_text() == "keep me"
    for bad in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="min_compile_time"):
            fd.enable_compilation_cache(tmp_path / "c", min_compile_time=bad)
    assert cache_settings() == before  # refused before anything was set
    assert not (tmp_path / "c").exists()


def test_the_host_tag_names_the_processor(monkeypatch):
    """Machines whose processors differ in model or instruction-set flags get different
    folders; the same processor always the same one."""
    import builtins
    import io

    import fused_dynamics.compilation_cache as cc

    def cpuinfo(flags):
        text = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n"

        def fake_open(path, *args, **kwargs):
            if str(path) == "/proc/cpuinfo":
                return io.StringIO(text)
            return real_open(path, *args, **kwargs)

        return fake_open

    real_open = builtins.open
    monkeypatch.setattr(cc, "open", cpuinfo("fpu sse2 avx2"), raising=False)
    with_avx2 = host_tag()
    monkeypatch.setattr(cc, "open", cpuinfo("avx2 sse2 fpu"), raising=False)
    assert host_tag() == with_avx2  # the order of the flags does not matter
    monkeypatch.setattr(cc, "open", cpuinfo("fpu sse2 avx2 avx512f"), raising=False)
    assert host_tag() != with_avx2
    assert with_avx2.startswith(platform.machine() or "cpu")

    def block(cpu, mhz):  # other architectures name other keys; the clock does not count
        text = f"processor\t: 0\ncpu\t\t: {cpu}\nclock\t\t: {mhz}MHz\n\nprocessor\t: 1\n"
        return lambda path, *a, **k: io.StringIO(text) if str(path) == "/proc/cpuinfo" else None

    monkeypatch.setattr(cc, "open", block("POWER9", 2000), raising=False)
    power9 = host_tag()
    monkeypatch.setattr(cc, "open", block("POWER9", 3800), raising=False)
    assert host_tag() == power9
    monkeypatch.setattr(cc, "open", block("POWER8", 2000), raising=False)
    assert host_tag() != power9

    def unreadable(path, *a, **k):
        raise OSError("no /proc/cpuinfo")

    # without /proc/cpuinfo and without a processor name: the machine's own name, never a
    # folder every such machine would share
    monkeypatch.setattr(cc, "open", unreadable, raising=False)
    monkeypatch.setattr(cc.platform, "processor", lambda: "")
    monkeypatch.setattr(cc.platform, "node", lambda: "node-a")
    on_a = host_tag()
    monkeypatch.setattr(cc.platform, "node", lambda: "node-b")
    assert host_tag() != on_a


def test_the_default_folder_and_time(monkeypatch, tmp_path):
    """$FUSED_DYNAMICS_CACHE_DIR, then JAX's own folder, then XDG, then ~/.cache; the
    minimum compile time a user gave JAX is kept."""
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)  # conftest's
    monkeypatch.setenv("FUSED_DYNAMICS_CACHE_DIR", str(tmp_path / "own"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))  # restored after
    assert default_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("FUSED_DYNAMICS_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "jax"
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    host = host_tag()  # our own folders: one per kind of processor
    assert default_cache_dir() == tmp_path / "xdg" / "fused_dynamics" / "jax" / host
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fused_dynamics" / "jax" / host
    fd.enable_compilation_cache(tmp_path / "c")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.2
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "3.0")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 3.0)
    fd.enable_compilation_cache(tmp_path / "c")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0


JOB = """\
compilation_cache = {value}
[structures]
generate = "argon"
count = 2
[model]
type = "lennard_jones"
sigma = 3.405
epsilon = 0.0104
cutoff = 6.0
[capacity]
max_atoms = 64
max_systems = 2
[[stages]]
type = "fire"
fmax = 0.05
n_steps = 10
[[outputs]]
type = "extxyz"
path = "out.extxyz"
"""


def _config(tmp_path, value: str):
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(value=value))
    return load_config(path)


def test_the_configuration_key(tmp_path, monkeypatch):
    cfg, base = _config(tmp_path, '"xla"')  # relative to the configuration's folder
    assert use_compilation_cache(cfg, base) == (tmp_path / "xla").resolve()
    assert jax.config.jax_compilation_cache_dir == str((tmp_path / "xla").resolve())
    cfg, base = _config(tmp_path, "false")  # switches off a cache an earlier run switched on
    assert use_compilation_cache(cfg, base) is None
    assert jax.config.jax_compilation_cache_dir is None
    (tmp_path / "taken").write_text("")
    cfg, base = _config(tmp_path, '"taken"')
    with pytest.raises(ConfigError, match=r"compilation_cache: directory .*taken.* is a file"):
        check_compilation_cache(cfg, base)  # what --validate-only runs: refused there too
    with pytest.raises(ConfigError, match=r"compilation_cache: directory .*taken.* is a file"):
        use_compilation_cache(cfg, base)
    for bad, why in (('""', "empty"), ("1", ""), ('"false"', "without quotes"), ('" x"', "spaces")):
        with pytest.raises(ConfigError, match=f"compilation_cache.*{why}"):
            _config(tmp_path, bad)
    # an unusable default folder costs the cache, not the run: a warning
    monkeypatch.setenv("FUSED_DYNAMICS_CACHE_DIR", str(tmp_path / "taken"))
    cfg, base = _config(tmp_path, "true")
    check_compilation_cache(cfg, base)
    warnings = []
    assert use_compilation_cache(cfg, base, warnings.append) is None
    assert "taken" in warnings[0] and "without a cache" in warnings[0], warnings


def test_a_run_leaves_jax_as_it_found_it(tmp_path):
    """The command line's cache holds for its run only: JAX's settings are put back."""
    before = cache_settings()
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(value='"xla"'))
    res = CliRunner().invoke(app, ["run", str(job), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"compiled programs: kept in {(tmp_path / 'xla').resolve()}" in res.output
    assert any((tmp_path / "xla").iterdir())
    assert cache_settings() == before
