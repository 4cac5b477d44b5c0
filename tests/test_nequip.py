"""NequIP (fused_dynamics/models/nequip.py): E(3) symmetry, derivatives, graph sources, slot
independence, precision, dynamics, species errors and restorable hyper-parameters.

A small random-weight model (2 layers, hidden ``4x0e+2x1o+2x2e``, spherical harmonics to l = 2)
keeps the file fast; the second layer takes l = 1, 2 inputs, so every tensor-product path kind is
exercised. Float64 throughout (conftest enables x64) unless stated.
"""

from __future__ import annotations

import json

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

import fused_dynamics as fd
from fused_dynamics.models.neighbors import NeighborList
from fused_dynamics.models.nequip import NequIP

jax.config.update("jax_enable_x64", True)

CUTOFF = 3.5
HYPER = dict(
    cutoff=CUTOFF,
    n_layers=2,
    features="4x0e+2x1o+2x2e",
    l_max=2,
    n_radial=6,
    radial_width=16,
    avg_num_neighbors=8.0,
)
MODEL = NequIP(("Cu", "Ni"), **HYPER, key=jax.random.key(0))
# dynamics: one layer (a fused stage compiles the model into its step; this halves that cost)
DYN_MODEL = NequIP(("Cu", "Ni"), **dict(HYPER, n_layers=1), key=jax.random.key(1))


def _triclinic() -> ase.Atoms:
    rng = np.random.default_rng(3)
    cell = np.array([[5.0, 0.0, 0.0], [1.3, 5.2, 0.0], [0.7, -0.9, 5.6]])
    return ase.Atoms("CuNi" * 4, scaled_positions=rng.random((8, 3)), cell=cell, pbc=True)


def _cluster() -> ase.Atoms:
    rng = np.random.default_rng(4)
    return ase.Atoms("Cu3Ni2", positions=rng.random((5, 3)) * 3.0)


def _batch(atoms, **kwargs) -> fd.Batch:
    return fd.Batch.from_atoms(atoms, dtype=kwargs.pop("dtype", jnp.float64), **kwargs)


@pytest.fixture(scope="module")
def reference():
    """Energy, forces and stress of [triclinic, cluster] (dense graph, float64)."""
    batch = _batch([_triclinic(), _cluster()])
    return batch, MODEL(batch)


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _moved(atoms, rot=None, shift=None, perm=None, image=None) -> ase.Atoms:
    a = atoms.copy()
    if perm is not None:
        a = a[perm]
    pos, cell = a.positions.copy(), np.asarray(a.cell).copy()
    if image is not None:  # move one atom by a lattice vector
        atom, n = image
        pos[atom] += np.asarray(n) @ cell
    if rot is not None:
        pos, cell = pos @ rot.T, cell @ rot.T
    if shift is not None:
        pos = pos + shift
    a.set_cell(cell, scale_atoms=False)
    a.positions = pos
    return a


@pytest.fixture(scope="module")
def variants():
    """Moved copies of the reference systems in one padded batch with an empty last slot (one
    compilation): ``(atoms, reference slot, rotation, permutation)`` per slot, and the output.
    Slot 0 and slot 4 hold the unmoved cluster and triclinic system, at other atom offsets,
    slots and neighbors than in the reference batch."""
    rot, inv = _rotation(1), -_rotation(2)
    shift = np.array([0.37, -1.2, 2.9])
    tri, clu = _triclinic(), _cluster()
    p_tri, p_clu = np.random.default_rng(5).permutation(8), np.random.default_rng(6).permutation(5)
    cases = [
        (clu, 1, np.eye(3), None),
        (_moved(clu, rot=rot, shift=shift), 1, rot, None),
        (_moved(clu, rot=inv), 1, inv, None),
        (_moved(clu, perm=p_clu), 1, np.eye(3), p_clu),
        (tri, 0, np.eye(3), None),
        (_moved(tri, rot=rot), 0, rot, None),
        (_moved(tri, rot=inv), 0, inv, None),
        (_moved(tri, shift=shift), 0, np.eye(3), None),
        (_moved(tri, perm=p_tri), 0, np.eye(3), p_tri),
        (_moved(tri, image=(3, [1, -1, 2])), 0, np.eye(3), None),
    ]
    batch = _batch([c[0] for c in cases], max_systems=len(cases) + 1)
    return cases, batch, MODEL(batch)


def test_energy_invariant_forces_and_stress_equivariant(reference, variants):
    """E(3) symmetry to 1e-10 (eV, eV/Å, eV/Å³ absolute; float64 rounding of sums over ~10²
    edges of O(1) terms is ~1e-14): proper and improper rotations (cell rotated too),
    translations, atom permutations and moving an atom by a lattice vector."""
    ref_batch, ref = reference
    cases, batch, out = variants
    idx, ref_idx = np.asarray(batch.system_idx), np.asarray(ref_batch.system_idx)
    worst = 0.0
    for s, (_, base, r, perm) in enumerate(cases):
        f_ref = np.asarray(ref.forces)[ref_idx == base]
        if perm is not None:
            f_ref = f_ref[perm]
        errs = [
            abs(float(out.energy[s]) - float(ref.energy[base])),
            np.abs(np.asarray(out.forces)[idx == s] - f_ref @ r.T).max(),
        ]
        if base == 0:
            errs.append(
                np.abs(np.asarray(out.stress[s]) - r @ np.asarray(ref.stress[0]) @ r.T).max()
            )
        worst = max(worst, *errs)
        assert max(errs) < 1e-10, (s, errs)
    assert np.abs(np.asarray(ref.forces)).max() > 1e-2  # the check is not vacuous
    print(f"worst symmetry error {worst:.2e}")


def test_forces_and_stress_equal_finite_differences(reference):
    """Forces = -dE/dr and stress = (1/V) dE/dε by central differences, step 1e-4 Å (positions)
    and 1e-5 (strain). The truncation error h²/6 |E'''| is ~1e-8 eV/Å and ~1e-9 eV/Å³ here and
    rounding ~eps |E| / h ~1e-12, so 1e-6 eV/Å and 1e-7 eV/Å³ bound the difference with margin."""
    batch, ref = reference
    model = MODEL.prepare(batch)
    pos0, cell0 = np.asarray(batch.positions), np.asarray(batch.cell)
    energy = jax.jit(lambda p, c: model.energy(batch.replace(positions=p, cell=c)))
    h = 1e-4
    fd_forces = np.zeros_like(pos0)
    for i in range(len(pos0)):
        for k in range(3):
            d = np.zeros_like(pos0)
            d[i, k] = h
            ep, em = energy(pos0 + d, cell0), energy(pos0 - d, cell0)
            fd_forces[i, k] = -float(jnp.sum(ep - em)) / (2 * h)
    err_f = np.abs(fd_forces - np.asarray(ref.forces)).max()
    assert err_f < 1e-6, err_f
    eps, sys_idx = 1e-5, np.asarray(batch.system_idx)
    fd_stress = np.zeros((3, 3))
    volume = abs(np.linalg.det(cell0[0]))
    for i in range(3):
        for k in range(3):
            e = np.zeros((3, 3))
            e[i, k] += 0.5 * eps
            e[k, i] += 0.5 * eps
            vals = []
            for sign in (1, -1):
                deform = np.eye(3) + sign * e
                p = np.where((sys_idx == 0)[:, None], pos0 @ deform, pos0)
                c = cell0.copy()
                c[0] = cell0[0] @ deform
                vals.append(float(energy(p, c)[0]))
            fd_stress[i, k] = (vals[0] - vals[1]) / (2 * eps) / volume
    err_s = np.abs(fd_stress - np.asarray(ref.stress[0])).max()
    assert err_s < 1e-7, err_s
    print(f"finite differences: forces {err_f:.2e} eV/Å, stress {err_s:.2e} eV/Å³")


def test_dense_graph_equals_neighbor_list_graph(reference):
    """The dense and the (full) neighbor-list graph hold the same edges in another order:
    energy, forces and stress agree to 1e-12 (absolute; float64 summation order)."""
    batch, ref = reference
    nl_batch = batch.replace(neighbors=NeighborList.allocate(batch, CUTOFF, 0.5, half=False))
    out = MODEL(nl_batch)
    for name in ("energy", "forces", "stress"):
        a, b = np.asarray(getattr(out, name)), np.asarray(getattr(ref, name))
        if name == "stress":  # the cluster has no stress
            a, b = a[:1], b[:1]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=name)
        print(f"dense vs list {name}: {np.abs(a - b).max():.1e}")


def test_slot_independence_bitwise(reference, variants):
    """Each reference system ([tri, cluster], no empty slot) gives bit-identical energy, forces
    and stress in another slot of a mixed batch with an empty slot (``variants``: other
    capacities, atom offsets and neighbors); the empty slot reads 0."""
    ref_batch, ref = reference
    _, batch, out = variants
    idx, ref_idx = np.asarray(batch.system_idx), np.asarray(ref_batch.system_idx)
    for slot, base in [(4, 0), (0, 1)]:
        assert float(out.energy[slot]) == float(ref.energy[base])
        np.testing.assert_array_equal(
            np.asarray(out.forces)[idx == slot], np.asarray(ref.forces)[ref_idx == base]
        )
    np.testing.assert_array_equal(np.asarray(out.stress[4]), np.asarray(ref.stress[0]))
    assert float(out.energy[-1]) == 0.0 and not np.asarray(out.stress[-1]).any()


def test_float32_agrees_with_float64(reference):
    """A float32 batch is evaluated in float32 (parameters cast at the call) and agrees with
    float64 to 1e-5 relative in energy and 1e-4 of the largest force/stress component (float32
    eps ~1.2e-7, accumulated over two layers and ~10² edges per atom)."""
    batch, ref = reference
    out = MODEL(_batch([_triclinic(), _cluster()], dtype=jnp.float32))
    assert out.energy.dtype == jnp.float32 and out.forces.dtype == jnp.float32
    assert ref.forces.dtype == jnp.float64
    e32, e64 = np.asarray(out.energy, np.float64), np.asarray(ref.energy)
    np.testing.assert_allclose(e32, e64, rtol=1e-5, atol=1e-5)
    f32, f64 = np.asarray(out.forces, np.float64), np.asarray(ref.forces)
    assert np.abs(f32 - f64).max() < 1e-4 * np.abs(f64).max()
    s32, s64 = np.asarray(out.stress[0], np.float64), np.asarray(ref.stress[0])
    assert np.abs(s32 - s64).max() < 1e-4 * np.abs(s64).max()
    print(
        f"float32: energy rel {np.abs(e32 / e64 - 1).max():.1e}, forces "
        f"{np.abs(f32 - f64).max() / np.abs(f64).max():.1e}, stress "
        f"{np.abs(s32 - s64).max() / np.abs(s64).max():.1e} (of the largest component)"
    )


def _copper() -> ase.Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)  # 32 atoms, L = 7.22 Å > 2 cutoff
    rng = np.random.default_rng(8)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    sigma = np.sqrt(units.kB * 300.0 / atoms.get_masses())[:, None]  # Maxwell-Boltzmann, 300 K
    atoms.set_velocities(rng.normal(size=atoms.positions.shape) * sigma)
    return atoms


@pytest.mark.slow
def test_nve_conserves_energy_and_fire_relaxes():
    """Velocity Verlet (dt = 1 fs, 100 steps, 300 K) in a fused run on perturbed fcc Cu (32
    atoms, one-layer model): the total energy changes by less than 2e-5 eV/atom (measured
    ~5e-7: Verlet's O(dt²) energy error with forces ~0.4 eV/Å and Cu's ~0.2 fs⁻¹ vibrations).
    FIRE then lowers the energy."""
    batch = _batch([_copper()])
    start = DYN_MODEL(batch, stress=False)
    e0 = float(start.energy[0] + fd.kinetic_energy(batch)[0])
    final = fd.NVE(DYN_MODEL, dt=1.0, n_steps=100).run(batch)
    e1 = float(final.energy[0] + fd.kinetic_energy(final)[0])
    drift = abs(e1 - e0) / 32
    assert drift < 2e-5, drift
    fire = fd.FIRE(DYN_MODEL, convergence_hook=fd.ConvergenceHook.from_fmax(1e-3), n_steps=50)
    relaxed = fire.run(batch.replace(velocities=jnp.zeros_like(batch.velocities)))
    assert np.isfinite(np.asarray(relaxed.energy)).all()
    assert float(relaxed.energy[0]) < float(start.energy[0]) - 1e-3
    print(
        f"NVE drift {drift:.2e} eV/atom; FIRE {float(start.energy[0]):.4f} -> "
        f"{float(relaxed.energy[0]):.4f} eV"
    )


def test_unknown_element_names_element_and_system():
    """An element outside ``species`` is refused (``check_batch``, which a run calls before
    compiling), naming it and its slot."""
    atoms = [_cluster(), ase.Atoms("CuAr", positions=[[0, 0, 0], [2.0, 0, 0]])]
    with pytest.raises(ValueError, match=r"Ar \(Z=18\) in system slot 1"):
        MODEL.check_batch(_batch(atoms))
    with pytest.raises(ValueError, match=r"Ar \(Z=18\) in system slot 1"):  # a run checks first
        fd.NVE(MODEL, dt=1.0, n_steps=2).run(_batch(atoms))


def test_hyperparameters_round_trip(tmp_path, reference):
    """JSON hyper-parameters + serialised leaves restore a model with the same pytree structure
    and bit-identical energies (the same compiled program, the same parameter values)."""
    batch, ref = reference
    model = MODEL.with_reference_energies(
        [_triclinic(), _cluster()],
        energies=[-30.0, -18.0],
        forces=[np.ones((8, 3)), np.ones((5, 3))],
    )
    path = tmp_path / "nequip.eqx"
    eqx.tree_serialise_leaves(path, model)
    hyper = json.loads(json.dumps(model.hyperparameters()))
    skeleton = NequIP(**hyper, key=jax.random.key(123))
    assert jax.tree_util.tree_structure(skeleton) == jax.tree_util.tree_structure(model)
    restored = eqx.tree_deserialise_leaves(path, skeleton)
    np.testing.assert_array_equal(
        np.asarray(restored(batch).energy), np.asarray(model(batch).energy)
    )


def test_with_reference_energies_fits_e0s_and_force_rms():
    """Energies exactly linear in the composition give back the per-species E0s (1e-10 eV,
    least squares in float64); the scale is the RMS of all force components."""
    e0 = {29: -3.7, 28: -5.1}
    rng = np.random.default_rng(9)
    data, forces = [], []
    for n_cu, n_ni in [(3, 1), (2, 2), (1, 4), (5, 0)]:
        atoms = ase.Atoms(
            f"Cu{n_cu}Ni{n_ni}" if n_ni else f"Cu{n_cu}", positions=rng.random((n_cu + n_ni, 3))
        )
        f = rng.normal(size=(len(atoms), 3))
        atoms.calc = SinglePointCalculator(atoms, energy=n_cu * e0[29] + n_ni * e0[28], forces=f)
        data.append(atoms)
        forces.append(f)
    model = MODEL.with_reference_energies(data)
    np.testing.assert_allclose(np.asarray(model.energy_shift), [e0[29], e0[28]], atol=1e-10)
    rms = np.sqrt(np.mean(np.concatenate(forces) ** 2))
    np.testing.assert_allclose(np.asarray(model.energy_scale), [rms, rms], rtol=1e-12)
    with pytest.raises(ValueError, match="Ar"):
        MODEL.with_reference_energies([ase.Atoms("Ar")], energies=[0.0], forces=[np.ones((1, 3))])
