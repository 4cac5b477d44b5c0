"""The EAM model (fused_dynamics/models/eam.py) against ASE's ``ase.calculators.eam.EAM``.

Every potential here is an analytic Cu/Ni-style EAM (exponential densities, Johnson-like pair
terms, ``-sqrt(ρ)`` embedding, all brought smoothly to zero at 4.5 Å) tabulated and written by
ASE's own writer into ``tmp_path``, then read back both by ASE (the reference) and by
``EAM.from_file``; nothing is downloaded.
"""

from __future__ import annotations

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, fcc100, fcc111
from ase.calculators.eam import EAM as AseEAM
from ase.data import atomic_numbers
from ase.units import Bohr, Hartree

import fused_dynamics as fd
from fused_dynamics.models.eam import EAM, spline_table
from fused_dynamics.models.neighbors import NeighborList

jax.config.update("jax_enable_x64", True)

RC = 4.5  # Å, cutoff of the analytic functions and of the files
NR, DR = 500, 0.01  # r table: 0 .. 4.99 Å
NRHO, DRHO = 500, 0.1  # ρ table: 0 .. 49.9

# Zhou, Johnson & Wadley (PRB 69, 144113 (2004))-like parameters: re, fe, rho_e, alpha, beta,
# A, B, embedding scale
PARAMS = {
    "Cu": dict(re=2.556, fe=1.554, rhoe=21.2, alpha=7.67, beta=4.09, A=0.327, B=0.468, E=2.2),
    "Ni": dict(re=2.489, fe=2.007, rhoe=27.6, alpha=8.38, beta=4.48, A=0.429, B=0.633, E=2.6),
}


def _cut(r):
    """Smooth cutoff ``x⁴ / (1 + x⁴)``, ``x = (r - RC) / 0.5`` below RC, 0 above."""
    x = (np.asarray(r) - RC) / 0.5
    return np.where(r < RC, x**4 / (1 + x**4), 0.0)


def _density(p):
    return lambda r: p["fe"] * np.exp(-p["beta"] * (r / p["re"] - 1)) * _cut(r)


def _pair(p, q):
    """Johnson-like pair term; cross pairs take the mean of the two elements' parameters."""
    m = {k: 0.5 * (p[k] + q[k]) for k in p}

    def phi(r):
        x = r / m["re"] - 1
        return (m["A"] * np.exp(-m["alpha"] * x) - m["B"] * np.exp(-m["beta"] * x)) * _cut(r)

    return phi


def _embedding(p):
    return lambda rho: -p["E"] * np.sqrt(np.maximum(rho, 0.0) / p["rhoe"])


def _scaled(f, c):
    return lambda r: c * f(r)


def write_alloy(path, form="alloy") -> str:
    """A Cu-Ni setfl (.alloy) file written by ASE's ``EAM.write_potential``; ``form="fs"``: a
    Finnis-Sinclair (.fs) file whose density of a neighbor depends on both species (the
    neighbor's function scaled by 0.8 for unlike pairs)."""
    els = ["Cu", "Ni"]
    ps = [PARAMS[e] for e in els]
    density = np.array([_density(p) for p in ps], object)
    if form == "fs":
        density = np.array(
            [[_scaled(density[i], 1.0 if i == j else 0.8) for j in range(2)] for i in range(2)],
            object,
        )
    calc = AseEAM(
        elements=els,
        embedded_energy=np.array([_embedding(p) for p in ps], object),
        electron_density=density,
        phi=np.array([[_pair(p, q) for q in ps] for p in ps], object),
        cutoff=RC,
        form=form,
        Z=[29, 28],
        mass=[63.546, 58.693],
        a=[3.615, 3.52],
        lattice=["fcc", "fcc"],
        nr=NR,
        dr=DR,
        nrho=NRHO,
        drho=DRHO,
    )
    calc.Nelements = 2
    path = str(path / f"CuNi.eam.{form}")
    calc.write_potential(path)
    return path


def write_funcfl(path) -> str:
    """A single-element Cu funcfl (.eam) file: the pair term is purely repulsive,
    ``φ = 27.2 · 0.529 · Z(r)² / r`` with an effective charge ``Z(r) = 2.5 exp(-1.2 r)``, as the
    format requires (``r φ >= 0``)."""
    p = PARAMS["Cu"]

    def z(r):
        return 2.5 * np.exp(-1.2 * r) * _cut(r)

    def phi(r):
        return Hartree * Bohr * z(r) ** 2 / np.where(r > 0, r, 1.0)

    calc = AseEAM(
        elements=["Cu"],
        embedded_energy=np.array([_embedding(p)], object),
        electron_density=np.array([_density(p)], object),
        phi=np.array([[phi]], object),
        cutoff=RC,
        form="eam",
        Z=[29],
        mass=[63.546],
        a=[3.615],
        lattice=["fcc"],
        nr=NR,
        dr=DR,
        nrho=NRHO,
        drho=DRHO,
    )
    calc.Nelements = 1
    path = str(path / "Cu.eam")
    calc.write_potential(path)
    return path


def _alloy(atoms, rng, x_ni=0.4):
    atoms.numbers[rng.random(len(atoms)) < x_ni] = atomic_numbers["Ni"]
    return atoms


def alloy_structures(rng) -> list[ase.Atoms]:
    """Four Cu/Ni structures of 27-36 atoms, rattled by 0.08 Å."""
    random_alloy = _alloy(bulk("Cu", "fcc", a=3.58, cubic=True) * (2, 2, 2), rng)  # 32
    slab = _alloy(fcc111("Cu", size=(3, 3, 4), a=3.6, vacuum=5.0), rng)  # 36, pbc z False
    vacancy = _alloy(bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2), rng)
    del vacancy[5]  # 31
    tri = _alloy(bulk("Cu", "fcc", a=3.6) * (3, 3, 3), rng)  # 27, primitive fcc: triclinic
    shear = np.array([[1.0, 0.08, -0.05], [0.0, 1.02, 0.06], [0.03, 0.0, 0.97]])
    tri.set_cell(tri.cell @ shear, scale_atoms=True)
    out = [random_alloy, slab, vacancy, tri]
    for a in out:
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
    return out


def copper_structures(rng) -> list[ase.Atoms]:
    """Pure Cu: a rattled bulk cell (32 atoms) and a (100) slab (36 atoms)."""
    out = [bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2), fcc100("Cu", (3, 3, 4), vacuum=5.0)]
    for a in out:
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eam")
    return {"alloy": write_alloy(d), "fs": write_alloy(d, "fs"), "funcfl": write_funcfl(d)}


def alloy_batch(atoms):
    """The mixed padded batch of the four alloy structures and one empty slot. Every test that
    can uses this one shape, so the compiled evaluation is shared (compilation dominates)."""
    return fd.Batch.from_atoms(atoms, dtype=jnp.float64, max_systems=len(atoms) + 1)


def ase_results(path, atoms):
    calc = AseEAM(potential=path)
    a = atoms.copy()
    a.calc = calc
    return a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)


def _rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| (a scale-relative error: force components near zero would
    make an entry-wise relative error meaningless)."""
    got, ref = np.asarray(got), np.asarray(ref)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# ------------------------------------------------------------------------- equality with ASE
def test_spline_table_equals_ase_spline_inside_and_beyond_the_table():
    """The per-interval cubics reproduce scipy's InterpolatedUnivariateSpline (ASE's spline),
    including its extrapolation by the end cubics, to 1e-13 of the function's scale (rounding
    of the re-expansion about the grid points)."""
    from scipy.interpolate import InterpolatedUnivariateSpline

    x = np.arange(60) * 0.1
    y = np.exp(-x) * np.cos(3 * x)
    table = spline_table(x, y)
    ref = InterpolatedUnivariateSpline(x, y, k=3)
    r = np.linspace(-0.5, 6.5, 20001)
    k = np.clip(np.floor(r / 0.1), 0, len(x) - 2).astype(int)
    u = r - x[k]
    c = table[k]
    got = c[:, 0] + u * (c[:, 1] + u * (c[:, 2] + u * c[:, 3]))
    assert _rel_err(got, ref(r)) < 1e-13


@pytest.mark.parametrize("kind", ["alloy", "fs", "funcfl"])
def test_energy_forces_stress_equal_ase(files, kind):
    """Energy, forces and stress of every system of one padded batch (different sizes and one
    empty slot) equal ASE's EAM calculator to 1e-8 relative (float64; the two differ only by
    the summation order and by spline evaluation as local cubics instead of de Boor's recursion,
    measured ~1e-14). Alloy (setfl) and fs: a random fcc alloy, a (111) slab (pbc False along
    z), a vacancy and a sheared triclinic cell; funcfl: pure Cu bulk and a (100) slab. For the
    alloy, a full neighbor list on the batch gives the dense graph's numbers to 1e-12 relative
    (the same terms summed in another order)."""
    rng = np.random.default_rng(1)
    atoms = copper_structures(rng) if kind == "funcfl" else alloy_structures(rng)
    path = files[kind]
    model = EAM.from_file(path)
    assert model.species == ((29,) if kind == "funcfl" else (29, 28))
    batch = alloy_batch(atoms)
    out = model(batch)
    idx = np.asarray(batch.system_idx)
    worst = 0.0
    for s, a in enumerate(atoms):
        e, f, st = ase_results(path, a)
        errs = (
            abs(float(out.energy[s]) - e) / abs(e),
            _rel_err(np.asarray(out.forces)[idx == s], f),
            _rel_err(out.stress[s], st),
        )
        assert max(errs) < 1e-8, (kind, s, errs)
        worst = max(worst, *errs)
    print(f"{kind}: worst relative difference to ASE {worst:.1e}")
    assert float(out.energy[len(atoms)]) == 0.0
    if kind == "alloy":
        listed = batch.replace(neighbors=NeighborList.allocate(batch, RC, 0.5, half=False))
        got = model(listed)
        for name in ("energy", "forces", "stress"):
            err = _rel_err(getattr(got, name), getattr(out, name))
            assert err < 1e-12, (name, err)


def test_from_tables_equals_from_file_and_parameters_are_differentiable(files):
    """``from_tables`` on ASE's arrays is ``from_file``. ``jax.grad`` of the total energy with
    respect to all coefficient arrays is finite and its projection on a random direction (each
    coefficient perturbed in proportion to its size) equals a central finite difference to 1e-6
    relative (step 1e-6: truncation ~1e-12, rounding ~1e-10 relative)."""
    calc = AseEAM(potential=files["alloy"])
    model = EAM.from_file(files["alloy"])
    again = EAM.from_tables(
        ("Cu", "Ni"),
        calc.embedded_data,
        calc.density_data,
        calc.rphi_data,
        drho=calc.drho,
        dr=calc.dr,
        cutoff=calc.cutoff,
    )
    for name in ("embedding", "density", "phi"):
        np.testing.assert_array_equal(getattr(again, name), getattr(model, name))
    batch = fd.Batch.from_atoms(alloy_structures(np.random.default_rng(2))[:1], dtype=jnp.float64)
    model = model.prepare(batch)

    @eqx.filter_jit
    def total(m):
        return jnp.sum(m.energy(batch))

    grads = eqx.filter_jit(eqx.filter_grad(total))(model)
    names = ("embedding", "density", "phi")
    rng = np.random.default_rng(0)
    direction = [
        rng.normal(size=getattr(model, n).shape) * np.abs(getattr(model, n)) for n in names
    ]
    projected = sum(
        float(jnp.sum(getattr(grads, n) * v)) for n, v in zip(names, direction, strict=True)
    )
    assert all(np.isfinite(np.asarray(getattr(grads, n))).all() for n in names)

    def moved(h):
        leaves = tuple(getattr(model, n) + h * v for n, v in zip(names, direction, strict=True))
        return eqx.tree_at(lambda m: (m.embedding, m.density, m.phi), model, leaves)

    h = 1e-6
    central = (float(total(moved(h))) - float(total(moved(-h)))) / (2 * h)
    np.testing.assert_allclose(projected, central, rtol=1e-6)


# ------------------------------------------------------------------------- errors
def test_unknown_element_is_an_error_naming_element_and_system(files):
    """An element without tables is a ValueError naming it and its system slot: eagerly, and
    from a fused run before anything is compiled; inside jit, an EquinoxRuntimeError."""
    model = EAM.from_file(files["alloy"])
    atoms = alloy_structures(np.random.default_rng(3))[:2]
    atoms[1].numbers[3] = atomic_numbers["Fe"]
    batch = fd.Batch.from_atoms(atoms, dtype=jnp.float64, max_systems=3)
    with pytest.raises(
        ValueError, match=r"Fe \(Z=26\) in system slot 1.*tables for \(Cu, Ni\) only"
    ):
        model(batch)
    with pytest.raises(ValueError, match=r"Fe \(Z=26\) in system slot 1"):
        fd.FIRE(model, n_steps=2).run(batch)
    with pytest.raises(RuntimeError, match=r"System slot 1 contains Fe \(Z=26\)"):
        jax.block_until_ready(
            eqx.filter_jit(lambda m, b: m(b).energy)(
                model.prepare(fd.Batch.from_atoms(atoms[:1], dtype=jnp.float64)), batch
            )
        )


# ------------------------------------------------------------------------- dynamics
@pytest.mark.slow
def test_fire_relaxes_and_nve_conserves_energy(files):
    """FIRE in a fused stage lowers the energy of every system of the mixed alloy batch and
    converges all four from fmax > 0.5 eV/Å to fmax < 0.01 eV/Å within 200 steps (measured
    0.008-0.0099 eV/Å when the criterion stops them). 200 steps of NVE (1 fs) from 300 K keep
    every system's total energy within 1e-4 eV/atom of the start (the tables are splines of
    smooth functions that vanish smoothly at the cutoff; measured 1.5e-6 to 1.0e-5 eV/atom)."""
    from ase.md.velocitydistribution import thermalize_momenta

    model = EAM.from_file(files["alloy"])
    rng = np.random.default_rng(1)
    atoms = alloy_structures(rng)
    batch = alloy_batch(atoms)
    start = model(batch)
    relax = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(0.01), n_steps=200)
    final = relax.run(batch)
    idx = np.asarray(batch.system_idx)
    for s in range(len(atoms)):
        assert float(final.energy[s]) < float(start.energy[s])
        f0 = np.linalg.norm(np.asarray(start.forces)[idx == s], axis=-1).max()
        f1 = np.linalg.norm(np.asarray(final.forces)[idx == s], axis=-1).max()
        assert f0 > 0.5 and f1 < 0.01, (s, f0, f1)
    converged = int(fd.ExitReason.CONVERGED)
    assert np.asarray(final.info["exit_reason"])[: len(atoms)].tolist() == [converged] * 4

    for a in atoms:
        thermalize_momenta(a, temperature_K=300.0, rng=rng)
    hot = alloy_batch(atoms)
    n_atoms = np.array([len(a) for a in atoms])

    def totals(b, energy):
        ke = 0.5 * np.asarray(b.masses) * np.sum(np.asarray(b.velocities) ** 2, -1)
        return np.asarray(energy)[: len(atoms)] + np.bincount(idx, ke)[: len(atoms)]

    e0 = totals(hot, model(hot).energy)
    out = fd.NVE(model, dt=1.0, n_steps=200).run(hot)
    drift = np.abs(totals(out, out.energy) - e0) / n_atoms
    print(f"NVE |E(200 fs) - E(0)| per atom: {drift}")
    assert np.all(drift < 1e-4)


def test_one_system_alone_and_in_a_mixed_batch_is_bitwise_the_same(files):
    """A system's energy, forces and stress do not depend on what shares its batch: bit for
    bit, alone in a batch of the mixed batch's capacities (the other slots empty). The
    capacities are static shapes: they choose the layout of the dense graph (one row per atom
    slot or per-system blocks, models/blocked.py) and the length of the reductions over
    partners, so with other capacities the results differ by rounding (~1 ulp). Neighbor-list
    graph: its list built with the mixed batch's list capacities (compiled once per capacity:
    keeps it fast)."""
    model = EAM.from_file(files["alloy"])
    atoms = alloy_structures(np.random.default_rng(1))
    mixed = alloy_batch(atoms)
    dense = model.prepare(mixed)  # the mixed batch's image range, used for both
    nl = NeighborList.allocate(mixed, RC, 0.5)
    padded = fd.Batch.from_atoms(
        atoms[2:3],
        mixed.max_atoms,
        mixed.max_systems,
        jnp.float64,
        max_atoms_per_system=mixed.max_atoms_per_system,
    )
    pairs = [
        (dense, mixed, padded),
        (model, mixed.replace(neighbors=nl), padded.replace(neighbors=nl.build(padded))),
    ]
    idx = np.asarray(mixed.system_idx)
    for m, big, one in pairs:
        a, b = m(big), m(one)
        n = len(atoms[2])
        np.testing.assert_array_equal(np.asarray(a.energy)[2], np.asarray(b.energy)[0])
        np.testing.assert_array_equal(np.asarray(a.forces)[idx == 2], np.asarray(b.forces)[:n])
        np.testing.assert_array_equal(np.asarray(a.stress)[2], np.asarray(b.stress)[0])
