"""Hostile input, fuzzed (README "What is guaranteed"): ``Batch.from_atoms``, the sampler and the
configuration loader raise only their documented exceptions, never hang, and a run never
reports a non-finite result as a finite one.

Hypothesis runs derandomized (the same examples on every machine); 600 examples in all.
"""

from __future__ import annotations

import copy

import ase
import numpy as np
from ase.constraints import FixAtoms, FixBondLength, FixCartesian, FixCom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_dynamics as fd
from fused_dynamics.config import ConfigError, validate_config
from fused_dynamics.demo import demo_config

SETTINGS = dict(
    deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
LJ = fd.models.LennardJones(
    sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0, images=(1, 1, 1)
)
# one capacity for every example: one compilation
N_CAP, S_CAP, A_CAP = 18, 3, 6

nasty = st.one_of(
    st.floats(-12.0, 12.0),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, np.nan, np.inf, -np.inf]),
)


@st.composite
def atoms(draw):
    """Mostly sane structures (so that runs happen), each with at most one hostile feature."""
    n = draw(st.integers(1, A_CAP))
    rng = np.random.default_rng(draw(st.integers(0, 10**6)))
    positions = rng.uniform(0, 3, (n, 3)) + 3.6 * np.arange(n)[:, None] * [1, 0, 0]
    pbc = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    cell = np.diag([draw(st.sampled_from([9.0, 11.0, 14.0])) for _ in range(3)])
    cell[1, 0] = draw(st.sampled_from([0.0, 1.5]))
    for k in range(3):
        if not pbc[k] and draw(st.booleans()):
            cell[k] = 0.0  # ASE accepts a zero vector along a non-periodic direction
    masses = np.full(n, 39.948)
    velocities = rng.normal(0, 0.01, (n, 3))
    fault = draw(
        st.sampled_from(
            ["none"] * 4
            + ["positions", "close", "mass", "velocity", "cell", "constraint", "huge_velocity"]
        )
    )
    k = draw(st.integers(0, n - 1))
    if fault == "positions":
        positions[k, draw(st.integers(0, 2))] = draw(nasty)
    elif fault == "close" and n > 1:
        positions[1] = positions[0] + draw(st.sampled_from([0.0, 1e-8, 0.3, 1.0]))
    elif fault == "mass":
        masses[k] = draw(st.sampled_from([0.0, -4.0, np.nan, np.inf, 1e-30]))
    elif fault == "velocity":
        velocities[k] = draw(nasty)
    elif fault == "huge_velocity":
        velocities[k] = 1e4
    elif fault == "cell":
        cell[draw(st.integers(0, 2))] = draw(st.sampled_from([0.0, np.nan, 1e-9, np.inf]))
    a = ase.Atoms(["Ar"] * n, positions=positions, cell=cell, pbc=pbc, masses=masses)
    with np.errstate(all="ignore"):
        a.set_velocities(velocities)
    kind = draw(st.sampled_from(["none", "FixAtoms", "FixCartesian", "FixCom"]))
    if fault == "constraint" and n > 1:
        kind = "FixBondLength"
    if kind == "FixAtoms":
        a.set_constraint(FixAtoms(indices=[k]))
    elif kind == "FixCartesian":
        a.set_constraint(FixCartesian([k], mask=(True, False, False)))
    elif kind == "FixCom":
        a.set_constraint(FixCom())
    elif kind == "FixBondLength":
        a.set_constraint(FixBondLength(0, 1))
    return a


@settings(max_examples=250, **SETTINGS)
@given(systems=st.lists(atoms(), min_size=1, max_size=S_CAP))
def test_from_atoms_and_a_run_never_report_a_non_finite_result_as_finite(systems):
    try:
        batch = fd.Batch.from_atoms(
            systems, max_atoms=N_CAP, max_systems=S_CAP, max_atoms_per_system=A_CAP
        )
    except (ValueError, TypeError) as exc:  # documented: names the system
        assert "system" in str(exc) or "max_" in str(exc), exc
        return
    out = fd.FusedStage([(0, fd.NVE(LJ, dt=2.0, n_steps=2))]).run(batch)
    RAN.append(len(systems))
    for a in out.to_atoms():
        e = a.get_potential_energy()
        finite = np.isfinite(e) and np.all(np.isfinite(a.positions))
        finite = finite and np.all(np.isfinite(a.get_forces()))
        if a.info["exit_reason_name"] != "failed":
            assert finite, a.info
        else:
            assert a.info["failure"] and a.info["failure_step"] >= 0


RAN: list[int] = []


def test_the_fuzzed_runs_did_run():
    """The examples above must exercise runs, not only input errors (ordering: same module)."""
    assert len(RAN) >= 50, len(RAN)


@settings(max_examples=150, **SETTINGS)
@given(
    systems=st.lists(atoms(), min_size=1, max_size=8),
    max_atoms=st.integers(1, 24),
    max_systems=st.integers(1, 4),
)
def test_sampler_hands_out_or_rejects_every_structure_once(systems, max_atoms, max_systems):
    try:
        sampler = fd.SizeAwareSampler(systems, max_atoms=max_atoms, max_systems=max_systems)
    except ValueError as exc:
        assert "SizeAwareSampler" in str(exc) or "frame" in str(exc), exc
        return
    seen = []
    for _ in range(len(systems) + 2):  # bounded: never hangs
        if sampler.exhausted:
            break
        taken = sampler.take(max_atoms, max_systems)
        assert len(taken) <= max_systems
        assert sum(len(a) for _, a in taken) <= max_atoms
        seen += [i for i, _ in taken]
    assert sampler.exhausted
    rejected = [i for i, *_ in sampler.rejected]
    assert sorted(seen + rejected) == list(range(len(systems)))


def _mutations():
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=4),
        st.lists(st.integers(0, 3), max_size=3),
        st.just({}),
    )
    return st.lists(st.tuples(st.integers(0, 10**6), leaf, st.booleans()), max_size=4)


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@settings(max_examples=200, **SETTINGS)
@given(mutations=_mutations())
def test_config_loader_raises_only_config_errors(mutations, tmp_path_factory):
    base = tmp_path_factory.mktemp("cfg")
    cfg = copy.deepcopy(demo_config(quick=True, output_dir=str(base / "out")))
    for pick, value, delete in mutations:
        paths = list(_paths(cfg))
        path = paths[pick % len(paths)]
        parent = cfg
        for k in path[:-1]:
            parent = parent[k]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    try:
        validate_config(cfg, base)
    except ConfigError as exc:
        assert str(exc)
