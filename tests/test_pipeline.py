"""Pipelines: ``a | b`` runs each stage on its own device group; graduates of one stage become
entries of the next through a bounded buffer, moved between the groups with ``jax.device_put``
(docs/semantics.md §16; fused_dynamics/pipeline.py, fused_dynamics/pipeline_transfer.py).

The runs over device groups happen in subprocesses started together (this process started JAX
with one device): one with 4 forced CPU devices (two groups of 2), and two processes of 2
devices each joined by ``jax.distributed`` (one stage each; graduates cross in a ``ppermute``,
fused_dynamics/pipeline_remote.py). This process computes the reference, the fused run
``fire + nvt`` on one device, meanwhile.

Each system carries its own FIRE budget and Langevin temperature in ``atoms.info``.

The two-process pipeline sums over neighbor lists (each device keeps its own; the second
stage's lists are sized for the whole dataset before it compiles) and is compared with the fused
run on lists.

Tolerance: bitwise. A system's arithmetic in the pipeline is that of the fused run: its FIRE
steps are the same; it leaves FIRE at rest in both; it enters NVT with fresh stage state and
forces evaluated at the same positions (the fused run's ``migration.enter``, the pipeline's
admission); its row moves between the groups as a copy (``jax.device_put`` or a ``ppermute``,
then a scatter of the same values); Langevin noise is keyed by (system_id, the system's own
step). On lists, a system's pairs are summed in the same order whichever list holds them (pairs
beyond the cutoff add exact zeros). Measured: a maximum difference of exactly 0.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_sharding import (  # tests/ is on pytest's path
    LJ,
    _check,
    _free_port,
    _run,
    by_id,
    systems,
)

import fused_dynamics as fd
from fused_dynamics.pipeline import DistributedPipeline

N_SYSTEMS = 500  # the sampler size
N_SMALL = 48  # the first 48 of them through a buffer of 1, and checkpointed and resumed


LISTED = LJ.with_neighbors(skin=1.0)  # the two-process pipeline sums over neighbor lists


def stages(model=LJ):
    """FIRE with each system's own budget, then Langevin at each system's own temperature,
    both read from ``atoms.info`` (``fd.from_info``): the temperature, read by the second
    stage only, travels in the rows (docs/semantics.md §14a, §16)."""
    relax = fd.FIRE(
        model, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=fd.from_info("budget")
    )
    md = fd.NVTLangevin(
        model, dt=4.0, temperature=fd.from_info("T"), friction=0.02, seed=7, n_steps=12
    )
    return relax, md


def sampler(n: int = N_SYSTEMS):
    atoms = systems(n, seed=2)
    for i, a in enumerate(atoms):
        a.info["budget"] = 20 + 3 * (i % 8)
        a.info["T"] = 20.0 + 7.0 * (i % 11)
    return fd.SizeAwareSampler(atoms, max_atoms=256, max_systems=16, max_atoms_per_system=16)


def test_or_builds_a_pipeline_and_checks_its_arguments(tmp_path):
    relax, md = stages()
    for pipe in (relax | md, (relax + md) | md, (relax | md) | md):
        assert isinstance(pipe, DistributedPipeline)
    assert len((relax | md | md).stages) == 3
    pipe = relax | md
    assert pipe.is_first_stage and pipe.is_final_stage  # one process holds every stage
    assert len(pipe.stage_devices) == 2  # one device here: the stages share it
    with pytest.raises(ValueError, match="buffer_size"):
        DistributedPipeline(pipe.stages, buffer_size=0)
    with pytest.raises(ValueError, match="one non-empty group per stage"):
        pipe.with_devices([[]])
    with pytest.raises(ValueError, match="sink"):
        pipe.run(sampler(1), [])
    with pytest.raises(ValueError, match="go together"):
        pipe.run(sampler(1), [fd.HostMemory()], checkpoint=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no pipeline checkpoint"):
        pipe.run(sampler(1), [fd.HostMemory()], resume=tmp_path / "none")
    # a checkpoint never replaces what it did not write (docs/semantics.md §19)
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "data.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="results"):
        pipe.run(sampler(1), [fd.HostMemory()], checkpoint=mine, checkpoint_every=1)
    pipe.start(sampler(1), [fd.HostMemory()])
    for where in (mine, tmp_path / "ckpt"):
        if where != mine:
            (tmp_path / "ckpt.previous").write_text("keep")  # not a checkpoint either
        with pytest.raises(FileExistsError, match="not a pipeline checkpoint"):
            pipe.save(where)
    assert (mine / "data.txt").read_text() == "keep"
    assert (tmp_path / "ckpt.previous").read_text() == "keep"
    assert not (tmp_path / "ckpt").exists()
    # a "DIR.previous" (a user's, or the one whole checkpoint of a run killed between two
    # renames) refuses a run that does not resume from DIR
    with pytest.raises(FileExistsError, match="ckpt.previous"):
        pipe.run(sampler(1), [fd.HostMemory()], checkpoint=tmp_path / "ckpt", checkpoint_every=1)
    # a save's leftovers are its own folders only: a user's names that look alike stay
    (tmp_path / "new.tmp-notes").mkdir()
    (tmp_path / "new.tmp-list.txt").write_text("keep")
    pipe.save(tmp_path / "new")
    pipe.save(tmp_path / "new")  # a pipeline checkpoint is replaced by the next
    assert (tmp_path / "new" / "pipeline.json").is_file()
    assert (tmp_path / "new.tmp-notes").is_dir()
    assert (tmp_path / "new.tmp-list.txt").read_text() == "keep"


CODE = """
    import sys
    sys.path.insert(0, "tests")
    import fused_dynamics as fd
    from fused_dynamics.pipeline import DistributedPipeline
    from test_pipeline import N_SMALL, stages, sampler
    from test_sharding import _frames_npz
    out = sys.argv[1]
    relax, md = stages()
    devices = jax.devices()
    groups = [devices[:2], devices[2:]]
    pipe = (relax | md).with_devices(groups)
    for size, n in ((64, None), (1, N_SMALL)):
        sink = fd.HostMemory()
        with DistributedPipeline(pipe.stages, devices=groups, buffer_size=size) as p:
            p.start(sampler() if n is None else sampler(n), [sink], refill_frequency=10)
            seen = set()
            while not p.round():
                for sid, n, row in p.buffers[0].queue:  # rows wait on the sender's devices
                    seen |= {d.id for x in row.values() for d in x.devices()}
            stats = [r.stats for r in p._runs]
        if size > 1:  # (with a buffer of 1 the receiver takes each row in the round it came)
            assert seen and seen <= {d.id for d in groups[0]}, seen
        assert p.buffers[0].received == len(sink) and p.buffers[0].peak <= size
        print("buffer", size, "steps", [s.steps for s in stats], "peak", p.buffers[0].peak)
        _frames_npz(f"{out}/buffer{size}.npz", sink.atoms)

    # checkpoints after rounds 3 and 5 (the second replaces the first), one more round (its
    # graduates reach the sink after the checkpoint), stop; resume with the same sink
    part = fd.HostMemory()
    p = DistributedPipeline(pipe.stages, devices=groups, buffer_size=4)
    p.start(sampler(N_SMALL), [part], refill_frequency=10)
    for r in range(5):
        p.round()
        if r in (2, 4):
            p.save(f"{out}/ckpt")
    waiting = len(p.buffers[0])
    p.round()
    before = len(part)
    assert 0 < before < N_SMALL, before
    DistributedPipeline(pipe.stages, devices=groups, buffer_size=4).run(
        sampler(N_SMALL), [part], refill_frequency=10, resume=f"{out}/ckpt"
    )
    print("written before the resume", before, "rows waiting at the checkpoint", waiting)
    _frames_npz(f"{out}/resumed.npz", part.atoms)
    print("ok")
    """


TWO_PROCESSES = """
    import sys
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid
    )
    sys.path.insert(0, "tests")
    import fused_dynamics as fd
    from fused_dynamics.pipeline import DistributedPipeline
    from test_pipeline import LISTED, N_SMALL, stages, sampler
    from test_sharding import _frames_npz
    relax, md = stages(LISTED)
    groups = [[d for d in jax.devices() if d.process_index == i] for i in range(2)]
    assert len(groups[0]) == len(groups[1]) == 2
    pipe = (relax | md).with_devices(groups)
    # a host hook of the second stage runs on that stage's process (process 1)
    log = fd.LoggingHook(f"{out}/log{pid}.csv", every_n_steps=10)
    pipe = DistributedPipeline((pipe.stages[0], pipe.stages[1].register_fused_hook(log)))
    pipe = pipe.with_devices(groups)
    assert pipe.is_first_stage == (pid == 0) and pipe.is_final_stage == (pid == 1)
    sink = fd.HostMemory()
    import warnings
    with warnings.catch_warnings():  # the lists were sized for the dataset: none overflows
        warnings.filterwarnings("error", message=".*neighbor list overflowed")
        with DistributedPipeline(pipe.stages, devices=groups, buffer_size=2) as p:
            stats = p.run(sampler(N_SMALL), [sink], refill_frequency=10)
    assert (stats[0] is None) == (pid == 1) and (stats[1] is None) == (pid == 0)
    if len(sink):
        _frames_npz(f"{out}/process{pid}.npz", sink.atoms)
    print("process", pid, "wrote", len(sink), "rounds", p.rounds)

    # checkpoints in parts (ckpt/process<i>) after rounds 3 and 5; then, as if the run were
    # killed while process 1 renamed its round-5 part (process 0 still holds its round-3 part
    # as the previous one), process 1 holds round 3 only; one more round, stop, resume: from
    # round 3, the latest round both hold, with the same sink
    import shutil
    ckpt, keep = f"{out}/ckpt", f"{out}/keep{pid}"
    part = fd.HostMemory()
    p = DistributedPipeline(pipe.stages, devices=groups, buffer_size=2)
    p.start(sampler(N_SMALL), [part], refill_frequency=10)
    for r in range(5):
        p.round()
        if r == 2:
            p.save(ckpt)
            shutil.copytree(f"{ckpt}/process{pid}", keep)
        if r == 4:
            p.save(ckpt)
    p.round()
    mine = f"{ckpt}/process{pid}"
    shutil.move(mine, mine + ".old") if pid == 1 else None
    shutil.move(keep, mine if pid == 1 else mine + ".previous")
    before = len(part)
    with DistributedPipeline(pipe.stages, devices=groups, buffer_size=2) as p:
        p.start(sampler(N_SMALL), [part], refill_frequency=10, resume=ckpt)
        assert p.rounds == 3, p.rounds  # the latest round both processes hold whole
        while not p.round():
            pass
    print("process", pid, "wrote", before, "before the resume,", len(part), "in all")
    if len(part):
        _frames_npz(f"{out}/resumed{pid}.npz", part.atoms)

    # something at one process's checkpoint path only: every process refuses, so none is left
    # waiting at a barrier for the one that raised (each process its own path here)
    import os
    import pytest
    mine = f"{out}/clash{pid}"
    if pid == 1:
        os.makedirs(f"{mine}/process1")
        with open(f"{mine}/process1/notes.txt", "w") as f:
            f.write("keep")
    with DistributedPipeline(pipe.stages, devices=groups, buffer_size=2) as p:
        with pytest.raises(FileExistsError):
            p.run(sampler(N_SMALL), [fd.HostMemory()], checkpoint=mine, checkpoint_every=1)
        p.start(sampler(N_SMALL), [fd.HostMemory()], refill_frequency=10)
        with pytest.raises(FileExistsError):
            p.save(mine)
        taken = f"{out}/file{pid}"  # a file at one process's DIR (not a folder of parts)
        if pid == 1:
            with open(taken, "w") as f:
                f.write("keep")
        with pytest.raises(FileExistsError):
            p.save(taken)
    if pid == 1:
        with open(f"{mine}/process1/notes.txt") as f:
            assert f.read() == "keep"
    print("ok")
    """


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every subprocess started at once: one process of 4 devices (two groups of 2), and two
    processes of 2 devices each (jax.distributed on localhost, one stage each); meanwhile the
    reference here, the fused run ``fire + nvt`` of the 500 systems on one device."""
    out = tmp_path_factory.mktemp("pipeline")
    port = _free_port()
    procs = [_run(CODE, args=[out])]
    procs += [_run(TWO_PROCESSES, devices=2, args=[i, port, out]) for i in range(2)]
    relax, md = stages()
    ref = fd.HostMemory()
    (relax + md).run(sampler=sampler(), refill_frequency=10, sinks=[ref])
    relax, md = stages(LISTED)
    listed = fd.HostMemory()
    (relax + md).run(sampler=sampler(N_SMALL), refill_frequency=10, sinks=[listed])
    return out, procs, by_id(ref.atoms), by_id(listed.atoms)


def _assert_equal_to(ref: dict, got, name: str) -> list:
    ids = got["ids"].tolist()
    frames = [ref[i] for i in ids]
    np.testing.assert_array_equal(
        got["positions"], np.concatenate([a.positions for a in frames]), err_msg=name
    )
    np.testing.assert_array_equal(
        got["velocities"], np.concatenate([a.get_velocities() for a in frames]), err_msg=name
    )
    return ids


@pytest.mark.slow
def test_fire_then_nvt_over_two_device_groups_equals_the_fused_run_and_resumes(runs):
    """``fire | nvt`` on 2 + 2 devices: 500 systems through a buffer of 64 and the first 48
    through a buffer of 1 (back-pressure) each reach the sink exactly once, equal to the fused
    run; rows wait in the buffer on the sender's devices; a pipeline of the 48 checkpointed,
    run on (writing more systems to the sink), stopped and resumed with the same sink writes
    every system exactly once, equal to the fused run (so to the uninterrupted pipeline)."""
    out, procs, ref, _ = runs
    print(_check(procs[0]))
    for name, n in (("buffer64", N_SYSTEMS), ("buffer1", N_SMALL), ("resumed", N_SMALL)):
        ids = _assert_equal_to(ref, np.load(out / f"{name}.npz"), name)
        assert sorted(ids) == list(range(n)), name  # every system exactly once


@pytest.mark.slow
def test_fire_then_nvt_on_two_processes(runs):
    """``fire | nvt`` with each stage on its own process (2 devices each, jax.distributed on
    localhost), a buffer of 2, both stages summing over neighbor lists (each device keeps its
    own; the second stage's are sized for the whole dataset before it compiles): graduates
    cross between the processes in a ``ppermute`` of fixed-size buffers; the final stage's
    process writes every system exactly once, equal to the fused run on lists, and calls its
    host hook (a log). Checkpointed
    in parts (one per process) and resumed, from the round before when one process's latest
    part is missing (a run killed between the two processes' writes), the same holds. A
    checkpoint path that one process finds taken is refused by both (none waits at a barrier
    for the one that raised)."""
    out, procs, _, ref = runs
    for proc in procs[1:]:
        print(_check(proc))
    assert not (out / "log0.csv").exists()  # the second stage's hook: on its own process
    assert len((out / "log1.csv").read_text().splitlines()) > 2
    for name in ("process", "resumed"):
        assert not (out / f"{name}0.npz").exists()  # nothing failed: every system went on
        ids = _assert_equal_to(ref, np.load(out / f"{name}1.npz"), f"two processes, {name}")
        assert sorted(ids) == list(range(N_SMALL)), name
