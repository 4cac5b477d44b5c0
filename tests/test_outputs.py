"""Outputs never destroy work and carry what users need (README: "Command line"; the rules are
in the docstrings of fused_dynamics.sinks, fused_dynamics.provenance and fused_dynamics.cli).

Most tests touch no compiled code: sinks, provenance, the sampler's ids and the output plan of
the command line. Two small float64 runs check stage outputs and that a structure's trajectory
does not depend on the other structures of its file when ids come from an input key.
"""

from __future__ import annotations

import json
import os

import ase
import ase.io
import numpy as np
import pytest
import zarr
from ase.calculators.singlepoint import SinglePointCalculator
from ase.cluster import Icosahedron
from typer.testing import CliRunner

import fused_dynamics as fd
from fused_dynamics.application import _describe_problems, _problems, _with_stress
from fused_dynamics.cli import app, plan_outputs, summarize_output
from fused_dynamics.config import ConfigError, build_fused, validate_config
from fused_dynamics.provenance import copy_provenance, exit_reason_legend
from fused_dynamics.sinks import (
    check_writable,
    read_extxyz_ids,
    read_zarr,
    set_aside_tail,
    zarr_ids,
)

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)


def cluster(seed: int, n: int = 13) -> ase.Atoms:
    a = Icosahedron("Ar", 2)[:n]
    a.center(vacuum=5.0)
    a.rattle(0.05, seed=seed)
    return a


def result_frame(sid: int, exit_reason=fd.ExitReason.CONVERGED, stress=None) -> ase.Atoms:
    """An output as the run makes it: calculator results and the run's info keys."""
    a = cluster(sid)
    a.arrays.pop("tags", None)  # the engine writes no tags
    a.set_velocities(np.full((len(a), 3), 0.01))
    results = {"energy": -0.5 - sid, "forces": np.full((len(a), 3), 0.1 * sid)}
    if stress is not None:
        results["stress"] = np.asarray(stress, float)
    a.calc = SinglePointCalculator(a, **results)
    a.info.update(system_id=sid, status=2, exit_reason=int(exit_reason), stage_steps=[3, 5])
    return a


# ============================================================================ provenance
def test_provenance_copies_info_arrays_and_results_and_renames_clashes():
    src = cluster(0)
    src.info.update(name="ico", energy=-1.25, system_id=77, tags_note="x")
    src.set_tags(np.arange(len(src)))
    src.arrays["label"] = np.array([f"a{i}" for i in range(len(src))])
    src.calc = SinglePointCalculator(src, energy=-3.0, forces=np.ones((len(src), 3)))
    out = result_frame(5)
    copy_provenance(src, out, source_index=4, source_file="in.extxyz", system_id=5)
    assert out.info["name"] == "ico" and out.info["tags_note"] == "x"
    # keys the engine writes keep the engine's value; the input's is kept under input_
    assert out.info["system_id"] == 5 and out.info["input_system_id"] == 77
    assert out.info["input_energy"] == -1.25  # the input's info["energy"]
    assert out.info["input_input_energy"] == -3.0  # ... and its calculator's energy
    assert out.get_potential_energy() == -5.5  # the engine's result untouched
    np.testing.assert_array_equal(out.get_tags(), np.arange(len(src)))
    assert out.arrays["label"][3] == "a3"
    np.testing.assert_array_equal(out.arrays["input_forces"], np.ones((len(src), 3)))
    assert out.info["source_index"] == 4 and out.info["source_file"] == "in.extxyz"
    with pytest.raises(ValueError, match="12 atoms and the output 13"):
        copy_provenance(cluster(1, n=12), result_frame(1))


def test_provenance_never_shares_arrays_with_the_input():
    src = cluster(0)
    src.arrays["charge_guess"] = np.zeros(len(src))
    out = copy_provenance(src, result_frame(0))
    src.arrays["charge_guess"][0] = 9.0
    assert out.arrays["charge_guess"][0] == 0.0


# ============================================================================ sampler ids
def test_id_key_gives_ids_and_names_the_bad_frame(tmp_path):
    frames = [cluster(i) for i in range(4)]
    for seed, a in zip([40, 10, 30, 20], frames, strict=True):
        a.info["seed"] = seed
    s = fd.SizeAwareSampler(frames, max_atoms=64, max_systems=2, id_key="seed")
    assert s.ids.tolist() == [40, 10, 30, 20]
    assert [sid for sid, _ in s.take(64, 2)] == [40, 10]  # handed out in dataset order
    # a file: the message names the frame and the file
    path = tmp_path / "in.extxyz"
    frames[2].info["seed"] = 10
    ase.io.write(path, frames)
    with pytest.raises(ValueError, match=r"frame 2 of .*in.extxyz.* same as frame 1"):
        fd.SizeAwareSampler(path, max_atoms=64, max_systems=2, id_key="seed")
    for bad, rule in ((-1, r"\[0, "), (2.5, "must be an integer"), ("7", "must be an integer")):
        frames[2].info["seed"] = bad
        with pytest.raises(ValueError, match=rf"structure 2 has info\['seed'\] = .*{rule}"):
            fd.SizeAwareSampler(frames, max_atoms=64, max_systems=2, id_key="seed")
    del frames[2].info["seed"]
    with pytest.raises(ValueError, match=r"structure 2 has no info\['seed'\]"):
        fd.SizeAwareSampler(frames, max_atoms=64, max_systems=2, id_key="seed")


def test_skip_leaves_out_written_systems_also_rejected_ones():
    frames = [cluster(i) for i in range(5)]
    frames[3] = cluster(3) * (2, 2, 2)  # 104 atoms: rejected
    s = fd.SizeAwareSampler(frames, max_atoms=64, max_systems=4)
    assert [i for i, _ in s.rejected] == [3]
    assert s.skip([0, 3, 99]) == 2  # an unknown id is ignored
    assert s.take_rejected() == []
    assert [sid for sid, _ in s.take(64, 4)] == [1, 2, 4]


def test_annotate_adds_source_of_a_file(tmp_path):
    frames = [cluster(i) for i in range(3)]
    for i, a in enumerate(frames):
        a.info["name"] = f"c{i}"
    ase.io.write(tmp_path / "in.extxyz", frames)
    s = fd.SizeAwareSampler(tmp_path / "in.extxyz", max_atoms=64, max_systems=2)
    (out,) = s.annotate([result_frame(2)])
    assert out.info["name"] == "c2" and out.info["source_index"] == 2
    assert out.info["source_file"] == os.fspath(tmp_path / "in.extxyz")


# ============================================================================ extxyz sink
def test_extxyz_sink_refuses_existing_paths_and_directories(tmp_path):
    old = tmp_path / "old.extxyz"
    old.write_text("precious")
    with pytest.raises(FileExistsError, match="never overwritten silently"):
        fd.ExtXYZSink(old)
    for mode in ("x", "a", "w"):
        with pytest.raises((IsADirectoryError, FileExistsError)):
            fd.ExtXYZSink(tmp_path, mode=mode)
    assert old.read_text() == "precious"
    sink = fd.ExtXYZSink(old, mode="w")
    assert old.read_text() == "precious"  # replaced by the first write, not before
    sink.write([result_frame(0)])
    assert [a.info["system_id"] for a in ase.io.read(old, ":")] == [0]


def test_extxyz_sink_writes_names_units_header_stress_and_appends(tmp_path):
    path = tmp_path / "out.extxyz"
    sink = fd.ExtXYZSink(path, metadata={"run_config": {"seed": 3}})
    with_stress = result_frame(1, stress=[1e-3, 2e-3, 3e-3, 0, 0, 4e-4])
    failed = result_frame(2, fd.ExitReason.FAILED)
    failed.info.update(failure="FORCES,POSITIONS", failure_step=7)
    ok = result_frame(0)
    ok.info.update(failure="", failure_step=-1)
    sink.write([with_stress, failed])
    sink.write([ok])
    assert not path.with_name("out.extxyz.incomplete-tail").exists()
    fd.ExtXYZSink(path, mode="a").write([result_frame(3)])
    frames = ase.io.read(path, ":")
    assert [a.info["system_id"] for a in frames] == [1, 2, 0, 3]
    assert [a.info["exit_reason_name"] for a in frames] == [
        "converged",
        "failed",
        "converged",
        "converged",
    ]
    assert frames[1].info["failure"] == "FORCES,POSITIONS" and frames[1].info["failure_step"] == 7
    assert "failure" not in frames[2].info  # an empty name is left out (ASE cannot read key=)
    np.testing.assert_allclose(frames[0].get_stress(), [1e-3, 2e-3, 3e-3, 0, 0, 4e-4])
    assert "stress" not in frames[2].calc.results  # not computed: absent, never zeros
    for a in frames:
        assert "eV/Å³" in a.info["units"] and a.info["fused_dynamics_version"]
    # the first frame of each sink carries the legend and the metadata
    assert json.loads(frames[0].info["run_config"]) == {"seed": 3}
    assert "3=failed" in frames[0].info["exit_reason_legend"]
    assert "run_config" not in frames[1].info
    assert "exit_reason_legend" in frames[3].info


def test_a_frame_cut_short_is_found_and_moved_aside_not_deleted(tmp_path):
    path = tmp_path / "out.extxyz"
    fd.ExtXYZSink(path).write([result_frame(i) for i in range(3)])
    whole = path.read_bytes()
    cut = whole[: len(whole) - 40]  # the last frame cut inside its atom lines
    path.write_bytes(cut)
    ids, complete, size = read_extxyz_ids(path)
    assert ids == [0, 1] and size == len(cut) and complete < size
    side = set_aside_tail(path, complete)
    assert path.read_bytes() + open(side, "rb").read() == cut  # every byte kept
    assert [a.info["system_id"] for a in ase.io.read(path, ":")] == [0, 1]
    assert read_extxyz_ids(path) == ([0, 1], complete, complete)


# ============================================================================ zarr sink
def test_zarr_sink_round_trip_attributes_and_committed_records(tmp_path):
    path = tmp_path / "out.zarr"
    with pytest.raises(ValueError, match="never deleted"):
        fd.ZarrSink(path, mode="w")
    src = cluster(1)
    src.set_tags(np.arange(13))
    first = copy_provenance(src, result_frame(1, stress=[1e-3, 2e-3, 3e-3, 0, 0, 4e-4]))
    first.info.update(name="ico", failure="", failure_step=-1)
    sink = fd.ZarrSink(path, metadata={"run_config": "{}"})
    sink.write([first, result_frame(2, fd.ExitReason.BUDGET)])
    with pytest.raises(FileExistsError):
        fd.ZarrSink(path)
    root = zarr.open_group(path, mode="r")
    assert root.attrs["units"]["stress"].startswith("eV/Å³")
    assert root.attrs["exit_reason_legend"] == {str(k): v for k, v in exit_reason_legend().items()}
    assert root.attrs["metadata"] == {"run_config": "{}"} and root.attrs["fused_dynamics_version"]
    # a write cut short by a kill: rows past the committed count are not systems
    arr = zarr.open_group(path, mode="r+")["system_id"]
    arr.resize((3,))
    assert zarr_ids(path) == [1, 2] and len(fd.read_zarr(path)) == 2
    more = fd.ZarrSink(path, mode="a")
    more.write([result_frame(4)])
    back = fd.read_zarr(path)
    assert [a.info["system_id"] for a in back] == [1, 2, 4]
    assert back[0].info["name"] == "ico" and back[0].info["exit_reason_name"] == "converged"
    assert back[1].info["exit_reason_name"] == "budget"
    np.testing.assert_array_equal(back[0].get_tags(), np.arange(13))
    np.testing.assert_allclose(back[0].get_stress(), [1e-3, 2e-3, 3e-3, 0, 0, 4e-4])
    assert "stress" not in back[1].calc.results
    np.testing.assert_array_equal(back[2].positions, result_frame(4).positions)


def test_check_writable_probes_instead_of_trusting_os_access(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "out.extxyz")  # folders are made
    assert (tmp_path / "new" / "deeper").is_dir()
    assert os.listdir(tmp_path / "new" / "deeper") == []  # the probe is gone
    with pytest.raises(PermissionError, match="cannot write in '/proc'"):
        check_writable("/proc/out.extxyz")


# ============================================================================ the output plan
def job_toml(output: str, extra: str = "") -> str:
    """A small command-line job, as TOML: NVE on ``in.extxyz``, written to ``output``."""
    return (
        'structures = {path = "in.extxyz"}\n'
        'model = {type = "lennard_jones", sigma = 3.4, epsilon = 0.01, cutoff = 6.0}\n'
        "capacity = {max_atoms = 64, max_systems = 2}\n"
        '[[stages]]\ntype = "nve"\ndt = 2.0\nn_steps = 2\n'
        f'[[outputs]]\ntype = "extxyz"\npath = "{output}"\n' + extra
    )


def job(tmp_path, **extra):
    ase.io.write(tmp_path / "in.extxyz", [cluster(i) for i in range(3)])
    data = {
        "structures": {"path": "in.extxyz"},
        "model": {"type": "lennard_jones", "sigma": 3.4, "epsilon": 0.01, "cutoff": 6.0},
        "stages": [
            {"type": "fire", "fmax": 0.05, "n_steps": 20, "write": "out/relaxed.extxyz"},
            {"type": "nve", "dt": 2.0, "n_steps": 3},
        ],
        "capacity": {"max_atoms": 64, "max_systems": 2},
        "outputs": [{"type": "extxyz", "path": "out/run.extxyz"}],
        "report": {"plot": "out/run.png"},
    }
    data.update(extra)
    return validate_config(data, base_dir=tmp_path)


def test_plan_refuses_existing_outputs_naming_key_path_and_options(tmp_path):
    cfg = job(tmp_path)
    plans = plan_outputs(cfg, tmp_path)
    assert [(p.key, p.action) for p in plans] == [
        ("outputs[0].path", "new"),
        ("stages[0].write", "new"),
        ("report.plot", "new"),
        ("checkpoint_every", "new"),  # the checkpoint, next to the first output
    ]
    assert plans[-1].path == tmp_path / "out" / "run.extxyz.ckpt"
    fd.ExtXYZSink(tmp_path / "out" / "run.extxyz").write([result_frame(0)])
    with pytest.raises(
        ConfigError, match=r"outputs\[0\]\.path: .*run.extxyz.* exists.*--resume.*--overwrite"
    ):
        plan_outputs(cfg, tmp_path)
    by_key = {p.key: p for p in plan_outputs(cfg, tmp_path, resume=True)}
    assert by_key["outputs[0].path"].action == "resume"
    assert by_key["outputs[0].path"].written == {0}
    assert plan_outputs(cfg, tmp_path, overwrite=True)[0].action == "overwrite"
    (tmp_path / "out" / "run.png").write_bytes(b"png")
    assert {p.key: p.action for p in plan_outputs(cfg, tmp_path, resume=True)}["report.plot"] == (
        "keep"
    )
    with pytest.raises(ConfigError, match="exclude each other"):
        plan_outputs(cfg, tmp_path, overwrite=True, resume=True)


def test_plan_never_replaces_a_directory_or_an_input(tmp_path):
    for path in (".", "out"):
        (tmp_path / "out").mkdir(exist_ok=True)
        cfg = job(tmp_path, outputs=[{"type": "extxyz", "path": path}])
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(ConfigError, match="directory is never deleted or replaced"):
                plan_outputs(cfg, tmp_path, **flags)
    cfg = job(tmp_path, outputs=[{"type": "zarr", "path": "out/run.zarr"}])
    fd.ZarrSink(tmp_path / "out" / "run.zarr").write([result_frame(0)])
    with pytest.raises(ConfigError, match="zarr store, a directory: it is never deleted"):
        plan_outputs(cfg, tmp_path, overwrite=True)
    assert plan_outputs(cfg, tmp_path, resume=True)[0].written == {0}
    cfg = job(tmp_path, outputs=[{"type": "extxyz", "path": "in.extxyz"}])
    with pytest.raises(ConfigError, match="is an input structure file"):
        plan_outputs(cfg, tmp_path, overwrite=True, inputs=cfg.structures.files(tmp_path))
    cfg = job(tmp_path, report={"plot": "out/relaxed.extxyz"})
    with pytest.raises(ConfigError, match=r"report.plot and stages\[0\].write are the same path"):
        plan_outputs(cfg, tmp_path)


def _fake_checkpoint(path, **header):
    """A file with a checkpoint's header (the planner reads nothing else)."""
    from fused_dynamics import checkpoint as ckpt

    header = {
        "inflight": True,
        "step_count": 40,
        "sink_counts": [1],
        "layout": {"max_atoms": 64, "max_systems": 2, "dtype": "float32"},
        **header,
    }
    text = json.dumps(header).encode()
    path.write_bytes(f"{ckpt.FORMAT} {ckpt.VERSION} {len(text)}\n".encode() + text)
    return path


def test_plan_of_the_checkpoint_fresh_resume_overwrite_and_what_it_must_fit(tmp_path):
    cfg = job(tmp_path)
    ck = tmp_path / "out" / "run.extxyz.ckpt"
    plan_outputs(cfg, tmp_path)  # makes the folder
    fd.ExtXYZSink(tmp_path / "out" / "run.extxyz", metadata=_run_config(cfg)).write(
        [result_frame(0)]
    )
    _fake_checkpoint(ck)
    # a run that did not finish: refused without a flag, naming both
    with pytest.raises(
        ConfigError, match=r"checkpoint: .*run.extxyz.ckpt.* exists.*--resume.*--overwrite"
    ):
        plan_outputs(cfg, tmp_path)
    assert plan_outputs(cfg, tmp_path, overwrite=True)[-1].action == "overwrite"
    plan = plan_outputs(cfg, tmp_path, resume=True)[-1]
    assert (plan.key, plan.action, plan.header["step_count"]) == ("checkpoint_every", "resume", 40)
    # a checkpoint continues only the run that wrote it
    _fake_checkpoint(ck, layout={"max_atoms": 64, "max_systems": 3, "dtype": "float32"})
    with pytest.raises(ConfigError, match=r"capacity.max_systems: 2, but .*step 40.* with 3"):
        plan_outputs(cfg, tmp_path, resume=True)
    _fake_checkpoint(ck, sink_counts=[5])
    with pytest.raises(ConfigError, match=r"outputs\[0\].path: .* holds 1 systems, but .* held 5"):
        plan_outputs(cfg, tmp_path, resume=True)
    _fake_checkpoint(ck)
    changed = job(
        tmp_path,
        stages=[
            {"type": "fire", "fmax": 0.05, "n_steps": 20},
            {"type": "nve", "dt": 1.0, "n_steps": 3},
        ],
    )
    with pytest.raises(
        ConfigError, match=r"stages: the configuration differs .*move the checkpoint away"
    ):
        plan_outputs(changed, tmp_path, resume=True)
    ck.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot be continued.*resume by system_id"):
        plan_outputs(cfg, tmp_path, resume=True)
    ck.unlink()
    ck.mkdir()
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ConfigError, match="is a directory"):
            plan_outputs(cfg, tmp_path, **flags)
    ck.rmdir()
    # no checkpoint: resume by system_id, as before
    assert plan_outputs(cfg, tmp_path, resume=True)[-1].action == "new"


def _run_config(cfg):
    return {"run_config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True)}


def test_checkpoint_every_is_a_whole_number_of_steps_or_zero(tmp_path):
    assert job(tmp_path).checkpoint_every == 1000
    assert job(tmp_path, checkpoint_every=0).checkpoint_every == 0
    for bad in (-1, 2.0, "20", True, None):
        with pytest.raises(
            ConfigError, match=r"checkpoint_every: a whole number of steps >= 1, or 0"
        ):
            job(tmp_path, checkpoint_every=bad)


def test_tee_tells_a_resumed_run_what_every_output_holds(tmp_path):
    from fused_dynamics.run_outputs import TeeSink

    class Reporting(fd.HostMemory):  # a sink that can tell what it holds
        def system_ids(self):
            return [a.info["system_id"] for a in self.atoms] + [7]

    seen = []
    a, b = fd.HostMemory(), Reporting()
    tee = TeeSink([a, b], [{1, 2}, {2}], on_written=seen.extend)
    # held by every output, or reported by the sink itself
    assert tee.system_ids() == {2} and len(tee) == 1  # 7: one output lacks it
    tee.write([result_frame(1), result_frame(3)])
    assert [x.info["system_id"] for x in a.atoms] == [3]  # 1 was there already
    assert [x.info["system_id"] for x in b.atoms] == [1, 3]
    assert [x.info["system_id"] for x in seen] == [1, 3]
    assert tee.system_ids() == {1, 2, 3} and len(tee) == 3
    tee.written[0].add(7)
    assert tee.system_ids() == {1, 2, 3, 7}


def test_cli_refuses_before_compiling_and_keeps_the_data(tmp_path):
    """Exit 2 with the key, the path and both options; nothing on disk changes."""
    job(tmp_path)  # writes in.extxyz
    toml = tmp_path / "job.toml"
    toml.write_text(job_toml("results"))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "precious.txt").write_text("months of work")
    for flags in ([], ["--overwrite"], ["--resume"]):
        res = CliRunner().invoke(app, ["run", str(toml), *flags])
        assert res.exit_code == 2, res.output
        assert "outputs[0].path" in res.output and "results" in res.output
    assert (tmp_path / "results" / "precious.txt").read_text() == "months of work"
    toml.write_text(toml.read_text().replace('"results"', '"/proc/out.extxyz"'))
    res = CliRunner().invoke(app, ["run", str(toml), "--validate-only"])
    assert res.exit_code == 2 and "cannot write in '/proc'" in res.output
    toml.write_text(toml.read_text().replace('"/proc/out.extxyz"', '"in.extxyz"'))
    res = CliRunner().invoke(app, ["run", str(toml), "--overwrite"])
    assert res.exit_code == 2 and "is an input structure file" in res.output


def test_failed_systems_are_listed_with_names_and_steps():
    class Record:
        left = [
            {"system_id": 0, "exit_reason": 1, "finite": True},
            {"system_id": 5, "exit_reason": 3, "failure": "FORCES,POSITIONS", "failure_step": 12},
            {"system_id": 7, "exit_reason": 2, "finite": False},
            {"system_id": 9, "exit_reason": 4, "why": "system 9 has 300 atoms"},
        ]

    problems = _problems(Record())
    assert [(p["system_id"], p["kind"]) for p in problems] == [
        (5, "failed"),
        (7, "non-finite"),
        (9, "rejected"),
    ]
    text = "\n".join(_describe_problems(problems))
    assert "1 system(s) FAILED" in text and "system 5: FORCES,POSITIONS at step 12" in text
    assert "NaN" in text and "system 7" in text and "system 9 has 300 atoms" in text
    assert _describe_problems(_problems(type("R", (), {"left": Record.left[:1]}))) == []


# ============================================================================ small runs
def langevin_final(frames, id_key):
    md = fd.NVTLangevin(LJ, dt=4.0, temperature=60.0, friction=0.05, seed=11, n_steps=15)
    fused = fd.FusedStage([md])
    sink = fd.HostMemory()
    sampler = fd.SizeAwareSampler(
        frames, max_atoms=40, max_systems=3, max_atoms_per_system=13, id_key=id_key
    )
    fused.run(sampler=sampler, refill_frequency=5, sinks=[sink], dtype=np.float64)
    return {a.info["system_id"]: a for a in sink.atoms}


def test_with_an_id_key_removing_a_structure_leaves_the_others_bit_identical():
    frames = [cluster(i, n=9 + i % 4) for i in range(6)]
    for i, a in enumerate(frames):
        a.info["seed"] = 1000 + 7 * i
    full = langevin_final(frames, "seed")
    fewer = langevin_final(frames[:2] + frames[3:], "seed")
    assert sorted(full) == [1000 + 7 * i for i in range(6)]
    assert sorted(fewer) == sorted(set(full) - {1014})
    for sid, a in fewer.items():
        np.testing.assert_array_equal(a.positions, full[sid].positions)
        np.testing.assert_array_equal(a.get_velocities(), full[sid].get_velocities())
        assert a.info["source_index"] == full[sid].info["source_index"] - (sid > 1014)
    # without the key the ids are positions in the list: the ones after the gap change
    by_index = langevin_final(frames[:2] + frames[3:], None)
    assert not np.array_equal(by_index[2].positions, full[1021].positions)


def test_stage_write_keeps_each_system_as_it_left_the_relaxation():
    from fused_dynamics.inflight import StageExitWriter

    frames = [cluster(i, n=13) for i in range(4)]
    frames[3].rattle(0.3, seed=9)  # needs more steps than the budget
    relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=12)
    md = fd.NVE(LJ, dt=2.0, n_steps=4)
    relaxed, final = fd.HostMemory(), fd.HostMemory()
    sampler = fd.SizeAwareSampler(frames, max_atoms=40, max_systems=2, max_atoms_per_system=13)
    writer = StageExitWriter(0, 1, relaxed, annotate=sampler.annotate, stage_type="fire")
    fused = fd.FusedStage([relax, md], hooks=[writer.hook()])
    fused.run(
        sampler=sampler, sinks=[final], refill_frequency=3, dtype=np.float64, listeners=[writer]
    )
    assert sorted(a.info["system_id"] for a in relaxed.atoms) == [0, 1, 2, 3]
    ends = {a.info["system_id"]: a for a in final.atoms}
    for a in relaxed.atoms:
        steps = a.info["stage_steps"]
        assert steps[1] == 0 and a.info["stage"] == 0 and a.info["stage_type"] == "fire"
        fmax = np.linalg.norm(a.get_forces(), axis=1).max()
        if a.info["exit_reason_name"] == "converged":
            assert fmax <= 0.05 and steps[0] <= 12
        else:
            assert a.info["exit_reason_name"] == "budget" and steps[0] == 12 and fmax > 0.05
        # the structure and energy at that moment, not the final MD frame
        assert ends[a.info["system_id"]].info["stage_steps"] == [steps[0], 4]
        ref = fd.Batch.from_atoms([a])
        e = LJ(ref).energy[0]
        np.testing.assert_allclose(a.get_potential_energy(), float(e), rtol=0, atol=1e-12)
    assert {a.info["exit_reason_name"] for a in relaxed.atoms} == {"converged", "budget"}


def test_inspect_lists_failed_systems_and_keeps_them_out_of_the_statistics(tmp_path):
    bad = result_frame(4, fd.ExitReason.FAILED)
    bad.calc.results["energy"] = float("nan")
    bad.info.update(failure="energy,forces", failure_step=3)
    fd.ExtXYZSink(tmp_path / "o.extxyz").write([result_frame(0), bad])
    s = summarize_output(tmp_path / "o.extxyz")
    assert s["exit_reasons"] == {"converged": 1, "failed": 1}
    assert s["failed"] == [{"system_id": 4, "failure": "energy,forces", "failure_step": 3}]
    assert s["energy_per_atom"]["max"] == pytest.approx(-0.5 / 13)
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "o.extxyz")])
    assert "failed systems   4 (energy,forces, step 3)" in res.output


def test_outputs_stress_true_makes_the_run_compute_the_stress(tmp_path):
    cfg = job(tmp_path)
    assert not _with_stress(cfg, build_fused(cfg)).needs_stress
    cfg = job(tmp_path, outputs=[{"type": "extxyz", "path": "o.extxyz", "stress": True}])
    assert _with_stress(cfg, build_fused(cfg)).needs_stress


def test_config_keys_of_outputs_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\]\.write: .*allowed: .extxyz, .xyz, .zarr"):
        job(tmp_path, stages=[{"type": "nve", "dt": 1.0, "n_steps": 2, "write": "a.png"}])
    with pytest.raises(ConfigError, match="id_key only go with 'path'"):
        job(tmp_path, structures={"generate": "argon", "id_key": "seed"})
    assert job(tmp_path, structures={"path": "in.extxyz", "id_key": "seed"}).structures.id_key
    saved = tmp_path / "job.yaml"
    saved.write_text("mine")
    res = CliRunner().invoke(app, ["demo", "--save-config", str(saved)])
    assert res.exit_code == 2 and "--overwrite" in res.output and saved.read_text() == "mine"
    res = CliRunner().invoke(app, ["demo", "--save-config", str(saved), "--overwrite"])
    assert res.exit_code == 0 and "structures" in saved.read_text()


def test_zarr_rows_stay_aligned_when_a_rejected_system_has_no_step_counts(tmp_path):
    """A rejected system never ran (no stage_steps); written after systems that did, its row
    must still be there so that every later system reads its own counts."""
    path = tmp_path / "out.zarr"
    ran = result_frame(1)
    ran.info["stage_steps"] = [12, 20]
    rejected = result_frame(2, fd.ExitReason.REJECTED)
    rejected.info.pop("stage_steps", None)
    late = result_frame(3)
    late.info["stage_steps"] = [7, 20]
    sink = fd.ZarrSink(path)
    sink.write([ran])
    sink.write([rejected])  # the last write of a run: read back before anything follows
    assert [a.info["system_id"] for a in fd.read_zarr(path)] == [1, 2]
    sink.write([late])
    back = fd.read_zarr(path)
    assert [a.info["system_id"] for a in back] == [1, 2, 3]
    assert back[0].info["stage_steps"] == [12, 20]
    assert "stage_steps" not in back[1].info
    assert back[2].info["stage_steps"] == [7, 20]


def test_zarr_append_never_writes_over_committed_atoms(tmp_path):
    """A store whose atom count was left stale (a kill between two metadata writes, as zarr's
    ``attrs.update`` makes one write per key) is appended after its committed atoms."""

    def frame(i, n):
        a = ase.Atoms("Ar" * n, positions=np.full((n, 3), float(i)))
        a.info["system_id"] = i
        return a

    path = tmp_path / "s.zarr"
    sink = fd.ZarrSink(path)
    sink.write([frame(0, 3), frame(1, 2)])
    sink.write([frame(2, 4)])
    root = zarr.open_group(path, mode="r+")
    attrs = dict(root.attrs)
    attrs["atom_count"] = 5  # stale: the atoms of system 2 end at 9
    root.attrs.put(attrs)
    fd.ZarrSink(path, mode="a").write([frame(3, 1)])
    got = {a.info["system_id"]: a.positions[:, 0].tolist() for a in fd.read_zarr(path)}
    assert got == {0: [0.0] * 3, 1: [1.0] * 2, 2: [2.0] * 4, 3: [3.0]}


# ============================================================================ exact inputs
def test_a_float32_run_writes_input_masses_and_cells_exactly(tmp_path):
    """Masses and a fixed cell are the input's float64 values, not their float32 rounding
    (issue: masses 39.94800186, cell 12.239999771118164). Compared bitwise."""
    from fused_dynamics.run_outputs import TeeSink

    frames = []
    for seed in range(2):
        a = Icosahedron("Ar", 2)[:7]
        a.set_cell([12.24, 12.24, 12.24])  # periodic, and not a float32 number
        a.pbc = True
        a.center()
        a.rattle(0.05, seed=seed)
        masses = a.get_masses()
        masses[0] = 35.967545105  # an isotope: more digits than a float32 holds
        a.set_masses(masses)
        frames.append(a)
    assert float(np.float32(12.24)) != 12.24 and float(np.float32(39.948)) != 39.948
    sampler = fd.SizeAwareSampler(frames, max_atoms=14, max_systems=2, max_atoms_per_system=7)
    memory = fd.HostMemory()
    sinks = [memory, fd.ExtXYZSink(tmp_path / "o.extxyz"), fd.ZarrSink(tmp_path / "o.zarr")]
    fused = fd.FusedStage([fd.FIRE(LJ, n_steps=3)])
    fused.run(sampler=sampler, refill_frequency=3, sinks=[TeeSink(sinks)], dtype=np.float32)
    written = {
        "memory": memory.atoms,
        "extxyz": ase.io.read(tmp_path / "o.extxyz", ":"),
        "zarr": read_zarr(tmp_path / "o.zarr"),
    }
    for kind, out in written.items():
        assert [a.info["system_id"] for a in out] == [0, 1]
        for a, src in zip(out, frames, strict=True):
            masses = src.get_masses()
            if kind == "extxyz":  # ASE prints per-atom floats with 8 decimals (%16.8f)
                masses = np.array([float(f"{m:.8f}") for m in masses])
                assert np.array_equal(masses[1:], src.get_masses()[1:])  # 39.948 itself
            np.testing.assert_array_equal(a.get_masses(), masses)
            np.testing.assert_array_equal(a.cell.array, src.cell.array)
            np.testing.assert_array_equal(a.numbers, src.numbers)
            np.testing.assert_array_equal(a.pbc, src.pbc)
    # the run was float32: its positions are float32 numbers (the run moved them)
    moved = memory.atoms[0].positions
    np.testing.assert_array_equal(moved, moved.astype(np.float32))
    assert not np.array_equal(moved, frames[0].positions)
    # the results still belong to the structure (ASE compares the calculator's atoms)
    assert np.isfinite(memory.atoms[0].get_potential_energy())


def test_a_cell_the_run_changed_is_kept_as_computed():
    from fused_dynamics.provenance import restore_unchanged

    src = cluster(0)
    src.set_cell([12.24, 12.5, 13.0])
    out = src.copy()
    out.set_masses(src.get_masses().astype(np.float32))
    strained = src.cell.array * (1 + 1e-3)  # a variable-cell stage moved it
    out.set_cell(strained.astype(np.float32))
    restore_unchanged(src, out)
    np.testing.assert_array_equal(out.get_masses(), src.get_masses())  # rounding undone
    np.testing.assert_array_equal(out.cell.array, strained.astype(np.float32))  # kept


def test_codes_have_their_names_and_one_legend_in_both_formats(tmp_path):
    from fused_dynamics.provenance import output_legend
    from fused_dynamics.status import LEGEND, status_name

    bad = result_frame(1, fd.ExitReason.FAILED)
    bad.info.update(failure="max_force", failure_step=0, status=1)
    fd.ExtXYZSink(tmp_path / "o.extxyz").write([result_frame(0), bad])
    fd.ZarrSink(tmp_path / "o.zarr").write([result_frame(0), bad])
    for frames in (
        ase.io.read(tmp_path / "o.extxyz", ":"),
        read_zarr(tmp_path / "o.zarr"),
    ):
        # status 2 of a two-stage run: graduated; status 1: still in sub-stage 1
        assert [a.info["status_name"] for a in frames] == ["graduated", "stage_1"]
        assert [a.info["exit_reason_name"] for a in frames] == ["converged", "failed"]
        assert frames[1].info["failure"] == "max_force"
    legend = json.loads(ase.io.read(tmp_path / "o.extxyz", 0).info["legend"])
    assert legend == output_legend() == json.loads(json.dumps(LEGEND))  # the one table
    assert zarr.open_group(tmp_path / "o.zarr", mode="r").attrs["legend"] == legend
    assert legend["exit_reason"]["3"] == "failed" and legend["failure"]["64"] == "max_force"
    assert (status_name(0, 2), status_name(2, 2), status_name(3, 2)) == (
        "stage_0",
        "graduated",
        "unknown_3",
    )


@pytest.mark.parametrize("capacity", [0, -1, 2.5, "3", True])
def test_a_sink_that_can_hold_no_system_is_refused_when_made(tmp_path, capacity):
    # refused before any run: otherwise the run's work is refused at its first finished system
    makers = {
        "HostMemory": lambda: fd.HostMemory(capacity=capacity),
        "ExtXYZSink": lambda: fd.ExtXYZSink(tmp_path / "o.extxyz", capacity=capacity),
        "ZarrSink": lambda: fd.ZarrSink(tmp_path / "o.zarr", capacity=capacity),
    }
    for name, make in makers.items():
        with pytest.raises(ValueError, match=rf"{name}: capacity must be .*{capacity!r}"):
            make()
    assert not os.listdir(tmp_path)  # nothing created
    assert fd.HostMemory(capacity=np.int64(1)).capacity == 1


def test_extxyz_sink_never_appends_to_a_file_it_did_not_write(tmp_path):
    # a user's data set has no system_id: appending mixed this run's results into it
    path = tmp_path / "dataset.extxyz"
    ase.io.write(path, [Icosahedron("Ar", 2), Icosahedron("Ar", 2)])
    before = path.read_bytes()
    with pytest.raises(ValueError, match="first frame of .* has no system_id"):
        fd.ExtXYZSink(path, mode="a")
    assert path.read_bytes() == before
    ours = tmp_path / "ours.extxyz"
    sink = fd.ExtXYZSink(ours)
    atoms = Icosahedron("Ar", 2)
    atoms.info["system_id"] = 7
    sink.write([atoms])
    assert fd.ExtXYZSink(ours, mode="a").system_ids() == [7]  # its own output: accepted


def test_every_sink_gives_back_the_constraints_a_system_ran_with(tmp_path):
    # zarr kept none, extxyz lost FixCom (ASE's extxyz cannot hold it): a relaxation continued
    # from the output let its fixed atoms move
    from ase.build import bulk
    from ase.constraints import FixAtoms, FixCartesian, FixCom

    systems = []
    for i, c in enumerate([FixAtoms(indices=[0, 1]), FixCartesian([2], mask=(1, 0, 1)), FixCom()]):
        a = bulk("Ar", "fcc", a=5.3, cubic=True)
        a.rattle(0.05, seed=i)
        a.set_constraint(c)
        systems.append(a)
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)
    stage = fd.FusedStage([fd.NVTLangevin(lj, dt=2.0, temperature=50.0, friction=0.02, n_steps=3)])
    want = fd.Batch.from_atoms(systems)
    for kind, make, read in [
        ("zarr", lambda p: fd.ZarrSink(p), fd.read_zarr),
        ("extxyz", lambda p: fd.ExtXYZSink(p), lambda p: ase.io.read(p, ":")),
    ]:
        path = tmp_path / f"o.{kind}"
        sampler = fd.SizeAwareSampler(systems, max_atoms=12, max_systems=3)
        stage.run(sampler=sampler, sinks=[make(path)], refill_frequency=3)
        back = sorted(read(path), key=lambda a: a.info["system_id"])
        got = fd.Batch.from_atoms(back)
        np.testing.assert_array_equal(np.asarray(got.fixed), np.asarray(want.fixed), err_msg=kind)
        np.testing.assert_array_equal(np.asarray(got.fix_com), [False, False, True], err_msg=kind)
    assert [type(c).__name__ for c in fd.read_zarr(tmp_path / "o.zarr")[2].constraints] == [
        "FixCom"
    ]


def _tagged_clusters():
    """Two 13-atom clusters, each with an info tag ``name`` and a per-atom array ``lab``."""
    atoms = []
    for i in range(2):
        a = Icosahedron("Ar", 2)
        a.center(vacuum=6.0)
        a.rattle(0.05, seed=i)
        a.info["name"] = f"c{i}"
        a.arrays["lab"] = np.arange(13) + i
        atoms.append(a)
    return atoms, fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5, switch_onset=6.5)


def test_a_batch_run_given_its_inputs_writes_their_info_and_arrays(tmp_path):
    # a Batch holds arrays only: without inputs, a batch's records carried none of the
    # input's tags, where the same structures through a sampler kept them
    atoms, lj = _tagged_clusters()
    batch = fd.Batch.from_atoms(atoms)
    sink = fd.HostMemory()
    final = fd.FIRE(lj, n_steps=5).run(batch, sinks=[sink], inputs=atoms)
    for out in (sorted(sink.atoms, key=lambda a: a.info["system_id"]), final.to_atoms(atoms)):
        assert [a.info["name"] for a in out] == ["c0", "c1"]
        assert [a.info["source_index"] for a in out] == [0, 1]
        for k, a in enumerate(out):
            np.testing.assert_array_equal(a.arrays["lab"], np.arange(13) + k)
    assert "name" not in fd.FIRE(lj, n_steps=5).run(batch).to_atoms()[0].info  # opt-in
    with pytest.raises(ValueError, match="inputs: 1 structures for a batch of 2 systems"):
        final.to_atoms(atoms[:1])
    with pytest.raises(ValueError, match="inputs are copied onto what the sinks write"):
        fd.FIRE(lj, n_steps=5).run(batch, inputs=atoms)


def test_inputs_with_repeated_system_ids_pair_by_slot_or_are_refused():
    # repeated ids (a legitimate batch: replicas sharing an id) gave the second system the
    # first one's provenance; to_atoms pairs by slot, sinks (matched by id) refuse
    atoms, lj = _tagged_clusters()
    batch = fd.Batch.from_atoms(atoms, system_ids=[3, 3])
    out = batch.to_atoms(atoms)
    assert [a.info["name"] for a in out] == ["c0", "c1"]
    assert [a.info["source_index"] for a in out] == [0, 1]
    with pytest.raises(ValueError, match=r"system ids \[3\] repeat"):
        fd.FIRE(lj, n_steps=2).run(batch, sinks=[fd.HostMemory()], inputs=atoms)
