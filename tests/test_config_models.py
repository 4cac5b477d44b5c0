"""Model files in the run configuration: ``[model] type = "eam"`` (a potential file) and
``type = "trained"`` (a file written by ``save_model`` / ``fused-dynamics train``).

The file names the elements it covers; a structure with another element is refused (exit 2)
before anything compiles, naming ``model.file``; a run's energies are the model's own.
"""

from __future__ import annotations

import textwrap

import ase.build
import ase.io
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import fused_dynamics as fd
from fused_dynamics.cli import app
from fused_dynamics.config import ConfigError, build_model, check_structure_species, load_config
from fused_dynamics.models.eam import EAM
from fused_dynamics.reference_data import write_analytic_eam

JOB = """\
dtype = "float64"
[structures]
path = "in.extxyz"
[model]
{model}
[capacity]
max_atoms = 64
max_systems = 2
[[stages]]
type = "fire"
fmax = 0.05
n_steps = 40
[[outputs]]
type = "extxyz"
path = "out.extxyz"
"""


def _alloy(seed: int, elements=("Cu", "Ni")) -> ase.Atoms:
    atoms = ase.build.bulk("Cu", "fcc", a=3.55, cubic=True) * (2, 2, 2)
    rng = np.random.default_rng(seed)
    atoms.symbols = [elements[int(k)] for k in rng.integers(len(elements), size=len(atoms))]
    atoms.rattle(0.05, seed=seed)
    return atoms


def _job(folder, model: str, structures) -> str:
    ase.io.write(folder / "in.extxyz", structures)
    path = folder / "job.toml"
    path.write_text(JOB.format(model=textwrap.dedent(model)))
    return str(path)


@pytest.fixture(scope="module")
def potential(tmp_path_factory):
    return write_analytic_eam(tmp_path_factory.mktemp("eam") / "CuNi.eam.alloy")


def test_an_eam_file_runs_and_its_energies_are_the_models(tmp_path, potential):
    job = _job(tmp_path, f'type = "eam"\nfile = "{potential}"', [_alloy(0), _alloy(1)])
    cfg, base = load_config(job)
    line = check_structure_species(cfg, [_alloy(0)])
    assert "Cu, Ni" in line
    res = CliRunner().invoke(app, ["run", job])
    assert res.exit_code == 0, res.output
    frames = ase.io.read(tmp_path / "out.extxyz", ":")
    model = EAM.from_file(potential)
    # the written positions are the run's (extxyz keeps ~1e-8 Å): energies to 1e-6 eV
    energy = np.asarray(model(fd.Batch.from_atoms(frames, dtype=jnp.float64)).energy)
    np.testing.assert_allclose([a.get_potential_energy() for a in frames], energy, atol=1e-6)


def test_an_element_the_file_lacks_is_refused_naming_model_file(tmp_path, potential):
    job = _job(tmp_path, f'type = "eam"\nfile = "{potential}"', [_alloy(0, ("Cu", "Fe"))])
    res = CliRunner().invoke(app, ["run", job])
    assert res.exit_code == 2
    assert "model.file" in res.output and "Fe" in res.output
    assert not (tmp_path / "out.extxyz").exists()


def test_a_missing_or_unreadable_file_names_the_key(tmp_path, potential):
    job = _job(tmp_path, 'type = "eam"\nfile = "nowhere.eam.alloy"', [_alloy(0)])
    res = CliRunner().invoke(app, ["run", job])
    assert res.exit_code == 2 and "model.file" in res.output and "nowhere" in res.output
    bad = tmp_path / "bad.model"
    bad.write_text("not a model\n")
    job = _job(tmp_path, f'type = "trained"\nfile = "{bad}"', [_alloy(0)])
    cfg, _ = load_config(job)
    with pytest.raises(ConfigError, match="model.file"):
        check_structure_species(cfg, [_alloy(0)])


def test_a_trained_model_file_restores_the_saved_model(tmp_path):
    lj = fd.models.LennardJones.from_pairs(
        {"Cu": (2.3, 0.4), "Ni": (2.25, 0.45)}, mixing="lorentz_berthelot", cutoff=5.0
    )
    path = tmp_path / "fitted.model"
    fd.save_model(path, lj)
    job = _job(tmp_path, f'type = "trained"\nfile = "{path}"', [_alloy(2)])
    cfg, _ = load_config(job)
    model = build_model(cfg)
    batch = fd.Batch.from_atoms([_alloy(2)], dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(model(batch).energy), np.asarray(lj(batch).energy))


def test_a_trained_file_of_a_model_with_a_species_tuple_lists_its_elements(tmp_path):
    """Species stored as a tuple field (pairs models, EAM) are decoded from the header: the
    check names the elements, and a missing one exits 2 naming model.file."""
    lj = fd.models.LennardJones.from_pairs(
        {"Cu": (2.3, 0.4), "Ni": (2.25, 0.45), ("Cu", "Ni"): (2.27, 0.42)}, cutoff=5.0
    )
    path = tmp_path / "pairs.model"
    fd.save_model(path, lj)
    job = _job(tmp_path, f'type = "trained"\nfile = "{path}"', [_alloy(3)])
    cfg, _ = load_config(job)
    line = check_structure_species(cfg, [_alloy(3)])
    assert "Cu" in line and "Ni" in line, line
    with pytest.raises(ConfigError, match="model.file"):
        check_structure_species(cfg, [_alloy(3, ("Cu", "Fe"))])


def test_a_model_file_refuses_the_neighbor_list_naming_model_neighbors(tmp_path, potential):
    """EAM and trained models find their pairs themselves: ``neighbors = "list"`` is refused
    (exit 2, before anything is written), ``"auto"`` keeps them as they are and says so."""
    from fused_dynamics.application import preflight

    job = _job(tmp_path, f'type = "eam"\nfile = "{potential}"\nneighbors = "list"', [_alloy(0)])
    res = CliRunner().invoke(app, ["run", job])
    assert res.exit_code == 2, res.output
    assert "model.neighbors" in res.output and "EAM" in res.output and "'auto'" in res.output
    assert not (tmp_path / "out.extxyz").exists()
    job = _job(tmp_path, f'type = "eam"\nfile = "{potential}"', [_alloy(0)])
    cfg, base = load_config(job)
    pre = preflight(cfg, base)
    assert pre.path_line == (
        "pairs: dense pairs: EAM has no with_neighbors(skin), so a run attaches no list"
    )
    assert isinstance(pre.model, EAM)
