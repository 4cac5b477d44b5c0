"""Dense pairs or a neighbor list (docs/models.md, "Dense pairs or a neighbor list"): the rule
of :mod:`fused_dynamics.models.path_choice`, its one-call Python form and the job file's
``model.neighbors`` / ``model.skin`` keys.

The rule compares the dense path's pair work with the list's (the work ratio ``R``) against a
measured crossover: small clusters stay dense, large systems and small periodic cells (which
the dense path pays with 27 image shifts) take the list. Both paths give the same energies and
forces (the dense path is the reference), also through the command line.
"""

from __future__ import annotations

import math

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.cluster import Icosahedron
from typer.testing import CliRunner

import fused_dynamics as fd
from fused_dynamics.cli import app
from fused_dynamics.config import load_config
from fused_dynamics.config.writing import config_text
from fused_dynamics.models.path_choice import (
    ATOM_OVERHEAD,
    CROSSOVER,
    FIT_SLOPE,
    LIST_SETUP_SECONDS,
    PAIR_SECONDS,
    ROW_MARGIN,
    apply_choice,
    choose_neighbors,
    path_choice,
    saved_seconds,
    work_ratio,
)

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=8.5)


def _crystal(reps: int, seed: int = 0):
    a = bulk("Ar", "fcc", a=5.26, cubic=True) * (reps, reps, reps)
    a.rattle(0.05, seed=seed)
    a.wrap()
    return a


def _cluster(shells: int, seed: int = 0):
    a = Icosahedron("Ar", shells, latticeconstant=5.26)
    a.rattle(0.05, seed=seed)
    return a


# ----------------------------------------------------------------------------- the rule
def test_work_ratio_of_a_periodic_cell_is_the_formula():
    """R = (A^2 K + h A) / (n (W + h)), W = 1.15 m + 2 the row width, m = rho 4/3 pi (rc +
    skin)^3 the expected neighbors: one cubic cell, no image shift."""
    cell = 30.0 * np.eye(3)
    r = work_ratio([100], [cell], [[True] * 3], cutoff=5.0, skin=1.0, overhead=0.0)
    m = 100 / 30.0**3 * 4 / 3 * math.pi * 6.0**3
    width = ROW_MARGIN * m + 2.0
    assert r == pytest.approx(100 * 100 / (100 * width), rel=1e-12)
    # the cost per atom beyond the pairs, h, is paid on both paths
    with_overhead = work_ratio([100], [cell], [[True] * 3], cutoff=5.0, skin=1.0, overhead=3.0)
    assert with_overhead == pytest.approx((100 * 100 + 300) / (100 * (width + 3)), rel=1e-12)
    assert work_ratio([100], [cell], [[True] * 3], cutoff=5.0) == pytest.approx(
        (100 * 100 + ATOM_OVERHEAD * 100) / (100 * (width + ATOM_OVERHEAD)), rel=1e-12
    )
    # a cell narrower than twice the cutoff: the dense path pays 27 image shifts, the list
    # does not (its neighbours are the same atoms at the same density)
    small = work_ratio([100], [cell], [[True] * 3], cutoff=20.0, skin=1.0, overhead=0.0)
    m_small = min(100 / 30.0**3 * 4 / 3 * math.pi * 21.0**3, 100 * 27)
    assert small == pytest.approx(100 * 100 * 27 / (100 * (ROW_MARGIN * m_small + 2)), rel=1e-12)


def test_the_rules_row_margin_is_the_lists_default_margin():
    """W = ROW_MARGIN max(m) + 2 stands for the width a list allocates by default."""
    import dataclasses

    from fused_dynamics.models.neighbors import NeighborList

    default = {f.name: f.default for f in dataclasses.fields(NeighborList)}["margin"]
    assert ROW_MARGIN == default


def test_the_densest_system_sets_the_row_width_of_the_whole_batch():
    """The list's rows have one width for every atom of the batch: a sparse system next to a
    dense one pays the dense one's width (mean size times the widest rows)."""
    kw = dict(pbc=[[True] * 3] * 2, cutoff=5.0, skin=1.0, overhead=0.0)
    dense_cell, sparse_cell = 30.0 * np.eye(3), 60.0 * np.eye(3)
    both = work_ratio([100, 100], cells=[dense_cell, sparse_cell], **kw)
    m_dense = 100 / 30.0**3 * 4 / 3 * math.pi * 6.0**3
    assert both == pytest.approx(100 * 100 / (100 * (ROW_MARGIN * m_dense + 2)), rel=1e-12)
    assert both == pytest.approx(work_ratio([100, 100], cells=[dense_cell] * 2, **kw), rel=1e-12)


def test_a_cluster_within_reach_is_cheaper_dense():
    """Every atom of a small cluster is every other's neighbour: the list saves no pair, and
    its rows are wider than the cluster by the margin, so R < 1 and the dense path is kept."""
    kw = dict(cells=[np.eye(3)], pbc=[[False] * 3], cutoff=8.5, volumes=[100.0])
    width = ROW_MARGIN * 13 + 2
    assert work_ratio([13], overhead=0.0, **kw) == pytest.approx(13 / width, rel=1e-12)
    assert work_ratio([13], **kw) == pytest.approx(
        (13 + ATOM_OVERHEAD) / (width + ATOM_OVERHEAD), rel=1e-12
    )
    assert work_ratio([13], **kw) < 1.0


def test_bad_ratio_inputs_are_refused_and_an_empty_system_has_a_finite_ratio():
    """A capacity below the largest system or a negative cost per atom is refused, naming it;
    an empty cluster (no density) next to another gives a finite ratio and a choice."""
    kw = dict(cells=[np.eye(3) * 30], pbc=[[True] * 3], cutoff=5.0)
    with pytest.raises(ValueError, match="max_atoms_per_system"):
        work_ratio([100], max_atoms_per_system=50, **kw)
    with pytest.raises(ValueError, match="overhead"):
        work_ratio([100], overhead=-1.0, **kw)
    empty = Atoms("", cell=[20, 20, 20])
    choice = path_choice(LJ, [empty, _cluster(3)])
    assert math.isfinite(choice.ratio) and choice.path in ("dense", "list"), choice


def test_padding_counts_against_the_dense_path():
    """Systems padded to a larger capacity cost the dense path A^2 + h A, not n^2 + h n."""
    cell = 40.0 * np.eye(3)
    kw = dict(cells=[cell], pbc=[[True] * 3], cutoff=5.0, skin=1.0)
    full = work_ratio([200], **kw)
    padded = work_ratio([200], max_atoms_per_system=400, **kw)  # same list work
    dense_full = 200 * 200 + ATOM_OVERHEAD * 200
    dense_padded = 400 * 400 + ATOM_OVERHEAD * 400
    assert padded == pytest.approx(full * dense_padded / dense_full, rel=1e-12)


@pytest.mark.parametrize("structure", [_cluster(2), _cluster(3)], ids=["cluster13", "cluster55"])
def test_small_clusters_stay_dense(structure):
    choice = path_choice(LJ, [structure] * 3)
    assert choice.path == "dense" and choice.skin is None, choice
    assert choice.ratio < CROSSOVER
    assert choice.reason.startswith("dense pairs:") and f"< {CROSSOVER:g}" in choice.reason


@pytest.mark.parametrize(
    "structure",
    [_crystal(2), _crystal(3), _crystal(6), _crystal(8), _cluster(6), _cluster(8)],
    ids=["periodic32", "periodic108", "periodic864", "periodic2048", "cluster561", "cluster1415"],
)
def test_large_systems_and_small_periodic_cells_take_the_list(structure):
    """Above the crossover; a 32- or 108-atom cell pays 27 image shifts on the dense path."""
    choice = path_choice(LJ, [structure] * 2)
    assert choice.path == "list" and choice.skin == 1.0, choice
    assert choice.ratio >= CROSSOVER
    assert choice.reason.startswith("neighbor list (skin 1 Å):")


def test_the_measured_boundary_of_the_w2_cells():
    """benchmarks/results/crossover.json: on 108-atom fcc argon cells at cutoff 7.5 Å (no image
    shift) the list ran 0.65x the dense path per step, on 256-atom cells at 8.5 Å 2.2x; the
    rule keeps the first dense and puts the second on the list."""
    model = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5)
    assert path_choice(model, [_crystal(3, seed=s) for s in range(9)]).path == "dense"
    assert path_choice(LJ, [_crystal(4, seed=s) for s in range(4)]).path == "list"


def test_the_ratio_grows_with_the_size_of_a_cluster():
    """Below the reach of the cutoff (13 and 55 atoms: every atom sees most others) both
    paths pay mostly the cost per atom and R stays under 1; above it R grows with the size."""
    small = [path_choice(LJ, [_cluster(k)]).ratio for k in (2, 3)]
    assert all(r < 1.0 for r in small), small
    ratios = [path_choice(LJ, [_cluster(k)]).ratio for k in (3, 4, 5, 6, 8)]
    assert all(b > a for a, b in zip(ratios, ratios[1:], strict=False)), ratios


def test_a_batch_and_its_structures_give_the_same_choice():
    structures = [_crystal(3, seed=1), _cluster(4, seed=2)]
    from_atoms = path_choice(LJ, structures)
    from_batch = path_choice(LJ, fd.Batch.from_atoms(structures))
    assert from_atoms.path == from_batch.path
    assert from_batch.ratio == pytest.approx(from_atoms.ratio, rel=1e-9)


# ----------------------------------------------------------------------------- one call
def test_choose_neighbors_returns_the_model_on_the_chosen_path():
    small, large = [_cluster(3)], [_crystal(6)]
    assert choose_neighbors(LJ, small).skin is None
    listed = choose_neighbors(LJ, large, skin=0.5)
    assert listed.skin == 0.5 and listed == LJ.with_neighbors(0.5)
    assert choose_neighbors(LJ, large, neighbors="dense").skin is None
    assert choose_neighbors(LJ, small, neighbors="list").skin == 1.0
    # a model that asks for a list keeps it under "auto", and is put back on dense pairs only
    # when dense is asked for
    asked = LJ.with_neighbors(0.7)
    assert choose_neighbors(asked, small) == asked
    assert choose_neighbors(asked, small, neighbors="dense").skin is None
    assert fd.models.choose_neighbors is choose_neighbors


def test_a_model_without_a_list_path_is_returned_unchanged():
    model = fd.models.EnergyFunctionModel(lambda x, z, mask, cell, pbc: 0.0 * x.sum())
    assert choose_neighbors(model, [_crystal(8)]) is model
    choice = path_choice(model, [_crystal(8)])
    assert choice.path == "dense" and "no with_neighbors(skin)" in choice.reason
    with pytest.raises(ValueError, match="neighbors='list'"):
        path_choice(model, [_crystal(8)], neighbors="list")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"neighbors": "sparse"}, "neighbors must be one of"),
        ({"neighbors": True}, "neighbors must be one of"),
        ({"skin": -0.5}, "skin must be >= 0"),
        ({"skin": float("nan")}, "skin must be a finite"),
        ({"skin": True}, "skin must be a finite"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, words):
    with pytest.raises(ValueError, match=words):
        path_choice(LJ, [_crystal(2)], **kwargs)


def test_both_paths_give_the_same_energies_and_forces():
    """The chosen list model against the dense reference, float64, on the same batch."""
    structures = [_crystal(2, seed=3), _crystal(3, seed=4), _cluster(4, seed=5)]
    batch = fd.Batch.from_atoms(structures)
    listed = choose_neighbors(LJ, structures, neighbors="list")
    dense = apply_choice(listed, path_choice(LJ, structures, neighbors="dense"))
    ref = dense.with_images(batch)(batch)
    out = listed(listed.attach_neighbors(batch))
    np.testing.assert_allclose(np.asarray(out.energy), np.asarray(ref.energy), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out.forces), np.asarray(ref.forces), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_a_fixed_batch_run_attaches_the_list_itself():
    """One call: ``run`` of a list model on a batch without a list attaches one (as inflight
    runs do), and 10 NVE steps follow the dense run to 1e-10 Å (float64; the same pairs summed
    in another order, rounding grown over 10 steps)."""
    structures = [_crystal(2, seed=9), _cluster(3, seed=10)]
    batch = fd.Batch.from_atoms(structures)
    assert batch.neighbors is None
    listed = choose_neighbors(LJ, structures, neighbors="list")
    dense = apply_choice(listed, path_choice(LJ, structures, neighbors="dense"))
    got = fd.NVE(listed, dt=2.0).run(batch, n_steps=10)
    want = fd.NVE(dense, dt=2.0).run(batch, n_steps=10)
    assert isinstance(got.neighbors, fd.NeighborList)
    np.testing.assert_allclose(got.positions, want.positions, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- the job file
JOB = {
    "dtype": "float64",
    "structures": {"path": "in.extxyz"},
    "model": {"type": "lennard_jones", "sigma": 3.405, "epsilon": 0.0104, "cutoff": 8.5},
    "stages": [{"type": "nve", "dt": 2.0, "n_steps": 4}],
    "capacity": {"max_atoms": 240, "max_systems": 3},
    "outputs": [{"type": "zarr", "path": "out.zarr"}],
}


def _job(folder, **model):
    structures = [_crystal(2, seed=6), _crystal(3, seed=7), _cluster(3, seed=8)]
    ase.io.write(folder / "in.extxyz", structures)
    data = {**JOB, "model": {**JOB["model"], **model}}
    path = folder / "job.toml"
    path.write_text(config_text(data, "toml"))
    return path


@pytest.mark.slow
def test_a_job_on_the_list_and_on_dense_pairs_writes_the_same_systems(tmp_path):
    """neighbors = "list" against "dense" (the reference): energies and forces to 1e-12 eV
    (eV/Å) in float64, and the run says which path it took and why."""
    out = {}
    for path in ("dense", "list"):
        folder = tmp_path / path
        folder.mkdir()
        job = _job(folder, neighbors=path)
        res = CliRunner().invoke(app, ["run", str(job), "--no-progress"])
        assert res.exit_code == 0, res.output
        line = "pairs: dense pairs: asked for" if path == "dense" else "pairs: neighbor list"
        assert res.output.count(line) == 2, res.output  # at the start and in the summary
        out[path] = sorted(fd.read_zarr(folder / "out.zarr"), key=lambda a: a.info["system_id"])
    assert len(out["dense"]) == len(out["list"]) == 3
    for ref, got in zip(out["dense"], out["list"], strict=True):
        assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-12)
        np.testing.assert_allclose(got.get_forces(), ref.get_forces(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.positions, ref.positions, rtol=0, atol=1e-12)


def test_a_resumed_run_keeps_the_path_its_checkpoint_was_written_on(tmp_path):
    """--resume with model.neighbors = "auto" takes the path of the checkpoint's layout (a list
    and its skin, or dense pairs) instead of the rule, which may have changed since the
    checkpoint was written and would then give another fused stage; an explicit path wins."""
    from fused_dynamics.config.build import build_model, choose_model_path

    structures = [_crystal(3)] * 2
    data = _job(tmp_path)
    short, _ = load_config(data)  # 4 steps: the rule keeps dense pairs
    data.write_text(data.read_text().replace("n_steps = 4", "n_steps = 200000"))
    long, _ = load_config(data)  # the rule takes the list
    model = build_model(short)
    assert choose_model_path(short, model, structures, 108)[1].path == "dense"
    assert choose_model_path(long, model, structures, 108)[1].path == "list"
    written = {"neighbors": {"static": {"skin": 0.7}}}
    listed, choice = choose_model_path(short, model, structures, 108, written)
    assert listed.skin == 0.7 and choice.path == "list" and "(skin 0.7 Å)" in choice.reason
    assert choice.reason.endswith("the checkpoint being resumed was written on it")
    dense, choice = choose_model_path(long, model, structures, 108, {"neighbors": None})
    assert dense.skin is None and choice.path == "dense"
    assert choice.reason == "dense pairs: the checkpoint being resumed was written on them"
    asked = long.model_copy(update={"model": long.model.model_copy(update={"neighbors": "dense"})})
    assert choose_model_path(asked, model, structures, 108, written)[0].skin is None


def test_auto_is_the_default_and_says_why(tmp_path):
    """A 32- and a 108-atom cell: the dense path would pay 27 image shifts, so a long run takes
    the list; a run of 4 steps keeps dense pairs (the list would not repay its longer start)."""
    from fused_dynamics.application import preflight

    short = tmp_path / "short"
    short.mkdir()
    cfg, base = load_config(_job(short))
    assert cfg.model.neighbors == "auto" and cfg.model.skin == 1.0
    pre = preflight(cfg, base)
    assert pre.path_line.startswith("pairs: dense pairs: dense/list work"), pre.path_line
    assert "in at most 4 steps the list would save about" in pre.path_line
    assert pre.model.skin is None
    long = tmp_path / "long"
    long.mkdir()
    data = _job(long)
    data.write_text(data.read_text().replace("n_steps = 4", "n_steps = 200000"))
    cfg, base = load_config(data)
    pre = preflight(cfg, base)
    assert pre.path_line.startswith("pairs: neighbor list (skin 1 Å): dense/list work")
    assert pre.model.skin == 1.0


def test_a_run_too_short_to_repay_the_list_stays_dense():
    """``steps``: the list is taken only when the time it saves over the run exceeds its
    longer start (LIST_SETUP_SECONDS), with the saving of saved_seconds."""
    structures = [_crystal(3)] * 4
    ratio = path_choice(LJ, structures).ratio
    saved = saved_seconds(ratio, 1000, 4, 108, 27)
    work = 108 * 108 * 27 + ATOM_OVERHEAD * 108  # A^2 K + h A per slot
    expected = 1000 * PAIR_SECONDS * 4 * work * (1 - 1 / (FIT_SLOPE * ratio))
    assert saved == pytest.approx(expected, rel=1e-12)
    needed = int(np.ceil(1000 * LIST_SETUP_SECONDS / saved))
    assert path_choice(LJ, structures, steps=needed - 1).path == "dense"
    assert path_choice(LJ, structures, steps=needed + 1).path == "list"
    assert saved_seconds(0.5, 1000, 4, 108, 27) == 0.0  # the list would be slower


def test_the_list_of_a_job_is_sized_for_the_densest_batch_of_its_structures():
    """An inflight run's list (what a job's run gets, docs/semantics.md §14) bounds the pairs
    of any batch the sampler can fill, so a refill with larger systems than the first batch's
    does not overflow the list."""
    structures = [_cluster(2), _cluster(3), _crystal(2), _crystal(3, seed=9)]
    sampler = fd.SizeAwareSampler(structures, max_atoms=240, max_systems=2)
    first = sampler.initial_batch()  # the two clusters
    capacity = LJ.neighbor_list(first, more_batches=sampler.preview_batches).capacity
    densest = fd.Batch.from_atoms(structures[2:], max_atoms=240, max_systems=2)
    need = int(LJ.neighbor_list(densest).n_pairs)  # 32 + 108 atoms of crystal
    assert need <= capacity <= 1.15 * need + 16 + 1  # the two densest fill the bound exactly
    assert int(LJ.neighbor_list(first).n_pairs) < need
