"""Data parallel runs: the systems of a batch spread over a mesh of devices
(docs/semantics.md §21; fused_dynamics/sharding.py).

JAX fixes its device count when it starts, and this process started it with one CPU device, so
the multi-device checks run in subprocesses, all started at once by one module fixture: one
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` running every 4-device
check, and two processes of 2 devices each joined by ``jax.distributed.initialize``. Meanwhile
this process computes the one-device references (the same two runs serve every check).

Tolerance: bitwise. A sharded run executes, per device, the same single-device program on a
local batch; every per-system reduction (segment sums over ``system_idx``, the dense pair block
of each system) sees the same numbers in the same order whatever the slot, atom offset, device
or capacity, and Langevin noise is keyed by (system_id, the system's own step), so each
system's float64 trajectory is identical to the one-device run, not merely close (measured: a
maximum difference of exactly 0 for positions and velocities). With neighbor lists the same
holds: a device's list stores its systems' pairs in the list's canonical order (by atom, then
partner and shift), which within a system does not depend on the atom offset, the other
systems or the capacity, so each system's pair sums run in the same order as on one list.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
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


class SystemTape(fd.Hook):
    """Per call: the step and, by system id, each occupied system's energy, status and the
    positions of its atoms (found through ``system_idx``, so a wrong merge of the devices'
    atoms or slots shows)."""

    log: list = eqx.field(static=True, default_factory=list)
    fields: tuple[str, ...] = eqx.field(
        static=True, default=("energy", "positions", "system_idx"), kw_only=True
    )

    def on_host(self, data):
        per = {
            int(data["system_id"][s]): (
                int(data["status"][s]),
                float(data["energy"][s]),
                data["positions"][data["system_idx"] == s].tolist(),
            )
            for s in np.flatnonzero(data["system_mask"])
        }
        self.log.append((data.step, per))


def by_id(frames) -> dict:
    return {int(a.info["system_id"]): a for a in frames}


def _run(code: str, devices: int = 4, args=()) -> subprocess.Popen:
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


def _check(proc: subprocess.Popen, timeout=900) -> str:
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
    with pytest.raises(ValueError, match="differentiable=True. needs n_steps"):
        fused_stage().run(batch, mesh=mesh, differentiable=True)

    def traced(positions):  # a gradient with respect to a flat batch's positions on a mesh
        b = batch.replace(positions=positions)
        return fd.NVE(LJ, dt=1.0).run(b, n_steps=2, differentiable=True, mesh=mesh).energy.sum()

    with pytest.raises(ValueError, match="must be sharded before it is traced"):
        jax.grad(traced)(batch.positions)
    taped = fused_stage().register_fused_hook(SystemTape(every_n_steps=5))
    with pytest.raises(ValueError, match="does not take hooks that work on the host"):
        taped.run(batch, n_steps=2, mesh=mesh, differentiable=True)
    with pytest.raises(ValueError, match="not sharded"):
        sharding.unshard(batch)


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


# The same two runs everywhere (so this process computes each reference once): a fixed batch
# of 8 systems, FIRE -> Langevin with one temperature per system (per-system parameters go to
# the devices with their systems), and an inflight FIRE -> Langevin run of 20 systems.
def fixed_stage():
    return fused_stage(temperature=np.linspace(20.0, 90.0, 8))


def fixed_batch():
    return fd.Batch.from_atoms(systems(8), max_atoms=8 * 16, max_systems=8)


def inflight_sampler():
    """20 systems, each with its own temperature in ``atoms.info["T"]`` (read by
    :func:`inflight_stage`: the value travels with the system through refills and devices)."""
    atoms = systems(20, seed=1)
    for i, a in enumerate(atoms):
        a.info["T"] = 20.0 + 5.0 * i
    return fd.SizeAwareSampler(atoms, max_atoms=128, max_systems=8, max_atoms_per_system=16)


def inflight_stage():
    return fused_stage(temperature=fd.from_info("T"))


# Neighbor lists (one per device, one slot each): 4 small systems, then 2 compressed crystals
# that arrive with the refills; the lists, sized on the first batch (BlindSampler), overflow and
# grow on every device.
LISTED = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)
LISTED = LISTED.with_neighbors(skin=0.5)


def listed_stage():
    relax = fd.FIRE(LISTED, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=12)
    return relax + fd.NVE(LISTED, dt=4.0, n_steps=6)


class BlindSampler(fd.SizeAwareSampler):
    """A sampler without ``preview_batches`` (as a caller's own may be): the run cannot size
    its lists for the structures still to come, so the denser refills overflow them."""

    preview_batches = None


def listed_sampler():
    atoms = systems(4, seed=2)
    for k in range(2):
        dense = bulk("Ar", "fcc", a=4.9, cubic=True) * (1, 1, 4)
        dense.rattle(0.05, seed=k)
        atoms.append(dense)
    return BlindSampler(atoms, max_atoms=128, max_systems=4, max_atoms_per_system=16)


def listed_run(mesh=None):
    """The inflight run on lists with a stage-exit writer on the relaxation: the frames
    written at the end and as each system left FIRE."""
    from fused_dynamics.inflight import StageExitWriter

    final, relaxed = fd.HostMemory(), fd.HostMemory()
    writer = StageExitWriter(0, 1, relaxed, stage_type="fire")
    fused = listed_stage().register_fused_hook(writer.hook())
    options = {} if mesh is None else {"mesh": mesh}
    fused.run(
        sampler=listed_sampler(), refill_frequency=6, sinks=[final], listeners=[writer], **options
    )
    return final.atoms, relaxed.atoms


def listed_batch():
    """A flat batch carrying its own list (the flat list is not split: each device builds one
    with its cutoff and skin)."""
    return LISTED.attach_neighbors(fixed_batch())


def gradients(mesh=None):
    """``d(sum of final energies)/d(epsilon, positions)`` through a reverse-differentiable
    NVE run of 4 systems (one per device on a mesh of 4): the epsilon derivative and each
    system's position rows, by system id. On a mesh the batch is sharded before it is
    traced (docs/scale-out.md)."""
    batch = fd.Batch.from_atoms(systems(4, seed=3), max_atoms=64, max_systems=4)
    start = batch if mesh is None else sharding.shard(batch, mesh)

    def loss(epsilon, positions):
        model = eqx.tree_at(lambda m: m.epsilon, LJ, epsilon)
        b = start.replace(positions=positions)
        out = fd.NVE(model, dt=2.0).run(b, n_steps=4, differentiable=True, mesh=mesh)
        return jnp.sum(jnp.where(out.system_mask, out.energy, 0.0))

    args = (jnp.asarray(LJ.epsilon), start.positions)
    program = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    d_eps, d_pos = program(*args)
    flat = start.replace(positions=d_pos)
    flat = flat if mesh is None else sharding.unshard(flat)
    rows = {}
    idx, mask = np.asarray(flat.system_idx), np.asarray(flat.atom_mask)
    for slot in np.flatnonzero(np.asarray(flat.system_mask)):
        rows[int(flat.system_id[slot])] = np.asarray(flat.positions)[mask & (idx == slot)]
    return float(d_eps), rows, program.as_text()


FOUR_DEVICES = """
    import os, pickle, re, sys, warnings
    import numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, "tests")
    import fused_dynamics as fd
    from fused_dynamics import sharding
    from test_sharding import (fixed_stage, fixed_batch, inflight_stage, inflight_sampler,
                               _frames_npz, SystemTape, LISTED, listed_run, listed_batch,
                               gradients)
    out = sys.argv[1]
    mesh = Mesh(np.array(jax.devices()), ("systems",))
    # jax.grad through a differentiable run on 4 devices; its program moves no atoms (the
    # only collectives are scalar: the loop's "any device still running", and the sum over
    # devices of d/d epsilon, a parameter every device shares; XLA may make the latter one
    # all-reduce of a tuple of scalars)
    d_eps, rows, hlo = gradients(mesh)
    for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op
    results = re.findall(r"= (.+?) all-reduce(?:-start)?\\(", hlo)
    shapes = [s for r in results for s in r.strip("()").split(", ")]
    assert results and all(re.fullmatch(r"[a-z]+\\d*\\[1?\\]\\S*", s) for s in shapes), shapes
    np.savez(f"{out}/gradients.npz", epsilon=d_eps, ids=sorted(rows),
             positions=np.concatenate([rows[k] for k in sorted(rows)]))
    # the fixed batch
    fused, flat = fixed_stage(), fixed_batch()
    final = fused.run(flat, mesh=mesh)
    assert final.positions.shape == (4, 32, 3) and len(final.positions.sharding.device_set) == 4
    steps = np.asarray(final.step_count).tolist()
    assert steps == [steps[0]] * 4, steps  # every device the same step count
    _frames_npz(f"{out}/fixed.npz", sharding.unshard(final).to_atoms(), steps=steps[0])
    back = sharding.unshard(sharding.shard(flat, mesh))  # a flat batch and back: the same
    assert [a.info["system_id"] for a in back.to_atoms()] == list(range(8))
    more = fused.run(final, n_steps=3, resume=True, mesh=mesh)  # graduated: no step left
    assert int(np.asarray(more.step_count)[0]) == steps[0]
    # the compiled step moves no atoms: no all-gather, only scalar all-reduces
    hlo = sharding.chunk_hlo(sharding.prepare(fused, sharding.unshard(final)), final, mesh)
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert "collective-permute" not in hlo
    reductions = [l for l in hlo.splitlines() if re.search(r"= \\S+ all-reduce\\(", l)]
    shapes = [re.search(r"= (\\S+) all-reduce", l).group(1) for l in reductions]
    assert reductions and all(re.fullmatch(r"[su]\\d+\\[1?\\]\\S*", s) for s in shapes), shapes
    print("all-reduce shapes", shapes)
    # a host hook on 4 devices: each device records its systems, the host merges them
    tape = SystemTape(every_n_steps=5)
    fused.register_fused_hook(tape).run(flat, mesh=mesh)
    with open(f"{out}/tape.pkl", "wb") as fh:
        pickle.dump(tape.log, fh)
    # the inflight run; then one checkpointed after 3 visits, stopped and resumed
    fused = inflight_stage()
    sink = fd.HostMemory()
    fused.run(sampler=inflight_sampler(), refill_frequency=8, sinks=[sink], mesh=mesh)
    _frames_npz(f"{out}/inflight.npz", sink.atoms)
    path = os.path.join(out, "run.ckpt")
    part = fd.HostMemory()
    run = fused.start(sampler=inflight_sampler(), refill_frequency=8, sinks=[part], mesh=mesh)
    with run:
        for _ in range(3):
            run.advance()
            run.refill_check()
        run.save(path)
    written = len(part)
    assert 0 < written < 20, written
    fused.run(sampler=inflight_sampler(), refill_frequency=8, sinks=[part], mesh=mesh,
              resume=path)
    _frames_npz(f"{out}/resumed.npz", part.atoms, written=written)
    # neighbor lists, one per device: an inflight run whose denser refills overflow them (grown
    # on every device, the chunk redone), and a flat batch carrying its own list
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listed, relaxed = listed_run(mesh)
    assert any("overflowed" in str(c.message) for c in caught), caught
    _frames_npz(f"{out}/listed.npz", listed)
    _frames_npz(f"{out}/listed_relaxed.npz", relaxed)
    final = fd.NVE(LISTED, dt=4.0).run(listed_batch(), n_steps=6, mesh=mesh)
    assert final.neighbors.senders.shape[0] == 4  # a list per device
    _frames_npz(f"{out}/listed_fixed.npz", sharding.unshard(final).to_atoms())
    print("ok")
    """

TWO_PROCESSES = """
    import pickle, sys
    import numpy as np
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid
    )
    from jax.sharding import Mesh
    sys.path.insert(0, "tests")
    import fused_dynamics as fd
    from fused_dynamics import sharding
    from test_sharding import (fixed_stage, fixed_batch, inflight_stage, inflight_sampler,
                               _frames_npz, SystemTape)
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    mesh = Mesh(np.array(jax.devices()), ("systems",))
    final = sharding.unshard(fixed_stage().run(fixed_batch(), mesh=mesh))
    if pid == 0:
        _frames_npz(f"{out}/fixed2.npz", final.to_atoms(), steps=int(final.step_count))
    tape = SystemTape(every_n_steps=5)  # delivered on process 0, from every process's devices
    fixed_stage().register_fused_hook(tape).run(fixed_batch(), mesh=mesh)
    assert bool(tape.log) == (pid == 0), (pid, len(tape.log))
    if pid == 0:
        with open(f"{out}/tape2.pkl", "wb") as fh:
            pickle.dump(tape.log, fh)
    sink = fd.HostMemory()
    inflight_stage().run(sampler=inflight_sampler(), refill_frequency=8, sinks=[sink], mesh=mesh)
    _frames_npz(f"{out}/inflight{pid}.npz", sink.atoms)
    print("ok")
    """


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every subprocess started at once (they and this process's references overlap): one
    process of 4 devices, and two processes of 2 devices each (jax.distributed on
    localhost); then the one-device references here."""
    out = tmp_path_factory.mktemp("sharding")
    port = _free_port()
    procs = {"four": _run(FOUR_DEVICES, args=[out])}
    procs["two"] = [_run(TWO_PROCESSES, devices=2, args=[i, port, out]) for i in range(2)]
    ref = fixed_stage().run(fixed_batch())
    one = fd.HostMemory()
    inflight_stage().run(sampler=inflight_sampler(), refill_frequency=8, sinks=[one])
    tape = SystemTape(every_n_steps=5)
    fixed_stage().register_fused_hook(tape).run(fixed_batch())
    with pytest.warns(RuntimeWarning, match="overflowed"):
        listed, relaxed = listed_run()
    listed_fixed = fd.NVE(LISTED, dt=4.0).run(listed_batch(), n_steps=6)
    references = {
        "listed": by_id(listed),
        "listed_relaxed": by_id(relaxed),
        "listed_fixed": listed_fixed.to_atoms(),
        "gradients": gradients(),
    }
    return out, procs, ref, by_id(one.atoms), tape.log, references


@pytest.mark.slow
def test_four_devices_equal_one_device_move_no_atoms_and_resume(runs):
    """4 devices: the fixed batch (a temperature per system) and the inflight run (each
    system written once) per system bit for bit as on one device, the same step count; the
    compiled step has no all-gather and its only collectives are scalar reductions; an
    inflight run stopped at a checkpoint and resumed writes the rest, each system once; with
    neighbor lists (one per device, grown on overflow), inflight and fixed, the same bits as
    the one-device run on its one list, and a stage-exit writer on 4 devices writes each
    system once as it left FIRE, as on one device."""
    out, procs, ref, one, tape, references = runs
    print(_check(procs["four"]))
    fixed = np.load(out / "fixed.npz")
    assert int(fixed["steps"]) == int(ref.step_count)
    _assert_npz_equal(fixed, ref.to_atoms())
    for name in ("inflight", "resumed"):
        got = np.load(out / f"{name}.npz")
        ids = got["ids"].tolist()
        assert sorted(ids) == list(range(20)), (name, ids)  # every system exactly once
        _assert_npz_equal(got, [one[i] for i in ids])
    for name in ("listed", "listed_relaxed"):  # final frames; each as it left FIRE
        got = np.load(out / f"{name}.npz")
        assert sorted(got["ids"].tolist()) == list(range(6)), name
        _assert_npz_equal(got, [references[name][i] for i in got["ids"].tolist()])
    _assert_npz_equal(np.load(out / "listed_fixed.npz"), references["listed_fixed"])
    # a host hook on 4 devices receives, merged, what it receives on one (bit for bit)
    with open(out / "tape.pkl", "rb") as fh:
        four = pickle.load(fh)
    assert (
        [step for step, _ in four]
        == [step for step, _ in tape]
        == list(range(0, 40, 5))[: len(tape)]
    )
    assert four == tape


@pytest.mark.slow
def test_grad_through_a_run_on_four_devices_equals_one_device(runs):
    """``jax.grad`` of the final energies with respect to a model parameter and to the
    positions, through a reverse-differentiable run (``differentiable=True``) on 4
    devices (a program with no all-gather: each device differentiates its own systems),
    equals the one-device gradient. Tolerance: 1e-12 relative; each system's arithmetic is its
    own on either layout, and only the loss's sum over systems runs in another order (over the
    devices' slots). Measured: equal bit for bit."""
    out, procs, *_, references = runs
    print(_check(procs["four"]))
    got = np.load(out / "gradients.npz")
    d_eps, rows, _ = references["gradients"]
    np.testing.assert_allclose(float(got["epsilon"]), d_eps, rtol=1e-12, atol=0)
    assert got["ids"].tolist() == sorted(rows) == list(range(4))
    want = np.concatenate([rows[k] for k in sorted(rows)])
    np.testing.assert_allclose(got["positions"], want, rtol=1e-12, atol=1e-15)
    assert np.abs(want).max() > 1e-3  # the gradient is not trivially zero


@pytest.mark.slow
def test_two_processes_run_one_sharded_batch(runs):
    """Two processes of 2 CPU devices each (jax.distributed on localhost) run the fixed batch
    over the 4-device global mesh, equal to the one-device run, then an inflight run from
    (replicas of) one sampler: each process writes the systems of its own devices, together
    every system exactly once, each equal to the one-device inflight run."""
    out, procs, ref, one, tape, _ = runs
    for proc in procs["two"]:
        _check(proc)
    fixed = np.load(out / "fixed2.npz")
    assert int(fixed["steps"]) == int(ref.step_count)
    _assert_npz_equal(fixed, ref.to_atoms())
    with open(out / "tape2.pkl", "rb") as fh:
        assert pickle.load(fh) == tape  # a host hook over two processes: as on one device
    parts = [np.load(out / f"inflight{i}.npz") for i in range(2)]
    ids = [i for p in parts for i in p["ids"].tolist()]
    assert sorted(ids) == list(range(20)) and all(len(p["ids"]) for p in parts), ids
    for p in parts:
        _assert_npz_equal(p, [one[i] for i in p["ids"].tolist()])
