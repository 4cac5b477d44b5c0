"""Pair-potential models on padded batches, checked against ASE's own calculators.

Units are reduced Lennard-Jones-like numbers (σ ≈ 1 Å, cutoff 2.5 Å, fcc lattice constant 1.55 Å)
so that every structure is small while still having many neighbours, periodic images beyond the
first shell, triclinic cells and mixed periodicity. The whole suite runs in float64 (conftest).
"""

import dataclasses
import functools

import ase
import ase.build
import ase.cluster
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.lj import LennardJones as AseLJ
from ase.calculators.morse import MorsePotential as AseMorse
from ase.stress import full_3x3_to_voigt_6_stress
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_dynamics as fd

A_FCC = 1.55  # Å, near the LJ(σ=1) fcc minimum, so the switch region is populated
CUTOFF = 2.5
ONSET = 2.0

# Relative tolerance against ASE: both codes evaluate the same float64 sums in different orders
# (and we go through fractional coordinates and back), so agreement is at the level of rounding,
# ~1e-14; 1e-9 (the bound) leaves a wide margin yet catches any missed or double-counted
# pair, wrong image or wrong switch (each changes results at the 1e-4 level or more).
RTOL_ASE = 1e-9
# Relative tolerance between a system evaluated inside a batch and alone: the same pairs are summed
# with extra exact zeros from padding and larger image ranges, so only summation order can differ.
RTOL_SAME = 1e-12


# ---------------------------------------------------------------------------- structures
def cluster_nocell():
    """A rattled 13-atom icosahedron, no cell at all (ASE's default zero cell), no pbc."""
    atoms = ase.cluster.Icosahedron("Ar", noshells=2, latticeconstant=A_FCC)
    atoms.rattle(0.05, seed=1)
    return atoms


def cluster_cell():
    """A rattled 19-atom fcc-like cluster in a regular but non-periodic box (stress is defined)."""
    atoms = ase.cluster.Octahedron("Ar", length=3, latticeconstant=A_FCC)
    atoms.center(vacuum=1.0)
    atoms.rattle(0.05, seed=2)
    return atoms


def fcc():
    """32-atom rattled fcc crystal, cubic cell of 3.1 Å (one image shell suffices)."""
    atoms = ase.build.bulk("Ar", "fcc", a=A_FCC, cubic=True).repeat(2)
    atoms.rattle(0.03, seed=3)
    return atoms


def triclinic():
    """fcc under a random strain (a general triclinic cell), rattled."""
    rng = np.random.default_rng(4)
    atoms = ase.build.bulk("Ar", "fcc", a=A_FCC, cubic=True).repeat((2, 2, 1))
    strain = np.eye(3) + rng.uniform(-0.15, 0.15, (3, 3))
    atoms.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
    atoms.rattle(0.04, seed=5)
    return atoms


def small_cell():
    """A 4-atom cubic fcc cell of 1.55 Å, much smaller than 2 x cutoff: needs 2 image shells."""
    atoms = ase.build.bulk("Ar", "fcc", a=A_FCC, cubic=True)
    atoms.rattle(0.05, seed=6)
    return atoms


def mixed_pbc():
    """A slab periodic in x, y, open in z, with a full tilted 3x3 cell.

    The vacuum gap (1.6 Å) is below the cutoff, so a wrongly periodic z would add pairs.
    """
    atoms = ase.build.bulk("Ar", "fcc", a=A_FCC, cubic=True).repeat((2, 2, 1))
    atoms.center(vacuum=0.8, axis=2)
    cell = atoms.cell[:].copy()
    cell[2] += [0.4, -0.3, 0.0]
    atoms.set_cell(cell)
    atoms.pbc = (True, True, False)
    atoms.rattle(0.04, seed=7)
    return atoms


STRUCTURES = {
    "cluster_nocell": cluster_nocell,
    "cluster_cell": cluster_cell,
    "fcc": fcc,
    "triclinic": triclinic,
    "small_cell": small_cell,
    "mixed_pbc": mixed_pbc,
}


# ---------------------------------------------------------------------------- models
def lj_shift():
    return (
        fd.models.LennardJones(sigma=1.0, epsilon=0.7, cutoff=CUTOFF),
        AseLJ(sigma=1.0, epsilon=0.7, rc=CUTOFF, smooth=False),
    )


def lj_smooth():
    return (
        fd.models.LennardJones(sigma=1.0, epsilon=0.7, cutoff=CUTOFF, switch_onset=ONSET),
        AseLJ(sigma=1.0, epsilon=0.7, rc=CUTOFF, smooth=True, ro=ONSET),
    )


def morse():
    d, alpha, r0 = 0.6, 4.0, 1.1
    return (
        fd.models.Morse(D=d, alpha=alpha, r0=r0, cutoff=CUTOFF, switch_onset=ONSET),
        AseMorse(epsilon=d, rho0=alpha * r0, r0=r0, rcut1=ONSET / r0, rcut2=CUTOFF / r0),
    )


MODELS = {"lj_shift": lj_shift, "lj_smooth": lj_smooth, "morse": morse}


# Every single-system evaluation uses one capacity and one static image range, so that each model
# compiles once for all structures (compilation dominates the run time of this file). Padding
# atoms and unused image shifts contribute nothing (tested below), and every structure here has
# at most 32 atoms and needs at most 2 image shells.
SINGLE_CAPACITY = {"max_atoms": 32, "max_systems": 1, "max_atoms_per_system": 32}
SINGLE_IMAGES = (2, 2, 2)


@eqx.filter_jit
def _evaluate(model, batch):
    return model(batch)


def evaluate(model, batch):
    """Jitted model call with the static image range resolved for ``batch`` on the host."""
    return _evaluate(model.with_images(batch), batch)


def evaluate_single(model, atoms):
    """One system in a batch of the shared single-system capacity."""
    batch = fd.Batch.from_atoms([atoms], **SINGLE_CAPACITY)
    need = model.with_images(batch).images
    assert all(n <= m for n, m in zip(need, SINGLE_IMAGES, strict=True)), need
    return batch, _evaluate(dataclasses.replace(model, images=SINGLE_IMAGES), batch)


def ase_reference(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    s = atoms.get_stress() if atoms.cell.rank == 3 else None
    return e, f, s


def assert_rel(actual, expected, rtol, what):
    """|actual - expected| <= rtol * max|expected| (elementwise, one scale per quantity)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = np.max(np.abs(expected))
    err = np.max(np.abs(actual - expected)) if actual.size else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} x {scale:.3e}"


def assert_matches_ase(out, batch, slot, atoms, calc, rtol=RTOL_ASE):
    e_ref, f_ref, s_ref = ase_reference(atoms, calc)
    sel = np.flatnonzero(np.asarray(batch.system_idx) == slot)
    assert_rel(out.energy[slot], e_ref, rtol, "energy")
    assert_rel(np.asarray(out.forces)[sel], f_ref, rtol, "forces")
    if s_ref is not None:
        assert_rel(full_3x3_to_voigt_6_stress(np.asarray(out.stress[slot])), s_ref, rtol, "stress")


# ---------------------------------------------------------------------------- 1. vs ASE
def test_structures_exercise_what_they_claim():
    # Guard the fixtures themselves, so the cases below test what their names say.
    def need(atoms):
        cell = atoms.cell[:] if atoms.cell.rank == 3 else np.eye(3)
        n = fd.models.required_images(jnp.asarray(cell)[None], jnp.asarray(atoms.pbc)[None], CUTOFF)
        return np.asarray(n)[0].tolist()

    assert need(cluster_nocell()) == [0, 0, 0] and cluster_nocell().cell.rank == 0
    assert need(cluster_cell()) == [0, 0, 0] and cluster_cell().cell.rank == 3
    assert need(fcc()) == [1, 1, 1]
    assert need(small_cell()) == [2, 2, 2]  # images beyond the first shell
    assert need(mixed_pbc())[2] == 0 and min(need(mixed_pbc())[:2]) >= 1
    assert np.all(np.abs(mixed_pbc().cell[2, :2]) > 0.1)  # open direction tilted, full 3x3 cell
    cell = triclinic().cell[:]
    assert np.all(np.abs(cell[~np.eye(3, dtype=bool)]) > 1e-3)  # every off-diagonal non-zero


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_single_system_matches_ase(model_name, structure):
    model, calc = MODELS[model_name]()
    atoms = STRUCTURES[structure]()
    batch, out = evaluate_single(model, atoms)
    e_ref = ase_reference(atoms, calc)[0]
    assert abs(e_ref) > 0.1  # a meaningful, non-trivial energy
    assert_matches_ase(out, batch, 0, atoms, calc)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_mixed_padded_batch_matches_ase(model_name):
    model, calc = MODELS[model_name]()
    systems = [make() for make in STRUCTURES.values()]
    n = sum(len(a) for a in systems)
    batch = fd.Batch.from_atoms(
        systems,
        max_atoms=n + 7,
        max_systems=len(systems) + 2,
        max_atoms_per_system=max(len(a) for a in systems) + 3,
    )
    out = evaluate(model, batch)
    for slot, atoms in enumerate(systems):
        assert_matches_ase(out, batch, slot, atoms, calc)
    pad = ~np.asarray(batch.atom_mask)
    assert np.all(np.asarray(out.forces)[pad] == 0.0)
    empty = ~np.asarray(batch.system_mask)
    assert np.all(np.asarray(out.energy)[empty] == 0.0)
    assert np.all(np.asarray(out.stress)[empty] == 0.0)


def test_eager_call_resolves_images_and_matches_ase():
    # The documented path: a plain eager call computes the image range itself.
    model, calc = lj_shift()
    atoms = small_cell()
    batch = fd.Batch.from_atoms([atoms])
    assert_matches_ase(model(batch), batch, 0, atoms, calc)


def test_stress_is_symmetric_and_matches_strain_derivative():
    # Independent of ASE: stress = (1/V) dE/dε by central differences of the energy of the
    # strained crystal. Step 1e-5 gives truncation ~1e-10 and rounding ~1e-16/1e-5 relative; the
    # 1e-7 tolerance sits well above both.
    model, _ = lj_smooth()
    atoms = triclinic()
    batch = fd.Batch.from_atoms([atoms])
    model = model.with_images(batch)
    stress = np.asarray(_evaluate(model, batch).stress[0])
    np.testing.assert_allclose(stress, stress.T, rtol=0, atol=1e-12 * np.abs(stress).max())
    h = 1e-5
    numeric = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            eps = np.zeros((3, 3))
            eps[i, j] = eps[j, i] = h / (2 if i != j else 1)
            e = []
            for sign in (1, -1):
                a = atoms.copy()
                a.set_cell(a.cell[:] @ (np.eye(3) + sign * eps), scale_atoms=True)
                e.append(float(_evaluate(model, fd.Batch.from_atoms([a])).energy[0]))
            numeric[i, j] = (e[0] - e[1]) / (2 * h) / atoms.get_volume()
    assert_rel(stress, numeric, 1e-7, "stress vs strain derivative")


# ---------------------------------------------------------------------------- 3, 4. padding
KINDS = ["cluster", "crystal", "triclinic", "slab", "small"]


def random_system(kind, n, seed):
    """A system of ``n`` (1..32) atoms of the given kind: fcc sites with vacancies, rattled."""
    rng = np.random.default_rng(seed)
    atoms = ase.build.bulk("Ar", "fcc", a=A_FCC, cubic=True).repeat(1 if kind == "small" else 2)
    del atoms[np.sort(rng.permutation(len(atoms))[n:])]  # keeps min(n, len) atoms
    if kind == "cluster":
        atoms.pbc = False
        atoms.cell = None
    elif kind == "triclinic":
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + rng.uniform(-0.1, 0.1, (3, 3))), True)
    elif kind == "slab":
        atoms.center(vacuum=1.0, axis=2)
        atoms.pbc = (True, True, False)
    atoms.rattle(0.04, seed=seed)
    return atoms


@functools.cache
def alone(kind, n, seed):
    atoms = random_system(kind, n, seed)
    model, _ = lj_smooth()
    return atoms, jax.device_get(evaluate_single(model, atoms)[1])


system_strategy = st.tuples(st.sampled_from(KINDS), st.integers(1, 32), st.integers(0, 3))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    specs=st.lists(system_strategy, min_size=1, max_size=4),
    capacity=st.sampled_from([(128, 4, 32), (137, 6, 35)]),
    data=st.data(),
)
def test_batch_equals_systems_alone(specs, capacity, data):
    # Random kinds and sizes (1..32 atoms; 1..4 for "small") in random order, random ids.
    # The padding on all three axes is random because the sizes are; the capacities come from
    # two values so that the compiled evaluation is reused across examples (compiling dominates).
    systems = [alone(*spec)[0] for spec in specs]
    ids = data.draw(st.permutations(range(100, 100 + len(specs))))
    max_atoms, max_systems, per_system = capacity
    batch = fd.Batch.from_atoms(
        systems,
        max_atoms=max_atoms,
        max_systems=max_systems,
        max_atoms_per_system=per_system,
        system_ids=ids,
    )
    model, _ = lj_smooth()
    out = jax.device_get(_evaluate(dataclasses.replace(model, images=SINGLE_IMAGES), batch))
    system_idx = np.asarray(batch.system_idx)
    for slot, spec in enumerate(specs):
        ref = alone(*spec)[1]
        sel = system_idx == slot
        n = len(systems[slot])
        assert_rel(out.energy[slot], ref.energy[0], RTOL_SAME, "energy")
        assert_rel(out.forces[sel], ref.forces[:n], RTOL_SAME, "forces")
        assert_rel(out.stress[slot], ref.stress[0], RTOL_SAME, "stress")
    # Padding atoms get exactly zero force, empty slots exactly zero energy and stress.
    assert np.all(out.forces[system_idx == batch.max_systems] == 0.0)
    assert np.all(out.energy[len(systems) :] == 0.0)
    assert np.all(out.stress[len(systems) :] == 0.0)


def test_padded_batch_equals_unpadded():
    systems = [fcc(), small_cell(), cluster_cell()]
    model, _ = morse()
    tight = fd.Batch.from_atoms(systems)
    padded = fd.Batch.from_atoms(systems, max_atoms=80, max_systems=6, max_atoms_per_system=40)
    assert padded.max_atoms > tight.max_atoms and padded.max_systems > tight.max_systems
    a, b = jax.device_get(evaluate(model, tight)), jax.device_get(evaluate(model, padded))
    n, s = tight.max_atoms, tight.max_systems
    assert_rel(b.energy[:s], a.energy, RTOL_SAME, "energy")
    assert_rel(b.forces[:n], a.forces, RTOL_SAME, "forces")
    assert_rel(b.stress[:s], a.stress, RTOL_SAME, "stress")
    assert np.all(b.forces[n:] == 0.0) and np.all(b.energy[s:] == 0.0)


def test_padding_content_is_ignored():
    # Whatever garbage sits in padding atoms (positions on top of real atoms, huge masses, real
    # atomic numbers) and empty slots (a tiny periodic cell), results do not change at all:
    # padding is masked before every reduction, so here equality is exact.
    systems = [fcc(), cluster_cell()]
    model, _ = lj_shift()
    batch = fd.Batch.from_atoms(systems, max_atoms=60, max_systems=4)
    model = model.with_images(batch)
    pad = ~batch.atom_mask
    garbage = batch.replace(
        positions=jnp.where(pad[:, None], batch.positions[0], batch.positions),
        atomic_numbers=jnp.where(pad, 18, batch.atomic_numbers),
        cell=batch.cell.at[3].set(0.5 * jnp.eye(3)),
        pbc=batch.pbc.at[3].set(True),
    )
    a, b = _evaluate(model, batch), _evaluate(model, garbage)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------- 7. image range
def test_required_images_cubic():
    # For a cubic cell of side L, n = floor(cutoff / L + 1/2) shells; none along open directions.
    cells = jnp.stack([L * jnp.eye(3) for L in (6.0, 3.0, 2.0, 1.5, 1.0, 0.7)])
    pbc = jnp.ones((6, 3), bool).at[5, 2].set(False)
    n = np.asarray(fd.models.required_images(cells, pbc, 2.5))
    assert n[:, 0].tolist() == [0, 1, 1, 2, 3, 4]
    assert np.all(n[:, 0] == n[:, 1])
    assert n[5, 2] == 0


def test_required_images_suffice_and_are_needed():
    # With the computed range the energy equals that with one more shell (nothing is missed);
    # with one shell fewer a cubic cell of 1.5 Å loses the pairs between 2.25 and 2.5 Å.
    atoms = ase.build.bulk("Ar", "sc", a=1.5)
    batch = fd.Batch.from_atoms([atoms])
    model, calc = lj_shift()
    need = model.with_images(batch).images
    assert need == (2, 2, 2)
    e = float(_evaluate(model.with_images(batch), batch).energy[0])
    e_more = float(_evaluate(dataclasses.replace(model, images=(3, 3, 3)), batch).energy[0])
    assert_rel(e, e_more, RTOL_SAME, "energy with one more shell")
    assert_rel(e, ase_reference(atoms, calc)[0], RTOL_ASE, "energy vs ASE")


def test_too_few_images_fail_that_system_only_and_with_images_fixes_it():
    # A cell too small for the static image range would miss pairs: that system's energy, forces
    # and stress are NaN and the model reports Failure.CELL_TOO_SMALL for it; the other system of
    # the batch is evaluated as usual (no run-wide error).
    atoms = ase.build.bulk("Ar", "sc", a=1.5)  # needs 2 shells for cutoff 2.5
    batch = fd.Batch.from_atoms([fcc(), atoms], max_systems=3)
    model, calc = lj_shift()
    one = dataclasses.replace(model, images=(1, 1, 1))
    out = jax.jit(lambda b: one(b))(batch)
    n0 = len(fcc())
    assert np.isnan(out.energy[1]) and np.all(np.isnan(out.forces[n0 : n0 + 1]))
    assert np.all(np.isnan(out.stress[1]))
    assert np.isfinite(out.energy[0]) and np.all(np.isfinite(out.forces[:n0]))
    faults = np.asarray(jax.jit(one.system_faults)(batch))
    assert faults.tolist() == [0, int(fd.Failure.CELL_TOO_SMALL), 0]
    # images=None under jit cannot look at the cell and falls back to (1, 1, 1): the same
    assert np.isnan(jax.jit(lambda b: model(b).energy)(batch)[1])
    fixed = model.with_images(batch)
    assert fixed.images == (2, 2, 2)
    energy = jax.jit(lambda b: fixed(b).energy)(batch)
    assert_rel(energy[1], ase_reference(atoms, calc)[0], RTOL_ASE, "energy after with_images")


# ---------------------------------------------------------------------------- 9. SoftSphere
def soft_sphere_numpy(positions, sigma, epsilon, alpha):
    d = positions[:, None] - positions[None]
    r = np.linalg.norm(d, axis=-1)
    iu = np.triu_indices(len(positions), 1)
    r = r[iu]
    r = r[r < sigma]
    return np.sum(epsilon / alpha * (1 - r / sigma) ** alpha)


@pytest.mark.parametrize("alpha", [2.0, 2.5])
def test_soft_sphere_energy_and_forces(alpha):
    rng = np.random.default_rng(11)
    sigma, epsilon = 0.9, 1.3
    atoms = ase.Atoms("Ar10", positions=rng.uniform(0, 1.6, (10, 3)))
    model = fd.models.SoftSphere(sigma, epsilon, jnp.asarray(alpha))  # traced: one compile
    assert model.cutoff == sigma
    batch = fd.Batch.from_atoms([atoms], max_atoms=13, max_systems=2)
    out = _evaluate(model.with_images(batch), batch)
    e_ref = soft_sphere_numpy(atoms.positions, sigma, epsilon, alpha)
    assert e_ref > 0.05
    assert_rel(out.energy[0], e_ref, 1e-12, "energy vs numpy")  # same sum, rounding only
    # Forces vs central finite differences of the numpy energy: step 1e-6 gives truncation
    # ~1e-12 and rounding ~1e-16 / 1e-6 = 1e-10 relative; 1e-7 sits above both.
    h = 1e-6
    fd_forces = np.zeros((10, 3))
    for i in range(10):
        for k in range(3):
            p = atoms.positions.copy()
            p[i, k] += h
            ep = soft_sphere_numpy(p, sigma, epsilon, alpha)
            p[i, k] -= 2 * h
            em = soft_sphere_numpy(p, sigma, epsilon, alpha)
            fd_forces[i, k] = -(ep - em) / (2 * h)
    assert_rel(np.asarray(out.forces)[:10], fd_forces, 1e-7, "forces vs finite differences")


def test_parameter_gradients_are_finite():
    # Gradients with respect to the model parameters (for fitting) must not pick up NaN from
    # masked pairs (beyond the cutoff, self pairs, padding): σ < 1 and α = 2.5 make
    # (1 - r/σ)^α undefined for r > σ. dE/dε = E/ε exactly for every model here.
    atoms = ase.Atoms("Ar6", positions=np.random.default_rng(3).uniform(0, 1.5, (6, 3)))
    batch = fd.Batch.from_atoms([atoms], max_atoms=8, max_systems=2)
    models = [
        fd.models.SoftSphere(0.8, jnp.asarray(1.0), jnp.asarray(2.5)),
        fd.models.LennardJones(jnp.asarray(0.5), jnp.asarray(1.0), 1.2),
    ]
    for model in models:
        model = model.with_images(batch)
        e, grads = eqx.filter_jit(eqx.filter_value_and_grad(lambda m: jnp.sum(m.energy(batch))))(
            model
        )
        leaves = jax.tree.leaves(grads)
        assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
        np.testing.assert_allclose(float(grads.epsilon), float(e) / 1.0, rtol=1e-12)


def test_positional_arguments_follow_documented_order():
    lj = fd.models.LennardJones(1.1, 0.3, 2.7)
    assert (lj.sigma, lj.epsilon, lj.cutoff) == (1.1, 0.3, 2.7)
    mo = fd.models.Morse(0.6, 4.0, 1.1, 2.5)
    assert (mo.D, mo.alpha, mo.r0, mo.cutoff) == (0.6, 4.0, 1.1, 2.5)
    ss = fd.models.SoftSphere(0.9, 1.3, 2.5)
    assert (ss.sigma, ss.epsilon, ss.alpha, ss.cutoff) == (0.9, 1.3, 2.5, 0.9)


def test_morse_shifted_against_numpy():
    # The shifted (unswitched) Morse has no ASE counterpart: check it against a direct sum.
    d, alpha, r0, rc = 0.6, 4.0, 1.1, 2.5
    atoms = cluster_nocell()
    batch = fd.Batch.from_atoms([atoms])
    out = _evaluate(fd.models.Morse(d, alpha, r0, rc).with_images(batch), batch)

    def phi(r):
        e = np.exp(-alpha * (r - r0))
        return d * e * (e - 2)

    r = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
    r = r[np.triu_indices(len(atoms), 1)]
    r = r[r < rc]
    assert_rel(out.energy[0], np.sum(phi(r) - phi(rc)), 1e-12, "energy vs numpy")


@pytest.mark.slow
def test_vmap_over_batches_and_parameters():
    # Ensembles: a leading axis over batches of one capacity, or over model parameters, gives
    # the same as separate evaluations (to rounding, 1e-12 relative); E is linear in ε.
    batches = [fd.Batch.from_atoms([fcc()]), fd.Batch.from_atoms([triclinic().repeat((1, 1, 2))])]
    model, _ = lj_smooth()
    model = dataclasses.replace(model, images=SINGLE_IMAGES)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
    out = jax.vmap(model)(stacked)
    for i, batch in enumerate(batches):
        ref = _evaluate(model, batch)
        assert_rel(out.energy[i], ref.energy, RTOL_SAME, "energy")
        assert_rel(out.forces[i], ref.forces, RTOL_SAME, "forces")
        assert_rel(out.stress[i], ref.stress, RTOL_SAME, "stress")
    eps = jnp.asarray([0.5, 1.0, 2.0])
    energies = jax.vmap(lambda e: dataclasses.replace(model, epsilon=e)(batches[0]).energy)(eps)
    ref = _evaluate(model, batches[0]).energy[0] / model.epsilon
    assert_rel(energies[:, 0], eps * ref, RTOL_SAME, "energy vs epsilon")


# ---------------------------------------------------------------------------- 10. parameter checks
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: fd.models.LennardJones(3.4, 0.01, -7.5), r"LennardJones: cutoff must be > 0"),
        (lambda: fd.models.LennardJones(3.4, 0.01, float("inf")), r"cutoff must be > 0.*inf"),
        (lambda: fd.models.LennardJones(0.0, 0.01, 7.5), r"LennardJones: sigma must be > 0.*0\.0"),
        (lambda: fd.models.LennardJones(3.4, -0.01, 7.5), r"epsilon must be >= 0.*-0\.01"),
        (lambda: fd.models.LennardJones(3.4, float("nan"), 7.5), r"epsilon must be >= 0.*nan"),
        (
            lambda: fd.models.LennardJones(3.4, 0.01, 7.5, switch_onset=7.5),
            r"switch_onset must be < cutoff, got switch_onset=7\.5 and cutoff=7\.5",
        ),
        (
            lambda: fd.models.LennardJones(3.4, 0.01, 7.5, switch_onset=-1.0),
            r"switch_onset must be >= 0",
        ),
        (lambda: fd.models.Morse(-0.1, 1.0, 3.0, 7.0), r"Morse: D must be >= 0.*-0\.1"),
        (lambda: fd.models.Morse(0.1, 0.0, 3.0, 7.0), r"Morse: alpha must be > 0"),
        (lambda: fd.models.Morse(0.1, 1.0, -3.0, 7.0), r"Morse: r0 must be > 0"),
        (
            lambda: fd.models.Morse(0.1, 1.0, 3.0, 7.0, switch_onset=8.0),
            r"Morse: switch_onset must be < cutoff",
        ),
        (lambda: fd.models.SoftSphere(-1.0), r"SoftSphere: sigma must be > 0"),
        (lambda: fd.models.SoftSphere(1.0, 1.0, 0.0), r"SoftSphere: alpha must be > 0"),
        (lambda: fd.models.SoftSphere(1.0, -1.0), r"SoftSphere: epsilon must be >= 0"),
        (
            lambda: fd.models.LennardJones(3.4, 0.01, 7.5, images=(1, -1, 1)),
            r"LennardJones: images\[1\] must be an integer >= 0, got -1",
        ),
        (
            lambda: fd.models.LennardJones(3.4, 0.01, 7.5, images=(1, 1)),
            r"images must be None or 3 integers",
        ),
        (lambda: fd.models.LennardJones(3.4, 0.01, 7.5, skin=-0.5), r"skin must be >= 0"),
        (lambda: fd.models.LennardJones(3.4, 0.01, 7.5).with_neighbors(-0.5), "skin must be >= 0"),
        (lambda: fd.models.LennardJones(3.4, 0.01, 7.5, shift=1), r"shift must be True or False"),
    ],
)
def test_invalid_parameters_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_traced_parameters_are_not_value_checked():
    # Under vmap/grad a parameter is a tracer: its value is unknown when the model is built, so
    # only its shape is checked (a negative epsilon inside vmap is the caller's business).
    atoms = cluster_nocell()
    batch = fd.Batch.from_atoms([atoms])

    def energy(sigma, epsilon):
        model = fd.models.LennardJones(sigma=sigma, epsilon=epsilon, cutoff=CUTOFF)
        return model.with_images(batch).energy(batch)[0]

    out = jax.vmap(energy)(jnp.asarray([1.0, 1.1]), jnp.asarray([0.7, -0.7]))
    assert np.isfinite(np.asarray(out)).all()
    grad = jax.grad(energy, argnums=(0, 1))(1.0, 0.7)
    assert all(np.isfinite(float(g)) for g in grad)
    with pytest.raises(ValueError, match=r"sigma must be a scalar or a symmetric \(K, K\)"):
        jax.vmap(lambda s: energy(s, 0.7))(jnp.ones((2, 3)))
