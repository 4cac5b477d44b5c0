"""Limits a hostile probe found unguarded: step budgets past int32, FreezeAtomsHook in an inflight
run, and initialize_velocities on a FixCom system that also has fixed atoms.

Everything here is refused or computed before (or without) compiling a run, so it stays fast.
"""

import textwrap

import jax
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.constraints import FixAtoms, FixCartesian, FixCom
from typer.testing import CliRunner

import fused_dynamics as fd
from fused_dynamics import constraints
from fused_dynamics.cli import app
from fused_dynamics.observables import degrees_of_freedom

INT32_MAX = 2**31 - 1


def _lj():
    return fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=5.0)


def _argon(seed=0, repeat=(1, 1, 1)):
    a = bulk("Ar", "fcc", a=5.3, cubic=True) * repeat
    a.rattle(0.05, seed=seed)
    return a


# ----------------------------------------------------------------- 1. budgets past int32
@pytest.mark.parametrize("n", [2**31, 2**31 + 5, 2**32 + 3, 2**40])
def test_a_stage_budget_past_int32_is_refused(n):
    # 2**32 + 3 ran 3 steps and 2**31 + 5 ran 1, both reported BUDGET: the counters are int32
    with pytest.raises(ValueError) as err:
        fd.NVE(_lj(), dt=1.0, n_steps=n)
    msg = str(err.value)
    assert msg.startswith("NVE: n_steps")  # the stage and the parameter
    assert str(n) in msg and str(INT32_MAX) in msg  # the value and the allowed range


def test_the_largest_budget_is_kept_as_given():
    assert fd.NVE(_lj(), dt=1.0, n_steps=INT32_MAX).n_steps == INT32_MAX
    assert fd.FIRE(_lj(), n_steps=INT32_MAX).n_steps == INT32_MAX


def test_budgets_that_add_up_past_int32_are_refused():
    # a system that spends every sub-stage's budget counts them all in one int32 step_count
    half = fd.NVE(_lj(), dt=1.0, n_steps=2**30)
    fd.FusedStage([(0, half), (1, fd.NVE(_lj(), dt=1.0, n_steps=2**30 - 1))])  # 2**31 - 1
    with pytest.raises(ValueError, match=r"add up to 2147483648") as err:
        fd.FusedStage([(0, half), (1, half)])
    assert "n_steps=1073741824" in str(err.value) and str(INT32_MAX) in str(err.value)


def test_a_run_budget_past_int32_is_refused():
    batch = fd.Batch.from_atoms([_argon()])
    with pytest.raises(ValueError, match=r"n_steps") as err:
        fd.NVE(_lj(), dt=1.0).run(batch, n_steps=2**32 + 3)
    assert "4294967299" in str(err.value) and str(INT32_MAX) in str(err.value)


_TOML = """\
seed = 0
dtype = "float64"
device = "cpu"
refill_frequency = 5

[structures]
generate = "argon"
count = 2
max_size = 4

[model]
type = "lennard_jones"
sigma = 3.405
epsilon = 0.0104
cutoff = 6.0

[capacity]
max_atoms = 8
max_systems = 2

[[stages]]
type = "fire"
fmax = 0.05
n_steps = {first}

[[stages]]
type = "nve"
dt = 1.0
n_steps = {second}

[[outputs]]
type = "extxyz"
path = "out.extxyz"
"""


def _cli(tmp_path, first, second):
    path = tmp_path / "job.toml"
    path.write_text(textwrap.dedent(_TOML.format(first=first, second=second)))
    res = CliRunner().invoke(app, ["run", str(path), "--validate-only"])
    return res.exit_code, res.output


def test_the_command_line_refuses_a_budget_past_int32(tmp_path):
    rc, msg = _cli(tmp_path, 30, 2**32 + 3)
    assert rc == 2, msg
    assert "stages[1]" in msg and "n_steps" in msg and str(INT32_MAX) in msg
    rc, msg = _cli(tmp_path, 2**30, 2**30)  # each fits, together they do not
    assert rc == 2, msg
    assert "2147483648" in msg
    rc, msg = _cli(tmp_path, 30, 10)
    assert rc == 0, msg


@pytest.mark.parametrize(
    "line, key",
    [
        ("refill_frequency = 2147483648", "refill_frequency"),
        ("convergence_every = 4294967299", "convergence_every"),
        ("initial_temperature = inf", "initial_temperature"),
        ("initial_temperature = nan", "initial_temperature"),
    ],
)
def test_the_command_line_refuses_what_the_run_would_refuse(tmp_path, line, key):
    """``--validate-only`` refuses (exit 2, naming the key) the values the run refused only
    after validation passed (exit 1): a chunk past int32 steps, an infinite temperature."""
    path = tmp_path / "job.toml"
    text = _TOML.format(first=30, second=10).replace("refill_frequency = 5", line)
    path.write_text(text)
    res = CliRunner().invoke(app, ["run", str(path), "--validate-only"])
    assert res.exit_code == 2, res.output
    assert key in res.output


# ------------------------------------------------------- 2. FreezeAtomsHook in an inflight run
def test_freeze_atoms_hook_is_refused_in_an_inflight_run():
    # it holds atom slots: a refilled system would be moved to the previous occupant's positions
    d = []
    for i in range(4):
        a = _argon(seed=i)
        a.positions += 0.5 * i
        a.info["uid"] = i
        d.append(a)
    batch = fd.Batch.from_atoms(d[:2], max_atoms=8, max_systems=2)
    hook = fd.FreezeAtomsHook.from_batch(batch, indices=[0, 1])
    fused = fd.FusedStage([(0, fd.NVE(_lj(), dt=1.0, n_steps=5))], hooks=(hook,))
    sampler = fd.SizeAwareSampler(d, max_atoms=8, max_systems=2, id_key="uid")
    with pytest.raises(ValueError) as err:
        fused.run(sampler=sampler, sinks=[fd.HostMemory()], refill_frequency=5)
    msg = str(err.value)
    assert "FreezeAtomsHook" in msg and "inflight" in msg and "FixAtoms" in msg


# ------------------------------------------- 3. initialize_velocities on FixCom + fixed atoms
def _momentum(batch, n):
    return (np.asarray(batch.masses)[:n, None] * np.asarray(batch.velocities)[:n]).sum(0)


@pytest.mark.parametrize(
    "extra", [FixAtoms([0, 1, 2]), FixCartesian([0, 3, 5], mask=(False, False, True))]
)
def test_initialize_velocities_holds_the_momentum_of_a_fix_com_system(extra):
    a = _argon(seed=4, repeat=(2, 1, 1))
    a.set_constraint([extra, FixCom()])
    batch = fd.Batch.from_atoms([a])
    fixed = np.asarray(batch.fixed)[: len(a)]
    for remove_com in (True, False):
        b = fd.initialize_velocities(batch, 100.0, jax.random.PRNGKey(0), remove_com=remove_com)
        v = np.asarray(b.velocities)[: len(a)]
        p = _momentum(b, len(a))
        scale = np.abs(np.asarray(b.masses)[: len(a), None] * v).sum(0)
        np.testing.assert_allclose(p, 0.0, atol=1e-12 * scale.max())
        assert np.all(v[fixed] == 0.0)  # the fixed components stay at rest
        assert np.all(v[~fixed] != 0.0)
        # the target temperature over the constrained dof: 3N - fixed components - 3 (FixCom)
        dof = 3 * len(a) - fixed.sum() - 3
        assert float(degrees_of_freedom(b)[0]) == dof
        ke = 0.5 * (np.asarray(b.masses)[: len(a), None] * v**2).sum()
        np.testing.assert_allclose(2 * ke / (dof * units.kB), 100.0, rtol=1e-12)
        np.testing.assert_allclose(float(fd.temperature(b)[0]), 100.0, rtol=1e-12)
        # the first step's constraint finds nothing to remove
        after = constraints.constrain_update(b, b, np.asarray(b.system_mask))
        np.testing.assert_allclose(
            np.asarray(after.velocities)[: len(a)], v, atol=1e-12 * np.abs(v).max()
        )


def test_initialize_velocities_leaves_systems_without_fix_com_as_they_were():
    # a system with fixed atoms but no FixCom keeps its centre-of-mass velocity, and a plain
    # system's velocities do not depend on a FixCom neighbour in the batch
    plain = _argon(seed=1)
    pinned = _argon(seed=2)
    pinned.set_constraint(FixAtoms([0]))
    held = _argon(seed=3)
    held.set_constraint([FixAtoms([0]), FixCom()])
    key = jax.random.PRNGKey(7)
    n = len(plain)
    alone = fd.initialize_velocities(
        fd.Batch.from_atoms([plain, pinned], max_atoms=3 * n, max_systems=3), 50.0, key
    )
    mixed = fd.initialize_velocities(
        fd.Batch.from_atoms([plain, pinned, held], max_atoms=3 * n, max_systems=3), 50.0, key
    )
    np.testing.assert_array_equal(
        np.asarray(mixed.velocities)[: 2 * n], np.asarray(alone.velocities)[: 2 * n]
    )
    assert np.abs(_momentum(alone, 2 * n) - _momentum(alone, n)).max() > 1e-3  # pinned: kept


def test_convergence_every_and_refill_frequency_past_int32_are_refused():
    # both count steps in int32 inside the compiled loop, as budgets do
    stage = fd.NVE(_lj(), dt=1.0, n_steps=5)
    with pytest.raises(ValueError, match=r"convergence_every must be an integer >= 1 and <= 2147"):
        fd.FusedStage([(0, stage)], convergence_every=2**32 + 3)
    sampler = fd.SizeAwareSampler([_argon(0), _argon(1)], max_atoms=8, max_systems=2)
    with pytest.raises(ValueError, match=r"refill_frequency must be >= 1 and <= 2147483647"):
        stage.run(sampler=sampler, sinks=[fd.HostMemory()], refill_frequency=2**32 + 3)
