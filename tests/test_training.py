"""Training energy models (fd.train), model files (save_model/load_model), `fused-dynamics train`.

Reference data come from pair potentials of known parameters (dimers, trimers, small periodic
cells; fixed seeds), so a fit has a known answer. float64 (conftest enables x64).
"""

import json
import math
import warnings

import ase
import ase.io
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from typer.testing import CliRunner

import fused_dynamics as fd
from fused_dynamics.cli import app
from fused_dynamics.models import LennardJones, Model, Morse, SoftSphere
from fused_dynamics.training import (
    Capacity,
    LossWeights,
    evaluate,
    load_model,
    make_batches,
    read_labels,
    save_model,
    train,
)
from fused_dynamics.training.trainer import _loss_and_grad

SIGMA, EPSILON, CUTOFF = 2.5, 0.5, 6.0


def _structures(seed=0, n_small=12, n_bulk=4):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_small):
        d = rng.uniform(2.5, 3.6)
        if k % 3 == 0:
            third = [rng.uniform(0, 1), rng.uniform(2.6, 3.2), 0.3]
            out.append(ase.Atoms("Ar3", positions=[[0, 0, 0], [d, 0, 0], third]))
        else:
            out.append(ase.Atoms("Ar2", positions=[[0, 0, 0], [d, 0, 0]]))
    for k in range(n_bulk):
        a = bulk("Ar", "fcc", a=rng.uniform(3.6, 4.2), cubic=True)
        a.rattle(0.05, seed=seed + k)
        out.append(a)
    return out


def _label(model, structures):
    """Copies of the structures with the model's energy, forces, stress (periodic) attached."""
    batch = fd.Batch.from_atoms(structures)
    out = jax.device_get(model(batch))
    system_idx = np.asarray(batch.system_idx)
    labelled = []
    for i, a in enumerate(structures):
        s = np.asarray(out.stress[i])
        res = {"energy": float(out.energy[i]), "forces": np.asarray(out.forces)[system_idx == i]}
        if a.pbc.all():
            res["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        b = a.copy()
        b.calc = SinglePointCalculator(b, **res)
        labelled.append(b)
    return labelled


@pytest.fixture(scope="module")
def lj_data():
    return _label(LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF), _structures())


def _numpy_metrics(model, structures):
    """Energy MAE/atom, force RMSE, stress RMSE recomputed in NumPy from the model's outputs."""
    batch = fd.Batch.from_atoms(structures)
    out = jax.device_get(model(batch))
    system_idx = np.asarray(batch.system_idx)
    de, df, ds = [], [], []
    for i, a in enumerate(structures):
        de.append((float(out.energy[i]) - a.get_potential_energy()) / len(a))
        df.append(np.asarray(out.forces)[system_idx == i] - a.get_forces())
        if a.pbc.all():
            ds.append(np.asarray(out.stress[i]) - a.get_stress(voigt=False))
    return {
        "energy_mae_per_atom": float(np.mean(np.abs(de))),
        "force_rmse": float(np.sqrt(np.mean(np.concatenate(df) ** 2))),
        "stress_rmse": float(np.sqrt(np.mean(np.stack(ds) ** 2))) if ds else math.nan,
    }


@pytest.mark.slow
def test_recovers_known_parameters(lj_data):
    """From σ=2.3, ε=0.3 back to σ=2.5, ε=0.5 (noise-free data: to 1e-6 relative)."""
    result = train(
        LennardJones(sigma=2.3, epsilon=0.3, cutoff=CUTOFF),
        lj_data,
        epochs=200,
        batch_size=4,
        learning_rate=0.02,
        schedule="warmup_cosine",
        validation_fraction=0.25,
        seed=0,
        progress=False,
    )
    sigma, epsilon = float(result.model.sigma), float(result.model.epsilon)
    assert abs(sigma / SIGMA - 1) < 1e-6, sigma
    assert abs(epsilon / EPSILON - 1) < 1e-6, epsilon
    assert isinstance(result.model, LennardJones) and result.model.images is None  # as given
    assert len(result.validation_indices) == 4 and len(result.train_indices) == 12
    assert not set(result.validation_indices) & set(result.train_indices)
    val = result.best_metrics["validation"]
    assert val["force_rmse"] < 1e-7 and val["energy_mae_per_atom"] < 1e-8


def test_reported_metrics_equal_numpy_recomputation(lj_data):
    """Validation metrics of the returned models equal NumPy's, one structure at a time."""
    result = train(
        LennardJones(sigma=2.3, epsilon=0.3, cutoff=CUTOFF),
        lj_data,
        epochs=3,
        batch_size=4,
        learning_rate=0.01,
        validation_fraction=0.3,
        seed=1,
        progress=False,
    )
    val = [lj_data[i] for i in result.validation_indices]
    assert any(a.pbc.all() for a in val)  # the stress metric is exercised
    for model, entry in (
        (result.model, result.best_metrics),
        (result.last_model, result.history[-1]),
    ):
        ref = _numpy_metrics(model, val)
        for key, value in ref.items():
            assert entry["validation"][key] == pytest.approx(value, rel=1e-10), key
        assert ref["force_rmse"] > 1e-3  # not a comparison of round-off
    # the same with the public evaluate()
    again = evaluate(result.model, val)
    assert again["loss"] == pytest.approx(result.best_metrics["validation"]["loss"], rel=1e-10)
    # the seed decides the split and the shuffling: the same seed, the same history
    kwargs = dict(epochs=2, batch_size=4, learning_rate=0.01, validation_fraction=0.3)
    start = LennardJones(sigma=2.3, epsilon=0.3, cutoff=CUTOFF)
    a = train(start, lj_data, seed=jax.random.key(4), progress=False, **kwargs)
    b = train(start, lj_data, seed=jax.random.key(4), progress=False, **kwargs)
    c = train(start, lj_data, seed=jax.random.key(5), progress=False, **kwargs)
    assert a.history == b.history and a.validation_indices == b.validation_indices
    assert c.validation_indices != a.validation_indices


def test_loss_and_gradient_do_not_see_padding(lj_data):
    """More atom and system slots (empty ones included) change neither loss nor gradient."""
    model = eqx.tree_at(
        lambda m: (m.sigma, m.epsilon),
        LennardJones(sigma=2.3, epsilon=0.3, cutoff=3.5, images=(1, 1, 1)),
        (jnp.asarray(2.3), jnp.asarray(0.3)),
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    structures = [lj_data[i] for i in (0, 1, 13, 2, 14)]
    sizes = [len(a) for a in structures]
    results = []
    for extra_systems, extra_atoms in ((0, 0), (4, 31)):
        cap = Capacity(len(sizes) + extra_systems, sum(sizes) + extra_atoms, max(sizes) + 2)
        [(batch, targets)] = make_batches(
            structures, [read_labels(a) for a in structures], range(5), cap
        )
        (loss, _), grads = _loss_and_grad(
            params, static, batch, targets, LossWeights(1.0, 1.0, 1.0), True
        )
        results.append((float(loss), float(grads.sigma), float(grads.epsilon)))
    base = np.array(results[0])
    assert np.all(np.abs(base) > 1e-6)
    for other in results[1:]:
        np.testing.assert_allclose(other, base, rtol=1e-14, atol=0)


def test_early_stopping_returns_the_best_parameters(lj_data):
    """Training data from σ=2.5, validation from σ=2.4: the validation loss falls, then rises."""
    val = _label(
        LennardJones(sigma=2.4, epsilon=EPSILON, cutoff=CUTOFF), _structures(seed=5, n_bulk=0)
    )
    seen = []
    result = train(
        LennardJones(sigma=2.25, epsilon=EPSILON, cutoff=CUTOFF),
        lj_data,
        validation=val,
        epochs=200,
        batch_size=4,
        learning_rate=0.01,
        patience=4,
        progress=False,
        callback=seen.append,
    )
    losses = [h["validation"]["loss"] for h in result.history]
    assert result.stopped_early and len(result.history) < 200
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.best_epoch == len(result.history) - 4  # patience epochs after the best
    assert 1 < result.best_epoch and losses[-1] > losses[result.best_epoch - 1]
    assert [h["epoch"] for h in seen] == list(range(1, len(result.history) + 1))
    best = evaluate(
        result.model,
        val,
    )["loss"]
    last = evaluate(
        result.last_model,
        val,
    )["loss"]
    assert best == pytest.approx(min(losses), rel=1e-10)
    assert last == pytest.approx(losses[-1], rel=1e-10) and last > best
    assert float(result.model.sigma) != float(result.last_model.sigma)


def test_without_validation_the_best_model_has_the_loss_reported_for_it_and_is_valid():
    """No validation set: the model returned as best is the one whose loss selected it (the
    training set evaluated after its epoch, ``train_end``), not the parameters one epoch
    later. LJ dimers from σ=2.5, ε=0.5, one batch per epoch and a learning rate that makes
    the parameters overshoot: the loss accumulated during an epoch is of the parameters before
    its update (epochs' ``train`` 0.23, 25.7, 0.076, 0.27, ...; ``train_end`` 25.7, 0.076,
    0.27, ...); the returned model had 0.27 where 0.076 was reported. Equal to 1e-10
    relative: the same evaluation twice."""
    ref = LennardJones(sigma=2.5, epsilon=0.5, cutoff=6.0)
    dimers = [ase.Atoms("Ar2", positions=[[0, 0, 0], [d, 0, 0]]) for d in np.linspace(2.6, 3.6, 8)]
    data = _label(ref, dimers)
    start = LennardJones(sigma=2.3, epsilon=0.3, cutoff=6.0)
    # the overshooting steps then take ε below 0 (at epoch 4): training stops there, warning,
    # and that model is never the best (no run or evaluation would take it)
    with pytest.warns(UserWarning, match="left the model's domain"):
        result = train(
            start, data, epochs=6, batch_size=8, learning_rate=0.5, validation_fraction=0.0,
            progress=False,
        )  # fmt: skip
    assert result.stopped_early and len(result.history) < 6
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        evaluate(result.last_model, data)
    ends = [h["train_end"]["loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(ends)) + 1
    best = evaluate(result.model, data)["loss"]
    assert best == pytest.approx(result.best_metrics["train_end"]["loss"], rel=1e-10)
    assert best == pytest.approx(min(ends), rel=1e-10)
    # no parameters the training measured did better than the ones it returns
    assert best <= min(h["train"]["loss"] for h in result.history) * (1 + 1e-10)
    with pytest.raises(ValueError, match="epoch 1 left the model's domain"):
        train(LennardJones(sigma=2.5, epsilon=0.9, cutoff=6.0), data, epochs=3, batch_size=8,
              learning_rate=2.0, validation_fraction=0.0, progress=False)  # fmt: skip

    # a check of the model's own that is not a ValueError stops the training the same way
    # (epoch 1 takes ε from 0.3 to 0.8)
    class Capped(LennardJones):
        def __check_init__(self):
            assert float(self.epsilon) < 0.6, "epsilon past the cap"

    with pytest.raises(ValueError, match="epoch 1 .*AssertionError: epsilon past the cap"):
        train(Capped(sigma=2.3, epsilon=0.3, cutoff=6.0), data, epochs=3, batch_size=8,
              learning_rate=0.5, validation_fraction=0.0, progress=False)  # fmt: skip
    bad = {"learning_rate": float("nan"), "weight_decay": -1.0, "clip_norm": 0.0,
           "plateau_factor": 2.0}  # fmt: skip
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            train(ref, data, epochs=1, progress=False, **{name: value})


# ---------------------------------------------------------------------- model files
class TinyModel(Model):
    """A small learned model with hyper-parameters: E = Σ_i MLP(|r_i - r_c|²) per system."""

    mlp: eqx.nn.MLP
    width: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(self, width: int, scale: float = 1.0, *, key):
        self.width, self.scale = width, scale
        self.mlp = eqx.nn.MLP(1, "scalar", width, 2, key=key)

    def hyperparameters(self):
        return {"width": self.width, "scale": self.scale}

    def energy(self, batch):
        com = batch.sum_atoms(batch.positions) / jnp.maximum(batch.n_atoms, 1)[:, None]
        d2 = jnp.sum((batch.positions - batch.to_atoms_axis(com)) ** 2, axis=-1)
        e = jax.vmap(self.mlp)(self.scale * d2[:, None])
        return batch.sum_atoms(jnp.where(batch.atom_mask, e, 0.0))


class Unsavable(Model):
    mlp: eqx.nn.MLP

    def energy(self, batch):
        return jnp.zeros(batch.max_systems)


def _assert_same(a, b):
    assert type(a) is type(b)
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert type(x) is type(y) and np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "model",
    [
        LennardJones(sigma=2.5, epsilon=0.5, cutoff=6.0, switch_onset=5.0, images=(1, 2, 1)),
        LennardJones(sigma=jnp.asarray(2.5), epsilon=jnp.asarray(0.1), cutoff=6.0),
        Morse.from_pairs(
            {"Ar": (0.1, 1.3, 3.8), ("Kr", "Ar"): (0.2, 1.1, 4.0), "Kr": (0.3, 1.2, 4.1)},
            cutoff=8.0,
        ),
        SoftSphere(sigma=2.0, epsilon=jnp.asarray(1.5)),
        TinyModel(3, 0.5, key=jax.random.key(7)),
    ],
    ids=["lj-floats", "lj-arrays", "morse-pairs", "soft-sphere", "custom-hyperparameters"],
)
def test_save_load_round_trip(tmp_path, model):
    path = save_model(tmp_path / "m.eqx", model)
    restored = load_model(path)
    _assert_same(model, restored)
    batch = fd.Batch.from_atoms(_structures(n_small=3, n_bulk=0))
    if not isinstance(model, Morse):
        np.testing.assert_array_equal(model(batch).forces, restored(batch).forces)
    # never overwritten unless asked, and the file is left as it was
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(path, LennardJones(sigma=1.0, epsilon=1.0, cutoff=3.0))
    assert path.read_bytes() == before
    save_model(path, LennardJones(sigma=1.0, epsilon=1.0, cutoff=3.0), overwrite=True)
    assert float(load_model(path).sigma) == 1.0
    assert not [p for p in tmp_path.iterdir() if p.name != "m.eqx"]  # no temporary left


def test_unsavable_model_names_the_class(tmp_path):
    model = Unsavable(eqx.nn.MLP(1, 1, 2, 1, key=jax.random.key(0)))
    with pytest.raises(TypeError, match="Unsavable.*mlp.*hyperparameters"):
        save_model(tmp_path / "u.eqx", model)
    assert not list(tmp_path.iterdir())
    (tmp_path / "junk.eqx").write_text("not a model\n")
    with pytest.raises(ValueError, match="not a fused_dynamics model file"):
        load_model(tmp_path / "junk.eqx")
    # train() refuses it before the first epoch, not after the last one
    with pytest.raises(TypeError, match="Unsavable"):
        fd.train(model, [], output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # a class of the script being run cannot be imported back by another program
    main_class = type("Script", (LennardJones,), {"__module__": "__main__"})
    with pytest.raises(TypeError, match="__main__"):
        save_model(tmp_path / "s.eqx", main_class(sigma=1.0, epsilon=1.0, cutoff=3.0))


def test_trains_a_custom_model_and_writes_outputs(tmp_path, lj_data):
    """A model with static fields and a nested MLP trains; outputs land and are refused again."""
    model = TinyModel(4, 0.1, key=jax.random.key(0))
    before = evaluate(model, lj_data[:12])["loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the figure, the files: no warning leaks
        result = train(
            model,
            lj_data[:12],
            epochs=5,
            batch_size=4,
            learning_rate=0.01,
            clip_norm=1.0,
            schedule="plateau",
            validation_fraction=0.0,
            output_dir=tmp_path / "out",
            progress=False,
        )
    assert result.validation_indices == [] and result.best_metrics["validation"] is None
    assert evaluate(result.model, lj_data[:12])["loss"] < before
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"model.eqx", "last_model.eqx", "metrics.json", "metrics.csv", "loss.png"}
    _assert_same(load_model(tmp_path / "out" / "model.eqx"), result.model)
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["best_epoch"] == result.best_epoch and len(summary["history"]) == 5
    assert summary["best"]["train"]["stress_rmse"] is None  # no stress: null, not NaN
    assert all(math.isfinite(h["learning_rate"]) for h in result.history)  # plateau scale
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError):
        train(model, lj_data[:4], epochs=1, output_dir=tmp_path / "out", progress=False)


# ---------------------------------------------------------------------- files and the CLI
def test_reads_extxyz_written_with_a_single_point_calculator(tmp_path, lj_data):
    path = tmp_path / "data.extxyz"
    ase.io.write(path, lj_data)
    from_file = train(
        LennardJones(sigma=2.3, epsilon=0.3, cutoff=CUTOFF),
        str(path),
        epochs=2,
        batch_size=4,
        learning_rate=0.01,
        seed=3,
        progress=False,
    )
    from_list = train(
        LennardJones(sigma=2.3, epsilon=0.3, cutoff=CUTOFF),
        lj_data,
        epochs=2,
        batch_size=4,
        learning_rate=0.01,
        seed=3,
        progress=False,
    )
    # the same data (positions as extxyz writes them, 8 decimals), split and batches
    assert from_file.validation_indices == from_list.validation_indices
    for a, b in zip(from_file.history, from_list.history, strict=True):
        for split in ("train", "validation"):
            assert a[split] == pytest.approx(b[split], rel=1e-6)
    for a, b in zip(ase.io.read(path, ":"), lj_data, strict=True):
        la, lb = read_labels(a), read_labels(b)
        assert la.energy == pytest.approx(lb.energy, rel=1e-12)
        np.testing.assert_allclose(la.forces, lb.forces, rtol=0, atol=1e-8)  # 8 decimals
        assert (la.stress is None) == (lb.stress is None) == (not b.pbc.all())
        if la.stress is not None:
            np.testing.assert_allclose(la.stress, lb.stress, rtol=1e-12, atol=0)
    # references from info/arrays keys instead of the calculator
    keyed = []
    for a in lj_data[:4]:
        b = a.copy()
        b.info["ref_energy"] = a.get_potential_energy()
        b.arrays["ref_forces"] = a.get_forces()
        keyed.append(b)
    lab = read_labels(keyed[0], energy_key="ref_energy", forces_key="ref_forces")
    assert lab.energy == lj_data[0].get_potential_energy() and lab.stress is None


CONFIG = """\
seed = 0
dtype = "float64"
output_dir = "out"

[data]
path = "data.extxyz"

[validation]
fraction = 0.25

[model]
type = "lennard_jones"
sigma = 2.3
epsilon = 0.3
cutoff = 6.0

[optimizer]
learning_rate = 0.02
schedule = "warmup_cosine"

[training]
epochs = 3
batch_size = 4
"""


def test_cli_train(tmp_path, lj_data):
    ase.io.write(tmp_path / "data.extxyz", lj_data)
    cfg = tmp_path / "fit.toml"
    cfg.write_text(CONFIG)
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(cfg), "--no-progress"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "model.eqx",
        "last_model.eqx",
        "metrics.json",
        "metrics.csv",
        "loss.png",
    }
    assert isinstance(load_model(out / "model.eqx"), LennardJones)
    assert "force RMSE" in res.output
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and "validation_force_rmse" in rows[0]
    # an output folder that exists is refused (exit 2) unless --overwrite
    stamp = (out / "model.eqx").read_bytes()
    res = runner.invoke(app, ["train", str(cfg), "--no-progress"])
    assert res.exit_code == 2 and "output_dir" in res.output and "--overwrite" in res.output
    assert (out / "model.eqx").read_bytes() == stamp
    # start from the checkpoint, into another folder
    cfg2 = tmp_path / "more.yaml"
    cfg2.write_text(
        "output_dir: out2\ndata: {path: data.extxyz}\nmodel: {type: checkpoint, path: "
        "out/model.eqx}\ntraining: {epochs: 1, batch_size: 4}\n"
    )
    res = runner.invoke(app, ["train", str(cfg2), "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", str(cfg), "--no-progress", "--overwrite"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "change, key",
    [
        (("epochs = 3", "epoch = 3"), "training: unknown key 'epoch' (did you mean 'epochs'?)"),
        (('type = "lennard_jones"', 'type = "lj"'), "model.type: Input should be 'lennard_jones'"),
        (('schedule = "warmup_cosine"', 'schedule = "cos"'), "optimizer.schedule"),
        (("sigma = 2.3", "sigmaa = 2.3"), "model: lennard_jones: "),
        (("sigma = 2.3", "sigma = -2.3"), "model: lennard_jones: LennardJones: sigma"),
        (("fraction = 0.25", "fraction = 1.5"), "validation.fraction"),
        (('path = "data.extxyz"', 'path = "missing.extxyz"'), "data.path"),
        (("learning_rate = 0.02", "learning_rate = inf"), "optimizer.learning_rate"),
        (('output_dir = "out"\n', ""), "output_dir: required key is missing"),
    ],
)
def test_cli_train_bad_config_exits_2_naming_the_key(tmp_path, change, key):
    (tmp_path / "data.extxyz").write_text("")
    cfg = tmp_path / "fit.toml"
    cfg.write_text(CONFIG.replace(*change))
    res = CliRunner().invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2, res.output
    assert key in res.output, res.output


def test_a_pair_potential_on_neighbor_lists_trains_like_the_dense_one():
    """``with_neighbors`` models train on host-built lists (the trainer's batches are not the
    user's to attach lists to): the same losses and parameters as the dense path to float64
    rounding (the same pair terms summed in another order)."""
    ref = LennardJones(sigma=2.5, epsilon=0.5, cutoff=5.0)
    data = []
    for k in range(8):
        atoms = bulk("Ar", "fcc", a=3.6, cubic=True) * (2, 1, 1)
        atoms.rattle(0.05, seed=k)
        out = ref(fd.Batch.from_atoms([atoms], dtype=jnp.float64))
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(out.energy[0]), forces=np.asarray(out.forces)[: len(atoms)]
        )
        data.append(atoms)
    start = LennardJones(sigma=2.4, epsilon=0.45, cutoff=5.0)
    kw = dict(epochs=3, batch_size=4, validation_fraction=0, progress=False, seed=0)
    dense = fd.train(start, data, **kw)
    listed = fd.train(start.with_neighbors(skin=0.5), data, **kw)
    for a, b in zip(dense.history, listed.history, strict=True):
        np.testing.assert_allclose(b["train"]["loss"], a["train"]["loss"], rtol=1e-12)
    np.testing.assert_allclose(float(listed.model.sigma), float(dense.model.sigma), rtol=1e-12)
