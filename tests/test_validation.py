"""Parameters are checked where they are given (issue 10, item 5).

Every stage, criterion and convergence hook refuses a bad parameter at construction with a
ValueError naming the class, the parameter, the value and the rule; good edge values and JAX
tracers (vmap, grad) pass; per-system parameters are fitted to a batch by
``validation.fit_per_system`` (a scalar, one value per occupied system or one per slot).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ase.build import bulk

import fused_dynamics as fd
from fused_dynamics import validation as v
from fused_dynamics.convergence import Criterion
from fused_dynamics.stages import (
    FIRE,
    FIRE2,
    NPH,
    NPT,
    NVE,
    FrechetCellFilter,
    GradientDescent,
    NVTLangevin,
    NVTNoseHoover,
    OptaxRelax,
)

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=8.5)
NAN, INF = float("nan"), float("inf")

# valid keyword arguments of each class; a case overrides one of them
BASE = {
    NVE: dict(model=LJ, dt=2.0),
    NVTLangevin: dict(model=LJ, dt=2.0, temperature=60.0, friction=0.01),
    NVTNoseHoover: dict(model=LJ, dt=2.0, temperature=60.0, tdamp=100.0),
    NPT: dict(model=LJ, dt=2.0, temperature=60.0, pressure=0.0, tdamp=100.0, pdamp=1000.0),
    NPH: dict(model=LJ, dt=2.0, pressure=0.0, pdamp=1000.0),
    FIRE: dict(model=LJ),
    FIRE2: dict(model=LJ),
    GradientDescent: dict(model=LJ, step_size=0.1),
    OptaxRelax: dict(model=LJ, optax_transform=optax.adam(1e-2)),
    FrechetCellFilter: dict(),
    Criterion: dict(key="fmax", threshold=0.05),
    fd.ConvergenceHook: dict(criteria=[{"key": "fmax", "threshold": 0.05}]),
    fd.ThermalizeOnEntryHook: dict(code=1, temperature=300.0),
}


def make(cls, **overrides):
    return cls(**{**BASE[cls], **overrides})


# (class, parameter, bad value, text of the value in the message)
BAD = [
    # every stage: the budget and the criterion
    (NVE, "n_steps", -3, "-3"),
    (NVE, "n_steps", 0, "0"),
    (NVE, "n_steps", True, "True"),
    (NVE, "n_steps", 2.5, "2.5"),
    (FIRE, "n_steps", -3, "-3"),
    (NVTLangevin, "n_steps", 10.0, "10.0"),
    (NVTNoseHoover, "n_steps", 0, "0"),
    (NPT, "n_steps", -1, "-1"),
    (NPH, "n_steps", 0, "0"),
    (FIRE2, "n_steps", False, "False"),
    (GradientDescent, "n_steps", -2, "-2"),
    (OptaxRelax, "n_steps", 0, "0"),
    (NVE, "convergence_hook", 0.01, "0.01"),
    (FIRE, "convergence_hook", "fmax", "'fmax'"),
    # NVE
    (NVE, "dt", -5.0, "-5.0"),
    (NVE, "dt", 0.0, "0.0"),
    (NVE, "dt", NAN, "nan"),
    (NVE, "dt", INF, "inf"),
    (NVE, "dt", True, "True"),
    (NVE, "dt", "2.0", "'2.0'"),
    (NVE, "dt", None, "None"),
    (NVE, "dt", np.array([1.0, -1.0]), "-1.0"),
    (NVE, "dt", np.ones((2, 2)), "(2, 2)"),
    (NVE, "dt", np.array([1 + 1j]), "complex"),
    # NVTLangevin
    (NVTLangevin, "dt", -1.0, "-1.0"),
    (NVTLangevin, "dt", NAN, "nan"),
    (NVTLangevin, "temperature", -60.0, "-60.0"),
    (NVTLangevin, "temperature", NAN, "nan"),
    (NVTLangevin, "temperature", INF, "inf"),
    (NVTLangevin, "temperature", jnp.array([40.0, -1.0]), "-1.0"),
    (NVTLangevin, "friction", -0.02, "-0.02"),
    (NVTLangevin, "friction", INF, "inf"),
    (NVTLangevin, "seed", -1, "-1"),
    (NVTLangevin, "seed", 2**32, str(2**32)),
    (NVTLangevin, "seed", 1.5, "1.5"),
    (NVTLangevin, "seed", True, "True"),
    # NVTNoseHoover
    (NVTNoseHoover, "dt", 0.0, "0.0"),
    (NVTNoseHoover, "temperature", -1.0, "-1.0"),
    (NVTNoseHoover, "tdamp", 0.0, "0.0"),
    (NVTNoseHoover, "tdamp", -100.0, "-100.0"),
    (NVTNoseHoover, "tdamp", NAN, "nan"),
    (NVTNoseHoover, "chain_length", 0, "0"),
    (NVTNoseHoover, "chain_length", 2.0, "2.0"),
    (NVTNoseHoover, "chain_steps", 0, "0"),
    (NVTNoseHoover, "sy_order", 4, "4"),
    # NPT
    (NPT, "dt", -1.0, "-1.0"),
    (NPT, "temperature", 0.0, "0.0"),
    (NPT, "temperature", -10.0, "-10.0"),
    (NPT, "temperature", None, "None"),
    (NPT, "pressure", NAN, "nan"),
    (NPT, "pressure", INF, "inf"),
    (NPT, "tdamp", 0.0, "0.0"),
    (NPT, "tdamp", None, "None"),
    (NPT, "pdamp", -1.0, "-1.0"),
    (NPT, "coupling", "cubic", "'cubic'"),
    (NPT, "chain_length", 0, "0"),
    (NPT, "thermostat", 1, "1"),
    # NPH
    (NPH, "dt", 0.0, "0.0"),
    (NPH, "pressure", NAN, "nan"),
    (NPH, "pdamp", 0.0, "0.0"),
    (NPH, "mass_temperature", -1.0, "-1.0"),
    (NPH, "mass_temperature", 0.0, "0.0"),
    (NPH, "coupling", "iso", "'iso'"),
    # FIRE
    (FIRE, "dt", -0.1, "-0.1"),
    (FIRE, "dt", 0.0, "0.0"),
    (FIRE, "dtmax", 0.0, "0.0"),
    (FIRE, "maxstep", 0.0, "0.0"),
    (FIRE, "maxstep", -0.2, "-0.2"),
    (FIRE, "Nmin", -1, "-1"),
    (FIRE, "Nmin", 2.5, "2.5"),
    (FIRE, "Nmin", True, "True"),
    (FIRE, "finc", 0.9, "0.9"),
    (FIRE, "fdec", 0.0, "0.0"),
    (FIRE, "fdec", 1.5, "1.5"),
    (FIRE, "astart", -0.1, "-0.1"),
    (FIRE, "astart", 1.1, "1.1"),
    (FIRE, "fa", 0.0, "0.0"),
    (FIRE, "fa", 1.01, "1.01"),
    (FIRE, "flavor", "fast", "'fast'"),
    (FIRE, "cell_filter", "exp", "'exp'"),
    (FIRE, "scalar_pressure", NAN, "nan"),
    (FIRE, "exp_cell_factor", 0.0, "0.0"),
    # FIRE2
    (FIRE2, "dt", 0.0, "0.0"),
    (FIRE2, "dtmax", -1.0, "-1.0"),
    (FIRE2, "dtmin", 0.0, "0.0"),
    (FIRE2, "dtmin", 2.0, "2.0"),  # above dtmax = 1.0
    (FIRE2, "maxstep", 0.0, "0.0"),
    (FIRE2, "Nmin", -1, "-1"),
    (FIRE2, "finc", 0.5, "0.5"),
    (FIRE2, "fdec", 0.0, "0.0"),
    (FIRE2, "astart", 2.0, "2.0"),
    (FIRE2, "fa", 0.0, "0.0"),
    (FIRE2, "Npneg_max", 0, "0"),
    (FIRE2, "Npneg_max", 10.0, "10.0"),
    (FIRE2, "initialdelay", "yes", "'yes'"),
    (FIRE2, "cell_filter", "frechet2", "'frechet2'"),
    (FIRE2, "scalar_pressure", INF, "inf"),
    (FIRE2, "exp_cell_factor", -1.0, "-1.0"),
    # GradientDescent, OptaxRelax, FrechetCellFilter
    (GradientDescent, "step_size", 0.0, "0.0"),
    (GradientDescent, "step_size", -0.1, "-0.1"),
    (GradientDescent, "step_size", NAN, "nan"),
    (GradientDescent, "maxstep", 0.0, "0.0"),
    (OptaxRelax, "optax_transform", 0.01, "0.01"),
    (FrechetCellFilter, "scalar_pressure", NAN, "nan"),
    (FrechetCellFilter, "exp_cell_factor", 0.0, "0.0"),
    # Criterion, ConvergenceHook
    (Criterion, "threshold", NAN, "nan"),
    (Criterion, "threshold", INF, "inf"),
    (Criterion, "threshold", True, "True"),
    (Criterion, "threshold", "0.05", "'0.05'"),
    (Criterion, "reduce_op", "avg", "'avg'"),
    (Criterion, "reduce_dims", 1.5, "1.5"),
    (Criterion, "key", "", "''"),
    (fd.ConvergenceHook, "criteria", [], "none"),
    (fd.ConvergenceHook, "criteria", {"key": "fmax", "threshold": 0.1}, "'fmax'"),
    (fd.ConvergenceHook, "custom_op", 3, "3"),
    (fd.ConvergenceHook, "source_status", 1.5, "1.5"),
    # ThermalizeOnEntryHook: the temperature systems entering a stage get
    (fd.ThermalizeOnEntryHook, "temperature", -5.0, "-5.0"),
    (fd.ThermalizeOnEntryHook, "temperature", NAN, "nan"),
    (fd.ThermalizeOnEntryHook, "temperature", "300", "'300'"),
    (fd.ThermalizeOnEntryHook, "code", -1, "-1"),
    (fd.ThermalizeOnEntryHook, "code", 1.5, "1.5"),
    (fd.ThermalizeOnEntryHook, "seed", 0.5, "0.5"),
    (fd.ThermalizeOnEntryHook, "seed", -1, "-1"),
    (fd.ThermalizeOnEntryHook, "seed", 2**32, str(2**32)),
]


def _case_id(case):
    cls, name, value, _ = case
    return f"{cls.__name__}-{name}-{value!r}"[:60]


@pytest.mark.parametrize("case", BAD, ids=[_case_id(c) for c in BAD])
def test_bad_parameter_is_refused_with_class_parameter_and_value(case):
    cls, name, value, shown = case
    with pytest.raises(ValueError) as info:
        make(cls, **{name: value})
    msg = str(info.value)
    owner = cls.__name__ if cls is not Criterion else "Criterion"
    assert msg.startswith(owner), msg
    assert name in msg, msg
    assert shown in msg, msg
    assert "must" in msg, msg  # the rule is stated


def test_message_states_the_rule_and_unit():
    with pytest.raises(ValueError, match=r"^NVE: dt must be > 0 and finite \(fs\), got -5\.0\.$"):
        NVE(LJ, dt=-5.0)
    with pytest.raises(
        ValueError,
        match=r"^FIRE: n_steps must be an integer >= 1 and <= 2147483647 or None, got -3",
    ):
        FIRE(LJ, n_steps=-3)
    with pytest.raises(ValueError, match=r"temperature must be >= 0 and finite \(K\)"):
        NVTLangevin(LJ, dt=1.0, temperature=-60.0, friction=0.02)
    with pytest.raises(ValueError, match=r"friction must be >= 0 and finite \(1/fs\)"):
        NVTLangevin(LJ, dt=1.0, temperature=60.0, friction=-0.02)
    with pytest.raises(ValueError, match=r"fdec must be in \(0, 1\], got 1\.5"):
        FIRE(LJ, fdec=1.5)
    with pytest.raises(ValueError, match=r"entry 1 is -1\.0"):
        NVE(LJ, dt=np.array([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match=r"FIRE2: dtmin must be <= dtmax"):
        FIRE2(LJ, dtmin=2.0, dtmax=1.0)
    with pytest.raises(ValueError, match=r"Criterion 'fmax': threshold must be finite, got nan"):
        fd.ConvergenceHook.from_fmax(NAN)


GOOD = [
    (NVE, dict(dt=1e-12)),
    (NVE, dict(dt=2)),  # an integer time step is a number of fs
    (NVE, dict(dt=np.float32(2.0), n_steps=1)),
    (NVE, dict(dt=np.array([1.0, 2.0, 0.5]))),
    (NVE, dict(dt=jnp.array(2.0))),
    (NVTLangevin, dict(temperature=0.0, friction=0.0)),
    (NVTLangevin, dict(temperature=np.array([0.0, 300.0]), seed=2**32 - 1)),
    (NVTLangevin, dict(seed=np.int64(7))),
    (NVTLangevin, dict(seed=jnp.array(3))),
    (NVTNoseHoover, dict(temperature=0.0, chain_length=1, chain_steps=1, sy_order=7)),
    (NPT, dict(pressure=-0.01, coupling="triclinic", chain_length=1)),
    (NPT, dict(pressure=np.array([-0.01, 0.0, 0.02]))),
    (NPH, dict(mass_temperature=50.0, coupling="anisotropic")),
    (FIRE, dict(finc=1.0, fdec=1.0, astart=0.0, fa=1.0, Nmin=0)),
    (FIRE, dict(astart=1.0, flavor="vv", dt=0.5, dtmax=5.0)),
    (FIRE, dict(cell_filter="frechet", scalar_pressure=-0.01, exp_cell_factor=10.0)),
    (FIRE2, dict(dtmin=1.0, dtmax=1.0, Npneg_max=None, initialdelay=False)),
    (FIRE2, dict(Nmin=np.array([0, 20]), initialdelay=np.array([True, False]))),
    (GradientDescent, dict(step_size=1e-6, maxstep=None)),
    (Criterion, dict(threshold=-1.0)),  # never holds: a way to keep systems in a stage
    (Criterion, dict(key="energy", threshold=-1e9)),
    (Criterion, dict(key="forces", threshold=0.1, reduce_op="norm", reduce_dims=(-1,))),
    (fd.ConvergenceHook, dict(criteria=[], custom_op=lambda batch, fields: batch.system_mask)),
    (fd.ConvergenceHook, dict(source_status=0, target_status=-1)),
]


@pytest.mark.parametrize(
    "cls,kwargs", GOOD, ids=[f"{c.__name__}-{sorted(k)}"[:60] for c, k in GOOD]
)
def test_good_edge_values_are_accepted(cls, kwargs):
    make(cls, **kwargs)


# ----------------------------------------------------------------------------- tracers
def test_tracers_are_accepted_under_vmap_and_grad():
    temps = jnp.array([0.0, 20.0, 40.0])

    def build(t):
        return NVTLangevin(LJ, dt=2.0, temperature=t, friction=0.1, n_steps=3).temperature

    np.testing.assert_array_equal(jax.vmap(build)(temps), temps)
    # values of a tracer are unknown at construction: even a negative one passes, never float()
    np.testing.assert_array_equal(jax.vmap(build)(-temps), -temps)
    g = jax.grad(lambda dt: NVE(LJ, dt=dt).dt * 3.0)(2.0)
    assert float(g) == 3.0
    seeds = jax.vmap(lambda s: NVTLangevin(LJ, 2.0, 10.0, 0.1, seed=s).seed)(jnp.arange(3))
    np.testing.assert_array_equal(seeds, [0, 1, 2])
    # shape and dtype of a tracer are still checked
    with pytest.raises(ValueError, match="shape"):
        jax.vmap(lambda t: NVE(LJ, dt=t))(jnp.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="seed must be an integer"):
        jax.vmap(lambda s: NVTLangevin(LJ, 2.0, 10.0, 0.1, seed=s))(jnp.ones(2))


def test_jit_of_construction_accepts_traced_parameters():
    out = jax.jit(lambda dt, t: NVTNoseHoover(LJ, dt, t, 100.0).temperature)(1.0, 30.0)
    assert float(out) == 30.0


# ----------------------------------------------------------------------------- rules
def test_rule_texts_and_bounds():
    assert v.positive().text == "> 0 and finite"
    assert v.non_negative().text == ">= 0 and finite"
    assert v.finite().text == "finite"
    assert v.interval(0, 1, "right").text == "in (0, 1]"
    assert v.interval(0, 1, "both").text == "in [0, 1]"
    x = np.array([-1.0, 0.0, 0.5, 1.0, NAN, INF])
    np.testing.assert_array_equal(v.positive().holds(x), [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(v.interval(0, 1, "left").holds(x), [0, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="closed"):
        v.interval(0, 1, "open")


def test_check_integer_static_field_refuses_arrays():
    with pytest.raises(ValueError, match="not an array"):
        v.check_integer("X", "count", np.array([1, 2]), 1)
    v.check_integer("X", "count", np.array([1, 2]), 1, per_system=True)
    with pytest.raises(ValueError, match="dtype float64"):
        v.check_integer("X", "count", np.array([1.0, 2.0]), 1, per_system=True)


# ----------------------------------------------------------------------------- per-system fit
def _batch(max_systems=3, occupied=None):
    systems = [
        bulk("Ar", "fcc", a=5.3, cubic=True),
        bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 1, 1),
    ]
    batch = fd.Batch.from_atoms(systems, max_atoms=32, max_systems=max_systems)
    if occupied is not None:
        batch = batch.replace(system_mask=jnp.asarray(occupied))
    return batch


def test_fit_scatters_one_value_per_occupied_system_over_the_occupied_slots():
    md = NVTLangevin(LJ, dt=2.0, temperature=np.array([40.0, 90.0]), friction=0.01)
    fitted = v.fit_per_system(md, _batch())
    np.testing.assert_array_equal(fitted.temperature, [40.0, 90.0, 40.0])  # empty slot: first
    assert fitted.friction == 0.01 and fitted.dt == 2.0  # scalars kept
    assert isinstance(fitted.temperature, np.ndarray)
    # occupied slots with a gap, slot order
    gap = v.fit_per_system(md, _batch(occupied=[True, False, True]))
    np.testing.assert_array_equal(gap.temperature, [40.0, 40.0, 90.0])
    # JAX arrays stay JAX arrays
    md = NVTLangevin(LJ, dt=2.0, temperature=60.0, friction=jnp.array([0.1, 0.2]))
    fitted = v.fit_per_system(md, _batch())
    assert isinstance(fitted.friction, jax.Array)
    np.testing.assert_array_equal(fitted.friction, [0.1, 0.2, 0.1])


def test_fit_keeps_scalars_and_per_slot_arrays():
    md = NVTLangevin(LJ, dt=2.0, temperature=np.array([40.0, 90.0, 10.0]), friction=0.01)
    assert v.fit_per_system(md, _batch()) is md
    nve = NVE(LJ, dt=2.0)
    assert v.fit_per_system(nve, _batch()) is nve


@pytest.mark.parametrize(
    "value,text",
    [
        (np.array([1.0, 2.0, 3.0, 4.0]), "has 4 values"),
        (np.array([1.0]), "has 1 value;"),
        (np.zeros(0), "has 0 values"),
    ],
)
def test_fit_refuses_other_lengths_naming_parameter_and_lengths(value, text):
    md = NVTLangevin(LJ, dt=2.0, temperature=value, friction=0.01)
    with pytest.raises(ValueError) as info:
        v.fit_per_system(md, _batch())
    msg = str(info.value)
    assert msg.startswith("NVTLangevin: temperature ") and text in msg
    assert "one per occupied system (2)" in msg and "one per slot (max_systems=3)" in msg


def test_fit_value_refuses_two_dimensional_arrays_and_needs_a_concrete_mask():
    mask = np.array([True, True, False])
    with pytest.raises(ValueError, match=r"X: p has shape \(2, 2\); give a scalar"):
        v.fit_value("X", "p", np.ones((2, 2)), mask)

    def fit(m):
        return v.fit_value("X", "p", jnp.array([1.0, 2.0]), m)

    with pytest.raises(ValueError, match="one per slot .max_systems=3.; one per occupied"):
        jax.jit(fit)(mask)
    per_slot = jax.jit(lambda m: v.fit_value("X", "p", jnp.ones(3), m))(mask)
    assert per_slot.shape == (3,)


def test_fit_covers_every_stage_and_the_criteria():
    b = _batch()
    two = np.array([1.0, 2.0])
    stages = [
        NVE(LJ, dt=two),
        NVTNoseHoover(LJ, dt=two, temperature=two, tdamp=100.0 * two),
        NPT(LJ, two, two, 1e-3 * two, 100.0 * two, 1000.0 * two),
        NPH(LJ, two, 1e-3 * two, 1000.0 * two, mass_temperature=two),
        FIRE(LJ, dt=0.1 * two, maxstep=0.1 * two, Nmin=np.array([1, 2]), fa=0.5 * two),
        FIRE2(LJ, dtmin=1e-3 * two, initialdelay=np.array([True, False])),
        GradientDescent(LJ, step_size=two, maxstep=0.1 * two),
    ]
    for stage in stages:
        fitted = v.fit_per_system(stage, b)
        for name in type(stage).per_system_parameters:
            value = getattr(fitted, name)
            if getattr(value, "ndim", 0) == 1:
                assert value.shape == (3,), (type(stage).__name__, name)
                assert value[2] == value[0]
    hook = fd.ConvergenceHook([{"key": "fmax", "threshold": np.array([0.1, 0.2])}])
    fitted = v.fit_per_system(FIRE(LJ, convergence_hook=hook), b)
    np.testing.assert_array_equal(fitted.convergence_hook.criteria[0].threshold, [0.1, 0.2, 0.1])
    with pytest.raises(ValueError, match="^NPH: mass_temperature has 4 values"):
        v.fit_per_system(NPH(LJ, 1.0, 0.0, 100.0, mass_temperature=np.ones(4)), b)
    with pytest.raises(ValueError, match="^Criterion 'fmax': threshold has 4 values"):
        v.fit_per_system(FIRE(LJ, convergence_hook=fd.ConvergenceHook.from_fmax(np.ones(4))), b)


def test_fitted_per_system_run_equals_separate_runs():
    # one value per occupied system, fitted by hand: each system runs as with its own scalar
    b = _batch()
    per_system = NVTLangevin(
        LJ, dt=2.0, temperature=np.array([40.0, 90.0]), friction=0.05, seed=1, n_steps=4
    )
    out = v.fit_per_system(per_system, b).run(b)
    atom_slot = np.asarray(b.system_idx)
    for slot, t in enumerate([40.0, 90.0]):
        alone = NVTLangevin(LJ, dt=2.0, temperature=t, friction=0.05, seed=1, n_steps=4).run(b)
        sel = atom_slot == slot
        np.testing.assert_allclose(
            np.asarray(out.positions)[sel], np.asarray(alone.positions)[sel], rtol=0, atol=1e-12
        )


def _run_wired():
    b = _batch()
    md = NVTLangevin(
        LJ, dt=2.0, temperature=np.array([40.0, 90.0]), friction=0.05, seed=1, n_steps=4
    )
    try:
        return md.run(b), b
    except Exception as exc:  # noqa: BLE001 (the wiring is not there yet)
        pytest.xfail(f"fit_per_system is not wired in FusedStage.run yet: {exc}"[:200])


def test_run_applies_one_value_per_occupied_system():
    out, b = _run_wired()
    slots = np.asarray(b.system_idx)
    for slot, t in enumerate([40.0, 90.0]):
        alone = NVTLangevin(LJ, dt=2.0, temperature=t, friction=0.05, seed=1, n_steps=4).run(b)
        sel = slots == slot
        np.testing.assert_allclose(
            np.asarray(out.positions)[sel], np.asarray(alone.positions)[sel], rtol=0, atol=1e-12
        )


def test_run_with_a_wrong_length_names_the_parameter_and_the_slots():
    # whether or not FusedStage.run fits per-system parameters first, the error is clear
    b = _batch()
    md = NVTLangevin(LJ, dt=2.0, temperature=np.ones(4), friction=0.05, n_steps=2)
    with pytest.raises(ValueError, match=r"NVTLangevin: temperature has 4 values.*max_systems=3"):
        md.run(b)


@pytest.mark.parametrize(
    "stage",
    [
        NVE(LJ, dt=np.ones(2)),
        NVTNoseHoover(LJ, 2.0, 60.0, np.ones(2)),
        NPH(LJ, 2.0, np.zeros(2), 1000.0),
        FIRE(LJ, fa=np.full(2, 0.9)),
        FIRE2(LJ, dtmin=np.full(2, 1e-3)),
        GradientDescent(LJ, step_size=np.ones(2)),
    ],
    ids=lambda s: type(s).__name__,
)
def test_init_state_refuses_arrays_that_do_not_fit_the_slots(stage):
    with pytest.raises(ValueError, match=rf"^{type(stage).__name__}: .* has 2 values.*=3 slots"):
        stage.init_state(_batch())


def test_convergence_refuses_thresholds_that_do_not_fit_the_slots():
    hook = fd.ConvergenceHook.from_fmax(np.ones(2))
    b = _batch()
    with pytest.raises(ValueError, match=r"^Criterion 'fmax': threshold has 2 values"):
        hook.converged(b, {"fmax": jnp.zeros(3)})
    fitted = v.fit_per_system(FIRE(LJ, convergence_hook=hook), b).convergence_hook
    np.testing.assert_array_equal(fitted.converged(b, {"fmax": jnp.zeros(3)}), [True, True, False])


@pytest.mark.parametrize(
    ("temperature", "text"),
    [
        (-10.0, "must be >= 0 and finite"),
        (float("nan"), "must be >= 0 and finite"),
        (np.array([-1.0, 5.0]), "entry 0 is -1.0"),
        (np.array([1.0, 2.0, 3.0]), "one value or one per slot \\(2 slots\\), got shape \\(3,\\)"),
    ],
)
def test_initialize_velocities_refuses_a_bad_temperature(temperature, text):
    # before: sqrt of a negative kT gave NaN velocities, and a run then failed every system
    atoms = [bulk("Ar", "fcc", a=5.26, cubic=True) for _ in range(2)]
    batch = fd.Batch.from_atoms(atoms)
    with pytest.raises(ValueError, match=f"initialize_velocities: temperature .*{text}"):
        fd.initialize_velocities(batch, temperature, jax.random.key(0))
    out = fd.initialize_velocities(batch, np.array([0.0, 30.0]), jax.random.key(0))
    assert np.all(np.asarray(out.velocities)[:4] == 0.0)
    assert np.all(np.isfinite(np.asarray(out.velocities)))
