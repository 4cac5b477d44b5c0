"""Data parallel runs: the systems of a batch spread over a mesh of devices
(docs/semantics.md §21; fused_dynamics/sharding.py).

JAX fixes its device count when it starts, and this process started it with one CPU device, so
every check runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(or two processes of 2 devices each joined by ``jax.distributed.initialize``).

Tolerance: bitwise. A sharded run executes, per device, the same single-device program on a
local batch; every per-system reduction (segment sums over ``system_idx``, the dense pair block
of each system) sees the same numbers in the same order whatever the slot, atom offset, device
or capacity, and Langevin noise is keyed by (system_id, the system's own step), so each
system's float64 trajectory is identical to the one-device run, not merely close (measured: a
maximum difference of exactly 0 for positions and velocities).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron
from jax.sharding import Mesh

import fused_dynamics as fd
from fused_dynamics import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)


def systems(n: int, seed: int = 0) -> list:
    """Small perturbed argon clusters (8-13 atoms) and periodic crystals (4-16 atoms)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            a = bulk("Ar", "fcc", a=5.3, cubic=True) * (1, 1, int(rng.integers(1, 5)))
        else:
            a = Icosahedron("Ar", 2)[: int(rng.integers(8, 14))]
            a.cell = np.zeros((3, 3))
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        out.append(a)
    return out


def fused_stage(md: str = "langevin", n_md: int = 12, temperature=40.0):
    relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=40)
    if md == "nve":
        return relax + fd.NVE(LJ, dt=4.0, n_steps=n_md)
    return relax + fd.NVTLangevin(
        LJ, dt=4.0, temperature=temperature, friction=0.02, seed=7, n_steps=n_md
    )


def by_id(frames) -> dict:
    return {int(a.info["system_id"]): a for a in frames}


def assert_same_systems(got, ref, last_stages: int | None = None) -> float:
    """Per system (by id): bitwise equal positions and velocities, equal stage steps (of the
    last ``last_stages`` sub-stages of ``ref``: a pipeline's final stage counts only its own)."""
    got, ref = by_id(got), by_id(ref)
    assert sorted(got) == sorted(ref)
    worst = 0.0
    for k, a in got.items():
        b = ref[k]
        np.testing.assert_array_equal(a.positions, b.positions, err_msg=f"system {k}")
        np.testing.assert_array_equal(a.get_velocities(), b.get_velocities())
        steps = list(b.info["stage_steps"])
        assert list(a.info["stage_steps"]) == steps[-(last_stages or len(steps)) :], k
        worst = max(worst, float(np.abs(a.positions - b.positions).max()))
    return worst


def _run(code: str, devices: int = 4, args=(), timeout=400) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env["OPENBLAS_NUM_THREADS"] = "1"
    prelude = "import jax\njax.config.update('jax_enable_x64', True)\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check(proc: subprocess.Popen, timeout=400) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "ok" in out, (out[-2000:], err[-4000:])
    return out


def test_bad_mesh_and_unsupported_options_are_refused_before_compiling():
    batch = fd.Batch.from_atoms(systems(2))
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        fused_stage().run(batch, mesh="gpu")
    with pytest.raises(ValueError, match="one axis"):
        fused_stage().run(batch, mesh=Mesh(np.array(jax.devices()), ("d",)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("systems",))
    with pytest.raises(ValueError, match="differentiable"):
        fused_stage().run(batch, n_steps=2, mesh=mesh, differentiable=True)
    listed = fd.NVE(LJ.with_neighbors(skin=0.5), dt=1.0, n_steps=2)
    with pytest.raises(ValueError, match="neighbor list"):
        listed.run(batch, mesh=mesh)
    with pytest.raises(ValueError, match="not sharded"):
        sharding.unshard(batch)


def test_fixed_batch_sharded_equals_one_device_and_moves_no_atoms():
    """4 devices: a FIRE -> Langevin fixed batch (a temperature per system) per system bit for
    bit as on one device; the compiled step has no all-gather and its only collectives are
    scalar reductions."""
    code = """
        import re
        import numpy as np
        from jax.sharding import Mesh
        import fused_dynamics as fd
        from fused_dynamics import sharding
        from tests.test_sharding import systems, fused_stage, assert_same_systems
        mesh = Mesh(np.array(jax.devices()), ("systems",))
        # one temperature per system: per-system parameters go to the devices with the systems
        fused = fused_stage(temperature=np.linspace(20.0, 90.0, 8))
        flat = fd.Batch.from_atoms(systems(8), max_atoms=8 * 16, max_systems=8)
        ref = fused.run(flat)
        out = fused.run(flat, mesh=mesh)
        assert out.positions.shape == (4, 32, 3) and len(out.positions.sharding.device_set) == 4
        assert np.asarray(out.step_count).tolist() == [int(ref.step_count)] * 4
        print("worst", assert_same_systems(sharding.unshard(out).to_atoms(), ref.to_atoms()))
        # a flat batch and back: the same
        back = sharding.unshard(sharding.shard(flat, mesh))
        assert [a.info["system_id"] for a in back.to_atoms()] == list(range(8))
        # resume=True continues the sharded batch
        more = fused.run(out, n_steps=3, resume=True, mesh=mesh)
        assert int(np.asarray(more.step_count)[0]) == int(ref.step_count)
        hlo = sharding.chunk_hlo(sharding.prepare(fused, sharding.unshard(out)), out, mesh)
        assert "all-gather" not in hlo and "all-to-all" not in hlo
        assert "collective-permute" not in hlo
        reductions = [l for l in hlo.splitlines() if re.search(r"= \\S+ all-reduce\\(", l)]
        shapes = [re.search(r"= (\\S+) all-reduce", l).group(1) for l in reductions]
        assert reductions and all(re.fullmatch(r"[su]\\d+\\[1?\\]\\S*", s) for s in shapes), shapes
        print("all-reduce shapes", shapes)
        # host callbacks of hooks are ordered effects: JAX runs them on one device only
        hooked = fused.register_fused_hook(fd.LoggingHook(every_n_steps=5))
        try:
            hooked.run(flat, mesh=mesh)
            raise AssertionError("a hook with a host callback ran on 4 devices")
        except ValueError as exc:
            assert "ordered host callback" in str(exc), exc
        print("ok")
        """
    out = _check(_run(code))
    print(out)


def test_inflight_sharded_every_system_once_equal_to_one_device_and_resumes(tmp_path):
    """40 systems from one sampler over 4 devices: each written once, each equal (bitwise) to
    the one-device inflight run; a run stopped at a checkpoint and resumed writes the rest."""
    code = """
        import os, sys
        import numpy as np
        from jax.sharding import Mesh
        import fused_dynamics as fd
        from tests.test_sharding import systems, fused_stage, assert_same_systems
        mesh = Mesh(np.array(jax.devices()), ("systems",))
        fused = fused_stage()
        data = systems(40, seed=1)

        def sampler():
            return fd.SizeAwareSampler(data, max_atoms=128, max_systems=8, max_atoms_per_system=16)

        one, many = fd.HostMemory(), fd.HostMemory()
        s1 = fused.run(sampler=sampler(), refill_frequency=8, sinks=[one])
        s4 = fused.run(sampler=sampler(), refill_frequency=8, sinks=[many], mesh=mesh)
        ids = [a.info["system_id"] for a in many.atoms]
        assert sorted(ids) == list(range(40)), ids
        print("worst", assert_same_systems(many.atoms, one.atoms), s1.steps, s4.steps)
        # checkpoint, stop, resume
        path = os.path.join(sys.argv[1], "run.ckpt")
        part = fd.HostMemory()
        run = fused.start(sampler=sampler(), refill_frequency=8, sinks=[part], mesh=mesh)
        with run:
            for _ in range(3):
                run.advance()
                run.refill_check()
            run.save(path)
        written = len(part)
        assert 0 < written < 40
        fused.run(sampler=sampler(), refill_frequency=8, sinks=[part], mesh=mesh, resume=path)
        assert sorted(a.info["system_id"] for a in part.atoms) == list(range(40))
        assert_same_systems(part.atoms, one.atoms)
        print("resumed after", written, "written")
        print("ok")
        """
    out = _check(_run(code, args=[tmp_path]))
    print(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frames_npz(path, frames, **extra) -> None:
    np.savez(
        path,
        ids=[a.info["system_id"] for a in frames],
        positions=np.concatenate([a.positions for a in frames]),
        velocities=np.concatenate([a.get_velocities() for a in frames]),
        **extra,
    )


def _assert_npz_equal(got, frames) -> None:
    assert got["ids"].tolist() == [a.info["system_id"] for a in frames]
    np.testing.assert_array_equal(got["positions"], np.concatenate([a.positions for a in frames]))
    np.testing.assert_array_equal(
        got["velocities"], np.concatenate([a.get_velocities() for a in frames])
    )


def inflight_sampler():
    return fd.SizeAwareSampler(systems(20, seed=1), max_atoms=64, max_systems=4)


def test_two_processes_run_one_sharded_batch(tmp_path):
    """Two processes of 2 CPU devices each (jax.distributed on localhost) run one fused batch
    over the 4-device global mesh, then an inflight run from (replicas of) one sampler; the
    fixed batch equals this process's one-device run; in the inflight run each process writes
    the systems of its own devices: together every system exactly once, each equal to the
    one-device inflight run."""
    code = """
        import sys
        import numpy as np
        pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid
        )
        from jax.sharding import Mesh
        import fused_dynamics as fd
        from fused_dynamics import sharding
        from tests.test_sharding import systems, fused_stage, inflight_sampler, _frames_npz
        assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
        mesh = Mesh(np.array(jax.devices()), ("systems",))
        flat = fd.Batch.from_atoms(systems(8), max_atoms=8 * 16, max_systems=8)
        final = sharding.unshard(fused_stage("nve").run(flat, mesh=mesh))
        if pid == 0:
            _frames_npz(f"{out}/fixed.npz", final.to_atoms(), steps=int(final.step_count))
        sink = fd.HostMemory()
        fused_stage("nve").run(sampler=inflight_sampler(), refill_frequency=8, sinks=[sink],
                               mesh=mesh)
        _frames_npz(f"{out}/inflight{pid}.npz", sink.atoms)
        print("ok")
        """
    port = _free_port()
    procs = [_run(code, devices=2, args=[i, port, tmp_path]) for i in range(2)]
    # the references on this process's one device, while the two processes run
    flat = fd.Batch.from_atoms(systems(8), max_atoms=8 * 16, max_systems=8)
    ref = fused_stage("nve").run(flat)
    one = fd.HostMemory()
    fused_stage("nve").run(sampler=inflight_sampler(), refill_frequency=8, sinks=[one])
    for proc in procs:
        _check(proc)
    fixed = np.load(tmp_path / "fixed.npz")
    assert int(fixed["steps"]) == int(ref.step_count)
    _assert_npz_equal(fixed, ref.to_atoms())
    parts = [np.load(tmp_path / f"inflight{i}.npz") for i in range(2)]
    ids = [i for p in parts for i in p["ids"].tolist()]
    assert sorted(ids) == list(range(20)) and all(len(p["ids"]) for p in parts), ids
    ref_by_id = by_id(one.atoms)
    for p in parts:
        _assert_npz_equal(p, [ref_by_id[i] for i in p["ids"].tolist()])
