"""EnergyFunctionModel: JAX-MD energy functions of one system, vmapped over a padded batch.

References are JAX-MD (Schoenholz & Cubuk, NeurIPS 2020) run directly on each system: its energy,
forces as ``-jax.grad`` of the energy with respect to its (fractional) positions (JAX-MD's
``space.transform`` makes that gradient the real-space ``dE/dr``), and its stress from
``quantity.stress``, which is ``-(1/V) dU/dε`` (the negative of ASE's and this library's sign
convention). The periodic references use ``space.periodic_general(box, fractional_coordinates=
True)`` with ASE's scaled positions and JAX-MD's static-species code path (boolean indexing per
species pair); the clusters use ``space.free()`` with Cartesian positions. The model goes through
the dynamic-species path, the padded blocks, :func:`periodic_box` and
:func:`real_space_fractional`: the same float64 terms in a different order and from fractional
coordinates computed in another way, so results agree to rounding (measured ~1e-15); the bound
``RTOL = 1e-12`` (relative to the largest entry) catches a wrong derivative convention (the
naive fractional coordinates are off by ~1e-1, see the last test).
"""

import jax

jax.config.update("jax_enable_x64", True)

import ase  # noqa: E402
import ase.build  # noqa: E402
import ase.cluster  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax_md = pytest.importorskip("jax_md")
from jax_md import energy, quantity, space  # noqa: E402

import fused_dynamics as fd  # noqa: E402
from fused_dynamics.models.energy_function import (  # noqa: E402
    EnergyFunctionModel,
    periodic_box,
    real_space_fractional,
    system_blocks,
)

RTOL = 1e-12

# two species, labelled Ar (row 0) and Kr (row 1); padded atoms get row 2 (no parameters)
ROW_OF_Z = np.zeros(119, np.int32)
ROW_OF_Z[36] = 1
# JAX-MD's wrappers make Python floats and NumPy arrays float32 (``util.maybe_downcast``), even
# with x64: every parameter is a jnp float64 array
SS_SIGMA = jnp.array([[1.0, 0.9], [0.9, 1.1]])  # Å
SS_EPSILON = jnp.array([[1.0, 1.5], [1.5, 0.7]])  # eV
# Kob-Andersen matrices, switched off between 1.5 and 2.0 (times the largest sigma, 1 Å)
LJ_SIGMA = jnp.array([[1.0, 0.8], [0.8, 0.88]])
LJ_EPSILON = jnp.array([[1.0, 1.5], [1.5, 0.5]])
LJ_ONSET, LJ_CUTOFF = jnp.array(1.5), jnp.array(2.0)


# ---------------------------------------------------------------------------- structures
def binary_box(n, density, seed, shear=0.1, periodic=True):
    """A triclinic periodic box of random non-overlapping atoms, 80 % Ar-, 20 % Kr-labelled."""
    rng = np.random.default_rng(seed)
    length = (n / density) ** (1 / 3)
    cell = length * (np.eye(3) + shear * np.triu(rng.uniform(-1, 1, (3, 3)), 1))
    frac = []
    while len(frac) < n:
        s = rng.uniform(0.0, 1.0, 3)
        d = np.asarray(frac) - s if frac else np.zeros((0, 3))
        d = (d - np.round(d)) @ cell
        if not len(d) or np.min(np.linalg.norm(d, axis=1)) > 0.75:
            frac.append(s)
    symbols = ["Ar"] * (n - n // 5) + ["Kr"] * (n // 5)
    rng.shuffle(symbols)
    atoms = ase.Atoms(symbols, scaled_positions=frac, cell=cell, pbc=True)
    if periodic:
        _check_minimum_image(atoms, float(LJ_CUTOFF))
    return atoms


def binary_cluster(n, seed):
    """A cluster with a zero cell (pbc False)."""
    atoms = binary_box(n, 1.0, seed, shear=0.0, periodic=False)
    return ase.Atoms(atoms.numbers, positions=atoms.positions - 2.0)


def _check_minimum_image(atoms, cutoff):
    """JAX-MD's periodic_general is minimum-image: every lattice-plane spacing > 2 cutoff."""
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(atoms.cell.array), axis=0)
    assert spacing.min() > 2 * cutoff, spacing


def mixed_batch():
    """Different sizes, a cluster and an empty slot (slot 3)."""
    systems = [binary_box(100, 1.1, 0), binary_cluster(9, 1), binary_box(70, 0.8, 2, 0.2)]
    return systems, fd.Batch.from_atoms(systems, max_systems=4, dtype=jnp.float64)


@pytest.fixture(scope="module")
def mixed():
    """The mixed batch and the soft-sphere model's output on it (compiled once per module)."""
    systems, batch = mixed_batch()
    return systems, batch, EnergyFunctionModel(soft_spheres)(batch)


# ---------------------------------------------------------------------------- wrappers
def _space(positions, mask, cell, pbc):
    """JAX-MD space and coordinates for a block (periodic_box: no wrap along open rows)."""
    box = periodic_box(cell, pbc, positions, mask)
    displacement, _ = space.periodic_general(box.T, fractional_coordinates=True)
    return displacement, real_space_fractional(positions, box)


def soft_spheres(positions, numbers, mask, cell, pbc):
    displacement, frac = _space(positions, mask, cell, pbc)
    species = jnp.where(mask, jnp.asarray(ROW_OF_Z)[numbers], 2)
    fn = energy.soft_sphere_pair(displacement, species=2, sigma=SS_SIGMA, epsilon=SS_EPSILON)
    return fn(frac, species)


def lennard_jones(positions, numbers, mask, cell, pbc):
    displacement, frac = _space(positions, mask, cell, pbc)
    species = jnp.where(mask, jnp.asarray(ROW_OF_Z)[numbers], 2)
    fn = energy.lennard_jones_pair(
        displacement,
        species=2,
        sigma=LJ_SIGMA,
        epsilon=LJ_EPSILON,
        r_onset=LJ_ONSET,
        r_cutoff=LJ_CUTOFF,
    )
    return fn(frac, species)


class SoftSpheres(eqx.Module):
    """The soft-sphere wrapper with its parameters as pytree leaves (differentiable)."""

    sigma: jax.Array
    epsilon: jax.Array

    def __call__(self, positions, numbers, mask, cell, pbc):
        displacement, frac = _space(positions, mask, cell, pbc)
        species = jnp.where(mask, jnp.asarray(ROW_OF_Z)[numbers], 2)
        fn = energy.soft_sphere_pair(
            displacement, species=2, sigma=self.sigma, epsilon=self.epsilon
        )
        return fn(frac, species)


# EAM with analytic functions (Cu-like, Å / eV), zero with zero slope at EAM_CUTOFF
EAM_CUTOFF = 4.5


def _taper(r):
    x = jnp.clip(1.0 - r / EAM_CUTOFF, 0.0, None)
    return x * x * x


def eam_density(r):
    return jnp.exp(-2.0 * (r / 2.55 - 1.0)) * _taper(r)


def eam_embedding(rho):
    return -1.3 * jnp.sqrt(rho)


def eam_pair(r):
    e = jnp.exp(-1.6 * (r - 2.55))
    return 0.4 * e * (e - 2.0) * _taper(r)


def eam(positions, numbers, mask, cell, pbc):
    box = periodic_box(cell, pbc, positions, mask)
    frac = real_space_fractional(positions, box)
    displacement, _ = space.periodic_general(box.T, fractional_coordinates=True)
    pair = mask[:, None] & mask[None, :]
    density = lambda r: jnp.where(pair, eam_density(r), 0.0)  # noqa: E731
    pairwise = lambda r: jnp.where(pair, eam_pair(r), 0.0)  # noqa: E731
    embedding = lambda d: jnp.where(mask, eam_embedding(jnp.where(mask, d, 1.0)), 0.0)  # noqa: E731
    return energy.eam(displacement, density, embedding, pairwise)(frac)


def copper_systems():
    bulk = ase.build.bulk("Cu", "fcc", a=3.6) * (5, 5, 5)  # primitive: triclinic
    bulk.set_cell(bulk.cell.array @ (np.eye(3) + [[0, 0.03, 0], [0, 0, -0.02], [0, 0, 0]]), True)
    bulk.rattle(0.05, seed=3)
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(bulk.cell.array), axis=0)
    assert spacing.min() > 2 * EAM_CUTOFF
    cluster = ase.cluster.Icosahedron("Cu", noshells=2, latticeconstant=3.6)
    cluster.rattle(0.05, seed=4)
    cluster.cell = np.zeros((3, 3))
    return [bulk, cluster]


# ---------------------------------------------------------------------------- JAX-MD references
def jaxmd_reference(atoms, make_energy):
    """Energy, forces and ASE-convention stress of JAX-MD run directly on one system.

    ``make_energy(displacement, species)`` builds the JAX-MD energy with static species.
    """
    species = ROW_OF_Z[atoms.numbers]
    if atoms.pbc.all():
        box = jnp.asarray(atoms.cell.array.T)
        displacement, _ = space.periodic_general(box, fractional_coordinates=True)
        r = jnp.asarray(atoms.get_scaled_positions(wrap=False))
    else:
        box = jnp.eye(3)  # the batch's cell of a cluster without one (volume 1 Å³)
        displacement, _ = space.free()
        r = jnp.asarray(atoms.positions)
    fn = make_energy(displacement, species)

    @jax.jit  # compiled: JAX-MD's static-species path op by op takes ~15 s per system
    def evaluate(r, box):
        e, de_dr = jax.value_and_grad(fn)(r)
        return e, -de_dr, -quantity.stress(fn, r, box)  # JAX-MD's stress: -(1/V) dU/dε

    e, forces, stress = evaluate(r, box)
    return float(e), np.asarray(forces), np.asarray(stress)


def _ss_ref(displacement, species):
    return energy.soft_sphere_pair(
        displacement, species=species, sigma=SS_SIGMA, epsilon=SS_EPSILON
    )


def _lj_ref(displacement, species):
    return energy.lennard_jones_pair(
        displacement,
        species=species,
        sigma=LJ_SIGMA,
        epsilon=LJ_EPSILON,
        r_onset=LJ_ONSET,
        r_cutoff=LJ_CUTOFF,
    )


def _eam_ref(displacement, species):
    return energy.eam(displacement, eam_density, eam_embedding, eam_pair)


def _rel(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def _compare(systems, batch, out, reference):
    offset = 0
    for slot, atoms in enumerate(systems):
        e, f, s = reference(atoms)
        n = len(atoms)
        assert _rel(out.energy[slot], e) < RTOL, (slot, float(out.energy[slot]), e)
        assert _rel(out.forces[offset : offset + n], f) < RTOL, slot
        assert _rel(out.stress[slot], s) < RTOL, slot
        assert np.abs(f).max() > 1e-3  # forces that test something
        offset += n
    empty = ~np.asarray(batch.system_mask)
    assert np.all(np.asarray(out.energy)[empty] == 0.0)
    assert np.all(np.asarray(out.stress)[empty] == 0.0)
    assert np.all(np.isfinite(np.asarray(out.forces)))


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("potential", ["soft_sphere", "lj"])
def test_pair_potentials_equal_jaxmd_on_each_system(mixed, potential):
    systems, batch, out = mixed
    ref = _ss_ref
    if potential == "lj":
        out, ref = EnergyFunctionModel(lennard_jones)(batch), _lj_ref
    _compare(systems, batch, out, lambda atoms: jaxmd_reference(atoms, ref))


def test_eam_equals_jaxmd_on_each_system():
    systems = copper_systems()[::-1]  # the cluster first
    batch = fd.Batch.from_atoms(systems, max_systems=3, dtype=jnp.float64)
    out = EnergyFunctionModel(eam)(batch)
    _compare(systems, batch, out, lambda atoms: jaxmd_reference(atoms, _eam_ref))


def test_a_system_alone_and_in_a_padded_batch_is_bitwise_equal(mixed):
    """Bitwise at the same capacities (S, A): one compiled program, whatever the other slots
    hold and wherever the system sits. A batch of another capacity is another XLA program
    (vectorized differently): equal to rounding only, checked at 1e-14 (measured 2e-16)."""
    systems, batch, out = mixed
    model = EnergyFunctionModel(soft_spheres)
    caps = dict(  # the mixed batch's capacities: its compiled program serves every one
        max_atoms=batch.max_atoms,
        max_systems=batch.max_systems,
        max_atoms_per_system=batch.max_atoms_per_system,
    )
    start = np.cumsum([0] + [len(a) for a in systems])
    for slot, atoms in enumerate(systems):
        sel = slice(start[slot], start[slot] + len(atoms))
        want = (out.energy[slot], out.forces[sel], out.stress[slot])
        one = model(fd.Batch.from_atoms([atoms], dtype=jnp.float64, **caps))
        got = (one.energy[0], one.forces[: len(atoms)], one.stress[0])
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(np.asarray(g), np.asarray(w)), slot
        if slot == 1:  # the cluster at its own capacity (1, 9)
            own = model(fd.Batch.from_atoms([atoms], dtype=jnp.float64))
            for g, w in zip((own.energy[0], own.forces, own.stress[0]), want, strict=True):
                assert _rel(g, w) < 1e-14, slot


def test_runs_in_fused_fire_and_nve(mixed):
    systems, batch, start = mixed
    model = EnergyFunctionModel(soft_spheres)
    fire = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(0.01), n_steps=200)
    relaxed = fire.run(batch)
    occupied = np.asarray(batch.system_mask)
    reason = np.asarray(relaxed.info["exit_reason"])[occupied]
    assert np.all(reason == int(fd.ExitReason.CONVERGED)), reason
    assert np.all(np.asarray(relaxed.energy) <= np.asarray(start.energy))
    for atoms in relaxed.to_atoms():
        assert np.abs(atoms.get_forces()).max() <= 0.01

    rng = np.random.default_rng(5)
    kt = 300 * ase.units.kB
    hot = []
    for atoms in systems:
        atoms = atoms.copy()
        m = atoms.get_masses()[:, None]
        atoms.set_momenta(np.sqrt(m * kt) * rng.standard_normal((len(atoms), 3)))
        hot.append(atoms)
    batch = fd.Batch.from_atoms(hot, max_systems=4, dtype=jnp.float64)
    out = fd.NVE(model, dt=1.0, n_steps=20).run(batch)

    def total(b, potential):
        masses = np.asarray(b.masses)[:, None]
        kinetic = 0.5 * np.sum(masses * np.asarray(b.velocities) ** 2, axis=1)
        per_system = np.bincount(np.asarray(b.system_idx), kinetic, minlength=5)[:4]
        return np.asarray(potential) + per_system

    drift = np.abs(total(out, out.energy) - total(batch, start.energy))[occupied]
    # velocity Verlet at dt = 1 fs << tau = sigma sqrt(m / eps) ~ 64 fs: drift << kinetic energy
    kinetic = 1.5 * kt * np.array([len(a) for a in hot])
    assert np.all(drift < 1e-3 * kinetic), (drift, kinetic)
    assert np.all(np.asarray(out.info["exit_reason"])[occupied] == int(fd.ExitReason.BUDGET))


def test_gradient_with_respect_to_parameters_equals_finite_differences(mixed):
    """jax.grad through the model (forces and stress included) w.r.t. the function's sigma.

    Central differences with h = 1e-6 Å have truncation error ~h² f''' ~ 1e-12 and rounding
    ~1e-16 / h ~ 1e-10 relative: 1e-7 relative is a bound with margin that still catches a
    missing or wrong term (order 1).
    """
    _, batch, _ = mixed

    def loss(sigma):
        out = EnergyFunctionModel(SoftSpheres(sigma, jnp.asarray(SS_EPSILON)))(batch)
        return jnp.sum(out.energy) + jnp.sum(out.forces**2) + jnp.sum(out.stress[:, 0, 1])

    sigma = jnp.asarray(SS_SIGMA)
    grad = np.asarray(jax.grad(loss)(sigma))
    assert np.all(np.isfinite(grad))
    h = 1e-6
    want = []
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        e = np.zeros((2, 2))
        e[i, j] = e[j, i] = h  # the symmetric perturbation of the pair parameter (i, j)
        want.append((float(loss(sigma + e)) - float(loss(sigma - e))) / (2 * h))
    want = np.array(want)
    got = np.array([grad[0, 0], grad[0, 1] + grad[1, 0], grad[1, 1]])
    assert np.max(np.abs(got - want)) <= 1e-7 * np.max(np.abs(want)), (got, want)


def test_a_non_scalar_energy_is_an_error_naming_the_shape(mixed):
    _, batch, _ = mixed

    def per_atom(positions, numbers, mask, cell, pbc):
        return jnp.where(mask, jnp.sum(positions**2, axis=-1), 0.0)

    with pytest.raises(ValueError, match=r"scalar energy .*shape \(100,\)"):
        EnergyFunctionModel(per_atom)(batch)
    with pytest.raises(TypeError, match="must be callable"):
        EnergyFunctionModel(1.0)


def test_what_the_function_receives(mixed):
    """Mask, atomic number 0 and distinct far points in padded rows, the identity cell of a
    cluster without one, and a copy of a real system in the empty slot (its result dropped)."""
    _, batch, _ = mixed
    pos, numbers, mask, cell, pbc = (np.asarray(x) for x in system_blocks(batch))
    assert mask.sum(axis=1).tolist() == [100, 9, 70, 100]  # the empty slot copies slot 0
    assert np.all(numbers[~mask] == 0)
    assert np.all(np.linalg.norm(pos[~mask], axis=-1) >= 1000.0)
    assert len(np.unique(pos[1][~mask[1]], axis=0)) == 91
    assert np.array_equal(cell[1], np.eye(3)) and not pbc[1].any()
    assert np.array_equal(pos[3], pos[0]) and np.array_equal(cell[3], cell[0])

    def first_coordinate(positions, numbers, mask, cell, pbc):
        return jnp.sum(jnp.where(mask, positions[:, 0], 0.0))

    out = EnergyFunctionModel(first_coordinate)(batch)
    assert float(out.energy[3]) == 0.0
    forces = np.asarray(out.forces)[np.asarray(batch.atom_mask)]
    assert np.all(forces[:, 0] == -1.0) and np.all(forces[:, 1:] == 0.0)


def test_naive_fractional_coordinates_give_wrong_forces_with_jaxmd(mixed):
    """Why real_space_fractional: JAX-MD reads fractional tangents as real-space ones."""
    systems, batch, good = mixed

    def naive(positions, numbers, mask, cell, pbc):
        box = periodic_box(cell, pbc, positions, mask)
        displacement, _ = space.periodic_general(box.T, fractional_coordinates=True)
        species = jnp.where(mask, jnp.asarray(ROW_OF_Z)[numbers], 2)
        fn = energy.soft_sphere_pair(displacement, species=2, sigma=SS_SIGMA, epsilon=SS_EPSILON)
        return fn(positions @ jnp.linalg.inv(box), species)

    bad = EnergyFunctionModel(naive)(batch)
    assert _rel(bad.energy, good.energy) < RTOL
    n = len(systems[0])
    assert _rel(bad.forces[:n], good.forces[:n]) > 1e-2
