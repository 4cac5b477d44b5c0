"""The driver: any Equinox model or hook under the default compile, resume with the step count,
checkpoints, and the live run (docs/semantics.md §8, §18, §19, §20)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics import checkpoint as ckpt

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)


def clusters(n, seed=0, sizes=(5, 13)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = Icosahedron("Ar", 2)[: int(rng.integers(*sizes, endpoint=True))]
        a.cell = np.zeros((3, 3))
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        out.append(a)
    return out


def batch_of(atoms, max_systems=4):
    return fd.Batch.from_atoms(atoms, max_atoms=13 * max_systems, max_systems=max_systems)


def relax_then_md(model=LJ, n_md=12, **kw):
    relax = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=40)
    md = fd.NVTLangevin(model, dt=4.0, temperature=40.0, friction=0.02, seed=3, n_steps=n_md)
    return fd.FusedStage([relax, md], **kw)


# ----------------------------------------------------------------- any Equinox model or hook
class MLPCorrected(fd.models.Model):
    """Lennard-Jones plus a small neural correction per atom: its activation functions are
    non-array leaves, which ``jax.jit`` of the whole fused stage cannot take."""

    base: fd.models.Model
    mlp: eqx.nn.MLP

    def energy(self, batch):
        x = batch.positions[:, :1] / 10.0
        per_atom = jax.vmap(self.mlp)(x)[:, 0]
        return self.base.energy(batch) + 1e-3 * batch.sum_atoms(
            jnp.where(batch.atom_mask, per_atom, 0.0)
        )


class Labelled(fd.Hook):
    """A hook with a plain (non-static) string field."""

    label: str = "every third step"
    seen: list = eqx.field(static=True, default_factory=list)
    every_n_steps: int = eqx.field(static=True, default=3, kw_only=True)

    def on_host(self, data):
        self.seen.append((self.label, data.step))


@pytest.mark.slow
def test_equinox_mlp_model_and_string_hook_run_compiled_fixed_and_inflight():
    mlp = eqx.nn.MLP(1, 1, 8, 2, activation=jax.nn.softplus, key=jax.random.PRNGKey(0))
    model = MLPCorrected(base=LJ, mlp=jax.tree_util.tree_map(lambda x: x, mlp))
    hook = Labelled()
    fused = relax_then_md(model, n_md=6, compile_step=True).register_fused_hook(hook)
    out = fused.run(batch_of(clusters(3)))
    assert np.all(np.asarray(out.info["exit_reason"])[:3] > 0)
    jax.effects_barrier()
    assert hook.seen and all(label == "every third step" for label, _ in hook.seen)
    assert all(step % 3 == 0 for _, step in hook.seen)
    sink = fd.HostMemory()
    sampler = fd.SizeAwareSampler(clusters(6, seed=1), max_atoms=26, max_systems=2)
    stats = fused.run(sampler=sampler, sinks=[sink], refill_frequency=5)
    assert isinstance(stats, fd.RunStats) and stats.steps > 0
    assert sorted(a.info["system_id"] for a in sink.atoms) == list(range(6))
    # the correction is really in the forces: they differ from plain LJ's
    plain = LJ(batch_of(clusters(1))).forces
    assert not np.allclose(model(batch_of(clusters(1))).forces, plain, atol=1e-8)


def test_non_hook_objects_are_refused_with_the_expected_base_class():
    with pytest.raises(TypeError, match="fused_dynamics.Hook"):
        relax_then_md().register_fused_hook(lambda batch: batch)
    with pytest.raises(TypeError, match="Hook"):
        fd.FusedStage([fd.NVE(LJ, dt=1.0)], hooks=["not a hook"])


# ----------------------------------------------------------------- resume: §8
class StepLog(fd.Hook):
    log: list = eqx.field(static=True)
    every_n_steps: int = eqx.field(static=True, default=3, kw_only=True)

    def on_host(self, data):
        self.log.append(data.step)


def test_resumed_run_fires_hooks_at_the_same_steps_and_draws_the_same_noise():
    md = fd.NVTLangevin(LJ, dt=4.0, temperature=60.0, friction=0.05, seed=11)
    one, two = [], []
    batch = batch_of(clusters(3, seed=2))
    whole = fd.FusedStage([md], hooks=[StepLog(log=one)]).run(batch, n_steps=20)
    halves = fd.FusedStage([md], hooks=[StepLog(log=two)])
    first = halves.run(batch, n_steps=10)
    assert int(first.step_count) == 10
    second = halves.run(first, n_steps=10, resume=True)
    jax.effects_barrier()
    assert int(second.step_count) == int(whole.step_count) == 20
    assert one == two == [0, 3, 6, 9, 12, 15, 18]
    # same Langevin noise (keyed by system and its own step): bit for bit
    np.testing.assert_array_equal(np.asarray(second.positions), np.asarray(whole.positions))
    np.testing.assert_array_equal(np.asarray(second.velocities), np.asarray(whole.velocities))


# ----------------------------------------------------------------- checkpoints: §19
@pytest.mark.slow
@pytest.mark.parametrize("path_kind", ["dense", "neighbors"])
def test_checkpoint_of_a_fixed_batch_resumes_bit_for_bit(tmp_path, path_kind):
    path = tmp_path / "run.ckpt"
    model = LJ.with_neighbors(1.0) if path_kind == "neighbors" else LJ
    fused = relax_then_md(model, n_md=30)
    batch = batch_of(clusters(4, seed=5))
    if path_kind == "neighbors":
        batch = model.attach_neighbors(batch)
    ref_run = fused.start(batch, refill_frequency=10)
    ref_run.run_to_end()
    run = fused.start(batch, refill_frequency=10, checkpoint=path, checkpoint_every=20)
    while run.step_count < 20:
        run.advance()
    run.advance()  # a checkpoint due at the current step is written before the next chunk
    assert ckpt.read_header(path)["step_count"] == 20 and run.step_count > 20
    resumed = fused.run(resume=path)
    assert int(resumed.step_count) == ref_run.step_count
    for name in ("positions", "velocities", "forces", "energy", "status"):
        np.testing.assert_array_equal(
            np.asarray(getattr(resumed, name)), np.asarray(getattr(ref_run.batch, name)), name
        )
    for key in ("stage_steps", "exit_reason"):
        np.testing.assert_array_equal(resumed.info[key], ref_run.batch.info[key])
    if path_kind == "neighbors":  # the list (and its rebuild schedule) continued too
        assert int(resumed.neighbors.rebuilds) == int(ref_run.batch.neighbors.rebuilds)


def test_checkpoint_is_refused_by_another_fused_stage_and_bad_options(tmp_path):
    path = tmp_path / "run.ckpt"
    fused = relax_then_md(n_md=5)
    fused.run(batch_of(clusters(2)), checkpoint=path, checkpoint_every=5)
    assert ckpt.read_header(path)["step_count"] > 0
    with pytest.raises(ValueError, match="another fused stage"):
        fd.FusedStage([fd.NVE(LJ, dt=1.0, n_steps=3)]).run(resume=path)
    with pytest.raises(ValueError, match="checkpoint_every"):
        fused.run(batch_of(clusters(2)), checkpoint=path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        fused.run(resume=tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="give no batch"):
        fused.run(batch_of(clusters(2)), resume=path)
    (tmp_path / "junk.ckpt").write_text("hello\n")
    with pytest.raises(ValueError, match="not a fused_dynamics checkpoint"):
        fused.run(resume=tmp_path / "junk.ckpt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous checkpoint whole and no temporary file."""
    path = tmp_path / "run.ckpt"
    fused = relax_then_md(n_md=5)
    out = fused.run(batch_of(clusters(2)))
    ckpt.save(path, out, {"step_count": 1})
    before = path.read_bytes()

    def broken(f, tree):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.eqx, "tree_serialise_leaves", broken)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(path, out, {"step_count": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


# ----------------------------------------------------------------- the live run: §20
def test_live_run_driven_by_hand_gives_the_results_of_run():
    data = clusters(14, seed=7, sizes=(4, 13))
    fused = relax_then_md(n_md=15)

    def sampler():
        return fd.SizeAwareSampler(data, max_atoms=52, max_systems=4, max_atoms_per_system=13)

    auto = fd.HostMemory()
    stats = fused.run(sampler=sampler(), sinks=[auto], refill_frequency=5)
    manual = fd.HostMemory()
    refills = 0
    with fused.start(sampler=sampler(), sinks=[manual], refill_frequency=5) as run:
        assert run.inflight_mode and run.active_batch_size == 4 and not run.active_batch_has_room
        steps = []
        while not run.all_complete:
            run.advance()
            steps.append(run.step_count)
            if run.room_in_active_batch > 2 or run.active_batch_size == 0:
                refills += run.refill_check() > 0
        run.refill_check()
        assert run.all_complete and run.active_batch_size == 0
    assert steps == sorted(steps) and run.stats.steps == run.step_count
    assert refills >= 2
    assert run.step_count != stats.steps  # refilled later, so the schedule differs
    got = {a.info["system_id"]: a for a in manual.atoms}
    ref = {a.info["system_id"]: a for a in auto.atoms}
    assert sorted(got) == sorted(ref) == list(range(14))
    for sid, a in ref.items():
        # per system, bit for bit: a system's arithmetic does not depend on its slot, its atom
        # offset or when it was admitted (its Langevin noise is keyed by its id and own step)
        np.testing.assert_array_equal(got[sid].positions, a.positions)
        np.testing.assert_array_equal(got[sid].get_velocities(), a.get_velocities())
        assert got[sid].info["stage_steps"] == a.info["stage_steps"]


def test_live_run_with_checkpoints_writes_them_and_completes(tmp_path):
    path = tmp_path / "run.ckpt"
    sink = fd.HostMemory()
    sampler = fd.SizeAwareSampler(clusters(6, seed=3), max_atoms=26, max_systems=2)
    fused = relax_then_md(n_md=8)
    with fused.start(
        sampler=sampler, sinks=[sink], refill_frequency=4, checkpoint=path, checkpoint_every=10
    ) as run:
        for _ in range(1000):
            if run.all_complete:
                break
            run.advance()
            if run.room_in_active_batch > 0:
                run.refill_check()
        assert run.all_complete
    assert sorted(a.info["system_id"] for a in sink.atoms) == list(range(6))
    assert run.stats.checkpoints == run.step_count // 10 >= 2
    assert ckpt.read_header(path)["step_count"] == 10 * run.stats.checkpoints


@pytest.mark.slow
def test_n_steps_counts_steps_of_this_call_on_every_path(tmp_path):
    """``n_steps`` is the number of steps a call may take, with or without sinks/checkpoints."""
    md = fd.FusedStage([fd.NVTLangevin(LJ, dt=4.0, temperature=40.0, friction=0.02)])
    first = md.run(batch_of(clusters(2)), n_steps=10)
    assert int(md.run(first, n_steps=10, resume=True).step_count) == 20
    out = md.run(first, n_steps=10, resume=True, sinks=[fd.HostMemory()])
    assert int(out.step_count) == 20
    path = tmp_path / "md.ckpt"
    out = md.run(first, n_steps=10, resume=True, checkpoint=path, checkpoint_every=5)
    assert int(out.step_count) == 20 and ckpt.read_header(path)["step_count"] == 20
    # without n_steps a never-graduating run goes on to where the checkpointed call would stop
    # a batch the run returned goes on writing the run's checkpoint; an earlier one may not
    # (it would replace the later state, docs/semantics.md §19)
    assert (
        int(md.run(out, n_steps=5, resume=True, checkpoint=path, checkpoint_every=5).step_count)
        == 25
    )
    assert ckpt.read_header(path)["step_count"] == 25
    assert int(md.run(resume=path, n_steps=5).step_count) == 30
    with pytest.raises(FileExistsError, match="resume=True"):
        md.start(first, resume=True, n_steps=10, checkpoint=path, checkpoint_every=5)
    again = tmp_path / "again.ckpt"
    run = md.start(first, resume=True, n_steps=10, checkpoint=again, checkpoint_every=5)
    run.advance(5)
    run.advance(1)  # the checkpoint of step 15 is written before this chunk
    assert ckpt.read_header(again)["step_count"] == 15
    assert int(md.run(resume=again).step_count) == 20


class FailingOnce:
    """A sink whose first write fails (a full disk, say)."""

    def __init__(self):
        self.atoms, self.failed = [], False

    def has_room(self, n=1):
        return True

    def write(self, frames):
        if not self.failed:
            self.failed = True
            raise OSError("disk full")
        self.atoms.extend(frames)

    def system_ids(self):
        return [a.info["system_id"] for a in self.atoms]

    def close(self):
        pass


def test_a_failed_sink_write_loses_no_system():
    sink = FailingOnce()
    sampler = fd.SizeAwareSampler(clusters(6, seed=4), max_atoms=26, max_systems=2)
    run = relax_then_md(n_md=5).start(sampler=sampler, sinks=[sink], refill_frequency=5)
    with pytest.raises(OSError, match="disk full"):
        run.run_to_end()
    run.run_to_end()  # the caller freed space and carries on
    assert sorted(a.info["system_id"] for a in sink.atoms) == list(range(6))


class Options(fd.Hook):
    """Python bool and int fields used in Python control flow stay static under compilation."""

    verbose: bool = False
    repeats: int = 2
    seen: list = eqx.field(static=True, default_factory=list)

    def on_host(self, data):
        for _ in range(self.repeats):
            if not self.verbose:
                self.seen.append(data.step)


def test_bool_and_int_hook_fields_are_static_under_the_default_compile():
    hook = Options()
    fused = fd.FusedStage([fd.NVE(LJ, dt=1.0, n_steps=3)], hooks=[hook])
    fused.run(batch_of(clusters(2)))
    jax.effects_barrier()
    assert hook.seen == [0, 0, 1, 1, 2, 2]


def test_resume_refuses_other_parameters_or_another_dataset(tmp_path):
    path = tmp_path / "run.ckpt"
    data = clusters(4, seed=8)

    def sampler(atoms):
        return fd.SizeAwareSampler(atoms, max_atoms=26, max_systems=2)

    fused = relax_then_md(n_md=30)
    run = fused.start(
        sampler=sampler(data), sinks=[fd.HostMemory()], checkpoint=path, checkpoint_every=5
    )
    run.advance(5)
    run.advance()
    assert ckpt.read_header(path)["step_count"] == 5
    other_dt = fd.FusedStage(
        [
            fused.stages[0],
            fd.NVTLangevin(LJ, dt=2.0, temperature=40.0, friction=0.02, seed=3, n_steps=30),
        ]
    )
    with pytest.raises(ValueError, match="another fused stage"):
        other_dt.run(sampler=sampler(data), sinks=[fd.HostMemory()], resume=path)
    moved = [a.copy() for a in data]
    moved[1].positions += 0.01
    with pytest.raises(ValueError, match="dataset"):
        fused.run(sampler=sampler(moved), sinks=[fd.HostMemory()], resume=path)
    stats = fused.run(sampler=sampler(data), sinks=[fd.HostMemory()], resume=path)
    assert stats.checkpoints >= 1


def test_a_run_never_replaces_a_file_at_its_checkpoint_path(tmp_path):
    """docs/semantics.md §19: ``checkpoint=PATH`` is refused before anything runs when a file
    is there (a user's file, or the checkpoint of a run that did not finish, re-run without
    ``resume``), and the file keeps every byte; ``resume=PATH`` with the same path goes on
    writing it; ``Run.save`` replaces only a checkpoint."""
    fused = relax_then_md(n_md=20)
    mine = tmp_path / "thesis.tex"
    mine.write_text("\\section{Results}\n")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        fused.run(batch_of(clusters(2)), checkpoint=mine, checkpoint_every=5)
    with pytest.raises(FileExistsError, match="thesis.tex"):
        queue = fd.SizeAwareSampler(clusters(3), max_atoms=26, max_systems=2)
        fused.run(sampler=queue, sinks=[fd.HostMemory()], checkpoint=mine, checkpoint_every=5)
    assert mine.read_text() == "\\section{Results}\n"
    path = tmp_path / "run.ckpt"
    run = fused.start(batch_of(clusters(2)), refill_frequency=5, checkpoint=path,
                      checkpoint_every=5)  # fmt: skip
    run.advance()
    run.advance()  # the checkpoint of step 5 is written; the run stops here, unfinished
    saved = path.read_bytes()
    with pytest.raises(FileExistsError, match="resume=PATH"):
        fused.run(batch_of(clusters(2)), checkpoint=path, checkpoint_every=5)
    assert path.read_bytes() == saved
    with pytest.raises(FileExistsError, match="not a fused_dynamics checkpoint"):
        run.save(mine)
    assert mine.read_text() == "\\section{Results}\n"
    run.save(path)  # a checkpoint is replaced by a checkpoint
    at = ckpt.read_header(path)["step_count"]
    link = tmp_path / "link.ckpt"  # a link to a checkpoint: replaced, its target kept
    link.symlink_to(path)
    done = fused.run(resume=link, checkpoint=link, checkpoint_every=5)  # goes on writing it
    assert at < ckpt.read_header(link)["step_count"] <= int(done.step_count)
    assert not link.is_symlink() and ckpt.read_header(path)["step_count"] == at


def test_bad_checkpoint_paths_and_damaged_files_are_named(tmp_path):
    fused = relax_then_md(n_md=5)
    # a missing folder is created (as for every output), before anything runs
    fused.run(batch_of(clusters(2)), checkpoint=tmp_path / "new" / "c", checkpoint_every=5)
    assert ckpt.read_header(tmp_path / "new" / "c")["step_count"] > 0
    with pytest.raises(IsADirectoryError, match="directory"):
        fused.run(batch_of(clusters(2)), checkpoint=tmp_path, checkpoint_every=5)
    path = tmp_path / "run.ckpt"
    fused.run(batch_of(clusters(2)), checkpoint=path, checkpoint_every=5)
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="damaged"):
        fused.run(resume=tmp_path / "cut.ckpt")
    (tmp_path / "long.ckpt").write_bytes(data + b"x")
    with pytest.raises(ValueError, match="damaged"):
        fused.run(resume=tmp_path / "long.ckpt")
