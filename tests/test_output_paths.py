"""Every path a run writes is distinct, and never an input (README: "Command line";
fused_dynamics.run_outputs.plan_outputs).

The paths a run writes are its outputs, the side file of waiting systems of an output in input
order (``<name>.pending.<suffix>``), its stage outputs, its report files and its checkpoint
(``<outputs[0].path>.ckpt``). Two of them that are the same file, or one that is an input
structure file (by its name, a symbolic link, a hard link or another spelling of its path), are
refused before anything compiles, naming both, whatever --overwrite or --resume say: exit 2,
nothing on disk changes. Nothing here compiles: the plan is checked directly, and the command
line with ``run`` stops at its preflight.
"""

from __future__ import annotations

import os

import ase.io
import pytest
from test_outputs import cluster, job_toml  # tests/ is on pytest's path
from typer.testing import CliRunner

from fused_dynamics.cli import app, plan_outputs
from fused_dynamics.config import ConfigError, validate_config

FLAGS = ({}, {"overwrite": True}, {"resume": True})
CLI_FLAGS = ([], ["--overwrite"], ["--resume"])


def job(tmp_path, **extra):
    """A small job reading ``in.extxyz`` (written here) with the given keys replaced."""
    if not (tmp_path / "in.extxyz").exists():
        ase.io.write(tmp_path / "in.extxyz", [cluster(i) for i in range(3)])
    data = {
        "structures": {"path": "in.extxyz"},
        "model": {"type": "lennard_jones", "sigma": 3.4, "epsilon": 0.01, "cutoff": 6.0},
        "stages": [{"type": "nve", "dt": 2.0, "n_steps": 2}],
        "capacity": {"max_atoms": 64, "max_systems": 2},
        "outputs": [{"type": "extxyz", "path": "out/run.extxyz"}],
    }
    data.update(extra)
    return validate_config(data, base_dir=tmp_path)


def plan(cfg, tmp_path, **flags):
    return plan_outputs(cfg, tmp_path, inputs=cfg.structures.files(tmp_path), **flags)


def _snapshot(folder):
    """Every file under ``folder``: its bytes (what a refused run must leave as it was)."""
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(folder)
        for f in files
    }


# ============================================================ a side file is a path the run writes
def test_an_output_at_another_outputs_side_file_is_refused(tmp_path):
    outputs = [
        {"type": "extxyz", "path": "out/run.extxyz", "order": "input"},
        {"type": "extxyz", "path": "out/run.pending.extxyz"},
    ]
    cfg = job(tmp_path, outputs=outputs)
    for flags in FLAGS:
        with pytest.raises(ConfigError) as err:
            plan(cfg, tmp_path, **flags)
        msg = str(err.value)
        assert "outputs[1].path" in msg and "outputs[0].path" in msg, msg
        assert "run.pending.extxyz" in msg and "side file" in msg, msg
    # the same two paths, the first in completion order: it has no side file
    outputs[0]["order"] = "completion"
    assert [p.action for p in plan(job(tmp_path, outputs=outputs), tmp_path)] == ["new"] * 3


def test_a_zarr_output_at_another_zarr_outputs_side_store_is_refused(tmp_path):
    outputs = [
        {"type": "zarr", "path": "out/run.pending.zarr"},
        {"type": "zarr", "path": "out/run.zarr", "order": "input"},
    ]
    cfg = job(tmp_path, outputs=outputs)
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.path.*outputs\[0\]\.path"):
        plan(cfg, tmp_path)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"report": {"record": "out/run.pending.extxyz"}}, "report.record"),
        ({"report": {"plot": "out/run.pending.extxyz"}}, "report.plot"),
        (
            {
                "stages": [
                    {"type": "nve", "dt": 2.0, "n_steps": 2, "write": "out/run.pending.extxyz"}
                ]
            },
            "stages[0].write",
        ),
    ],
)
def test_a_stage_or_report_file_at_an_outputs_side_file_is_refused(tmp_path, extra, key):
    outputs = [{"type": "extxyz", "path": "out/run.extxyz", "order": "input"}]
    cfg = job(tmp_path, outputs=outputs, **extra)
    for flags in FLAGS:
        with pytest.raises(ConfigError) as err:
            plan(cfg, tmp_path, **flags)
        assert key in str(err.value) and "outputs[0].path" in str(err.value), str(err.value)


def test_an_outputs_side_file_at_the_checkpoint_is_refused(tmp_path):
    # the checkpoint is <outputs[0].path>.ckpt = r.pending.ckpt, the side file of r.ckpt
    outputs = [
        {"type": "extxyz", "path": "r.pending"},
        {"type": "extxyz", "path": "r.ckpt", "order": "input"},
    ]
    cfg = job(tmp_path, outputs=outputs)
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.path.*checkpoint"):
        plan(cfg, tmp_path)


def test_an_outputs_side_file_at_an_input_is_refused_even_with_overwrite(tmp_path):
    ase.io.write(tmp_path / "data.pending.extxyz", [cluster(i) for i in range(2)])
    cfg = job(
        tmp_path,
        structures={"path": "data.pending.extxyz"},
        outputs=[{"type": "extxyz", "path": "data.extxyz", "order": "input"}],
    )
    before = _snapshot(tmp_path)
    for flags in FLAGS:
        with pytest.raises(ConfigError) as err:
            plan(cfg, tmp_path, **flags)
        msg = str(err.value)
        assert "outputs[0].path" in msg and "data.pending.extxyz" in msg, msg
        assert "input structure file" in msg, msg
    assert _snapshot(tmp_path) == before


def test_the_checkpoint_at_an_input_is_refused_even_with_overwrite(tmp_path):
    cfg = job(tmp_path)
    (tmp_path / "out").mkdir()
    os.link(tmp_path / "in.extxyz", tmp_path / "out" / "run.extxyz.ckpt")
    before = _snapshot(tmp_path)
    for flags in FLAGS:
        with pytest.raises(ConfigError, match="checkpoint.*input structure file"):
            plan(cfg, tmp_path, **flags)
    assert _snapshot(tmp_path) == before


def test_an_existing_side_file_hard_linked_to_another_output_is_refused(tmp_path):
    # run.pending.extxyz is the same file as other.extxyz: --overwrite replaces the side file
    outputs = [
        {"type": "extxyz", "path": "out/run.extxyz", "order": "input"},
        {"type": "extxyz", "path": "out/other.extxyz"},
    ]
    cfg = job(tmp_path, outputs=outputs)
    (tmp_path / "out").mkdir()
    ase.io.write(tmp_path / "out" / "other.extxyz", cluster(0))
    os.link(tmp_path / "out" / "other.extxyz", tmp_path / "out" / "run.pending.extxyz")
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.path.*outputs\[0\]\.path"):
        plan(cfg, tmp_path, overwrite=True)


def test_two_outputs_that_are_one_file_by_a_hard_link_are_refused(tmp_path):
    outputs = [
        {"type": "extxyz", "path": "out/a.extxyz"},
        {"type": "extxyz", "path": "out/b.extxyz"},
    ]
    cfg = job(tmp_path, outputs=outputs)
    (tmp_path / "out").mkdir()
    ase.io.write(tmp_path / "out" / "a.extxyz", cluster(0))
    os.link(tmp_path / "out" / "a.extxyz", tmp_path / "out" / "b.extxyz")
    with pytest.raises(
        ConfigError,
        match=r"outputs\[1\]\.path .*b.extxyz.* and outputs\[0\]\.path .*a.extxyz.* are the "
        "same file",
    ):
        plan(cfg, tmp_path, overwrite=True)


def test_a_path_inside_a_zarr_output_is_refused(tmp_path):
    cfg = job(
        tmp_path,
        outputs=[{"type": "zarr", "path": "out/run.zarr"}],
        report={"record": "out/run.zarr/record.csv"},
    )
    with pytest.raises(ConfigError, match=r"report\.record.*inside.*outputs\[0\]\.path"):
        plan(cfg, tmp_path)


# ============================================================ an input is never an output
@pytest.mark.parametrize("how", ["hard link", "symlink", "spelling"])
@pytest.mark.parametrize("key", ["outputs[0].path", "stages[0].write", "report.record"])
def test_an_output_that_is_the_input_is_refused_with_any_flag(tmp_path, how, key):
    (tmp_path / "out").mkdir()
    (tmp_path / "sub").mkdir()
    if how == "hard link":
        name = "out/copy.extxyz"
    elif how == "symlink":
        name = "out/link.extxyz"
    else:
        name = "./sub/../in.extxyz"
    extra = {}
    if key == "stages[0].write":
        extra["stages"] = [{"type": "nve", "dt": 2.0, "n_steps": 2, "write": name}]
    elif key == "report.record":
        extra["report"] = {"record": name}
    else:
        extra["outputs"] = [{"type": "extxyz", "path": name}]
    cfg = job(tmp_path, **extra)
    if how == "hard link":
        os.link(tmp_path / "in.extxyz", tmp_path / name)
    elif how == "symlink":
        os.symlink(tmp_path / "in.extxyz", tmp_path / name)
    before = _snapshot(tmp_path)
    for flags in FLAGS:
        with pytest.raises(ConfigError) as err:
            plan(cfg, tmp_path, **flags)
        msg = str(err.value)
        assert key in msg and "input structure file" in msg and "in.extxyz" in msg, msg
    assert _snapshot(tmp_path) == before


def test_an_input_given_by_a_hard_link_is_never_written_by_the_command_line(tmp_path):
    """``run --overwrite`` (and --resume) onto a hard link of the input: exit 2, input intact."""
    ase.io.write(tmp_path / "in.extxyz", [cluster(i) for i in range(2)])
    os.link(tmp_path / "in.extxyz", tmp_path / "copy.extxyz")
    toml = tmp_path / "job.toml"
    toml.write_text(job_toml("copy.extxyz", "[report]\nprogress = false\n"))
    before = _snapshot(tmp_path)
    for flags in CLI_FLAGS:
        for extra in (["--validate-only"], []):
            res = CliRunner().invoke(app, ["run", str(toml), *flags, *extra])
            assert res.exit_code == 2, (flags, extra, res.output)
            assert "outputs[0].path" in res.output, res.output
            assert "input structure file" in res.output and "in.extxyz" in res.output
    assert _snapshot(tmp_path) == before


def test_an_output_at_a_side_file_is_refused_by_the_command_line(tmp_path):
    ase.io.write(tmp_path / "in.extxyz", [cluster(i) for i in range(2)])
    toml = tmp_path / "job.toml"
    toml.write_text(
        job_toml(
            "out/run.extxyz",
            'order = "input"\n'
            '[[outputs]]\ntype = "extxyz"\npath = "out/run.pending.extxyz"\n'
            "[report]\nprogress = false\n",
        )
    )
    for extra in (["--validate-only"], []):
        res = CliRunner().invoke(app, ["run", str(toml), *extra])
        assert res.exit_code == 2, res.output
        assert "outputs[1].path" in res.output and "outputs[0].path" in res.output
        assert "run.pending.extxyz" in res.output
    assert not (tmp_path / "out" / "run.extxyz").exists()
