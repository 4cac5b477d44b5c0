"""Per-species model parameters in the run configuration (``model.species``, ``model.pairs``).

A configuration never applies one element's parameters to another silently: a scalar model
without ``species`` runs only on structures of one element type, and an element without
parameters is refused (exit 2) before anything compiles, naming the element, the file and
frame, and the key to add. A pairs table gives the energies of ``LennardJones.from_pairs``.
"""

import textwrap

import ase
import ase.build
import ase.io
import numpy as np
import pytest
from typer.testing import CliRunner

import fused_dynamics as fd
from fused_dynamics.cli import app
from fused_dynamics.config import (
    ConfigError,
    build_model,
    check_structure_species,
    load_config,
    validate_config,
)
from fused_dynamics.config.writing import _to_toml

AR = {"sigma": 3.405, "epsilon": 0.0104}
KR = {"sigma": 3.65, "epsilon": 0.014}
XE = {"sigma": 4.0, "epsilon": 0.019}
ARKR = {"sigma": 3.5, "epsilon": 0.012}  # not the Lorentz-Berthelot value, on purpose


def _structures():
    """An Ar/Kr fcc cell (periodic), an Ar/Kr/Xe cluster, a Kr dimer: 2-4 atoms each."""
    alloy = ase.build.bulk("Ar", "fcc", a=5.5, cubic=True)
    alloy.numbers = [18, 36, 18, 36]
    alloy.rattle(0.05, seed=1)
    cluster = ase.Atoms(
        "ArKrXeAr",
        positions=[[0, 0, 0], [3.8, 0, 0], [0, 3.9, 0], [0.2, 0, 3.7]],
        cell=[20.0] * 3,
    )
    cluster.center()
    dimer = ase.Atoms("Kr2", positions=[[0, 0, 0], [0, 0, 4.0]], cell=[15.0] * 3)
    dimer.center()
    return [alloy, cluster, dimer]


JOB = """\
dtype = "float64"
[structures]
path = "in.extxyz"
[model]
type = "lennard_jones"
cutoff = 7.0
{model}
[capacity]
max_atoms = 16
max_systems = 2
[[stages]]
type = "gradient_descent"   # a vanishing step: the input structures, evaluated
step_size = 1e-300
n_steps = 1
[[outputs]]
type = "extxyz"
path = "out/run.extxyz"
[report]
progress = false
"""

PAIRS = """\
mixing = "lorentz_berthelot"
[model.pairs]
Ar = {sigma = 3.405, epsilon = 0.0104}
Kr = {sigma = 3.65, epsilon = 0.014}
Xe = {sigma = 4.0, epsilon = 0.019}
"Ar-Kr" = {sigma = 3.5, epsilon = 0.012}
"""

SCALAR = "sigma = 3.405\nepsilon = 0.0104\n"


def _job(folder, model, structures=None):
    ase.io.write(folder / "in.extxyz", _structures() if structures is None else structures)
    path = folder / "job.toml"
    path.write_text(JOB.format(model=model))
    return path


def _invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def _base(model):
    return {
        "structures": {"generate": "argon", "count": 2},
        "model": {"type": "lennard_jones", "cutoff": 7.0, **model},
        "stages": [{"type": "nve", "dt": 1.0, "n_steps": 2}],
        "capacity": {"max_atoms": 64, "max_systems": 2},
        "outputs": [{"type": "extxyz", "path": "out.extxyz"}],
    }


def _error(model) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(_base(model))
    return str(info.value)


# ----------------------------------------------------------------------------- a real run
def test_pairs_table_run_gives_the_energies_of_from_pairs(tmp_path):
    """Through the CLI (float64): the energies of LennardJones.from_pairs on the inputs."""
    job = _job(tmp_path, PAIRS)
    rc, out = _invoke("run", job, "--validate-only")
    assert rc == 0, out
    assert "mixed (lorentz_berthelot): Ar-Xe, Kr-Xe" in out
    rc, out = _invoke("run", job)
    assert rc == 0, out
    assert "per species pair for Ar, Kr, Xe" in out
    frames = ase.io.read(tmp_path / "out" / "run.extxyz", ":")
    inputs = ase.io.read(tmp_path / "in.extxyz", ":")
    assert sorted(a.info["system_id"] for a in frames) == [0, 1, 2]
    model = fd.models.LennardJones.from_pairs(
        {"Ar": AR, "Kr": KR, "Xe": XE, ("Ar", "Kr"): ARKR},
        mixing="lorentz_berthelot",
        cutoff=7.0,
    )
    batch = fd.Batch.from_atoms(inputs, max_systems=4)
    assert batch.positions.dtype == np.float64
    expected = np.asarray(model(batch).energy)[:3]
    for a in frames:
        sid = a.info["system_id"]
        np.testing.assert_allclose(a.positions, inputs[sid].positions, atol=1e-8)
        np.testing.assert_allclose(a.get_potential_energy(), expected[sid], rtol=1e-12, atol=0)
    # the explicit Ar-Kr entry is kept, not mixed: a Lorentz-Berthelot Ar-Kr differs
    mixed = fd.models.LennardJones.from_pairs(
        {"Ar": AR, "Kr": KR, "Xe": XE}, mixing="lorentz_berthelot", cutoff=7.0
    )
    assert abs(np.asarray(mixed(batch).energy)[0] - expected[0]) > 1e-6 * abs(expected[0])


# ----------------------------------------------------------------------------- refusals
def test_scalar_model_without_species_on_ar_kr_exits_2_naming_kr_and_the_frame(tmp_path):
    structures = [ase.Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.8]])] + _structures()[:1]
    job = _job(tmp_path, SCALAR, structures)
    for flags in ([], ["--validate-only"]):
        rc, out = _invoke("run", job, *flags)
        assert rc == 2, out
        assert "Kr (in " in out and "in.extxyz' frame 1" in out, out
        assert "model.species" in out and "model.pairs" in out
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_scalar_model_on_one_element_implies_it(tmp_path):
    argon = [ase.Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.8]])] * 2
    rc, out = _invoke("run", _job(tmp_path, SCALAR, argon), "--validate-only")
    assert rc == 0, out
    assert "parameters for Ar (implied" in out


def test_an_element_without_parameters_exits_2(tmp_path):
    """Xe in frame 1: not in the pairs table, not in model.species."""
    table = PAIRS.replace("Xe = {sigma = 4.0, epsilon = 0.019}\n", "")
    rc, out = _invoke("run", _job(tmp_path, table), "--validate-only")
    assert rc == 2, out
    assert "model.pairs" in out and "Xe (in " in out and "frame 1" in out
    assert "Xe = {...}" in out and '"Ar-Xe"' in out
    species = SCALAR + 'species = ["Ar", "Kr"]\n'
    rc, out = _invoke("run", _job(tmp_path, species), "--validate-only")
    assert rc == 2, out
    assert "model.species" in out and "Xe (in " in out and "frame 1" in out
    # and a real run stops there too, before compiling, with nothing written
    rc, out = _invoke("run", _job(tmp_path, table))
    assert rc == 2 and "Xe" in out
    assert not (tmp_path / "out").exists()


def test_unknown_element_symbols_in_the_config_are_refused():
    msg = _error({"pairs": {"Ar": AR, "Ar-Xx": ARKR}})
    assert 'model.pairs."Ar-Xx"' in msg and "'Xx' is not an element symbol" in msg
    msg = _error({"pairs": {"ar": AR}})
    assert "model.pairs.ar" in msg and "did you mean 'Ar'" in msg
    msg = _error({**AR, "species": ["Ar", "Qq"]})
    assert "model.species" in msg and "'Qq'" in msg
    msg = _error({"pairs": {"Ar-Kr-Xe": AR}})
    assert "two joined by '-'" in msg


# ----------------------------------------------------------------------------- the table
def test_mixing_fills_cross_pairs():
    cfg = validate_config(_base({"pairs": {"Ar": AR, "Kr": KR}, "mixing": "lorentz_berthelot"}))
    model = build_model(cfg)
    assert model.species == (18, 36)
    s, e = np.asarray(model.sigma), np.asarray(model.epsilon)
    assert s[0, 1] == s[1, 0] == pytest.approx((AR["sigma"] + KR["sigma"]) / 2, rel=1e-15)
    assert e[0, 1] == pytest.approx(np.sqrt(AR["epsilon"] * KR["epsilon"]), rel=1e-15)
    cfg = validate_config(_base({"pairs": {"Ar": AR, "Kr": KR}, "mixing": "geometric"}))
    s = np.asarray(build_model(cfg).sigma)
    assert s[0, 1] == pytest.approx(np.sqrt(AR["sigma"] * KR["sigma"]), rel=1e-15)
    # without mixing every pair is needed, and the message says which and how
    msg = _error({"pairs": {"Ar": AR, "Kr": KR}})
    assert 'no parameters for "Ar-Kr"' in msg and "model.mixing" in msg
    assert '"Ar-Kr" = {sigma = ' in msg
    # mixing never makes an element's own pair
    msg = _error({"pairs": {"Ar-Kr": ARKR, "Kr": KR}, "mixing": "geometric"})
    assert 'no parameters for "Ar"' in msg


def test_bad_entries_name_the_key():
    msg = _error({"pairs": {"Ar": AR, "Kr": KR, "Ar-Kr": {"sigma": -1.0, "epsilon": 0.01}}})
    assert 'model.pairs."Ar-Kr".sigma' in msg and "must be > 0 (Å), got -1.0" in msg
    msg = _error({"pairs": {"Ar": {"sigma": "big", "epsilon": 0.01}}})
    assert "model.pairs.Ar.sigma" in msg
    msg = _error({"pairs": {"Ar": {"sigma": 3.4, "epsilom": 0.01}}})
    assert "model.pairs.Ar" in msg and "did you mean 'epsilon'" in msg
    msg = _error({"pairs": {"Ar": [3.4, 0.01]}})
    assert "model.pairs.Ar" in msg and "sigma = ... (Å)" in msg
    msg = _error({"pairs": {"Ar": AR, "Kr": KR, "Ar-Kr": ARKR, "Kr-Ar": ARKR}})
    assert 'model.pairs."Kr-Ar"' in msg and "give it once" in msg
    msg = _error({**AR, "pairs": {"Ar": AR}})
    assert "model.pairs" in msg and "exclude each other" in msg
    msg = _error({"species": ["Ar"], "pairs": {"Ar": AR}})
    assert "model.species" in msg and "exclude each other" in msg
    msg = _error({**AR, "mixing": "geometric"})
    assert "model.mixing" in msg
    msg = _error({"pairs": {"Ar": AR, "Kr": KR}, "mixing": "arithmetic"})
    assert "model.mixing" in msg and "lorentz_berthelot" in msg
    msg = _error({})
    assert "missing sigma, epsilon" in msg and "model.pairs" in msg
    # Morse has no mixing rule
    morse = {
        "type": "morse",
        "pairs": {"Ar": {"D": 0.01, "alpha": 1.3, "r0": 3.8}},
        "mixing": "geometric",
    }
    assert "morse has no mixing rule" in _error(morse)


def test_yaml_pairs_and_a_symbol_yaml_reads_as_false(tmp_path):
    ase.io.write(tmp_path / "in.extxyz", _structures()[:1])
    text = textwrap.dedent(
        """\
        structures: {path: in.extxyz}
        model:
          type: morse
          cutoff: 7.0
          pairs:
            Ar: {D: 0.0104, alpha: 1.3, r0: 3.82}
            Kr: {D: 0.014, alpha: 1.25, r0: 4.0}
            Ar-Kr: {D: 0.012, alpha: 1.28, r0: 3.9}
        stages: [{type: fire, fmax: 0.1, n_steps: 5}]
        capacity: {max_atoms: 8, max_systems: 1}
        outputs: [{type: extxyz, path: out.extxyz}]
        """
    )
    (tmp_path / "job.yaml").write_text(text)
    cfg, base = load_config(tmp_path / "job.yaml")
    model = build_model(cfg)
    assert model.species == (18, 36) and float(np.asarray(model.r0)[0, 1]) == 3.9
    assert "Ar, Kr" in check_structure_species(cfg, ase.io.read(tmp_path / "in.extxyz", ":"))
    (tmp_path / "no.yaml").write_text(text.replace("Kr: {", "No: {"))
    rc, out = _invoke("run", tmp_path / "no.yaml")
    assert rc == 2 and "quote symbols" in out and '"No"' in out


def test_soft_sphere_shared_or_per_pair_keys():
    model_cfg = {
        "type": "soft_sphere",
        "alpha": 3.0,
        "pairs": {"Ar": {"sigma": 3.0}, "Kr": {"sigma": 3.3}},
        "mixing": "geometric",
    }
    data = _base({})
    data["model"] = model_cfg
    model = build_model(validate_config(data))
    assert model.alpha == 3.0 and model.epsilon == 1.0 and model.cutoff == 3.3
    model_cfg["pairs"] = {"Ar": {"sigma": 3.0, "alpha": 2.5}, "Kr": {"sigma": 3.3}}
    with pytest.raises(ConfigError, match=r"model.pairs.Kr.alpha: alpha is given in some"):
        validate_config(data)


def test_a_pairs_config_round_trips_through_toml(tmp_path):
    import tomllib

    data = _base({"pairs": {"Ar": AR, "Kr": KR, "Ar-Kr": ARKR}})
    text = _to_toml(data)
    assert tomllib.loads(text)["model"]["pairs"]["Ar-Kr"] == ARKR
    path = tmp_path / "job.toml"
    path.write_text(text)
    cfg, _ = load_config(path)
    assert cfg == validate_config(data)
