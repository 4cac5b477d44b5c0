"""Structure of the stages and hooks (issue 11, items 2 to 4): abstract or final classes, one
Nosé–Hoover chain and Suzuki–Yoshida table, hooks refused where they are not hooks, and entry
into a stage handled by the engine (a system that enters FIRE mid-run starts a fresh FIRE)."""

import inspect

import jax
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.cluster import Icosahedron
from ase.filters import FrechetCellFilter as AseFrechetCellFilter
from ase.optimize import FIRE as AseFIRE

import fused_dynamics as fd
from fused_dynamics import hooks, hooks_base, hooks_builtin
from fused_dynamics.stages import Stage, chains, nose_hoover, npt

SIGMA, EPSILON, CUTOFF = 3.405, 0.0104, 8.0
LJ = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF)
LJ_PBC = fd.models.LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, images=(2, 2, 2))

_INIT = jax.jit(lambda fused, batch: fused.init(batch))
_STEP = jax.jit(lambda fused, batch: fused.step(batch)[0])


def ase_lj():
    return AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=CUTOFF)


def with_velocities(systems, temperature, seed):
    rng = np.random.default_rng(seed)
    for atoms in systems:
        m = atoms.get_masses()[:, None]
        atoms.set_velocities(rng.normal(size=(len(atoms), 3)) * np.sqrt(units.kB * temperature / m))
    return systems


def clusters():
    rng = np.random.default_rng(0)
    ico = Icosahedron("Ar", 2)
    ico.rattle(0.1, rng=rng)
    cube = bulk("Ar", "fcc", a=5.3, cubic=True)
    cube.pbc = False
    cube.rattle(0.1, rng=rng)
    return with_velocities([ico, cube], 40.0, 1)


def crystals():
    rng = np.random.default_rng(1)
    out = []
    for strain in (0.02, -0.01):
        atoms = bulk("Ar", "fcc", a=5.6, cubic=True)
        atoms.set_cell(atoms.cell[:] * (1.0 + strain), scale_atoms=True)
        atoms.rattle(0.05, rng=rng)
        out.append(atoms)
    return with_velocities(out, 40.0, 2)


# ---------------------------------------------------------------------- abstract or final
def test_a_stage_without_both_halves_cannot_be_built():
    class OnlyFirst(fd.Stage):
        def first_half(self, batch, state):
            return batch, state

    class OnlySecond(fd.Stage):
        def second_half(self, batch, state):
            return batch, state

    class Both(OnlyFirst):
        def second_half(self, batch, state):
            return batch, state

    with pytest.raises(TypeError, match="abstract"):
        OnlyFirst(LJ)
    with pytest.raises(TypeError, match="first_half"):
        OnlySecond(LJ)
    assert Both(LJ).init_state(fd.Batch.from_atoms(clusters())) == ()  # init_state defaults


def _is_abstract(cls) -> bool:
    return bool(
        getattr(cls, "__abstractmethods__", ())
        or getattr(cls, "__abstractvars__", ())
        or getattr(cls, "__abstractclassvars__", ())
    )


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _package_classes():
    """Every class defined in the stage and hook modules, and every subclass of Stage or Hook
    defined anywhere in the package."""
    modules = [hooks, hooks_base, hooks_builtin]
    modules += [m for _, m in inspect.getmembers(fd.stages, inspect.ismodule)]
    out = set()
    for module in modules:
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__.startswith("fused_dynamics"):
                out.add(obj)
    for base in (Stage, fd.Hook):
        out |= {c for c in _subclasses(base) if c.__module__.startswith("fused_dynamics.")}
    return out


def test_no_concrete_class_is_subclassed():
    """Equinox's pattern: a class with subclasses in the package is abstract (abstract methods
    or AbstractVars); only Stage and Hook, the bases users subclass, are named exceptions."""
    classes = _package_classes()
    assert {fd.FIRE, fd.NPH, fd.MaxForceHook, fd.ConvergedSnapshotHook} <= classes
    offenders = []
    for cls in classes:
        for base in cls.__mro__[1:]:
            if not base.__module__.startswith("fused_dynamics") or base in (Stage, fd.Hook):
                continue
            if not _is_abstract(base):
                offenders.append(f"{cls.__module__}.{cls.__qualname__} <- {base.__qualname__}")
    assert not offenders, offenders
    assert _is_abstract(Stage)
    for abstract in (
        fd.stages.AbstractFIRE,
        fd.stages.AbstractMTK,
        hooks.AbstractFailureHook,
        hooks.AbstractSnapshotHook,
    ):
        assert _is_abstract(abstract)
        with pytest.raises(TypeError):
            abstract(LJ) if issubclass(abstract, Stage) else abstract()
    # the former concrete-on-concrete pairs are now siblings
    assert not issubclass(fd.NPH, fd.NPT) and not issubclass(fd.FIRE2, fd.FIRE)
    assert not issubclass(fd.MaxForceHook, fd.NaNDetectorHook)
    assert not issubclass(fd.ConvergedSnapshotHook, fd.SnapshotHook)


# ---------------------------------------------------------------------- hooks are hooks
NOT_HOOKS = [
    pytest.param(lambda batch, ctx: batch, id="function"),
    pytest.param("AFTER_STEP", id="string"),
    pytest.param(fd.LoggingHook, id="hook-class"),
    pytest.param(fd.ConvergenceHook.from_fmax(0.1), id="convergence-hook"),
]


@pytest.mark.parametrize("obj", NOT_HOOKS)
def test_register_hook_refuses_what_is_not_a_hook(obj):
    stage = fd.NVE(LJ, dt=1.0)
    with pytest.raises(TypeError, match=r"expected an instance of fused_dynamics\.Hook") as info:
        stage.register_hook(obj)
    received = obj if isinstance(obj, type) else type(obj)
    assert received.__qualname__ in str(info.value)  # the type received is named
    with pytest.raises(TypeError, match=r"fused_dynamics\.Hook"):
        fd.NVE(LJ, dt=1.0, hooks=(obj,))
    # a real hook is accepted
    assert stage.register_hook(fd.NaNDetectorHook()).hooks[0] == fd.NaNDetectorHook()


# ---------------------------------------------------------------------- one chain, one table
def test_nose_hoover_and_npt_share_one_chain_and_one_table(monkeypatch):
    assert nose_hoover.suzuki_yoshida_weights is chains.suzuki_yoshida_weights
    for module in (nose_hoover, npt, fd.stages.mtk):  # no chain or table of their own
        names = {n for n, _ in inspect.getmembers(module, inspect.isfunction)}
        own = {n for n in names if "nhc" in n.lower() or "suzuki" in n.lower()}
        assert own <= {"suzuki_yoshida_weights"}, (module.__name__, own)
    calls = []
    real = chains.nose_hoover_chain

    def spy(*args, **kwargs):
        calls.append(tuple(np.asarray(args[-1], float)))
        return real(*args, **kwargs)

    monkeypatch.setattr(chains, "nose_hoover_chain", spy)
    batch = fd.Batch.from_atoms(crystals())
    out = LJ_PBC(batch, stress=True)
    batch = batch.replace(energy=out.energy, forces=out.forces, stress=out.stress)
    table = chains.suzuki_yoshida_weights(3)

    nvt = fd.NVTNoseHoover(LJ_PBC, dt=2.0, temperature=50.0, tdamp=50.0, chain_steps=2)
    nvt.first_half(batch, nvt.init_state(batch))  # eager: the Python function runs
    assert calls == [tuple(np.tile(table, 2) / 2)]

    calls.clear()
    barostat = fd.NPT(LJ_PBC, 2.0, 50.0, 0.0, 50.0, 500.0)
    barostat.first_half(batch, barostat.init_state(batch))
    assert calls == [table, table]  # the barostat chain, then the particle chain


# ---------------------------------------------------------------------- entry into a stage
def _run_until_entered(fused, batch, n_first):
    """Init and ``n_first`` steps: every system leaves sub-stage 0 (a budget of ``n_first``)."""
    b = _INIT(fused, batch)
    for _ in range(n_first):
        b = _STEP(fused, b)
    occupied = np.asarray(b.system_mask)
    assert np.all(np.asarray(b.status)[occupied] == 1), "every system entered the second stage"
    return b


def _ase_trajectory(opt, atoms, n):
    pos, cells = [], []
    for _ in range(n):
        opt.step()
        pos.append(atoms.get_positions().copy())
        cells.append(atoms.get_cell()[:].copy())
    return pos, cells


def test_fire_entering_after_nve_is_a_fresh_ase_fire():
    """NVE for 6 steps (moving, with velocities), then FIRE: from the NVE end state, FIRE makes
    exactly ASE's FIRE steps: zero velocity on entry, no v·F test on its first step, fresh dt and
    alpha (a FIRE that kept the NVE velocities, or that took its state from the start of the run,
    would not)."""
    systems = clusters()
    fused = fd.NVE(LJ, dt=4.0, n_steps=6) + fd.FIRE(
        LJ, convergence_hook=fd.ConvergenceHook.from_fmax(1e-6)
    )
    batch = fd.Batch.from_atoms(systems, max_atoms=24, max_systems=3)
    b = _run_until_entered(fused, batch, 6)
    start = b.to_atoms()
    assert np.abs(start[0].positions - systems[0].positions).max() > 1e-3  # NVE moved them
    n = 25
    traj = []
    for _ in range(n):
        b = _STEP(fused, b)
        traj.append(np.asarray(b.positions))
    offset = 0
    for atoms in start:
        ref = atoms.copy()
        ref.calc = ase_lj()
        ase_pos, _ = _ase_trajectory(AseFIRE(ref, logfile=None), ref, n)
        sl = slice(offset, offset + len(atoms))
        offset += len(atoms)
        # same arithmetic up to the order of sums: rounding only
        err = max(np.abs(traj[k][sl] - ase_pos[k]).max() for k in range(n))
        assert err < 1e-8, err


def test_variable_cell_fire_entering_after_npt_takes_the_entry_cell_as_reference():
    """NPT for 5 steps changes the cells; FIRE with the Fréchet cell filter then relaxes from the
    NPT end state exactly as ASE's FIRE on a FrechetCellFilter built on that state (its
    reference cell is the cell at entry)."""
    systems = crystals()
    pressure = 0.002
    fire = fd.FIRE(
        LJ_PBC,
        cell_filter="frechet",
        scalar_pressure=pressure,
        convergence_hook=fd.ConvergenceHook.from_fmax(1e-6),
    )
    fused = fd.NPT(LJ_PBC, 4.0, 80.0, 0.01, 50.0, 200.0, n_steps=5) + fire
    batch = fd.Batch.from_atoms(systems, max_systems=3)
    b = _run_until_entered(fused, batch, 5)
    start = b.to_atoms()
    assert np.abs(start[0].cell[:] - systems[0].cell[:]).max() > 1e-6  # NPT moved the cell
    n = 20
    traj, cells = [], []
    for _ in range(n):
        b = _STEP(fused, b)
        traj.append(np.asarray(b.positions))
        cells.append(np.asarray(b.cell))
    offset = 0
    for s, atoms in enumerate(start):
        ref = atoms.copy()
        ref.calc = ase_lj()
        filt = AseFrechetCellFilter(ref, scalar_pressure=pressure)
        ase_pos, ase_cells = _ase_trajectory(AseFIRE(filt, logfile=None), ref, n)
        sl = slice(offset, offset + len(atoms))
        offset += len(atoms)
        # ASE recomputes log F with scipy's logm, we keep it: rounding only
        err = max(np.abs(traj[k][sl] - ase_pos[k]).max() for k in range(n))
        cerr = max(np.abs(cells[k][s] - ase_cells[k]).max() for k in range(n))
        assert err < 1e-8 and cerr < 1e-8, (s, err, cerr)
