"""Pair potentials with per-species-pair parameters, against a direct NumPy double sum.

The reference sums ``φ_{s_i s_j}(|r_j - r_i + n·cell|)`` over every ordered pair of atoms and every
lattice translation ``n`` that can bring a pair within the cutoff, with the analytic ``φ'`` for
forces and the virial for the stress: nothing of the code under test (no image logic, no neighbor
list, no gather). Both sum the same float64 terms in different orders, so they agree to rounding
(~1e-14); 1e-10 relative catches a wrong pair parameter (a change of order 1e-2 or more).
"""

import itertools

import jax

jax.config.update("jax_enable_x64", True)

import ase  # noqa: E402
import ase.build  # noqa: E402
import ase.cluster  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ase.data import atomic_numbers  # noqa: E402

import fused_dynamics as fd  # noqa: E402

RTOL = 1e-10

# Kob & Andersen, Phys. Rev. E 51, 4626 (1995): A80B20 (modelled on Ni80P20), here in Å / eV.
KA_SPECIES = ("Ni", "P")  # A, B: rows in this order (not increasing atomic number: P is 15)
KA_SIGMA = np.array([[1.0, 0.8], [0.8, 0.88]])
KA_EPSILON = np.array([[1.0, 1.5], [1.5, 0.5]])
KA_CUTOFF = 2.5

# Ar / Kr (σ Å, ε eV); the cross pair is not the Lorentz-Berthelot value on purpose.
ARKR_SPECIES = ("Ar", "Kr")
ARKR_SIGMA = np.array([[3.405, 3.55], [3.55, 3.65]])
ARKR_EPSILON = np.array([[0.0104, 0.0118], [0.0118, 0.014]])
ARKR_CUTOFF = 8.5


# ---------------------------------------------------------------------------- structures
def kob_andersen(n=40, density=1.2, seed=0):
    """A periodic KA box: 80 % A (Ni), 20 % B (P), random positions at distances > 0.7 Å."""
    rng = np.random.default_rng(seed)
    length = (n / density) ** (1 / 3)
    pos = []
    while len(pos) < n:
        p = rng.uniform(0.0, length, 3)
        d = np.asarray(pos) - p if pos else np.zeros((0, 3))
        d -= length * np.round(d / length)
        if not len(d) or np.min(np.linalg.norm(d, axis=1)) > 0.7:
            pos.append(p)
    n_b = n // 5
    symbols = ["Ni"] * (n - n_b) + ["P"] * n_b
    rng.shuffle(symbols)
    return ase.Atoms(symbols, positions=pos, cell=[length] * 3, pbc=True)


def kob_andersen_cluster(seed=1):
    """A non-periodic KA cluster in a box (so that its stress is defined)."""
    atoms = kob_andersen(16, density=1.0, seed=seed)
    atoms.pbc = False
    atoms.center(vacuum=2.0)
    return atoms


def ar_kr_alloy(seed=2):
    atoms = ase.build.bulk("Ar", "fcc", a=5.6, cubic=True) * (2, 2, 2)
    rng = np.random.default_rng(seed)
    numbers = atoms.numbers.copy()
    numbers[rng.choice(len(atoms), 12, replace=False)] = atomic_numbers["Kr"]
    atoms.numbers = numbers
    atoms.rattle(0.1, seed=seed)
    atoms.wrap()
    return atoms


def ar_cluster():
    atoms = ase.cluster.Icosahedron("Ar", noshells=2, latticeconstant=5.4)
    atoms.rattle(0.05, seed=3)
    atoms.center(vacuum=3.0)
    return atoms


# ---------------------------------------------------------------------------- NumPy reference
def lj_phi(p, cutoff):
    def phi(r):
        c6 = (p["sigma"] / r) ** 6
        return 4 * p["epsilon"] * (c6 * c6 - c6)

    def dphi(r):
        c6 = (p["sigma"] / r) ** 6
        return 4 * p["epsilon"] * (-12 * c6 * c6 + 6 * c6) / r

    return lambda r: phi(r) - phi(cutoff), dphi


def morse_phi(p, cutoff):
    def phi(r):
        e = np.exp(-p["alpha"] * (r - p["r0"]))
        return p["D"] * e * (e - 2)

    def dphi(r):
        e = np.exp(-p["alpha"] * (r - p["r0"]))
        return 2 * p["alpha"] * p["D"] * e * (1 - e)

    return lambda r: phi(r) - phi(cutoff), dphi


def soft_sphere_phi(p, cutoff):
    def phi(r):
        x = np.clip(1 - r / p["sigma"], 0.0, None)
        return p["epsilon"] / p["alpha"] * x ** p["alpha"]

    def dphi(r):
        x = np.clip(1 - r / p["sigma"], 0.0, None)
        return -p["epsilon"] / p["sigma"] * x ** (p["alpha"] - 1)

    return phi, dphi


def reference(atoms, species, matrices, make_phi, cutoff):
    """Energy, forces and stress of one system by a direct double sum over pairs and images."""
    pos = atoms.get_positions()
    cell = atoms.cell.array
    rows = np.array([species.index(z) for z in atoms.numbers])
    p = {k: np.asarray(m, float)[rows[:, None], rows[None, :]] for k, m in matrices.items()}
    phi, dphi = make_phi(p, cutoff)
    ranges = []
    for k in range(3):
        if atoms.pbc[k]:
            spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell)[:, k])
            n = int(np.ceil(cutoff / spacing)) + 1  # wrapped positions: |Δfrac| < 1
            ranges.append(range(-n, n + 1))
        else:
            ranges.append(range(1))
    n_atoms = len(atoms)
    energy, forces, virial = 0.0, np.zeros((n_atoms, 3)), np.zeros((3, 3))
    for shift in itertools.product(*ranges):
        d = pos[None, :, :] + np.asarray(shift) @ cell - pos[:, None, :]  # r_j + n·cell - r_i
        r = np.linalg.norm(d, axis=-1)
        ok = r < cutoff
        if not any(shift):
            ok &= ~np.eye(n_atoms, dtype=bool)
        rs = np.where(ok, r, cutoff)
        e = np.where(ok, phi(rs), 0.0)
        g = np.where(ok, dphi(rs) / rs, 0.0)  # φ'(r) / r
        energy += 0.5 * e.sum()
        forces += np.einsum("ij,ijk->ik", g, d)
        virial += 0.5 * np.einsum("ij,ija,ijb->ab", g, d, d)
    return energy, forces, virial / atoms.get_volume()


def assert_close(actual, desired, what):
    actual, desired = np.asarray(actual), np.asarray(desired)
    scale = np.max(np.abs(desired))
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def check_batch(model, systems, species, matrices, make_phi, neighbors):
    """Model output on one padded batch of ``systems`` equals the reference, system by system."""
    batch = fd.Batch.from_atoms(systems, max_atoms=sum(map(len, systems)) + 7, max_systems=4)
    if neighbors:
        model = model.with_neighbors(skin=0.4)
        batch = model.attach_neighbors(batch)
    out = model(batch)
    start = 0
    for s, atoms in enumerate(systems):
        e, f, stress = reference(atoms, species, matrices, make_phi, model.cutoff)
        assert abs(e) > 1e-6
        assert_close(out.energy[s], e, f"energy of system {s}")
        assert_close(out.forces[start : start + len(atoms)], f, f"forces of system {s}")
        assert_close(out.stress[s], stress, f"stress of system {s}")
        start += len(atoms)
    assert np.all(np.asarray(out.forces[start:]) == 0.0)
    assert np.all(np.asarray(out.energy[len(systems) :]) == 0.0)


def zs(symbols):
    return [atomic_numbers[s] for s in symbols]


# ---------------------------------------------------------------------------- against NumPy
@pytest.mark.parametrize("neighbors", [False, True], ids=["dense", "neighbors"])
def test_kob_andersen_matches_double_sum(neighbors):
    model = fd.models.LennardJones(
        sigma=KA_SIGMA, epsilon=KA_EPSILON, cutoff=KA_CUTOFF, species=KA_SPECIES
    )
    assert model.species == (28, 15)
    systems = [kob_andersen(), kob_andersen_cluster()]
    assert sorted(set(systems[0].get_chemical_symbols())) == ["Ni", "P"]
    matrices = {"sigma": KA_SIGMA, "epsilon": KA_EPSILON}
    check_batch(model, systems, zs(KA_SPECIES), matrices, lj_phi, neighbors)


@pytest.mark.parametrize("neighbors", [False, True], ids=["dense", "neighbors"])
def test_ar_kr_alloy_and_pure_ar_cluster_match_double_sum(neighbors):
    model = fd.models.LennardJones(
        sigma=ARKR_SIGMA, epsilon=ARKR_EPSILON, cutoff=ARKR_CUTOFF, species=ARKR_SPECIES
    )
    systems = [ar_kr_alloy(), ar_cluster()]
    matrices = {"sigma": ARKR_SIGMA, "epsilon": ARKR_EPSILON}
    check_batch(model, systems, zs(ARKR_SPECIES), matrices, lj_phi, neighbors)


def test_morse_and_soft_sphere_per_pair_match_double_sum():
    systems = [ar_kr_alloy(), ar_cluster()]
    morse = {
        "D": np.array([[0.0104, 0.012], [0.012, 0.014]]),
        "alpha": np.array([[1.3, 1.25], [1.25, 1.2]]),
        "r0": np.array([[3.8, 3.9], [3.9, 4.0]]),
    }
    model = fd.models.Morse(**morse, cutoff=7.0, species=ARKR_SPECIES)
    check_batch(model, systems, zs(ARKR_SPECIES), morse, morse_phi, neighbors=False)
    # σ per pair below the cutoff (the largest σ), non-integer α: zero beyond each σ_ij
    soft = {
        "sigma": np.array([[3.9, 4.1], [4.1, 4.3]]),
        "epsilon": np.array([[0.5, 0.7], [0.7, 0.9]]),
        "alpha": np.array([[2.5, 2.0], [2.0, 2.5]]),
    }
    model = fd.models.SoftSphere(**soft, species=ARKR_SPECIES)
    assert model.cutoff == 4.3
    check_batch(model, systems, zs(ARKR_SPECIES), soft, soft_sphere_phi, neighbors=False)


# ---------------------------------------------------------------------------- construction
def test_lorentz_berthelot_and_geometric_mixing_equal_explicit_matrices():
    sig, eps = {"Ar": 3.405, "Kr": 3.65}, {"Ar": 0.0104, "Kr": 0.014}
    table = {e: (sig[e], eps[e]) for e in sig}
    lb = fd.models.LennardJones.from_pairs(table, mixing="lorentz_berthelot", cutoff=8.5)
    cross_s, cross_e = (sig["Ar"] + sig["Kr"]) / 2, np.sqrt(eps["Ar"] * eps["Kr"])
    explicit = fd.models.LennardJones(
        sigma=[[sig["Ar"], cross_s], [cross_s, sig["Kr"]]],
        epsilon=[[eps["Ar"], cross_e], [cross_e, eps["Kr"]]],
        cutoff=8.5,
        species=("Ar", "Kr"),
    )
    assert lb.species == explicit.species == (18, 36)
    np.testing.assert_array_equal(lb.sigma, explicit.sigma)
    np.testing.assert_array_equal(lb.epsilon, explicit.epsilon)
    batch = fd.Batch.from_atoms([ar_kr_alloy()])
    np.testing.assert_array_equal(lb(batch).energy, explicit(batch).energy)

    geo = fd.models.LennardJones.from_pairs(table, mixing="geometric", cutoff=8.5)
    assert geo.sigma[0, 1] == np.sqrt(sig["Ar"] * sig["Kr"])
    assert geo.epsilon[0, 1] == cross_e

    # an explicit cross pair wins over mixing; keys in any order, by symbol or number
    table[(36, "Ar")] = (3.55, 0.0118)
    mixed = fd.models.LennardJones.from_pairs(table, mixing="lorentz_berthelot", cutoff=8.5)
    np.testing.assert_array_equal(mixed.sigma, ARKR_SIGMA)
    np.testing.assert_array_equal(mixed.epsilon, ARKR_EPSILON)


def test_from_pairs_lists_every_pair_or_says_which_is_missing():
    table = {("Ar", "Ar"): (3.405, 0.0104), ("Kr", "Kr"): (3.65, 0.014)}
    with pytest.raises(ValueError, match=r"no parameters for pair\(s\) \(Ar, Kr\)"):
        fd.models.LennardJones.from_pairs(table, cutoff=8.5)
    with pytest.raises(ValueError, match="twice with different values"):
        fd.models.LennardJones.from_pairs(
            {**table, ("Ar", "Kr"): (3.5, 0.01), ("Kr", "Ar"): (3.6, 0.01)}, cutoff=8.5
        )
    with pytest.raises(ValueError, match="'Qq' in the table is not an element"):
        fd.models.LennardJones.from_pairs({("Ar", "Qq"): (3.4, 0.01)}, cutoff=8.5)
    with pytest.raises(ValueError, match="Morse has no mixing rule"):
        fd.models.Morse.from_pairs(
            {"Ar": (0.01, 1.3, 3.8), "Kr": (0.014, 1.2, 4.0)}, mixing="geometric", cutoff=7.0
        )
    with pytest.raises(ValueError, match="mixing must be one of"):
        fd.models.LennardJones.from_pairs(table, mixing="arithmetic", cutoff=8.5)
    # Soft spheres: α shared as a keyword, σ and ε mixed
    ss = fd.models.SoftSphere.from_pairs(
        {"Ar": {"sigma": 3.4, "epsilon": 1.0}, "Kr": {"sigma": 3.6, "epsilon": 4.0}},
        mixing="lorentz_berthelot",
        alpha=2.0,
    )
    assert ss.sigma == ((3.4, 3.5), (3.5, 3.6)) and ss.cutoff == 3.6
    np.testing.assert_array_equal(ss.epsilon, [[1.0, 2.0], [2.0, 4.0]])


def test_species_order_is_the_matrix_order():
    batch = fd.Batch.from_atoms([ar_kr_alloy()])
    ref = fd.models.LennardJones(
        sigma=ARKR_SIGMA, epsilon=ARKR_EPSILON, cutoff=ARKR_CUTOFF, species=ARKR_SPECIES
    )(batch)
    perm = [1, 0]
    swapped = fd.models.LennardJones(
        sigma=ARKR_SIGMA[perm][:, perm],
        epsilon=ARKR_EPSILON[perm][:, perm],
        cutoff=ARKR_CUTOFF,
        species=("Kr", 18),
    )(batch)
    assert_close(swapped.energy, ref.energy, "energy")
    assert_close(swapped.forces, ref.forces, "forces")


def test_scalar_parameters_with_species_equal_the_plain_model():
    batch = fd.Batch.from_atoms([ar_cluster(), ar_cluster()], max_systems=3)
    plain = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=8.5)
    named = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=8.5, species=("Ar",))
    a, b = plain(batch), named(batch)
    np.testing.assert_array_equal(a.energy, b.energy)
    np.testing.assert_array_equal(a.forces, b.forces)


# ---------------------------------------------------------------------------- unknown elements
def test_unknown_element_is_an_error_naming_element_and_system():
    model = fd.models.LennardJones(
        sigma=ARKR_SIGMA, epsilon=ARKR_EPSILON, cutoff=ARKR_CUTOFF, species=ARKR_SPECIES
    )
    xe = ar_cluster()
    xe.numbers[4] = atomic_numbers["Xe"]
    batch = fd.Batch.from_atoms([ar_kr_alloy(), xe], max_systems=3)
    # eagerly, on the host, before compiling
    with pytest.raises(ValueError, match=r"Xe \(Z=54\) in system slot 1.*species are \(Ar, Kr\)"):
        model(batch)
    # inside jit (as in a fused run): at run time, from the device
    with pytest.raises(RuntimeError, match=r"System slot 1 contains Xe \(Z=54\)"):
        jax.block_until_ready(eqx.filter_jit(lambda m, b: m(b).energy)(model, batch))
    nl_model = model.with_neighbors(skin=0.4)
    nl_batch = nl_model.attach_neighbors(batch)
    with pytest.raises(RuntimeError, match=r"System slot 1 contains Xe \(Z=54\)"):
        jax.block_until_ready(eqx.filter_jit(lambda m, b: m(b).energy)(nl_model, nl_batch))


def test_matrix_without_species_rule():
    # Eager call on a concrete batch with exactly K elements: rows are those elements in
    # increasing atomic number, with a warning; anything else asks for species=.
    alloy = fd.Batch.from_atoms([ar_kr_alloy()])
    model = fd.models.LennardJones(sigma=ARKR_SIGMA, epsilon=ARKR_EPSILON, cutoff=ARKR_CUTOFF)
    with pytest.warns(UserWarning, match=r"rows taken as \(Ar, Kr\)"):
        guessed = model(alloy)
    named = model.__class__(
        sigma=ARKR_SIGMA, epsilon=ARKR_EPSILON, cutoff=ARKR_CUTOFF, species=ARKR_SPECIES
    )(alloy)
    np.testing.assert_array_equal(guessed.energy, named.energy)
    pure = fd.Batch.from_atoms([ar_cluster()])
    with pytest.raises(ValueError, match=r"2x2 matrices without species=.*1 elements \(Ar\)"):
        model(pure)
    with pytest.raises(ValueError, match=r"need species=\(\.\.\.\)"):
        jax.jit(lambda b: model(b).energy)(alloy)


# ---------------------------------------------------------------------------- differentiation
def test_parameter_gradients_and_vmap_over_matrices():
    batch = fd.Batch.from_atoms([ar_kr_alloy(), ar_cluster()], max_systems=3)
    model = fd.models.LennardJones(
        sigma=jnp.asarray(ARKR_SIGMA),
        epsilon=jnp.asarray(ARKR_EPSILON),
        cutoff=ARKR_CUTOFF,
        species=ARKR_SPECIES,
    ).with_images(batch)

    def total(m):
        return jnp.sum(m.energy(batch))

    e, grads = eqx.filter_jit(eqx.filter_value_and_grad(total))(model)
    assert np.all(np.isfinite(grads.sigma)) and np.all(np.isfinite(grads.epsilon))
    # E is linear in every ε_ab: Σ ε_ab dE/dε_ab = E
    np.testing.assert_allclose(np.sum(grads.epsilon * ARKR_EPSILON), e, rtol=1e-12)
    scales = jnp.asarray([0.5, 1.0, 2.0])
    stack = scales[:, None, None] * jnp.asarray(ARKR_EPSILON)
    energies = jax.vmap(lambda eps: eqx.tree_at(lambda m: m.epsilon, model, eps)(batch).energy)(
        stack
    )
    np.testing.assert_allclose(energies, scales[:, None] * model(batch).energy, rtol=1e-12)


def test_soft_sphere_matrix_gradients_are_finite():
    # σ_ij < r for most pairs and α = 2.5: (1 - r/σ)^α is undefined there and must not reach
    # the gradient through the unused branch
    atoms = ase.Atoms("Ar3Kr3", positions=np.random.default_rng(3).uniform(0, 1.5, (6, 3)))
    batch = fd.Batch.from_atoms([atoms], max_atoms=8, max_systems=2)
    model = fd.models.SoftSphere(
        [[0.6, 0.8], [0.8, 1.0]],
        jnp.ones((2, 2)),
        jnp.full((2, 2), 2.5),
        species=ARKR_SPECIES,
    ).with_images(batch)
    _, grads = eqx.filter_jit(eqx.filter_value_and_grad(lambda m: jnp.sum(m.energy(batch))))(model)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
    out = model(batch)
    assert np.isfinite(np.asarray(out.forces)).all()


# ---------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"sigma": [[3.4, -3.5], [-3.5, 3.6]], "epsilon": 0.01, "species": ("Ar", "Kr")},
            r"LennardJones: sigma must be > 0 and finite \(Å\) for every species pair, got "
            r"-3.5 for pair \(Ar, Kr\)",
        ),
        (
            {"sigma": [[3.4, 3.5], [3.55, 3.6]], "epsilon": 0.01, "species": ("Ar", "Kr")},
            "sigma must be a symmetric matrix",
        ),
        (
            {"sigma": ARKR_SIGMA, "epsilon": 0.01, "species": ("Ar", "Kr", "Xe")},
            r"sigma has shape \(2, 2\) but species names 3 elements \(Ar, Kr, Xe\)",
        ),
        (
            {"sigma": ARKR_SIGMA, "epsilon": np.ones((3, 3)) * 0.01},
            "matrices must all have one row per species",
        ),
        ({"sigma": [3.4, 3.6], "epsilon": 0.01}, r"got shape \(2,\)"),
        ({"sigma": 3.4, "epsilon": 0.01, "species": ("Ar", "Ar")}, "each element once"),
        ({"sigma": 3.4, "epsilon": 0.01, "species": ("Ar", "Qq")}, "'Qq' is not an element"),
    ],
)
def test_bad_per_pair_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fd.models.LennardJones(cutoff=8.5, **kwargs)


def test_fused_run_with_species_and_unknown_element_stops_it():
    model = fd.models.LennardJones.from_pairs(
        {"Ar": (3.405, 0.0104), "Kr": (3.65, 0.014)}, mixing="lorentz_berthelot", cutoff=8.5
    )
    relax = fd.FIRE(model, n_steps=3)
    batch = fd.Batch.from_atoms([ar_kr_alloy(), ar_cluster()], max_systems=3)
    out = relax.run(batch)
    assert np.isfinite(np.asarray(out.energy[:2])).all()
    ref = model(out)
    np.testing.assert_allclose(out.forces, ref.forces, rtol=1e-12, atol=1e-14)
    xe = ar_cluster()
    xe.numbers[2] = atomic_numbers["Xe"]
    # compiled before any element is looked at: the run itself stops, naming element and slot
    # (an XLA runtime error carrying Equinox's message)
    with pytest.raises(ValueError, match=r"Xe \(Z=54\) in system slot 1"):
        relax.run(fd.Batch.from_atoms([ar_kr_alloy(), xe], max_systems=3))
