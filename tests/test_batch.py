"""The padded Batch: packing from and to ase.Atoms, layout invariants, segment helpers, errors."""

import json
import os
import subprocess
import sys
import textwrap

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.lj import LennardJones as AseLJ
from ase.stress import full_3x3_to_voigt_6_stress

import fused_dynamics as fd
from fused_dynamics import segment


def systems_with_everything():
    """Systems of different sizes, cells, periodicity, species, masses and velocities."""
    rng = np.random.default_rng(0)
    crystal = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    crystal.rattle(0.05, seed=1)
    tric = ase.build.bulk("NaCl", "rocksalt", a=5.6)
    tric.set_cell(tric.cell[:] @ (np.eye(3) + rng.uniform(-0.1, 0.1, (3, 3))), scale_atoms=True)
    slab = ase.build.fcc111("Al", size=(2, 2, 2), vacuum=4.0)
    slab.pbc = (True, True, False)
    molecule = ase.build.molecule("CH3CH2OH")
    molecule.center(vacuum=3.0)  # a regular cell, but not periodic
    systems = [crystal, tric, slab, molecule]
    for atoms in systems:
        atoms.set_velocities(rng.normal(scale=0.05, size=(len(atoms), 3)))
        masses = atoms.get_masses()
        masses[0] *= 1.37  # an isotope: masses are not just a function of the numbers
        atoms.set_masses(masses)
    return systems


# ---------------------------------------------------------------------------- round trip
def test_round_trip_is_bitwise_exact():
    systems = systems_with_everything()
    n = sum(len(a) for a in systems)
    batch = fd.Batch.from_atoms(
        systems, max_atoms=n + 5, max_systems=6, max_atoms_per_system=20, system_ids=[7, 3, 9, 1]
    )
    assert batch.dtype == jnp.float64
    back = batch.to_atoms()
    assert len(back) == len(systems)
    for slot, (orig, new) in enumerate(zip(systems, back, strict=True)):
        # float64 in, float64 stored, float64 out: nothing may change, not even the last bit.
        np.testing.assert_array_equal(new.get_positions(), orig.get_positions())
        np.testing.assert_array_equal(new.get_atomic_numbers(), orig.get_atomic_numbers())
        np.testing.assert_array_equal(new.get_masses(), orig.get_masses())
        np.testing.assert_array_equal(new.get_cell()[:], orig.get_cell()[:])
        np.testing.assert_array_equal(new.get_pbc(), orig.get_pbc())
        np.testing.assert_array_equal(new.get_velocities(), orig.get_velocities())
        # ASE stores momenta and the batch velocities v = fl(p / m): p comes back as fl(v * m),
        # which can differ from the original p in the last bit (masses here were changed after
        # the velocities were set, so p is not itself a rounded v * m).
        np.testing.assert_array_max_ulp(new.get_momenta(), orig.get_momenta(), maxulp=1)
        assert new.info["system_id"] == [7, 3, 9, 1][slot]
        assert new.info["status"] == 0


def test_from_atoms_compiles_no_program():
    """Packing is host work: the integer and bool arrays go to the device by ``device_put``
    (``jnp.asarray`` of them compiled a copy program per shape in jax 0.10, six programs and
    0.07 s of a first ``from_atoms``). Capacities no other test uses, so no program of an
    earlier test could hide one; a lowering is counted whether or not a cache holds it."""
    lowerings = []

    def count(event, duration, **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowerings.append(duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        batch = fd.Batch.from_atoms(systems_with_everything(), max_atoms=1013, max_systems=7)
        jax.block_until_ready(batch)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert lowerings == []
    assert batch.system_idx.dtype == jnp.int32 and batch.atom_mask.dtype == jnp.bool_


def test_round_trip_of_a_cluster_without_cell():
    # A non-periodic system given without a cell is computed with the identity cell (so that
    # volumes and strain derivatives stay finite) and comes back with its zero cell; everything
    # else is exact.
    molecule = ase.build.molecule("H2O")
    molecule.set_velocities(np.arange(9.0).reshape(3, 3) / 100)
    (back,) = fd.Batch.from_atoms([molecule], max_atoms=5).to_atoms()
    np.testing.assert_array_equal(back.positions, molecule.positions)
    np.testing.assert_array_equal(back.get_velocities(), molecule.get_velocities())
    np.testing.assert_array_equal(back.cell[:], np.zeros((3, 3)))
    assert not back.pbc.any()


def test_to_atoms_carries_model_results_in_ase_conventions():
    systems = [ase.build.bulk("Ar", "fcc", a=1.55, cubic=True).repeat(2), ase.build.molecule("H2O")]
    systems[0].rattle(0.03, seed=2)
    systems[0].cell[0, 1] = 0.2  # triclinic: off-diagonal stress components are non-zero
    batch = fd.Batch.from_atoms(systems, max_atoms=40, max_systems=3)
    model = fd.models.LennardJones(1.0, 0.7, 2.5)
    out = model(batch)
    back = batch.replace(energy=out.energy, forces=out.forces, stress=out.stress).to_atoms()
    ref = systems[0].copy()
    ref.calc = AseLJ(sigma=1.0, epsilon=0.7, rc=2.5)
    # Same physics as tests/test_models.py at 1e-9 relative; here the point is the packing:
    # Voigt order (xx, yy, zz, yz, xz, xy), per-system forces, energy as a float.
    np.testing.assert_allclose(back[0].get_stress(), ref.get_stress(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(back[0].get_forces(), ref.get_forces(), rtol=1e-9, atol=1e-12)
    assert back[0].get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-9)
    np.testing.assert_array_equal(
        back[0].get_stress(), full_3x3_to_voigt_6_stress(np.asarray(out.stress[0]))
    )
    np.testing.assert_array_equal(back[1].get_forces(), np.asarray(out.forces)[32:35])


# ---------------------------------------------------------------------------- layout
def test_layout_invariants_and_defaults():
    systems = systems_with_everything()
    sizes = [len(a) for a in systems]
    tight = fd.Batch.from_atoms(systems)
    assert (tight.max_atoms, tight.max_systems, tight.max_atoms_per_system) == (
        sum(sizes),
        len(sizes),
        max(sizes),
    )
    batch = fd.Batch.from_atoms(systems, max_atoms=sum(sizes) + 4, max_systems=6)
    s = batch.max_systems
    expected_idx = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)] + [np.full(4, s)])
    np.testing.assert_array_equal(batch.system_idx, expected_idx)
    np.testing.assert_array_equal(batch.atom_mask, expected_idx < s)
    np.testing.assert_array_equal(batch.system_mask, [True] * 4 + [False] * 2)
    np.testing.assert_array_equal(batch.n_atoms, sizes + [0, 0])
    np.testing.assert_array_equal(batch.system_id, [0, 1, 2, 3, -1, -1])
    # Padding: unit masses (finite divisions), zero positions/velocities, identity cells.
    np.testing.assert_array_equal(batch.masses[-4:], 1.0)
    np.testing.assert_array_equal(batch.velocities[-4:], 0.0)
    np.testing.assert_array_equal(batch.cell[4:], np.tile(np.eye(3), (2, 1, 1)))
    assert not np.asarray(batch.pbc[4:]).any()
    assert batch.system_idx.dtype == jnp.int32 and batch.atomic_numbers.dtype == jnp.int32
    np.testing.assert_allclose(
        batch.volume[:4], [a.get_volume() for a in systems], rtol=1e-14
    )  # determinant rounding only


def test_explicit_float32_with_x64_on():
    batch = fd.Batch.from_atoms([ase.build.molecule("H2O")], dtype=jnp.float32)
    for name in ("positions", "velocities", "masses", "forces", "cell", "energy", "stress"):
        assert getattr(batch, name).dtype == jnp.float32, name


def test_segment_helpers_with_padding():
    systems = [ase.Atoms("H3"), ase.Atoms("H"), ase.Atoms("H2")]
    batch = fd.Batch.from_atoms(systems, max_atoms=9, max_systems=5, max_atoms_per_system=4)
    x = jnp.arange(1.0, 10.0)  # padding atoms hold 7, 8, 9: they must never show up
    np.testing.assert_array_equal(batch.sum_atoms(x), [6.0, 4.0, 11.0, 0.0, 0.0])
    np.testing.assert_array_equal(batch.max_atoms_of(x)[:3], [3.0, 4.0, 6.0])
    assert np.all(np.isneginf(batch.max_atoms_of(x)[3:]))
    np.testing.assert_array_equal(segment.segment_min(x, batch.system_idx, 5)[:3], [1.0, 4.0, 5.0])
    np.testing.assert_array_equal(
        segment.segment_mean(x, batch.system_idx, 5), [2.0, 4.0, 5.5, 0.0, 0.0]
    )
    np.testing.assert_array_equal(
        batch.to_atoms_axis(jnp.arange(10.0, 15.0)), [10, 10, 10, 11, 12, 12, 0, 0, 0]
    )
    np.testing.assert_array_equal(segment.first_atom(batch.system_idx, 5), [0, 3, 4, 9, 9])
    local = segment.local_index(batch.system_idx, 5)
    np.testing.assert_array_equal(local[:6], [0, 1, 2, 0, 0, 1])
    index, valid = batch.system_view_index()
    np.testing.assert_array_equal(
        np.where(valid, index, -1),
        [[0, 1, 2, -1], [3, -1, -1, -1], [4, 5, -1, -1], [-1] * 4, [-1] * 4],
    )
    assert np.all((np.asarray(index) >= 0) & (np.asarray(index) < 9))  # safe to gather


def test_batch_is_a_pytree_that_jits():
    batch = fd.Batch.from_atoms([ase.build.molecule("H2O")], max_atoms=4, max_systems=2)
    total = jax.jit(lambda b: b.sum_atoms(b.masses))(batch)
    np.testing.assert_allclose(total[0], ase.build.molecule("H2O").get_masses().sum(), rtol=1e-15)
    assert total[1] == 0.0


# ---------------------------------------------------------------------------- errors
def two_systems():
    a = ase.build.molecule("H2O")
    b = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    return [a, b]


def test_error_more_atoms_than_max_atoms():
    with pytest.raises(ValueError, match=r"7 atoms in all do not fit max_atoms=5 \(system 1 "):
        fd.Batch.from_atoms(two_systems(), max_atoms=5)


def test_error_more_systems_than_max_systems():
    with pytest.raises(ValueError, match="2 systems do not fit max_systems=1"):
        fd.Batch.from_atoms(two_systems(), max_systems=1)


def test_error_system_larger_than_max_atoms_per_system():
    with pytest.raises(ValueError, match="system 1 has 4 atoms, more than max_atoms_per_system=3"):
        fd.Batch.from_atoms(two_systems(), max_atoms_per_system=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_non_finite_positions(bad):
    systems = two_systems()
    positions = systems[1].get_positions()
    positions[2, 1] = bad
    systems[1].set_positions(positions)
    with pytest.raises(ValueError, match=r"system 1: non-finite position \(atom 2\)"):
        fd.Batch.from_atoms(systems)


def test_error_non_finite_velocities():
    systems = two_systems()
    v = np.zeros((4, 3))
    v[3, 0] = np.nan
    systems[1].set_velocities(v)
    with pytest.raises(ValueError, match=r"system 1: non-finite velocity \(atom 3\)"):
        fd.Batch.from_atoms(systems)


@pytest.mark.parametrize("pbc", [True, (False, True, False)])
def test_error_singular_cell_with_pbc(pbc):
    systems = two_systems()
    systems[1].set_cell([[3.6, 0, 0], [0, 3.6, 0], [3.6, 3.6, 0]])  # coplanar vectors
    systems[1].pbc = pbc
    with pytest.raises(ValueError, match="system 1: periodic boundaries .* singular cell"):
        fd.Batch.from_atoms(systems)


@pytest.mark.parametrize("mass", [0.0, -1.0, np.nan])
def test_error_non_positive_masses(mass):
    systems = two_systems()
    masses = systems[0].get_masses()
    masses[1] = mass
    systems[0].set_masses(masses)
    with pytest.raises(ValueError, match=r"system 0: mass of atom 1 is .*masses must be > 0"):
        fd.Batch.from_atoms(systems)


def test_error_empty_atoms_list():
    with pytest.raises(ValueError, match="atoms_list is empty"):
        fd.Batch.from_atoms([])


def test_error_system_without_atoms():
    with pytest.raises(ValueError, match="system 1: has no atoms"):
        fd.Batch.from_atoms([ase.build.molecule("H2O"), ase.Atoms()])


def test_error_non_atoms_element():
    systems = two_systems()
    systems.insert(1, systems[0].get_positions())
    with pytest.raises(TypeError, match="system 1: expected ase.Atoms, got ndarray"):
        fd.Batch.from_atoms(systems)


def test_error_wrong_number_of_system_ids():
    with pytest.raises(ValueError, match="system_ids must give one id per system"):
        fd.Batch.from_atoms(two_systems(), system_ids=[4])


def test_error_float64_without_x64():
    with jax.enable_x64(False):
        with pytest.raises(TypeError, match="float64 .* jax_enable_x64 is off"):
            fd.Batch.from_atoms(two_systems(), dtype=jnp.float64)


@pytest.mark.parametrize("dtype", [jnp.int32, bool, "complex64"])
def test_error_non_float_dtype(dtype):
    with pytest.raises(TypeError, match="must be a float dtype"):
        fd.Batch.from_atoms(two_systems(), dtype=dtype)


# ---------------------------------------------------------------------------- float32 default
FLOAT32_SCRIPT = textwrap.dedent(
    """
    import json
    import ase.build
    import numpy as np
    import jax
    import fused_dynamics as fd

    atoms = ase.build.bulk("Ar", "fcc", a=1.55, cubic=True).repeat(2)
    atoms.rattle(0.03, seed=3)
    batch = fd.Batch.from_atoms([atoms])
    out = fd.models.LennardJones(1.0, 0.7, 2.5)(batch)
    fields = ("positions", "velocities", "masses", "forces", "cell", "energy", "stress")
    print(json.dumps({
        "x64": bool(jax.config.jax_enable_x64),
        "default": str(np.dtype(fd.default_float())),
        "dtypes": {k: str(getattr(batch, k).dtype) for k in fields},
        "out_dtypes": [str(out.energy.dtype), str(out.forces.dtype), str(out.stress.dtype)],
        "energy": float(out.energy[0]),
        "forces": np.asarray(out.forces, dtype=float).tolist(),
    }))
    """
)


def test_float32_by_default_without_x64():
    env = {**os.environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", FLOAT32_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["x64"] is False
    assert result["default"] == "float32"
    assert set(result["dtypes"].values()) == {"float32"}, result["dtypes"]
    assert result["out_dtypes"] == ["float32"] * 3
    atoms = ase.build.bulk("Ar", "fcc", a=1.55, cubic=True).repeat(2)
    atoms.rattle(0.03, seed=3)
    atoms.calc = AseLJ(sigma=1.0, epsilon=0.7, rc=2.5)
    # float32 rounds at 6e-8 relative. The energy sums ~80 pair terms per atom over 32 atoms
    # (observed error ~2e-7 relative); each force sums pair forces of ~1 that cancel to ~0.1 in
    # this near-equilibrium crystal (observed ~5e-6 of the largest force). Bounds of 1e-5 and
    # 1e-4 leave a 20-50x margin and still catch any physics error (>= 1e-3 here).
    e_ref = atoms.get_potential_energy()
    assert abs(result["energy"] - e_ref) <= 1e-5 * abs(e_ref)
    f_ref = atoms.get_forces()
    assert np.max(np.abs(np.asarray(result["forces"]) - f_ref)) <= 1e-4 * np.abs(f_ref).max()


# ------------------------------------------------------------- cells ASE accepts without vacuum
def test_zero_length_non_periodic_cell_vectors_are_accepted_and_round_trip():
    """A slab without vacuum (c = 0, pbc F along c) and a cluster without a cell: ASE accepts
    both; the batch fills the missing rows for its own arithmetic and gives zeros back."""
    from ase.build import fcc111
    from ase.calculators.lj import LennardJones as AseLJ
    from ase.cluster import Icosahedron

    slab = fcc111("Ar", size=(2, 2, 3), a=5.3)
    slab.cell[2] = 0.0
    slab.pbc = (True, True, False)
    wire = ase.Atoms("Ar4", positions=[[0, 0, 0], [0, 3.8, 0], [3.8, 0, 0], [3.8, 3.8, 0]])
    wire.cell = [[0, 0, 0], [0, 0, 0], [0, 0, 3.9]]
    wire.pbc = (False, False, True)
    cluster = Icosahedron("Ar", 2)  # cell all zero
    systems = [slab, wire, cluster]
    batch = fd.Batch.from_atoms(systems)
    assert np.all(np.abs(np.linalg.det(np.asarray(batch.cell))) > 0)
    back = batch.to_atoms()
    for a, b in zip(systems, back, strict=True):
        np.testing.assert_array_equal(b.cell.array, a.cell.array)
        np.testing.assert_array_equal(b.pbc, a.pbc)
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5, switch_onset=6.5)
    energy = np.asarray(lj(batch).energy)
    for k, a in enumerate(systems):
        ref = a.copy()
        ref.calc = AseLJ(sigma=3.405, epsilon=0.0104, rc=7.5, ro=6.5, smooth=True)
        # same pair sum, different summation order: 1e-12 relative
        np.testing.assert_allclose(energy[k], ref.get_potential_energy(), rtol=1e-12)
    # no stress for a cell that is not full rank (ASE has none either)
    out = fd.FIRE(lj, n_steps=2).run(batch).to_atoms()
    assert all("stress" not in a.calc.results for a in out)
