"""Multi-species pair potentials (LennardJones, Morse, SoftSphere with ``species=``) against JAX-MD.

JAX-MD (Schoenholz & Cubuk, NeurIPS 2020) is run directly on each system with its static-species
pair sums (``energy.lennard_jones_pair(displacement, species=array, sigma=matrix, ...)`` and the
like): energy, forces ``-jax.grad`` (w.r.t. fractional positions, which JAX-MD's
``space.transform`` turns into the real-space gradient) and ``quantity.stress``, which is
``-(1/V) dU/dε`` (opposite sign to ASE's convention used here). Periodic systems use
``space.periodic_general(cell.T, fractional_coordinates=True)`` (minimum image: every cell here has
lattice-plane spacings > 2 cutoff), the cluster ``space.free()``.

Conventions matched:

- JAX-MD's convenience wrappers pass parameters through ``util.maybe_downcast``, which turns
  Python floats and NumPy arrays into **float32** even with x64 enabled (only jnp float64 arrays
  stay float64): every parameter, ``r_onset`` and ``r_cutoff`` included, is given as a jnp
  float64 array here (with NumPy matrices the two sides differ by ~1e-7).
- JAX-MD's Lennard-Jones multiplies by a C¹ switch in r² between ``r_onset`` and ``r_cutoff``,
  both given in units of the *largest* sigma of the matrix; the repository's
  ``LennardJones(switch_onset=...)`` uses the same switch with absolute distances, so the model
  gets ``cutoff = r_cutoff * max(sigma)`` and ``switch_onset = r_onset * max(sigma)``.
- JAX-MD's ``morse_pair`` also multiplies by that r² switch, the repository's ``Morse`` switch is
  ASE's quintic one: they are different functions. Compared instead: ``Morse(shift=False)`` with
  JAX-MD's ``energy.morse`` (``sigma`` = r0, ``epsilon`` = D) under a hard cutoff through
  JAX-MD's species machinery (``smap.pair``).
- JAX-MD's ``soft_sphere_pair`` is zero beyond each pair's sigma, as ``SoftSphere`` with a sigma
  matrix.

Both sides sum the same float64 terms in different orders: agreement to rounding (measured
~1e-15); ``RTOL = 1e-10`` (relative to the largest entry) catches a wrong pair parameter (a change
of order 1e-2).

Systems, in Å / eV: a Kob–Andersen 80:20 binary LJ liquid (Kob & Andersen, PRE 51, 4626 (1995))
with σ_AA = 3.405 Å and ε_AA = 0.0104 eV, its species labelled Ni (A) and P (B); an fcc Ar/Kr
alloy with Lorentz–Berthelot cross parameters; a small Ar/Kr cluster without a cell; an empty slot.
One model with species (Ni, P, Ar, Kr) serves them all (cross pairs of the two families never
occur, they are filled by the mixing rule).
"""

import functools
import itertools

import jax

jax.config.update("jax_enable_x64", True)

import ase  # noqa: E402
import ase.build  # noqa: E402
import ase.cluster  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax_md = pytest.importorskip("jax_md")
from jax_md import energy, quantity, smap, space  # noqa: E402

import fused_dynamics as fd  # noqa: E402

RTOL = 1e-10

ORDER = ("Ni", "P", "Ar", "Kr")  # rows of the JAX-MD matrices (not the model's order)
Z = {"Ni": 28, "P": 15, "Ar": 18, "Kr": 36}
SIGMA_A, EPS_A = 3.405, 0.0104
KA = {  # Kob-Andersen in units of σ_AA, ε_AA
    ("Ni", "Ni"): (1.0 * SIGMA_A, 1.0 * EPS_A),
    ("Ni", "P"): (0.8 * SIGMA_A, 1.5 * EPS_A),
    ("P", "P"): (0.88 * SIGMA_A, 0.5 * EPS_A),
}
ARKR = {("Ar", "Ar"): (3.405, 0.0104), ("Kr", "Kr"): (3.65, 0.014)}
MAX_SIGMA = 3.65
# JAX-MD's r_onset / r_cutoff are in units of the largest sigma: 2 and 2.5 σ_AA of the liquid
R_ONSET, R_CUTOFF = 2.0 * SIGMA_A / MAX_SIGMA, 2.5 * SIGMA_A / MAX_SIGMA
ONSET, CUTOFF = R_ONSET * MAX_SIGMA, R_CUTOFF * MAX_SIGMA  # as JAX-MD computes them, Å


def lorentz_berthelot():
    """(σ, ε) matrices in ORDER: the listed pairs, every other pair mixed from the diagonal."""
    table = {**KA, **ARKR}
    k = len(ORDER)
    sigma, epsilon = np.zeros((k, k)), np.zeros((k, k))
    for (i, a), (j, b) in itertools.product(enumerate(ORDER), repeat=2):
        if (a, b) in table or (b, a) in table:
            sigma[i, j], epsilon[i, j] = table.get((a, b), table.get((b, a)))
        else:
            (sa, ea), (sb, eb) = table[(a, a)], table[(b, b)]
            sigma[i, j], epsilon[i, j] = 0.5 * (sa + sb), np.sqrt(ea * eb)
    return sigma, epsilon


# ---------------------------------------------------------------------------- structures
def ka_liquid(n=160, density=1.2, seed=0):
    """A cubic periodic KA box (random positions at distances > 0.75 σ_AA), 80 % Ni, 20 % P."""
    rng = np.random.default_rng(seed)
    length = (n / density) ** (1 / 3) * SIGMA_A
    pos = []
    while len(pos) < n:
        p = rng.uniform(0.0, length, 3)
        d = np.asarray(pos) - p if pos else np.zeros((0, 3))
        d -= length * np.round(d / length)
        if not len(d) or np.min(np.linalg.norm(d, axis=1)) > 0.75 * SIGMA_A:
            pos.append(p)
    symbols = ["Ni"] * (n - n // 5) + ["P"] * (n // 5)
    rng.shuffle(symbols)
    return ase.Atoms(symbols, positions=pos, cell=[length] * 3, pbc=True)


def ar_kr_alloy(seed=1):
    atoms = ase.build.bulk("Ar", "fcc", a=5.72, cubic=True) * (3, 3, 3)
    rng = np.random.default_rng(seed)
    numbers = atoms.numbers.copy()
    numbers[rng.choice(len(atoms), 30, replace=False)] = Z["Kr"]
    atoms.numbers = numbers
    atoms.rattle(0.15, seed=seed)
    atoms.wrap()
    return atoms


def ar_kr_cluster(seed=2):
    atoms = ase.cluster.Icosahedron("Ar", noshells=2, latticeconstant=5.4)
    atoms.numbers[[1, 5, 9]] = Z["Kr"]
    atoms.rattle(0.1, seed=seed)
    atoms.cell = np.zeros((3, 3))  # no cell: the batch completes it with the identity
    return atoms


@functools.cache
def _systems():
    out = [ka_liquid(), ar_kr_alloy(), ar_kr_cluster()]
    for atoms in out[:2]:
        spacing = 1.0 / np.linalg.norm(np.linalg.inv(atoms.cell.array), axis=0)
        assert spacing.min() > 2 * CUTOFF  # JAX-MD's minimum image is exact
    return out


@pytest.fixture(scope="module")
def systems():
    return _systems()


@pytest.fixture(scope="module")
def batch(systems):
    return fd.Batch.from_atoms(systems, max_systems=4, dtype=jnp.float64)


@pytest.fixture(scope="module")
def listed_batch(batch):
    """The batch with a half neighbor list for the longest cutoff (LJ's), shared by all three
    potentials (a list with ``cutoff >= model.cutoff`` serves any model)."""
    return lj_model().with_neighbors(skin=0.5).attach_neighbors(batch)


# ---------------------------------------------------------------------------- JAX-MD
def jaxmd(atoms, make_energy):
    """Energy, forces and ASE-convention stress of one system, JAX-MD run directly."""
    species = np.array([ORDER.index(ase.data.chemical_symbols[z]) for z in atoms.numbers])
    if atoms.pbc.all():
        box = jnp.asarray(atoms.cell.array.T)  # JAX-MD: columns are lattice vectors
        displacement, _ = space.periodic_general(box, fractional_coordinates=True)
        r = jnp.asarray(atoms.get_scaled_positions(wrap=False))
    else:
        box = jnp.eye(3)  # the batch's cell of a cluster without one (volume 1 Å³)
        displacement, _ = space.free()
        r = jnp.asarray(atoms.positions)
    fn = make_energy(displacement, species)

    @jax.jit
    def evaluate(r, box):
        e, de_dr = jax.value_and_grad(fn)(r)
        return e, -de_dr, -quantity.stress(fn, r, box)  # JAX-MD's stress: -(1/V) dU/dε

    return tuple(np.asarray(x) for x in evaluate(r, box))


def f64(x):
    """JAX-MD's ``maybe_downcast`` makes Python floats and NumPy arrays float32: jnp float64."""
    return jnp.asarray(x, jnp.float64)


def jaxmd_lj(displacement, species):
    sigma, epsilon = lorentz_berthelot()
    return energy.lennard_jones_pair(
        displacement,
        species=species,
        sigma=f64(sigma),
        epsilon=f64(epsilon),
        r_onset=f64(R_ONSET),
        r_cutoff=f64(R_CUTOFF),
    )


MORSE = {  # D (eV), alpha (1/Å), r0 (Å) per pair, ORDER rows
    "D": np.array(
        [
            [0.02, 0.03, 0.01, 0.01],
            [0.03, 0.01, 0.01, 0.01],
            [0.01, 0.01, 0.0104, 0.012],
            [0.01, 0.01, 0.012, 0.014],
        ]
    ),  # fmt: skip
    "alpha": np.array(
        [[1.6, 1.4, 1.0, 1.0], [1.4, 1.2, 1.0, 1.0], [1.0, 1.0, 1.3, 1.25], [1.0, 1.0, 1.25, 1.2]]
    ),  # fmt: skip
    "r0": np.array(
        [[3.8, 3.1, 4.0, 4.0], [3.1, 3.4, 4.0, 4.0], [4.0, 4.0, 3.8, 3.9], [4.0, 4.0, 3.9, 4.1]]
    ),  # fmt: skip
}
MORSE_CUTOFF = 8.0
SOFT = {  # sigma (Å), epsilon (eV) per pair, ORDER rows; alpha 2.5 for all
    "sigma": np.array(
        [[4.2, 3.6, 4.0, 4.0], [3.6, 3.9, 4.0, 4.0], [4.0, 4.0, 4.3, 4.4], [4.0, 4.0, 4.4, 4.6]]
    ),  # fmt: skip
    "epsilon": np.array(
        [[1.0, 1.5, 1.0, 1.0], [1.5, 0.5, 1.0, 1.0], [1.0, 1.0, 0.8, 1.1], [1.0, 1.0, 1.1, 1.3]]
    ),  # fmt: skip
}
SOFT_ALPHA = 2.5


def jaxmd_morse(displacement, species):
    def hard_cutoff_morse(dr, **kwargs):
        return jnp.where(dr < MORSE_CUTOFF, energy.morse(dr, **kwargs), 0.0)

    return smap.pair(
        hard_cutoff_morse,
        space.canonicalize_displacement_or_metric(displacement),
        species=species,
        sigma=f64(MORSE["r0"]),
        epsilon=f64(MORSE["D"]),
        alpha=f64(MORSE["alpha"]),
    )


def jaxmd_soft_sphere(displacement, species):
    return energy.soft_sphere_pair(
        displacement,
        species=species,
        sigma=f64(SOFT["sigma"]),
        epsilon=f64(SOFT["epsilon"]),
        alpha=f64(SOFT_ALPHA),
    )


# ---------------------------------------------------------------------------- models
def lj_model():
    table = {**KA, **{k[0]: v for k, v in ARKR.items()}}  # Ar, Kr as single elements
    return fd.models.LennardJones.from_pairs(
        table, mixing="lorentz_berthelot", cutoff=CUTOFF, switch_onset=ONSET
    )


def morse_model():
    return fd.models.Morse(**MORSE, cutoff=MORSE_CUTOFF, shift=False, species=ORDER)


def soft_sphere_model():
    return fd.models.SoftSphere(**SOFT, alpha=SOFT_ALPHA, species=ORDER)


CASES = {
    "lj": (lj_model, jaxmd_lj),
    "morse": (morse_model, jaxmd_morse),
    "soft_sphere": (soft_sphere_model, jaxmd_soft_sphere),
}


@functools.cache
def jaxmd_reference(potential, slot):
    """JAX-MD's results for a system of the batch, computed once for both paths."""
    return jaxmd(_systems()[slot], CASES[potential][1])


def _rel(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


@pytest.mark.slow
@pytest.mark.parametrize("neighbors", [False, True], ids=["dense", "neighbor_list"])
@pytest.mark.parametrize("potential", list(CASES))
def test_species_pair_potentials_equal_jaxmd(systems, batch, listed_batch, potential, neighbors):
    model = CASES[potential][0]()
    if neighbors:  # the list was just built for these positions: no refresh check needed
        model = model.with_neighbors(skin=0.5, auto_refresh=False)
        batch = listed_batch
    out = model(batch)
    offset = 0
    for slot, atoms in enumerate(systems):
        e, f, s = jaxmd_reference(potential, slot)
        n = len(atoms)
        errors = (
            _rel(out.energy[slot], e),
            _rel(out.forces[offset : offset + n], f),
            _rel(out.stress[slot], s),
        )
        assert max(errors) < RTOL, (slot, errors)
        assert np.abs(f).max() > 1e-4 and abs(e) > 1e-4  # interactions that test something
        offset += n
    assert float(out.energy[3]) == 0.0 and np.all(np.asarray(out.stress[3]) == 0.0)
    assert np.all(np.isfinite(np.asarray(out.forces)))


def test_kob_andersen_equals_a_numpy_double_sum(systems):
    """The switched LJ of the liquid by a direct minimum-image double sum (box > 2 cutoff)."""
    atoms = systems[0]
    sigma, epsilon = lorentz_berthelot()
    rows = np.array([ORDER.index(ase.data.chemical_symbols[z]) for z in atoms.numbers])
    pos, length = atoms.positions, atoms.cell.array[0, 0]
    d = pos[None, :, :] - pos[:, None, :]  # r_j - r_i
    d -= length * np.round(d / length)
    r = np.linalg.norm(d, axis=-1)
    np.fill_diagonal(r, 2 * CUTOFF)  # no self pair (outside the cutoff)
    s, e = sigma[rows[:, None], rows[None, :]], epsilon[rows[:, None], rows[None, :]]
    rc2, ro2, r2 = CUTOFF**2, ONSET**2, r * r
    c6 = (s / r) ** 6
    lj, dlj = 4 * e * (c6 * c6 - c6), 4 * e * (-12 * c6 * c6 + 6 * c6) / r
    switch = np.where(r2 < ro2, 1.0, (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3)
    dswitch = np.where(r2 < ro2, 0.0, 12 * r * (rc2 - r2) * (ro2 - r2) / (rc2 - ro2) ** 3)
    inside = r < CUTOFF
    phi = np.where(inside, lj * switch, 0.0)
    dphi = np.where(inside, dlj * switch + lj * dswitch, 0.0)
    want_e = 0.5 * phi.sum()
    # F_i = -dE/dr_i = sum_j φ'(r_ij) (r_j - r_i) / r_ij
    want_f = np.sum((dphi / r)[:, :, None] * d, axis=1)

    out = lj_model()(fd.Batch.from_atoms([atoms], dtype=jnp.float64))
    assert _rel(out.energy[0], want_e) < RTOL
    assert _rel(out.forces, want_f) < RTOL


def test_an_unknown_element_names_the_element_and_the_system(systems):
    xe = systems[2].copy()
    xe.numbers[0] = 54
    batch = fd.Batch.from_atoms([systems[2], xe], dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"Xe \(Z=54\) in system slot 1"):
        lj_model()(batch)
