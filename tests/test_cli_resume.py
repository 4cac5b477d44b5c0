"""A run killed with SIGKILL and continued with ``--resume`` from its checkpoint writes what an
uninterrupted run writes: every system once in each output, bit for bit (README: "Command
line"; fused_dynamics.cli).

300 argon clusters of 2-13 atoms, FIRE then NVT Langevin in float64, a checkpoint every 20 steps.
One run is killed (SIGSTOP, then SIGKILL) once at least two checkpoints exist and some system has
been written after the last one; it is resumed from the command line and compared with an
uninterrupted run of the same job started at the same time. The zarr output keeps float64
exactly, so positions, velocities, forces and energies are compared bit for bit there.
"""

import json
import os
import signal
import subprocess
import sys
import time

import ase.io
import numpy as np
import pytest
from ase.cluster import Icosahedron

from fused_dynamics.checkpoint import read_header
from fused_dynamics.sinks import read_zarr, zarr_ids

CLI = [sys.executable, "-m", "fused_dynamics.cli"]
N = 300

JOB = """\
seed = 1
dtype = "float64"
device = "cpu"
refill_frequency = 20
checkpoint_every = {every}

[structures]
path = "in.extxyz"

[model]
type = "lennard_jones"
sigma = 3.405
epsilon = 0.0104
cutoff = 7.5
switch_onset = 6.5

[capacity]
max_atoms = 104
max_systems = 8

[[stages]]
type = "fire"
fmax = 0.01
n_steps = 30
write = "out/relaxed.extxyz"

[[stages]]
type = "nvt_langevin"
dt = 5.0
temperature = 40.0
friction = 0.02
n_steps = 10

[[outputs]]
type = "zarr"
path = "out/run.zarr"

[report]
progress = false
"""


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "Agg"
    env.pop("JAX_ENABLE_X64", None)
    return env


def _job(folder, every):
    """The job in ``folder``: 300 rattled argon clusters of 2 to 13 atoms and the config."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    base = Icosahedron("Ar", 2)
    frames = []
    for _ in range(N):
        a = base[: int(rng.integers(2, 14))].copy()
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        a.center(vacuum=6.0)
        a.pbc = False
        frames.append(a)
    ase.io.write(folder / "in.extxyz", frames)
    (folder / "job.toml").write_text(JOB.format(every=every))
    return folder / "job.toml"


def _start(job, *flags):
    return subprocess.Popen(
        [*CLI, "run", str(job), "--no-progress", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _step(path):
    try:
        return read_header(path)["step_count"]
    except (OSError, ValueError, KeyError):
        return None


def _frames_written(out):
    """Systems committed to the zarr output (its ``count`` attribute, read without zarr)."""
    try:
        return json.loads((out / "run.zarr" / "zarr.json").read_text())["attributes"]["count"]
    except (OSError, ValueError, KeyError):  # not created yet, or caught while rewritten
        return None


def _kill_after_two_checkpoints(proc, out):
    """SIGKILL ``proc`` once checkpoint step >= 40 and a system was written after it.

    The process is stopped (SIGSTOP) before the checkpoint is read again, so what it had
    written is known when it dies. Returns the step of the checkpoint it leaves, or None when
    the run ended first (then the caller tries again).
    """
    ckpt = out / "run.zarr.ckpt"
    baseline = None  # (checkpoint step, systems in the zarr output when it was seen)
    while proc.poll() is None:
        step = _step(ckpt)
        written = _frames_written(out)
        if step is not None and step >= 40 and written is not None:
            if baseline is None or baseline[0] != step:
                baseline = (step, written)
            elif written > baseline[1]:
                proc.send_signal(signal.SIGSTOP)
                if _step(ckpt) == step:  # no checkpoint since: systems after it are on disk
                    proc.send_signal(signal.SIGKILL)
                    proc.communicate(timeout=60)
                    return step
                proc.send_signal(signal.SIGCONT)
                baseline = None
        time.sleep(0.02)
    proc.communicate()
    return None


def _by_id(frames):
    ids = [int(a.info["system_id"]) for a in frames]
    assert sorted(ids) == list(range(N)), "every system exactly once"
    return dict(zip(ids, frames, strict=True))


def _same(a, b, exact):
    eq = np.array_equal if exact else (lambda x, y: np.allclose(x, y, rtol=0, atol=1e-7))
    assert eq(a.positions, b.positions)
    assert eq(a.get_velocities(), b.get_velocities())
    assert eq(a.get_forces(), b.get_forces())
    assert a.get_potential_energy() == b.get_potential_energy() or not exact
    assert list(a.info["stage_steps"]) == list(b.info["stage_steps"])
    assert a.info["exit_reason"] == b.info["exit_reason"]


@pytest.mark.slow
def test_a_run_killed_and_resumed_from_its_checkpoint_writes_what_an_uninterrupted_run_writes(
    tmp_path,
):
    # the reference, without checkpoints, runs while the other one is killed
    reference = _start(_job(tmp_path / "reference", every=0))
    job = _job(tmp_path / "killed", every=20)
    out = tmp_path / "killed" / "out"
    for _attempt in range(3):  # a run that ends before it could be killed is started again
        step = _kill_after_two_checkpoints(_start(job), out)
        if step is not None:
            break
        for path in sorted(out.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    assert step is not None, "the run always finished before it could be killed"
    header = read_header(out / "run.zarr.ckpt")
    held = len(zarr_ids(out / "run.zarr"))
    assert header["step_count"] == step >= 40 and held > header["sink_counts"][0]

    resumed = subprocess.run(
        [*CLI, "run", str(job), "--no-progress", "--resume"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    ref_out, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_out + ref_err
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from the checkpoint {out / 'run.zarr.ckpt'} at step {step}" in (
        resumed.stdout
    )
    assert "removed the checkpoint" in resumed.stdout
    assert not (out / "run.zarr.ckpt").exists()

    ref = tmp_path / "reference" / "out"
    exact = _by_id(read_zarr(out / "run.zarr"))
    for sid, a in _by_id(read_zarr(ref / "run.zarr")).items():
        _same(exact[sid], a, exact=True)
    relaxed = _by_id(ase.io.read(out / "relaxed.extxyz", ":"))
    for sid, a in _by_id(ase.io.read(ref / "relaxed.extxyz", ":")).items():
        assert np.array_equal(relaxed[sid].positions, a.positions)
        assert list(relaxed[sid].info["stage_steps"]) == list(a.info["stage_steps"])
