"""The front door (issue 15): the commented configuration, structures from files, globs and
lists, strict types, ``--validate-only`` equal to ``run`` before compiling, messages that name
the key to change, the resume command after Ctrl-C, the per-stage summary.

Nothing here compiles: every command runs in-process (typer's CliRunner) with
``FusedStage.run`` and ``FusedStage.start`` replaced by a function that fails the test, so a
configuration that reached compilation would show. The compile message and the per-stage
summary of a real run are checked on the quick demo (tests/test_demo.py).
"""

import tomllib

import ase.io
import pytest
import yaml
from ase.build import bulk
from pydantic import BaseModel
from typer.testing import CliRunner

import fused_dynamics.fused
from fused_dynamics.application import format_stage_exits, stage_exit_counts
from fused_dynamics.cli import app
from fused_dynamics.config import (
    ConfigError,
    RunConfig,
    load_config,
    load_structures_with_sources,
    save_config,
    validate_config,
)
from fused_dynamics.config.writing import _MODELS, _STAGES, config_text
from fused_dynamics.demo import demo_config, make_structures
from fused_dynamics.interrupts import resume_command
from fused_dynamics.status import ExitReason


@pytest.fixture(autouse=True)
def _no_compilation(monkeypatch):
    """Any attempt to run the fused stage fails the test: these checks come before it."""

    def compiled(*args, **kwargs):
        raise AssertionError("the run reached FusedStage.run/start (compilation)")

    monkeypatch.setattr(fused_dynamics.fused.FusedStage, "run", compiled)
    monkeypatch.setattr(fused_dynamics.fused.FusedStage, "start", compiled)


JOB = {
    "structures": {"path": "in.extxyz"},
    "model": {"type": "lennard_jones", "sigma": 3.405, "epsilon": 0.0104, "cutoff": 7.0},
    "stages": [
        {"type": "fire", "fmax": 0.05, "n_steps": 20},
        {"type": "nvt_langevin", "dt": 2.0, "temperature": 30.0, "friction": 0.01, "n_steps": 5},
    ],
    "capacity": {"max_atoms": 32, "max_systems": 4},
    "outputs": [{"type": "extxyz", "path": "out/run.extxyz"}],
}


@pytest.fixture
def job(tmp_path):
    """A folder with ``in.extxyz`` (3 argon structures of at most 16 atoms)."""
    ase.io.write(tmp_path / "in.extxyz", make_structures(3, seed=1, max_size=16))
    return tmp_path


def _with(data: dict, dotted: str, value) -> dict:
    """A deep copy of ``data`` with ``dotted`` ("stages.1.dt", "seed") set (or removed)."""
    import copy

    out = copy.deepcopy(data)
    *path, last = dotted.split(".")
    node = out
    for part in path:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value is _REMOVE:
        node.pop(last)
    else:
        node[last] = value
    return out


_REMOVE = object()


def _write_job(folder, data, name="job.toml"):
    path = folder / name
    path.write_text(config_text(data, "toml" if name.endswith(".toml") else "yaml"))
    return path


def _invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


# ----------------------------------------------------------------------------- 1. commented file
def _section_fields(cls: type[BaseModel]) -> list[str]:
    return list(cls.model_fields)


def test_save_config_comments_every_key_and_loads_back_unchanged(tmp_path):
    rich = _with(JOB, "structures.path", ["in.extxyz", "more/*.cif"])
    rich["model"] = {
        "type": "lennard_jones",
        "cutoff": 7.0,
        "mixing": "lorentz_berthelot",
        "pairs": {"Ar": {"sigma": 3.4, "epsilon": 0.0104}, "Kr": {"sigma": 3.65, "epsilon": 0.014}},
    }
    rich["stages"][0]["criteria"] = [{"key": "energy_change", "threshold": 1e-6}]
    rich["stages"][0]["write"] = "out/relaxed.extxyz"
    rich["report"] = {"record": "out/rec.csv", "progress": False}
    rich["dtype"] = "float64"
    (tmp_path / "in.extxyz").write_text("")  # the files exist for validation only
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "a.cif").write_text("")
    for data in (demo_config(True, "out"), rich):
        for name in ("job.toml", "job.yaml"):
            path = tmp_path / name
            save_config(data, path, overwrite=True)
            text = path.read_text()
            cfg, _ = load_config(path)
            assert cfg == validate_config(data, tmp_path), name  # save, load: equal config
            parsed = tomllib.loads(text) if name.endswith("toml") else yaml.safe_load(text)
            assert parsed == _without_none(data), name  # nothing added, nothing lost
            # every key of every section is explained in a comment
            keys = _section_fields(RunConfig)
            for section in (cfg.structures, cfg.capacity, cfg.report, cfg.outputs[0]):
                keys += list(type(section).model_fields)
            keys += list(_MODELS[cfg.model.type].model_fields)
            for st in cfg.stages:
                keys += list(_STAGES[st.type].model_fields)
            for key in keys:
                assert f"# {key}:" in text or f"# {key};" in text, (name, key)
    text = (tmp_path / "job.toml").read_text()
    # units, defaults, allowed values, and how to read one's own files
    flat = " ".join(line.strip("# ") for line in text.splitlines())  # comments unwrapped
    assert "dt: fs: time step (or {info = KEY}: each structure's own atoms.info value); " in flat
    assert "(or {info = KEY}: each structure's own atoms.info value); required; > 0" in flat
    assert '# dtype: precision of the batch and the model; default: "float32"; allowed:' in text
    assert "# record_every: steps between recorded samples; default: 5; > 0" in text
    assert 'path = ["relaxed.extxyz", "POSCAR", "cifs/*.cif"]' in text
    assert "read in the listed order" in text and "sorted by name" in text
    assert "--validate-only" in text
    # the keys not given are there, commented out at their defaults
    assert "# refill_frequency = 20" in text and "# seed = 0" in text
    assert "# maxstep = 0.2" in text  # a FIRE key not set
    # how pairs are found (docs/cli.md): allowed values, default, the skin's unit
    assert "neighbors: how pairs are found: auto (" in flat
    assert 'default: "auto"; allowed: "auto" | "dense" | "list" ' in flat
    assert '# neighbors = "auto"' in text
    assert "skin: Å: Verlet skin of the neighbor list" in flat
    assert "default: 1.0; >= 0 " in flat and "# skin = 1.0" in text


def _without_none(data):
    if isinstance(data, dict):
        return {k: _without_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_without_none(v) for v in data]
    return data


def test_demo_save_config_writes_the_commented_toml(tmp_path):
    rc, out = _invoke("demo", "--quick", "--save-config", tmp_path / "demo.toml", "-o", "out")
    assert rc == 0, out
    text = (tmp_path / "demo.toml").read_text()
    assert "YOUR OWN STRUCTURES" in text and text.count("\n# ") > 100
    assert load_config(tmp_path / "demo.toml")[0] == validate_config(demo_config(True, "out"))
    rc, out = _invoke("demo", "--save-config", tmp_path / "demo.toml")
    assert rc == 2 and "--overwrite" in out  # never replaced unasked


# ----------------------------------------------------------------------------- 2. structures
def test_files_globs_and_lists_are_read_in_the_listed_order(tmp_path):
    ar = make_structures(4, seed=2, max_size=8)
    ase.io.write(tmp_path / "multi.extxyz", ar[:2])  # two frames
    (tmp_path / "cifs").mkdir()
    for name in ("b.cif", "a.cif"):  # written out of order: the glob sorts by name
        ase.io.write(tmp_path / "cifs" / name, bulk("Cu", "fcc", a=3.6), format="cif")
    ase.io.write(tmp_path / "POSCAR", bulk("Kr", "fcc", a=5.7), format="vasp")
    data = _with(JOB, "structures.path", ["POSCAR", "cifs/*.cif", "multi.extxyz", "cifs/a.cif"])
    cfg = validate_config(data, tmp_path)
    atoms, sources = load_structures_with_sources(cfg, tmp_path)
    names = [(s[0].rsplit("/", 2)[-1], s[1]) for s in sources]
    # listed order; a glob's matches sorted; a file named again is read once, where first named
    assert names == [("POSCAR", 0), ("a.cif", 0), ("b.cif", 0), ("multi.extxyz", 0)] + [
        ("multi.extxyz", 1)
    ]
    assert [a.get_chemical_symbols()[0] for a in atoms] == ["Kr", "Cu", "Cu", "Ar", "Ar"]
    # one string, a file or a glob, as before
    cfg = validate_config(_with(JOB, "structures.path", "cifs/*.cif"), tmp_path)
    assert [s[0].rsplit("/", 1)[-1] for s in load_structures_with_sources(cfg, tmp_path)[1]] == [
        "a.cif",
        "b.cif",
    ]
    # the order is documented in the key's description
    assert (
        "listed order"
        in RunConfig.model_fields["structures"].annotation.model_fields["path"].description
    )


@pytest.mark.parametrize(
    "path, pattern",
    [
        ("missing.extxyz", "missing.extxyz"),
        ("nothing/*.cif", "nothing/*.cif"),
        (["in.extxyz", "cifs/*.vasp"], "cifs/*.vasp"),
    ],
)
def test_a_missing_file_or_an_empty_glob_names_the_key_and_the_pattern(job, path, pattern):
    with pytest.raises(ConfigError, match=r"structures\.path: no structure file matches") as e:
        validate_config(_with(JOB, "structures.path", path), job)
    assert repr(pattern) in str(e.value)


# ----------------------------------------------------------------------------- 3.-5. the checks
# (key set, value, what the message must say): each is refused by --validate-only and by run
# with exit 2 and one message naming the key (and how to fix it), before compiling
BROKEN = [
    ("model.cutoff", True, ["model.cutoff", "a boolean"]),
    ("model.sigma", "3.4", ["model.sigma", "write 3.4 without quotes"]),
    ("capacity.max_atoms", 32.0, ["capacity.max_atoms", "write 32"]),
    ("stages.0.n_steps", "20", ["stages[0].n_steps", "without quotes"]),
    ("report.progress", 1, ["report.progress", "true or false"]),
    ("seed", 1.5, ["seed", "whole number"]),
    ("structures.path", "missing.extxyz", ["structures.path", "'missing.extxyz'"]),
    ("structures.path", ["in.extxyz", "no/*.cif"], ["structures.path", "'no/*.cif'"]),
    ("structures.path", 3, ["structures.path", "a glob or a list"]),
    ("capacity.max_atoms", 8, ["capacity.max_atoms", "raise capacity.max_atoms to at least"]),
    ("capacity.max_atoms_per_system", 64, ["capacity.max_atoms_per_system", "at most 32"]),
    ("capacity.max_atoms_per_system", 4, ["capacity.max_atoms_per_system = 4", "at least"]),
    ("model.switch_onset", 7.5, ["model.switch_onset", "smaller than model.cutoff"]),
    ("stages.1.entry_velocities", "thermal", None),  # replaced below: an nve stage
    ("stages.1.n_steps", _REMOVE, ["stages[1]", "never finish"]),
    ("model.alpah", 2.0, ["'alpah'", "allowed keys"]),
    ("model.species", ["Kr"], ["model.species", "Ar"]),
    ("stages.0.write", "out/relaxed.txt", ["stages[0].write", ".extxyz"]),
    ("dtype", "float16", ["dtype", "float32"]),
    ("stages.1.temperature", -1.0, ["stages[1].temperature"]),
    ("outputs.0.path", "in.extxyz", ["outputs[0].path", "in.extxyz"]),
    ("structures.id_key", "sid", ["structures.id_key", "sid"]),
    ("convergence_every", 0, ["convergence_every"]),
    ("convergence_every", True, ["convergence_every", "a boolean"]),
    ("model.neighbors", "sparse", ["model.neighbors", "'auto'", "'dense'", "'list'"]),
    ("model.neighbors", True, ["model.neighbors"]),
    ("model.skin", -0.5, ["model.skin", "must be >= 0", "got -0.5"]),
    ("model.skin", "1.0", ["model.skin", "without quotes"]),
]
BROKEN[13] = (
    "stages.1",
    {"type": "nve", "dt": 1.0, "n_steps": 3, "entry_velocities": "thermal"},
    ["stages[1].entry_temperature", "give entry_temperature (K)"],
)


def test_twenty_broken_configurations_validate_only_and_run_agree_before_compiling(job):
    assert len(BROKEN) >= 20
    for key, value, words in BROKEN:
        path = _write_job(job, _with(JOB, key, value))
        rc_check, out_check = _invoke("run", path, "--validate-only")
        rc_run, out_run = _invoke("run", path)
        assert rc_check == rc_run == 2, (key, out_check, out_run)
        assert out_check == out_run, (key, out_check, out_run)  # the same message
        for word in words:
            assert word in out_run, (key, word, out_run)
        assert "compil" not in out_run  # refused before the run started


def test_an_existing_output_is_refused_by_both_and_the_good_config_passes(job):
    path = _write_job(job, JOB)
    rc, out = _invoke("run", path, "--validate-only")
    assert rc == 0, out
    assert "valid" in out and "every check 'run' makes before compiling passed" in out
    assert "3 from 1 file(s), read in this order" in out and "in.extxyz (3)" in out
    (job / "out").mkdir(exist_ok=True)
    (job / "out" / "run.extxyz").write_text("")
    for extra in ((), ("--validate-only",)):
        rc, out = _invoke("run", path, *extra)
        assert rc == 2 and "outputs[0].path" in out and "--overwrite" in out, out


def test_a_structure_too_large_names_max_atoms_and_the_value_needed(job):
    big = bulk("Ar", "fcc", a=5.26, cubic=True) * (3, 3, 3)  # 108 atoms
    ase.io.write(job / "big.extxyz", [big])
    data = _with(JOB, "structures.path", ["in.extxyz", "big.extxyz"])
    rc, out = _invoke("run", _write_job(job, data), "--validate-only")
    assert rc == 2
    assert "capacity.max_atoms: 'big.extxyz' frame 0 has 108 atoms" in out
    assert "raise capacity.max_atoms to at least 108" in out
    # the message names the key to raise, not the largest structure that fits
    assert "at most 16" not in out


# ----------------------------------------------------------------------------- 6. Ctrl-C, summary
def test_resume_command_drops_overwrite_and_adds_resume():
    assert resume_command(["run", "my job.toml", "--overwrite", "--strict"]) == (
        "fused-dynamics run 'my job.toml' --strict --resume"
    )
    assert resume_command(["run", "a.toml", "--resume"]) == "fused-dynamics run a.toml --resume"


def test_an_interrupt_prints_the_exact_command_to_resume(job, monkeypatch):
    import signal

    import fused_dynamics.cli as cli
    from fused_dynamics.interrupts import RunInterrupted

    def interrupted(*args, **kwargs):
        raise RunInterrupted(signal.SIGINT, ["outputs[0].path 'run.extxyz': 2 systems"])

    monkeypatch.setattr(cli, "execute", interrupted)
    path = _write_job(job, JOB)
    rc, out = _invoke("run", path, "--overwrite", "--no-progress")
    assert rc == 130
    assert "2 systems" in out
    assert f"to continue, run: fused-dynamics run {path} --no-progress --resume" in out


def _left(reason, steps):
    return {"exit_reason": int(reason), "stage_steps": steps}


def test_stage_exit_counts_per_stage():
    R = ExitReason
    left = [
        _left(R.BUDGET, [12, 5]),  # FIRE converged (12 < 20), MD budget
        _left(R.BUDGET, [20, 5]),  # FIRE budget, MD budget
        _left(R.CONVERGED, [3, 2]),  # both by criterion
        _left(R.FAILED, [7, 0]),  # failed in FIRE
        _left(R.FAILED, [20, 2]),  # FIRE budget, failed in MD
        _left(R.FAILED, [0, 0]),  # failed on its first evaluation: counted in stage 0
        _left(R.REJECTED, []),  # never entered
    ]
    rows = stage_exit_counts(left, [20, 5], ["FIRE", "NVTLangevin"])
    assert [(r["entered"], r["converged"], r["budget"], r["failed"]) for r in rows] == [
        (6, 2, 2, 2),
        (4, 1, 2, 1),
    ]
    text = format_stage_exits(rows)
    assert "converged" in text and "budget" in text and "failed" in text
    assert "0: FIRE" in text and "1: NVTLangevin" in text


def test_the_run_says_it_compiles_then_how_long_it_took():
    """The first recorder sample comes from inside the compiled step: compilation is over."""
    from types import SimpleNamespace

    from fused_dynamics.application import _CompileWatch

    samples, lines = [], []

    class Bar:  # what _CompileWatch uses of tqdm
        desc = "graduated"

        def set_description(self, text):
            self.desc = text

        def clear(self):
            lines.append(("clear", self.desc))

        def refresh(self):
            pass

    record = SimpleNamespace(bar=Bar(), on_sample=samples.append)
    watch = _CompileWatch(record, lines.append)
    watch.start()
    assert lines[-1] == "compiling the fused step (the first chunk waits for it) ..."
    assert record.bar.desc == "compiling the fused step"  # the bar says so meanwhile
    watch.on_sample("first")
    assert lines[-1].startswith("compiled in ") and lines[-1].endswith(" s; running")
    assert record.bar.desc == "graduated"
    watch.on_sample("second")  # said once
    assert sum(isinstance(x, str) and x.startswith("compiled") for x in lines) == 1
    assert samples == ["first", "second"]  # every sample reaches the record


def test_convergence_every_reaches_the_fused_stage(job):
    """``convergence_every`` (docs/semantics.md §10) is passed to the FusedStage unchanged."""
    from fused_dynamics.config.build import build_fused

    default, _ = load_config(_write_job(job, JOB))
    assert build_fused(default).convergence_every == 1  # every step, unless asked
    cfg, _ = load_config(_write_job(job, _with(JOB, "convergence_every", 5), name="every5.toml"))
    assert build_fused(cfg).convergence_every == 5
