"""Per-system parameters read from each structure's ``atoms.info`` (``fd.from_info``): they
travel with the system through the batch, refills and checkpoints (docs/semantics.md §14a).

All comparisons are bitwise in float64: a value read from ``atoms.info`` must give exactly the
arithmetic of the same value given per slot, and a system's result must not depend on the slot
it lands in or on its neighbours (§21, at equal capacities).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics import ExitReason, inflight
from fused_dynamics import checkpoint as ckpt
from fused_dynamics.parameters import (
    check_info_values,
    info_keys,
    info_readers,
    read_info_values,
)

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)
N_CAP, S_CAP, A_CAP = 40, 3, 13  # capacities shared by every batch here (§21: equal capacities)


def clusters(n: int, seed: int = 0) -> list:
    """Perturbed argon clusters of 8-13 atoms, each with its own ``fmax``, ``T`` and
    ``md_steps`` (two budgets, 6 and 11, so that systems leave at different steps)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = Icosahedron("Ar", 2)[: int(rng.integers(8, 14))]
        a.cell = np.zeros((3, 3))
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        a.info.update(fmax=0.02 + 0.03 * (i % 3), T=10.0 + 15.0 * i, md_steps=6 if i % 2 else 11)
        out.append(a)
    return out


def from_info_stages():
    relax = fd.FIRE(
        LJ, convergence_hook=fd.ConvergenceHook.from_fmax(fd.from_info("fmax")), n_steps=60
    )
    md = fd.NVTLangevin(
        LJ,
        dt=4.0,
        temperature=fd.from_info("T"),
        friction=0.02,
        seed=3,
        n_steps=fd.from_info("md_steps"),
    )
    return relax, md


def from_info_stage():
    relax, md = from_info_stages()
    return relax + md


def per_slot_stage(atoms, md_steps: int):
    """The same run with the values given per slot in Python, and one budget for all."""
    fmax = np.array([a.info["fmax"] for a in atoms])
    temperature = np.array([a.info["T"] for a in atoms])
    relax = fd.FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(fmax), n_steps=60)
    md = fd.NVTLangevin(
        LJ, dt=4.0, temperature=temperature, friction=0.02, seed=3, n_steps=md_steps
    )
    return relax + md


def fixed_batch(atoms, **kw):
    return fd.Batch.from_atoms(
        atoms, max_atoms=N_CAP, max_systems=S_CAP, max_atoms_per_system=A_CAP, **kw
    )


def sampler(atoms):
    return fd.SizeAwareSampler(
        atoms, max_atoms=N_CAP, max_systems=S_CAP, max_atoms_per_system=A_CAP
    )


def by_id(frames) -> dict:
    return {int(a.info["system_id"]): a for a in frames}


@pytest.mark.slow
def test_values_from_info_equal_the_same_values_given_per_slot():
    """A fixed batch: thresholds, temperatures and budgets from ``atoms.info`` give bit for bit
    the run with those values given per slot; each system spends exactly its own budget."""
    atoms = clusters(3)
    got = from_info_stage().run(fixed_batch(atoms, info_keys=["fmax", "T", "md_steps"]))
    steps = np.asarray(got.info["stage_steps"])
    assert steps[:, 1].tolist() == [a.info["md_steps"] for a in atoms]
    assert np.asarray(got.info["exit_reason"]).tolist() == [int(ExitReason.BUDGET)] * 3
    for budget in (6, 11):
        ref = per_slot_stage(atoms, budget).run(fixed_batch(atoms))
        same = [i for i, a in enumerate(atoms) if a.info["md_steps"] == budget]
        assert same
        for i in same:
            rows = np.asarray(got.system_idx) == i
            assert np.array_equal(np.asarray(got.positions)[rows], np.asarray(ref.positions)[rows])
            assert np.array_equal(
                np.asarray(got.velocities)[rows], np.asarray(ref.velocities)[rows]
            )
            assert np.asarray(got.energy)[i] == np.asarray(ref.energy)[i]
            assert steps[i, 0] == np.asarray(ref.info["stage_steps"])[i, 0]
    out = got.to_atoms()  # the values used go out with each system
    assert [a.info["T"] for a in out] == [a.info["T"] for a in atoms]


def inflight_dataset() -> list:
    """8 clusters with ids in ``info["sid"]``; four carry a bad value."""
    atoms = clusters(8, seed=1)
    for i, a in enumerate(atoms):
        a.info["sid"] = i
    atoms[2].info["T"] = -5.0  # breaks NVTLangevin's rule temperature >= 0
    del atoms[4].info["fmax"]
    atoms[5].info["md_steps"] = 2.5  # a budget is an integer
    atoms[6].info["T"] = "hot"
    return atoms


REJECTED = {
    2: r"atoms.info\['T'\] \(read by NVTLangevin.temperature\).*>= 0",
    4: r"atoms.info has no 'fmax'",
    5: r"atoms.info\['md_steps'\] \(read by NVTLangevin.n_steps\) must be an integer",
    6: r"atoms.info\['T'\] must be a finite real number",
}


def inflight_run(atoms, **options) -> dict:
    sink = fd.HostMemory()
    smp = fd.SizeAwareSampler(
        atoms, max_atoms=N_CAP, max_systems=S_CAP, max_atoms_per_system=A_CAP, id_key="sid"
    )
    from_info_stage().run(sampler=smp, sinks=[sink], refill_frequency=4, **options)
    return by_id(sink.atoms)


def assert_same_systems(a: dict, b: dict, ids) -> None:
    for sid in ids:
        assert np.array_equal(a[sid].positions, b[sid].positions), sid
        assert np.array_equal(a[sid].get_velocities(), b[sid].get_velocities()), sid
        assert a[sid].get_potential_energy() == b[sid].get_potential_energy(), sid


def test_values_travel_with_their_system_through_refills_and_bad_ones_are_rejected(tmp_path):
    """Inflight, 3 slots for 8 structures: a system's result is the same bit for bit whatever
    slot and neighbours it gets (the dataset reversed), so its values came with it, not with
    its slot. Structures with a missing, non-numeric or out-of-rule value are written as
    REJECTED with a reason naming the key and the parameter; the others are not touched. A
    run stopped at a checkpoint and resumed gives the uninterrupted results."""
    atoms = inflight_dataset()
    first = inflight_run(atoms)
    second = inflight_run(atoms[::-1])
    assert sorted(first) == sorted(second) == list(range(8))
    for sid, pattern in REJECTED.items():
        assert first[sid].info["exit_reason"] == int(ExitReason.REJECTED)
        assert re.search(pattern, first[sid].info["rejected"]), first[sid].info["rejected"]
    good = sorted(set(range(8)) - set(REJECTED))
    for sid in good:
        assert first[sid].info["exit_reason"] == int(ExitReason.BUDGET)
        assert first[sid].info["stage_steps"][1] == atoms[sid].info["md_steps"]
        assert first[sid].info["T"] == atoms[sid].info["T"]
    assert_same_systems(first, second, good)

    # checkpointed after two host visits, stopped, resumed: the uninterrupted results
    path = tmp_path / "run.ckpt"
    part = fd.HostMemory()
    smp = fd.SizeAwareSampler(
        atoms, max_atoms=N_CAP, max_systems=S_CAP, max_atoms_per_system=A_CAP, id_key="sid"
    )
    with from_info_stage().start(sampler=smp, sinks=[part], refill_frequency=4) as run:
        for _ in range(2):
            run.advance()
            run.refill_check()
        run.save(path)
    assert 0 < len(part) < 8
    smp = fd.SizeAwareSampler(
        atoms, max_atoms=N_CAP, max_systems=S_CAP, max_atoms_per_system=A_CAP, id_key="sid"
    )
    from_info_stage().run(sampler=smp, sinks=[part], refill_frequency=4, resume=path)
    resumed = by_id(part.atoms)
    assert sorted(resumed) == list(range(8)) and len(part) == 8
    assert_same_systems(first, resumed, good)


@pytest.mark.slow
def test_a_pipeline_carries_the_values_between_its_stages():
    """``relax | md`` (here on one device, the stages taking turns): the temperature and the
    budget that only the second stage reads travel with each system's row, so every system's
    result is bit for bit the fused run's; a
    structure whose value only the second stage reads and breaks its rule is REJECTED before
    the first stage runs it, with the fused run's reason (docs/semantics.md §14a, §16)."""
    atoms = inflight_dataset()
    fused = inflight_run(atoms)
    relax, md = from_info_stages()
    sink = fd.HostMemory()
    smp = fd.SizeAwareSampler(
        atoms, max_atoms=N_CAP, max_systems=S_CAP, max_atoms_per_system=A_CAP, id_key="sid"
    )
    (relax | md).run(smp, [sink], refill_frequency=4, buffer_size=2)
    got = by_id(sink.atoms)
    assert sorted(got) == list(range(8)) and len(sink) == 8
    for sid, pattern in REJECTED.items():
        assert got[sid].info["exit_reason"] == int(ExitReason.REJECTED)
        assert re.search(pattern, got[sid].info["rejected"]), got[sid].info["rejected"]
        assert got[sid].info["rejected"] == fused[sid].info["rejected"]
    good = sorted(set(range(8)) - set(REJECTED))
    for sid in good:
        assert got[sid].info["stage_steps"][-1] == atoms[sid].info["md_steps"]  # the last stage's
    assert_same_systems(fused, got, good)


def test_missing_or_bad_values_are_refused_before_compiling():
    atoms = clusters(3)
    keys = ["fmax", "T", "md_steps"]
    with pytest.raises(ValueError, match=r"info_keys=\['T'\]"):  # the batch carries no values
        from_info_stage().run(fixed_batch(atoms, info_keys=["fmax", "md_steps"]))
    bad = [a.copy() for a in atoms]
    del bad[1].info["T"]
    with pytest.raises(ValueError, match=r"system 1: atoms.info has no 'T'"):
        fixed_batch(bad, info_keys=keys)
    bad[1].info["T"] = True
    with pytest.raises(
        ValueError, match=r"system 1: atoms.info\['T'\] must be a finite real number"
    ):
        fixed_batch(bad, info_keys=keys)
    bad[1].info["T"] = 300.0
    bad[2].info["fmax"] = np.inf  # a threshold must be finite: refused as it is read
    with pytest.raises(ValueError, match=r"system 2: atoms.info\['fmax'\] must be a finite"):
        fixed_batch(bad, info_keys=keys)
    bad[2].info["fmax"] = 0.05
    bad[2].info["T"] = -5.0  # breaks NVTLangevin's rule: refused when the run starts
    with pytest.raises(ValueError, match=r"system 2 \(slot 2\).*'T'.*temperature must be"):
        from_info_stage().run(fixed_batch(bad, info_keys=keys))
    bad[2].info["T"] = 50.0
    bad[0].info["md_steps"] = 0
    with pytest.raises(ValueError, match=r"system 0 \(slot 0\).*n_steps\) must be an integer"):
        from_info_stage().run(fixed_batch(bad, info_keys=keys))
    with pytest.raises(ValueError, match="non-empty str"):
        fd.from_info("")
    with pytest.raises(TypeError, match="sequence of str"):
        fixed_batch(atoms, info_keys="T")
    with pytest.raises(TypeError, match=r"read from_info parameters \['dt'\].*require_info"):
        relax = fd.FIRE(LJ, n_steps=3)
        md = fd.NVE(LJ, dt=fd.from_info("dt"), n_steps=3)
        (relax | md).run(SimpleNamespace(), sinks=[fd.HostMemory()])  # no require_info


def test_values_are_checked_as_the_batch_stores_them():
    """Host-side checks, no compilation: non-finite or overflowing numbers, a budget that is
    not an integer or that the batch's dtype would round, a value that float32 turns into inf;
    integral values pass integer rules (FIRE's ``Nmin``) and order checks skip the names."""
    stage = from_info_stage()
    good = {"fmax": 0.05, "T": 300.0, "md_steps": 11}
    check_info_values(stage, good, "system 0", dtype=np.float32)
    for key, value, pattern in (
        ("T", float("nan"), r"'T'\] must be a finite real number"),
        ("T", 10**400, r"'T'\] must be a finite real number"),
        ("md_steps", float("inf"), r"'md_steps'\] must be a finite real number"),
        ("fmax", "0.05", r"'fmax'\] must be a finite real number"),
    ):
        with pytest.raises(ValueError, match=pattern):
            read_info_values({**good, key: value}, list(good), "system 7")
    with pytest.raises(ValueError, match=r"system 7: atoms.info\['T'\].*finite"):
        check_info_values(stage, {**good, "T": 1e39}, "system 7", dtype=np.float32)
    check_info_values(stage, {**good, "T": 1e39}, "system 7", dtype=np.float64)
    with pytest.raises(ValueError, match=r"'md_steps'\] \(read by NVTLangevin.n_steps\)"):
        check_info_values(stage, {**good, "md_steps": 2**24 + 1}, "system 7", dtype=np.float64)
    with pytest.raises(ValueError, match=r"'md_steps'\] \(read by NVTLangevin.n_steps\)"):
        check_info_values(stage, {**good, "md_steps": 3001}, "system 7", dtype=np.float16)
    fire = fd.FIRE2(LJ, Nmin=fd.from_info("nmin"), dtmin=fd.from_info("dtmin"))
    check_info_values(fire, {"nmin": 5.0, "dtmin": 1e-3}, "system 0", dtype=np.float64)
    with pytest.raises(ValueError, match=r"'nmin'\] \(read by FIRE2.Nmin\)"):
        check_info_values(fire, {"nmin": 5.5, "dtmin": 1e-3}, "system 0", dtype=np.float64)
    assert info_keys(fire) == ("dtmin", "nmin")
    # a whole number that float32 would round is refused as the fixed batch is built
    big = clusters(1)
    big[0].info["md_steps"] = 2**24 + 1
    with pytest.raises(ValueError, match=r"system 0: atoms.info\['md_steps'\] = 16777217 .*"):
        fd.Batch.from_atoms(big, dtype=np.float32, info_keys=["md_steps"])
    # rejection reasons name the parameters that read the key; messages say what float32 stored
    with pytest.raises(ValueError, match=r"'T'\] must be a finite .*NVTLangevin.temperature"):
        read_info_values({"T": np.nan}, ["T"], "system 7", info_readers(stage))
    with pytest.raises(ValueError, match=r"got 16777217, which the batch's float32 stores as"):
        check_info_values(stage, {**good, "md_steps": 2**24 + 1}, "system 7", dtype=np.float32)
    # a sampler reused by a run whose stages read no values stops requiring them
    smp = sampler(clusters(2))
    inflight.require_info(from_info_stage(), smp)
    assert smp.info_keys == ("T", "fmax", "md_steps")
    inflight.require_info(fd.FusedStage([(0, fd.NVE(LJ, dt=1.0, n_steps=2))]), smp)
    assert smp.info_keys == ()


def test_a_checkpoint_of_stages_whose_state_reads_from_info_values_loads(tmp_path):
    """The checkpoint's skeleton builds every stage's state with the batch's values in place
    (FIRE's 'vv' flavour converts its ``dt`` to ASE units in ``init_state``)."""
    fire = fd.FIRE(LJ, flavor="vv", dt=fd.from_info("dt"), n_steps=2)
    atoms = clusters(2)
    for a, dt in zip(atoms, (0.5, 1.5), strict=True):
        a.info["dt"] = dt
    fused = fd.FusedStage([(0, fire)])
    prepared = fused.init(fixed_batch(atoms, info_keys=["dt"]))
    ckpt.save(tmp_path / "c", prepared, {"note": "test"})
    _, loaded = ckpt.load(tmp_path / "c", fused)
    assert sorted(loaded.parameters) == ["dt"]
    assert np.array_equal(
        np.asarray(loaded.parameters["dt"]), np.asarray(prepared.parameters["dt"])
    )
    assert np.array_equal(
        np.asarray(loaded.stage_state[0].dt), np.asarray(prepared.stage_state[0].dt)
    )


def test_a_dataset_whose_every_structure_is_rejected_writes_them_all_and_runs_nothing():
    """Nothing to compile: every structure lacks its value, so each is written REJECTED (§14)
    and the run ends without an error."""
    atoms = clusters(3)
    for a in atoms:
        del a.info["T"]
    sink = fd.HostMemory()
    stats = from_info_stage().run(sampler=sampler(atoms), sinks=[sink])
    assert stats.rejected == stats.written == 3 and stats.steps == 0
    assert sorted(a.info["system_id"] for a in sink.atoms) == [0, 1, 2]
    for a in sink.atoms:
        assert a.info["exit_reason"] == int(ExitReason.REJECTED)
        assert "atoms.info has no 'T', which NVTLangevin.temperature reads" in a.info["rejected"]


CLI_JOB = """\
dtype = "float64"
compilation_cache = false
[structures]
path = "{inputs}"
id_key = "sid"
[model]
type = "lennard_jones"
sigma = 3.405
epsilon = 0.0104
cutoff = 6.0
switch_onset = 5.0
[capacity]
max_atoms = {n_cap}
max_systems = {s_cap}
[[stages]]
type = "fire"
fmax = {{info = "fmax"}}
n_steps = 60
[[stages]]
type = "nvt_langevin"
dt = 4.0
temperature = {{info = "T"}}
friction = 0.02
n_steps = {{info = "md_steps"}}
[[outputs]]
type = "extxyz"
path = "{output}"
"""


@pytest.mark.slow
def test_the_command_line_reads_values_from_info(tmp_path):
    """``temperature = {info = "T"}`` in a job file: the same values and rules as
    ``fd.from_info`` (docs/command-line.md). Each system's result is bit for bit the same
    when the structures come in reverse order (the values travel with the systems); each
    spends its own Langevin budget; bad values are REJECTED naming the key and the parameter;
    the stage summary counts budgets per system."""
    import ase.io
    from typer.testing import CliRunner

    from fused_dynamics.cli import app

    atoms = inflight_dataset()
    outputs = {}
    for name, order in (("forward", atoms), ("reversed", atoms[::-1])):
        ase.io.write(tmp_path / f"{name}.extxyz", order)
        job = tmp_path / f"{name}.toml"
        job.write_text(
            CLI_JOB.format(
                inputs=f"{name}.extxyz", output=f"{name}-out.extxyz", n_cap=N_CAP, s_cap=S_CAP
            )
        )
        check = CliRunner().invoke(app, ["run", str(job), "--validate-only"])
        assert check.exit_code == 0, check.output
        res = CliRunner().invoke(app, ["run", str(job), "--no-progress"])
        assert res.exit_code == 0, res.output
        outputs[name] = by_id(ase.io.read(tmp_path / f"{name}-out.extxyz", ":"))
    first, second = outputs["forward"], outputs["reversed"]
    assert sorted(first) == sorted(second) == list(range(8))
    for sid, pattern in REJECTED.items():
        assert first[sid].info["exit_reason"] == int(ExitReason.REJECTED)
        assert re.search(pattern.replace("'", "."), first[sid].info["rejected"]), first[sid].info
    good = sorted(set(range(8)) - set(REJECTED))
    for sid in good:
        assert first[sid].info["exit_reason"] == int(ExitReason.BUDGET)
        assert first[sid].info["stage_steps"][1] == atoms[sid].info["md_steps"]
    assert_same_systems(first, second, good)
    assert re.search(r"1: NVTLangevin\s+4\s+0\s+4\s+0", res.output), res.output


def test_a_job_file_value_is_a_number_or_an_info_table(tmp_path):
    """A key that takes a number or ``{info = KEY}`` reports one problem, for the form that
    was meant, naming the key (and a key of another union still reports its problem)."""
    from fused_dynamics.config import ConfigError, load_config

    job = tmp_path / "job.toml"
    (tmp_path / "in.extxyz").write_text("")  # the structures key must name a file
    for old, new, expected in (
        ('temperature = {info = "T"}', 'temperature = "300"', r"temperature: must be a number"),
        ('temperature = {info = "T"}', 'temperature = {inf = "T"}', r"unknown key 'inf'"),
        (
            'temperature = {info = "T"}',
            'temperature = {info = ""}',
            r"temperature.info: the atoms.info key of each structure; got '', which names none$",
        ),
        (
            'temperature = {info = "T"}',
            'temperature = {info = " T"}',
            r"temperature.info: an atoms.info key without leading or trailing spaces, got ' T' "
            r"\(did you mean 'T'\?\)$",
        ),
        ('temperature = {info = "T"}', "temperature = -3", r"temperature: must be >= 0"),
        ('n_steps = {info = "md_steps"}', "n_steps = 2.5", r"n_steps: must be a whole"),
        ("compilation_cache = false", "compilation_cache = {a = 1}", r"compilation_cache: "),
    ):
        text = CLI_JOB.format(inputs="in.extxyz", output="out.extxyz", n_cap=40, s_cap=3)
        assert old in text
        job.write_text(text.replace(old, new))
        with pytest.raises(ConfigError) as info:
            load_config(job)
        lines = [line for line in str(info.value).splitlines()[1:] if line.strip()]
        assert len(lines) == (2 if "compilation_cache" in new else 1), lines
        assert re.search(expected, lines[0]), lines


def test_a_job_file_checks_the_values_before_compiling(tmp_path):
    """Before compiling (what ``--validate-only`` runs): how many structures carry good
    values, and which would be REJECTED; a value must also meet the job file's own bound
    for its key (``fmax > 0``, where the criterion itself only asks for a finite number); a
    key no structure carries is refused naming the job key."""
    import ase.io

    from fused_dynamics.application import preflight
    from fused_dynamics.config import ConfigError, load_config

    atoms = clusters(3)
    for i, a in enumerate(atoms):
        a.info["sid"] = i
    atoms[1].info["fmax"] = -1.0  # finite, so fd.from_info alone would take it
    ase.io.write(tmp_path / "in.extxyz", atoms)
    job = tmp_path / "job.toml"
    job.write_text(CLI_JOB.format(inputs="in.extxyz", output="out.extxyz", n_cap=40, s_cap=3))
    cfg, base = load_config(job)
    line = preflight(cfg, base).info_line
    assert line.startswith("atoms.info: 2 of 3 structures carry good values of 'T', 'fmax'")
    assert "1 will be REJECTED" in line
    assert "system 1: atoms.info['fmax'] (read by stages[0].fmax of the job file) must be > 0" in (
        line
    )
    for a in atoms:
        del a.info["T"]
    ase.io.write(tmp_path / "in.extxyz", atoms)
    with pytest.raises(ConfigError, match=r"stages\[1\].temperature: no structure carries"):
        preflight(cfg, base)
    assert not (tmp_path / "out.extxyz").exists()
