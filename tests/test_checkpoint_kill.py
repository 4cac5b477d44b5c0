"""A run killed with SIGKILL continues from its last checkpoint (docs/semantics.md §19).

An inflight run of 300 systems writes a checkpoint every 20 steps; it is killed with SIGKILL
after at least two checkpoints and resumed from Python in a new process. The sink then holds
every system exactly once, each bit for bit as an uninterrupted run without checkpoints wrote
it (float64, a zarr store: binary values, no text rounding), and the resumed run ends at the
step count of an uninterrupted run with them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fused_dynamics import checkpoint as ckpt
from fused_dynamics import read_zarr
from fused_dynamics.sinks import zarr_ids

SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from ase.cluster import Icosahedron
    import fused_dynamics as fd

    mode, store, path = sys.argv[1:4]
    rng = np.random.default_rng(0)
    data = []
    for _ in range(300):
        a = Icosahedron("Ar", 2)[: int(rng.integers(2, 14))]
        a.cell = np.zeros((3, 3))
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        data.append(a)
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)
    relax = fd.FIRE(lj, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=60)
    md = fd.NVTLangevin(lj, dt=4.0, temperature=40.0, friction=0.02, seed=5, n_steps=60)
    sampler = fd.SizeAwareSampler(data, max_atoms=96, max_systems=8, max_atoms_per_system=13)
    options = dict(sampler=sampler, refill_frequency=10)
    if mode == "plain":
        options["sinks"] = [fd.ZarrSink(store)]
    elif mode == "fresh":
        options.update(sinks=[fd.ZarrSink(store)], checkpoint=path, checkpoint_every=20)
    else:
        options.update(
            sinks=[fd.ZarrSink(store, mode="a")], checkpoint=path, checkpoint_every=20,
            resume=path,
        )
    stats = (relax + md).run(**options)
    print("steps", stats.steps, "checkpoints", stats.checkpoints, flush=True)
    """
)


def _python(tmp_path, *args, **kw):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
    # the three processes compile the same programs: the resumed one loads them from JAX's
    # cache in the test's own folder, as a rerun of a user's job would (the same executable,
    # so the same bits)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _by_id(store) -> dict:
    frames = read_zarr(store)
    ids = [int(a.info["system_id"]) for a in frames]
    assert len(ids) == len(set(ids)), "a system written twice"
    return dict(zip(ids, frames, strict=True))


@pytest.mark.slow
def test_sigkilled_inflight_run_resumes_from_its_checkpoint(tmp_path):
    ck = tmp_path / "run.ckpt"
    killed = _python(tmp_path, "fresh", tmp_path / "killed.zarr", ck)
    reference = _python(tmp_path, "plain", tmp_path / "reference.zarr", tmp_path / "none")
    # the same run with its checkpoints, uninterrupted: checkpoints admit refills by a priming
    # pass of their own, so its step count (not its numbers) may differ from the plain run's
    steady = _python(tmp_path, "fresh", tmp_path / "steady.zarr", tmp_path / "steady.ckpt")
    deadline = time.monotonic() + 600
    store = tmp_path / "killed.zarr"
    step = 0
    # kill after two checkpoints, at a moment when the store holds systems written after the
    # last one (the resumed run must not write them again)
    while time.monotonic() < deadline and killed.poll() is None:
        if ck.exists():
            header = ckpt.read_header(ck)
            step = header["step_count"]
            if step >= 40 and len(zarr_ids(store)) > header["stats"]["written"]:
                killed.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    assert killed.wait() == -signal.SIGKILL, f"the run was not killed: {killed.communicate()}"
    assert step >= 40
    header = ckpt.read_header(ck)
    assert len(zarr_ids(store)) > header["stats"]["written"], "nothing written after it"
    assert header["step_count"] % 20 == 0 and header["sampler"]["queue"], "killed mid-run"
    resumed = _python(tmp_path, "resume", tmp_path / "killed.zarr", ck)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    out_ref, err_ref = reference.communicate(timeout=600)
    assert reference.returncode == 0, err_ref
    got, ref = _by_id(tmp_path / "killed.zarr"), _by_id(tmp_path / "reference.zarr")
    assert sorted(got) == sorted(ref) == list(range(300)), "every system exactly once"
    for sid, a in ref.items():
        b = got[sid]
        np.testing.assert_array_equal(b.positions, a.positions, err_msg=str(sid))
        np.testing.assert_array_equal(b.get_velocities(), a.get_velocities(), err_msg=str(sid))
        assert b.get_potential_energy() == a.get_potential_energy(), sid
        assert b.info["stage_steps"] == a.info["stage_steps"], sid
        assert b.info["exit_reason"] == a.info["exit_reason"], sid
    # the resumed process went on from the checkpoint's step count, not from 0, and took the
    # steps of the run that was never killed (docs/semantics.md §19)
    out_steady, err_steady = steady.communicate(timeout=600)
    assert steady.returncode == 0, err_steady
    assert int(out.split()[1]) == int(out_steady.split()[1])
