"""The command line: `run` with TOML and YAML configurations, `inspect`, help, exit codes.

Runs that compile go through subprocesses (``python -m fused_dynamics.cli``), started together
by one module-scoped fixture so that their imports and compilations overlap. Configuration
errors are caught before any JAX state is touched, so those tests run in-process.
"""

import json
import os
import subprocess
import sys
import textwrap

import ase.io
import pytest
from ase.cluster import Icosahedron
from typer.testing import CliRunner

from fused_dynamics.cli import app
from fused_dynamics.demo import make_structures
from fused_dynamics.sinks import read_zarr

CLI = [sys.executable, "-m", "fused_dynamics.cli"]

TOML = """\
seed = 3
dtype = "float64"
device = "cpu"
refill_frequency = 5

[structures]
generate = "argon"
count = 6
max_size = 8

[model]
type = "morse"
D = 0.0104
alpha = 1.3
r0 = 3.82
cutoff = 7.5
switch_onset = 6.5

[capacity]
max_atoms = 24
max_systems = 3

[[stages]]
type = "fire2"
fmax = 0.02
n_steps = 200

[[stages]]
type = "nvt_nose_hoover"
dt = 5.0
temperature = 30.0
tdamp = 250.0
n_steps = 12

[[outputs]]
type = "zarr"
path = "out/run.zarr"

[report]
plot = "out/run.png"
record = "out/record.csv"
record_every = 2
"""

YAML = """\
seed: 0
structures:
  path: data/*.extxyz
capacity: {max_atoms: 32, max_systems: 4}
model: {type: lennard_jones, sigma: 3.405, epsilon: 0.0104, cutoff: 7.5, switch_onset: 6.5}
stages:
  - {type: fire, fmax: 0.02, n_steps: 200}
  - {type: nvt_langevin, dt: 5.0, temperature: 40.0, friction: 0.02, n_steps: 10}
outputs:
  - {type: extxyz, path: out/run.extxyz}
  - {type: zarr, path: out/run.zarr, order: input}
"""


def _env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["MPLBACKEND"] = "Agg"
    return env


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


RESUME = """\
seed = 1
dtype = "float64"
refill_frequency = 4
[structures]
path = "in.extxyz"
[model]
type = "lennard_jones"
sigma = 3.405
epsilon = 0.0104
cutoff = 6.0
[capacity]
max_atoms = 24
max_systems = 3
[[stages]]
type = "fire"
fmax = 0.05
n_steps = 30
write = "out/relaxed.extxyz"
[[stages]]
type = "nve"
dt = 2.0
n_steps = 4
[[outputs]]
type = "extxyz"
path = "out/run.extxyz"
stress = true
"""


def _resume_job(folder):
    """A job whose output holds systems 1 and 3 already, then a frame cut short by a kill."""
    data = make_structures(5, seed=8, max_size=8)
    for i, a in enumerate(data):
        a.info["name"] = f"s{i}"
    ase.io.write(_write(folder / "in.extxyz", ""), data)
    done = []
    for i in (1, 3):
        a = data[i].copy()
        a.info.update(system_id=i, exit_reason=1, name=f"earlier {i}")
        done.append(a)
    out = folder / "out" / "run.extxyz"
    ase.io.write(_write(out, ""), done)
    kept = out.read_bytes()
    ase.io.write(folder / "cut.extxyz", data[4])
    out.write_bytes(kept + (folder / "cut.extxyz").read_bytes()[:-30])
    return _write(folder / "job.toml", RESUME), kept


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three CLI runs started at once: TOML (float64, zarr), YAML (files, extxyz), --resume."""
    root = tmp_path_factory.mktemp("cli")
    toml = _write(root / "toml" / "job.toml", TOML)
    yaml_dir = root / "yaml"
    data = make_structures(7, seed=5, max_size=8)
    ase.io.write(_write(yaml_dir / "data" / "a.extxyz", ""), data[:4])
    ase.io.write(yaml_dir / "data" / "b.extxyz", data[4:])
    yaml = _write(yaml_dir / "job.yml", YAML)
    resume, kept = _resume_job(root / "resume")
    (root / "resume" / "kept").write_bytes(kept)
    procs = {
        name: subprocess.Popen(
            [*CLI, "run", str(cfg), "--no-progress", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for name, cfg, flags in (
            ("toml", toml, []),
            ("yaml", yaml, []),
            ("resume", resume, ["--resume", "--strict"]),
        )
    }
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        results[name] = (p.returncode, out, err)
    return root, results


def test_run_toml_float64_zarr(runs):
    root, results = runs
    rc, out, err = results["toml"]
    assert rc == 0, out + err
    assert "float64" in out  # dtype float64 turned on jax_enable_x64
    frames = read_zarr(root / "toml" / "out" / "run.zarr")
    assert sorted(a.info["system_id"] for a in frames) == list(range(6))
    assert not (root / "toml" / "out" / "run.zarr.ckpt").exists()  # a complete run leaves none
    assert {a.info["exit_reason"] for a in frames} <= {1, 2}
    assert all(a.info["stage_steps"][1] == 12 for a in frames)
    png = root / "toml" / "out" / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    header = (root / "toml" / "out" / "record.csv").read_text().splitlines()[0]
    assert header.startswith("step,system_id,status,stage_step,fmax,energy,temperature")


def test_run_yaml_from_a_glob_of_files_to_two_outputs(runs):
    root, results = runs
    rc, out, err = results["yaml"]
    assert rc == 0, out + err
    frames = ase.io.read(root / "yaml" / "out" / "run.extxyz", index=":")
    assert sorted(a.info["system_id"] for a in frames) == list(range(7))
    # outputs[1].order = "input" (docs/semantics.md, outputs): the store holds the systems in
    # the order their files were read, whatever order they finished in, and no side file
    # of waiting systems is left behind by a run that ended
    ordered = read_zarr(root / "yaml" / "out" / "run.zarr")
    assert [a.info["system_id"] for a in ordered] == list(range(7))
    assert not (root / "yaml" / "out" / "run.pending.zarr").exists()
    assert {a.info["exit_reason"] for a in frames} <= {1, 2}
    # every output gets every system
    copies = read_zarr(root / "yaml" / "out" / "run.zarr")
    assert sorted(a.info["system_id"] for a in copies) == list(range(7))
    assert "FIRE" in out and "NVTLangevin" in out


def test_resume_appends_the_missing_systems_with_their_provenance(runs):
    root, results = runs
    rc, out, err = results["resume"]
    assert rc == 0, out + err
    folder = root / "resume"
    path = folder / "out" / "run.extxyz"
    kept = (folder / "kept").read_bytes()
    assert path.read_bytes().startswith(kept), "what was written before is never rewritten"
    # the frame cut short was moved aside, not deleted
    tail = (folder / "out" / "run.extxyz.incomplete-tail").read_bytes()
    assert tail == (folder / "cut.extxyz").read_bytes()[:-30]
    frames = ase.io.read(path, index=":")
    assert [a.info["system_id"] for a in frames][:2] == [1, 3]
    assert sorted(a.info["system_id"] for a in frames) == [0, 1, 2, 3, 4]
    assert "skipped" in out and "appended to" in out
    assert "resuming by system_id (no checkpoint at" in out
    assert not (folder / "out" / "run.extxyz.ckpt").exists()
    for a in frames[2:]:
        sid = a.info["system_id"]
        assert a.info["name"] == f"s{sid}" and a.info["source_index"] == sid
        assert a.info["source_file"] == os.fspath(folder / "in.extxyz")
        assert a.info["exit_reason_name"] in ("converged", "budget")
        assert a.get_stress().shape == (6,)  # outputs.stress = true: always computed
        assert abs(a.get_stress()).max() > 0
    assert "stress" not in (frames[0].calc.results if frames[0].calc else {})
    assert json.loads(frames[2].info["run_config"])["stages"][1]["type"] == "nve"
    # the relaxation output: each system run here once, as it left FIRE
    relaxed = ase.io.read(folder / "out" / "relaxed.extxyz", index=":")
    assert sorted(a.info["system_id"] for a in relaxed) == [0, 2, 4]
    assert all(a.info["stage"] == 0 and a.info["stage_steps"][1] == 0 for a in relaxed)


def test_interrupts_wait_for_the_write_in_progress(tmp_path):
    """SIGTERM during a write: the write completes on every output, then KeyboardInterrupt."""
    import signal

    import fused_dynamics as fd
    from fused_dynamics.interrupts import INTERRUPTS
    from fused_dynamics.run_outputs import TeeSink

    class Slow(fd.HostMemory):
        def write(self, frames):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives between the two outputs
            super().write(frames)

    xyz = fd.ExtXYZSink(tmp_path / "a.extxyz")
    zarr_sink = fd.ZarrSink(tmp_path / "b.zarr")
    tee = TeeSink([Slow(), xyz, zarr_sink])
    frames = make_structures(2, max_size=4)
    for i, a in enumerate(frames):
        a.info["system_id"] = i
    with INTERRUPTS.installed_handlers():
        with pytest.raises(KeyboardInterrupt) as info:
            tee.write(frames)
    assert info.value.args == (signal.SIGTERM,)
    assert (
        len(ase.io.read(tmp_path / "a.extxyz", ":")) == 2
        and len(read_zarr(tmp_path / "b.zarr")) == 2
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_overwrite_and_resume_are_offered_by_run_and_demo():
    runner = CliRunner()
    for cmd in ("run", "demo"):
        res = runner.invoke(app, [cmd, "--help"])
        for flag in ("--overwrite", "--resume", "--strict"):
            assert flag in res.output, (cmd, flag)


def test_an_interrupt_says_what_was_written_and_where_resume_continues(tmp_path, monkeypatch):
    import signal

    import fused_dynamics.cli as cli
    from fused_dynamics import checkpoint
    from fused_dynamics.application import _left_behind
    from fused_dynamics.config import validate_config
    from fused_dynamics.interrupts import RunInterrupted
    from fused_dynamics.run_outputs import OutputPlan

    cfg = validate_config(
        {
            "structures": {"generate": "argon", "count": 2},
            "model": {"type": "lennard_jones", "sigma": 3.4, "epsilon": 0.01, "cutoff": 6.0},
            "stages": [{"type": "nve", "dt": 1.0, "n_steps": 2}],
            "capacity": {"max_atoms": 64, "max_systems": 2},
            "outputs": [{"type": "extxyz", "path": "run.extxyz"}],
        },
        base_dir=tmp_path,
    )
    plan = OutputPlan("outputs[0].path", tmp_path / "run.extxyz", "extxyz", written={0})
    ckpt = tmp_path / "run.extxyz.ckpt"
    lines = _left_behind([(plan, {0, 1, 2})], ckpt, cfg)
    assert "3 systems (2 written by this run)" in lines[0]
    assert "no checkpoint was written yet (every 1000 steps)" in lines[1]
    assert "--resume to skip the systems written" in lines[1]
    text = b'{"step_count": 40}'
    ckpt.write_bytes(f"{checkpoint.FORMAT} {checkpoint.VERSION} {len(text)}\n".encode() + text)
    lines = _left_behind([(plan, {0, 1, 2})], ckpt, cfg)
    assert "of step 40" in lines[1] and "--resume to continue from step 40" in lines[1]

    def interrupted(*args, **kwargs):
        raise RunInterrupted(signal.SIGINT, lines)

    monkeypatch.setattr(cli, "execute", interrupted)
    res = CliRunner().invoke(app, ["run", str(_write(tmp_path / "job.toml", TOML))])
    assert res.exit_code == 130
    assert "interrupted (SIGINT)" in res.output and "continue from step 40" in res.output


def test_a_failure_while_running_exits_1(tmp_path, monkeypatch):
    import fused_dynamics.cli as cli

    def failing(*args, **kwargs):
        raise RuntimeError("Every sink is full; systems [4, 5] cannot be written")

    monkeypatch.setattr(cli, "execute", failing)
    res = CliRunner().invoke(app, ["run", str(_write(tmp_path / "job.toml", TOML))])
    assert res.exit_code == 1
    assert "the run failed" in res.output and "full" in res.output and "--debug" in res.output
    res = CliRunner().invoke(app, ["run", str(tmp_path / "job.toml"), "--debug"])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)  # the traceback


def test_inspect_zarr_and_extxyz(runs):
    root, _ = runs
    proc = subprocess.run(
        [*CLI, "inspect", str(root / "toml" / "out" / "run.zarr"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["systems"] == 6 and summary["format"] == "zarr"
    assert set(summary["exit_reasons"]) <= {"converged", "budget"}
    assert summary["energy_per_atom"]["max"] < 0
    assert len(summary["stage_steps_mean"]) == 2
    text = CliRunner().invoke(app, ["inspect", str(root / "yaml" / "out" / "run.extxyz")])
    assert text.exit_code == 0, text.output
    for word in ("systems", "7", "exit reasons", "energy", "fmax", "temperature"):
        assert word in text.output
    # one row per system, exported as CSV (never over an existing file)
    csv = root / "systems.csv"
    res = CliRunner().invoke(
        app, ["inspect", str(root / "yaml" / "out" / "run.zarr"), "--export", str(csv)]
    )
    assert res.exit_code == 0, res.output
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 7 and "exit_reason" in rows[0], rows[:2]
    again = CliRunner().invoke(
        app, ["inspect", str(root / "yaml" / "out" / "run.zarr"), "--export", str(csv)]
    )
    assert again.exit_code == 2
    # an input structure file is not an output: exit 2 with the reason
    res = CliRunner().invoke(app, ["inspect", str(root / "yaml" / "data" / "a.extxyz")])
    assert res.exit_code == 2


# ----------------------------------------------------------------------------- help
def test_help_of_every_command():
    runner = CliRunner()
    for args in ([], ["run"], ["demo"], ["inspect"]):
        res = runner.invoke(app, [*args, "--help"])
        assert res.exit_code == 0, res.output
        assert "Usage" in res.output
    proc = subprocess.run([*CLI, "--help"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0
    for cmd in ("run", "demo", "inspect"):
        assert cmd in proc.stdout


# ----------------------------------------------------------------------------- bad configs
def _bad(tmp_path, text, name="job.toml"):
    path = _write(tmp_path / name, text)
    res = CliRunner().invoke(app, ["run", str(path)])
    return res.exit_code, res.output


def test_unknown_key(tmp_path):
    rc, msg = _bad(tmp_path, TOML.replace("alpha = 1.3", "alpha = 1.3\nalpah = 2"))
    assert rc == 2
    assert "model" in msg and "'alpah'" in msg and "allowed keys" in msg


def test_unknown_key_in_a_stage_suggests_the_right_one(tmp_path):
    rc, msg = _bad(tmp_path, TOML.replace("tdamp = 250.0", "tdump = 250.0"))
    assert rc == 2
    assert "stages[1]" in msg and "'tdump'" in msg and "did you mean 'tdamp'" in msg


def test_wrong_type(tmp_path):
    rc, msg = _bad(tmp_path, TOML.replace("D = 0.0104", 'D = "deep"'))
    assert rc == 2
    assert "model.D" in msg and "deep" in msg


def test_unknown_stage(tmp_path):
    rc, msg = _bad(tmp_path, TOML.replace('"nvt_nose_hoover"', '"nvt_berendsen"'))
    assert rc == 2
    assert "stages[1].type" in msg and "nvt_berendsen" in msg
    assert "nvt_langevin" in msg  # the allowed values are listed


def test_missing_structure_file(tmp_path):
    text = TOML.replace('generate = "argon"', 'path = "missing/*.extxyz"')
    rc, msg = _bad(tmp_path, text)
    assert rc == 2
    assert "structures.path" in msg and "missing/*.extxyz" in msg


def test_bad_values_name_the_key_and_the_allowed_values(tmp_path):
    rc, msg = _bad(tmp_path, TOML.replace('dtype = "float64"', 'dtype = "float16"'))
    assert rc == 2 and "dtype" in msg and "float32" in msg and "float16" in msg
    rc, msg = _bad(tmp_path, TOML.replace('type = "morse"', 'type = "buckingham"'))
    assert rc == 2 and "model.type" in msg and "lennard_jones" in msg
    rc, msg = _bad(tmp_path, TOML.replace("n_steps = 12", "n_steps = -1"))
    assert rc == 2 and "stages[1].n_steps" in msg
    rc, msg = _bad(tmp_path, TOML.replace("[capacity]\nmax_atoms = 24\nmax_systems = 3\n", ""))
    assert rc == 2 and "capacity" in msg and "missing" in msg
    # a final stage that never finishes
    rc, msg = _bad(tmp_path, TOML.replace("n_steps = 12\n", ""))
    assert rc == 2 and "stages[1]" in msg and "never finish" in msg


def test_structures_need_exactly_one_source(tmp_path):
    data = tmp_path / "d.extxyz"
    ase.io.write(data, make_structures(2, max_size=4))
    both = f'generate = "argon"\npath = "{data.name}"'
    rc, msg = _bad(tmp_path, TOML.replace('generate = "argon"', both))
    assert rc == 2 and "structures" in msg and "exactly one" in msg
    rc, msg = _bad(tmp_path, TOML.replace('generate = "argon"', 'generate = "neon"'))
    assert rc == 2 and "structures.generate" in msg and "argon" in msg
    rc, msg = _bad(tmp_path, TOML.replace('generate = "argon"', f'path = "{data.name}"'))
    assert rc == 2 and "count, max_size only go with 'generate'" in msg


def test_bad_files(tmp_path):
    res = CliRunner().invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "does not exist" in res.output
    rc, msg = _bad(tmp_path, "seed = 1\n", name="job.ini")
    assert rc == 2 and ".toml" in msg and ".yaml" in msg
    rc, msg = _bad(tmp_path, "seed = [1,\n")
    assert rc == 2 and "TOML" in msg
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "nothing.extxyz")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_validate_only_and_exit_code_of_a_real_process(tmp_path):
    good = _write(tmp_path / "good.toml", TOML)
    res = CliRunner().invoke(app, ["run", str(good), "--validate-only"])
    assert res.exit_code == 0 and "valid" in res.output
    bad = _write(tmp_path / "bad.yaml", YAML.replace("max_systems: 4", "max_systems: many"))
    proc = subprocess.run([*CLI, "run", str(bad)], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2
    assert "capacity.max_systems" in proc.stderr


def test_demo_save_config_round_trips(tmp_path):
    from fused_dynamics.config import load_config
    from fused_dynamics.demo import demo_config

    for name in ("demo.toml", "demo.yaml"):
        res = CliRunner().invoke(
            app, ["demo", "--quick", "--save-config", str(tmp_path / name), "-o", "out"]
        )
        assert res.exit_code == 0, res.output
        cfg, _ = load_config(tmp_path / name)
        from fused_dynamics.config import validate_config

        assert cfg == validate_config(demo_config(True, "out"))
        # the model keys are explained, with units, in comments before the model section
        text = (tmp_path / name).read_text()
        head = text[: text.index("\n[model]\n" if name.endswith("toml") else "\nmodel:")]
        for words in ("sigma (Å), epsilon (eV)", "D (eV), alpha (1/Å), r0 (Å)", "species"):
            assert words in head, (name, words)
        assert "Ar-Kr" in head and "lorentz_berthelot" in head and "pairs" in head


# ----------------------------------------------------------------------------- building
STAGE_EXAMPLES = {
    "fire": {"fmax": 0.05, "dt": 0.1, "maxstep": 0.1, "flavor": "vv", "cell_filter": "frechet"},
    "fire2": {"fmax": 0.05, "Npneg_max": 100, "initialdelay": False},
    "gradient_descent": {"step_size": 0.01, "maxstep": 0.1, "fmax": 0.05},
    "nve": {"dt": 2.0, "n_steps": 5},
    "nvt_langevin": {"dt": 2.0, "temperature": 50.0, "friction": 0.01, "n_steps": 5},
    "nvt_nose_hoover": {"dt": 2.0, "temperature": 50.0, "tdamp": 100.0, "n_steps": 5},
    "npt": {
        "dt": 2.0,
        "temperature": 50.0,
        "pressure": 0.0,
        "tdamp": 100.0,
        "pdamp": 1000.0,
        "coupling": "anisotropic",
        "n_steps": 5,
    },
    "nph": {"dt": 2.0, "pressure": 0.0, "pdamp": 1000.0, "n_steps": 5},
}


def _config(stages, model=None):
    from fused_dynamics.config import validate_config

    return validate_config(
        {
            "structures": {"generate": "argon", "count": 2},
            "model": model or {"type": "lennard_jones", "sigma": 3.4, "epsilon": 0.01, "cutoff": 7},
            "stages": stages,
            "capacity": {"max_atoms": 64, "max_systems": 2},
            "outputs": [{"type": "extxyz", "path": "out.extxyz"}],
        }
    )


def test_the_run_seed_is_a_seed_and_the_streams_derived_from_it_wrap():
    """``seed`` in [0, 2**32) (the range of every seed of the library); the stage and
    entry-velocity seeds derived from it (seed + i, seed + 1000 + i) wrap around 2**32, so a
    seed at the top of the range still builds, with the same streams as before below it."""
    from fused_dynamics.config import ConfigError, build_fused, validate_config

    stages = [
        {"type": "fire", "fmax": 0.1},
        {"type": "nvt_langevin", **STAGE_EXAMPLES["nvt_langevin"]},
    ]
    stages[1].pop("seed", None)
    base = _config(stages).model_dump(exclude_unset=True)
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(ConfigError, match=r"seed: "):
            validate_config({**base, "seed": bad})
    top = build_fused(validate_config({**base, "seed": 2**32 - 1}))
    assert top.stages[1].seed == 0  # 2**32 - 1 + 1, wrapped
    assert [h.seed for h in top.hooks] == [1000]  # 2**32 - 1 + 1001, wrapped
    low = build_fused(validate_config({**base, "seed": 7}))
    assert low.stages[1].seed == 8 and [h.seed for h in low.hooks] == [1008]


def test_every_stage_type_builds_with_its_keys():
    """Each stage's keys reach the stage class (building compiles nothing)."""
    from fused_dynamics.config import STAGE_TYPES, build_fused

    for kind in STAGE_TYPES:
        cfg = _config([{"type": "fire", "fmax": 0.1}, {"type": kind, **STAGE_EXAMPLES[kind]}])
        fused = build_fused(cfg)
        stage = fused.stages[1]
        for key, value in STAGE_EXAMPLES[kind].items():
            if key not in ("fmax", "n_steps"):
                assert getattr(stage, key) == value, (kind, key)
        assert stage.n_steps == STAGE_EXAMPLES[kind].get("n_steps")
        if "fmax" in STAGE_EXAMPLES[kind]:
            assert stage.convergence_hook.criteria[0].threshold == STAGE_EXAMPLES[kind]["fmax"]
    # thermalising hook on entry after an optimizer, for stages with a temperature, by default
    cfg = _config(
        [{"type": "fire", "fmax": 0.1}, {"type": "nvt_langevin", **STAGE_EXAMPLES["nvt_langevin"]}]
    )
    assert [type(h).__name__ for h in build_fused(cfg).hooks] == ["ThermalizeOnEntryHook"]
    cfg = _config(
        [
            {"type": "fire", "fmax": 0.1},
            {"type": "nve", "dt": 1.0, "n_steps": 3, "entry_velocities": "keep"},
        ]
    )
    assert build_fused(cfg).hooks == ()


def test_every_model_type_builds():
    from fused_dynamics.config import build_model

    models = [
        {
            "type": "lennard_jones",
            "sigma": 3.4,
            "epsilon": 0.01,
            "cutoff": 7.0,
            "images": [1, 1, 1],
        },
        {"type": "morse", "D": 0.01, "alpha": 1.3, "r0": 3.8, "cutoff": 7.0, "switch_onset": 6.0},
        {"type": "soft_sphere", "sigma": 3.0, "alpha": 2.5},
    ]
    for m in models:
        model = build_model(_config([{"type": "nve", "dt": 1.0, "n_steps": 2}], m))
        assert type(model).__name__.lower().replace("_", "") == m["type"].replace("_", "")
    assert build_model(_config([{"type": "nve", "dt": 1.0, "n_steps": 2}], models[0])).images == (
        1,
        1,
        1,
    )


def test_an_unavailable_device_exits_2(tmp_path):
    cfg = _write(tmp_path / "job.toml", TOML.replace('device = "cpu"', 'device = "tpu"'))
    proc = subprocess.run([*CLI, "run", str(cfg)], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "device" in proc.stderr and "tpu" in proc.stderr


# the application layer, lowest first: a module imports only lower ones (and the engine)
APP_LAYERS = {
    "structures": 0,
    "interrupts": 0,
    "config": 1,
    "inspection": 1,
    "run_outputs": 2,
    "application": 3,
    "demo_job": 4,
    "cli": 5,
    "demo": 6,
}


def _package_imports():
    """``{module: (set of fused_dynamics modules it imports, [(line, target) not at top])}``."""
    import ast
    from pathlib import Path

    import fused_dynamics

    root = Path(fused_dynamics.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges, nested = set(), []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = (
                    (base + "." + node.module if node.module else base)
                    if node.level
                    else node.module
                )
                targets = [
                    f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names
                ]
            else:
                continue
            targets = [t for t in targets if t in files and t != name]
            edges.update(targets)
            if targets and id(node) not in top:
                nested.append((node.lineno, targets))
        graph[name] = (edges, nested)
    return graph


def _layer(module):
    parts = module.split(".")
    return APP_LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_application_layer_imports_only_downwards_at_module_top():
    """config -> structures; application -> config, outputs; cli -> application; demo -> cli.

    No cycle, no function-level import between package modules, and the engine never imports
    the application layer.
    """
    graph = _package_imports()
    for module, (edges, nested) in graph.items():
        layer = _layer(module)
        if layer is None:  # the engine
            assert not [t for t in edges if _layer(t) is not None], module
            continue
        assert not nested, f"{module}: function-level imports {nested}"
        for target in edges:
            other = _layer(target)
            same_package = target.split(".")[1] == module.split(".")[1]
            assert other is None or other < layer or same_package, f"{module} imports {target}"
    # no cycle within the configuration package either
    config = {
        m: {t for t in e if t.startswith("fused_dynamics.config.")}
        for m, (e, _) in graph.items()
        if m.startswith("fused_dynamics.config.")
    }
    done: set = set()
    while config.keys() - done:
        free = [m for m in config.keys() - done if config[m] <= done]
        assert free, f"import cycle among {sorted(config.keys() - done)}"
        done.update(free)


@pytest.mark.parametrize(
    ("criterion", "text"),
    [
        ('{key = "fmax_typo", threshold = 0.1}', "criterion 1: key 'fmax_typo' is unknown"),
        (
            '{key = "energy_change", threshold = nan}',
            "threshold: Input should be a finite number (got nan)",
        ),
    ],
)
def test_a_bad_criterion_is_a_configuration_error_before_compiling(tmp_path, criterion, text):
    # the unknown key was found when the step was traced (exit 1, a KeyError), the NaN
    # threshold raised a bare ValueError (exit 1); both passed --validate-only
    job = TOML.replace("fmax = 0.02", f"fmax = 0.02\ncriteria = [{criterion}]")
    path = _write(tmp_path / "job.toml", job)
    for extra in (["--validate-only"], []):
        res = CliRunner().invoke(app, ["run", str(path), *extra])
        assert res.exit_code == 2, res.output
        assert "stages" in res.output and text in res.output, res.output


def test_a_stage_no_system_can_leave_is_refused_before_compiling(tmp_path):
    # energy_change <= -1 never holds and the stage has no n_steps: the run would never end
    job = TOML.replace(
        "fmax = 0.02\nn_steps = 200", 'criteria = [{key = "energy_change", threshold = -1.0}]'
    )
    assert job != TOML
    path = _write(tmp_path / "job.toml", job)
    for extra in (["--validate-only"], []):
        res = CliRunner().invoke(app, ["run", str(path), *extra])
        assert res.exit_code == 2, res.output
        assert "sub-stage 0 (FIRE2) has no n_steps and its convergence criterion 0" in res.output


def test_an_output_too_small_for_the_job_is_refused_before_compiling(tmp_path):
    # every output receives every system: with room for fewer, the run stopped with "every
    # sink is full" after simulating them all, and their results were lost
    job = TOML.replace('type = "zarr"', 'type = "zarr"\ncapacity = 2')
    assert job != TOML
    path = _write(tmp_path / "job.toml", job)
    for extra in (["--validate-only"], []):
        res = CliRunner().invoke(app, ["run", str(path), *extra])
        assert res.exit_code == 2, res.output
        assert "outputs[0].capacity = 2: the job has 6 structures" in res.output, res.output
    assert not (tmp_path / "out" / "run.zarr").exists()  # refused before any output was made


@pytest.mark.parametrize("index", ["abc", "1.5", "7"])
def test_a_structures_index_that_selects_nothing_is_a_configuration_error(tmp_path, index):
    # "abc" and "1.5" raised a TypeError inside the run (exit 1); "7" of 2 frames an IndexError
    ase.io.write(tmp_path / "in.extxyz", [Icosahedron("Ar", 1), Icosahedron("Ar", 1)])
    job = TOML.replace('generate = "argon"\ncount = 6\nmax_size = 8', 'path = "in.extxyz"')
    job = job.replace('path = "in.extxyz"', f'path = "in.extxyz"\nindex = "{index}"')
    assert job != TOML
    rc, msg = _bad(tmp_path, job)
    assert rc == 2, msg
    assert f"structures.index: '{index}' does not select frames" in msg, msg
