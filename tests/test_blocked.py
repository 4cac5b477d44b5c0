"""The blocked dense pair kernel (fused_dynamics/models/blocked.py; docs/models.md, dense path):
energy, forces and stress equal an independent sum over ASE's neighbor list to 1e-12 (float64) on
clusters, slabs, small triclinic cells that need several images and large cells, with per-species
parameters, in both layouts of the dense pairs (blocks and atom rows); a system's results are
bitwise the same whatever its neighbours in a batch of the same capacities (docs/semantics.md,
slot independence)."""

from __future__ import annotations

import ase
import jax
import numpy as np
import pytest
from ase.neighborlist import neighbor_list

import fused_dynamics as fd
from fused_dynamics.models import pair_sums
from fused_dynamics.models.blocked import dense_layout, tile_pairs

jax.config.update("jax_enable_x64", True)

CUTOFF = 5.0
SIGMA = {"Ar": 3.4, "Kr": 3.6}
EPSILON = {"Ar": 0.0104, "Kr": 0.014}


def _structures():
    rng = np.random.default_rng(11)

    def rattled(atoms):
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        return atoms

    # triclinic, fully periodic, shorter than twice the cutoff: images along every vector
    cell = np.array([[4.6, 0.0, 0.0], [1.1, 4.8, 0.0], [0.6, -0.8, 5.0]])
    basis = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    tri = rattled(ase.Atoms("ArKr" * 2, scaled_positions=basis, cell=cell, pbc=True))
    # slab: periodic along x and y only, vacuum along z
    offset = {8.0: 0.0, 10.8: 1.5}  # the second layer over the hollows of the first
    grid = [[x + offset[z], y + offset[z], z] for z in offset for x in (0, 3.1) for y in (0, 2.95)]
    slab = ase.Atoms("Ar5Kr2", positions=grid[:7])
    slab.cell, slab.pbc = [6.2, 5.9, 20.0], [True, True, False]
    slab = rattled(slab)
    # cluster without a cell: a trigonal bipyramid
    tbp = [[0, 0, 0], [3.8, 0, 0], [1.9, 3.29, 0], [1.9, 1.1, 3.1], [1.9, 1.1, -3.1]]
    cluster = rattled(ase.Atoms("Ar4Kr", positions=tbp))
    # cubic cell wider than twice the cutoff: no image within the cutoff
    grid = [[x, y, z] for x in (0, 3.5, 7.0) for y in (0, 5.25) for z in (0, 5.25)]
    big = rattled(ase.Atoms("Kr3Ar9", positions=grid, cell=[10.5] * 3, pbc=True))
    return {"triclinic": tri, "slab": slab, "cluster": cluster, "large cell": big}


def _lj(r, zi, zj):
    sigma = 0.5 * (SIGMA[zi] + SIGMA[zj])
    epsilon = np.sqrt(EPSILON[zi] * EPSILON[zj])
    c6 = (sigma / r) ** 6
    return 4 * epsilon * (c6 * c6 - c6), 4 * epsilon * (-12 * c6 * c6 + 6 * c6) / r


def _reference(atoms):
    """Energy, forces and stress summed over ASE's pairs (both directions) in NumPy."""
    i, j, d = neighbor_list("ijD", atoms, CUTOFF)
    sym = atoms.get_chemical_symbols()
    r = np.linalg.norm(d, axis=1)
    phi, dphi = np.array([_lj(rk, sym[a], sym[b]) for rk, a, b in zip(r, i, j, strict=True)]).T
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, i, (dphi / r)[:, None] * d)
    energy = 0.5 * phi.sum()
    stress = None
    if atoms.pbc.all():
        virial = 0.5 * np.einsum("k,ka,kb->ab", dphi / r, d, d)
        stress = virial / atoms.get_volume()
    return energy, forces, stress


@pytest.fixture(scope="module")
def model():
    table = {z: (SIGMA[z], EPSILON[z]) for z in SIGMA}
    return fd.models.LennardJones.from_pairs(
        table, mixing="lorentz_berthelot", cutoff=CUTOFF, shift=False
    )


@pytest.fixture(scope="module")
def structures():
    return _structures()


@pytest.fixture(scope="module", params=["rows", "blocks"])
def mixed(request, model, structures):
    """Every structure in one batch (with an empty slot and padding atoms) and its results, in
    each layout of the dense pairs (models/blocked.py, ``dense_layout``), forced for the tests
    that use this fixture: the triclinic cell's image shifts would choose the rows for both."""
    systems = list(structures.values())
    # capacities that differ per layout, so that no compiled program is shared between them
    n = sum(map(len, systems)) + (3 if request.param == "rows" else 4)
    batch = fd.Batch.from_atoms(systems, max_atoms=n, max_systems=len(systems) + 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pair_sums, "dense_layout", lambda *capacities: request.param)
        model = model.prepare(batch)
        yield batch, model, model(batch)


def _system(batch, out, slot):
    sel = np.asarray(batch.system_idx) == slot
    return np.asarray(out.energy)[slot], np.asarray(out.forces)[sel], np.asarray(out.stress)[slot]


@pytest.mark.parametrize("name", ["triclinic", "slab", "cluster", "large cell"])
def test_equals_a_sum_over_ases_pairs(mixed, structures, name):
    # Float64, the same pairs summed in another order: agreement to rounding (energies ~0.1 eV,
    # forces ~0.1 eV/Å), 1e-12 absolute.
    batch, model, out = mixed
    slot = list(structures).index(name)
    energy, forces, stress = _system(batch, out, slot)
    ref_energy, ref_forces, ref_stress = _reference(structures[name])
    assert abs(ref_energy) > 1e-3  # the structure has pairs within the cutoff
    np.testing.assert_allclose(energy, ref_energy, rtol=0, atol=1e-12)
    np.testing.assert_allclose(forces, ref_forces, rtol=0, atol=1e-12)
    if ref_stress is not None:
        np.testing.assert_allclose(stress, ref_stress, rtol=0, atol=1e-12)


def test_a_system_beside_others_is_bitwise_the_same_as_alone(model, structures, mixed):
    """Each slot's sums run over its own block: the cluster and the large cell (no image pair)
    and the triclinic cell (image pairs) give the same bits alone in a batch of the same
    capacities as beside the others."""
    batch, model, out = mixed
    systems = list(structures.values())
    for slot, atoms in enumerate(systems):
        alone = fd.Batch.from_atoms(
            [atoms],
            max_atoms=batch.max_atoms,
            max_systems=batch.max_systems,
            max_atoms_per_system=batch.max_atoms_per_system,
        )
        got = _system(alone, model(alone), 0)
        want = _system(batch, out, slot)
        for u, v in zip(got, want, strict=True):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("n_atoms", [1, 5, 32, 55, 256])
def test_tile_pairs_count_every_pair_once(n_atoms):
    tiles = tile_pairs(n_atoms)
    assert tiles.count * tiles.size >= n_atoms
    counts = np.zeros((tiles.count, tiles.count))
    for p, q, w in zip(tiles.first, tiles.second, tiles.weight, strict=True):
        counts[p, q] += w
        counts[q, p] += w
    np.testing.assert_array_equal(counts, np.ones_like(counts))  # i<j once, i=j tile halves


def test_layout_follows_the_fill_of_the_slots():
    """Full slots without image shifts take the blocks (half the pairs of a square), slots that
    are mostly padding or cells that need images the rows (N * A pairs): the choice is a static
    function of the capacities (models/blocked.py, the measured costs by dense_layout)."""
    # 16 slots of 256 atoms, full: 16 * 36 tile pairs * 32^2 < 4096 * 256 * 2.5
    assert dense_layout(16, 4096, 256, 0) == "blocks"
    # an inflight batch sized for 64-atom systems holding ~21 on average (tests/test_inflight.py)
    assert dense_layout(12, 256, 64, 26) == "rows"
    # full slots whose cells need image shifts: the rows form images more cheaply
    assert dense_layout(16, 512, 32, 26) == "rows"
    # one cluster alone
    assert dense_layout(1, 64, 64, 0) == "blocks"


def test_the_self_pair_mask_of_the_blocks_is_no_iota_comparison():
    """Regression (compile time, not a timing): the blocks' self-pair mask built by ``jnp.eye``
    put an iota comparison into a (tile pairs, t, t) fusion that LLVM took 0.3 s to compile,
    a fifth of LLVM's CPU time on the W1 relaxation's program (benchmarks/bench_peers.py);
    the identity comes as a host constant instead (docs/models.md, size buckets). The compiled
    evaluation of full 55-atom blocks has no (t, t) iota left."""
    from ase.cluster import Icosahedron

    systems = [Icosahedron("Ar", noshells=3, latticeconstant=5.26) for _ in range(3)]
    for a in systems:
        a.set_cell([40.0] * 3)
        a.center()
    batch = fd.Batch.from_atoms(systems)
    model = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=7.5).with_images(batch)
    t = tile_pairs(batch.max_atoms_per_system).size
    assert dense_layout(batch.max_systems, batch.max_atoms, batch.max_atoms_per_system, 0) == (
        "blocks"
    )
    hlo = jax.jit(lambda b: model(b).forces).lower(batch).compile().as_text()
    iotas = [line for line in hlo.splitlines() if " iota(" in line and f"[{t},{t}]" in line]
    assert not iotas, iotas


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["rows", "blocks"])
def test_a_float32_fused_relax_then_md_with_image_shifts_compiles_and_runs(layout, monkeypatch):
    """Regression: the blocks' image shifts formed component by component crashed XLA:CPU
    (jax 0.10.1, a segfault while compiling) in this float32 FIRE + NVT run of small Cu cells
    (27 image shifts); the blocks form them as (..., K', 3) arrays, the rows by component."""
    import jax.numpy as jnp
    from ase.build import bulk

    monkeypatch.setattr(pair_sums, "dense_layout", lambda *capacities: layout)
    rng = np.random.default_rng(0)
    systems = []
    for _ in range(4):
        a = bulk("Cu", "fcc", a=3.615, cubic=True) * (2, 2, 2)
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        a.wrap()
        systems.append(a)
    # one more atom slot per layout: no compiled program shared between the two cases
    extra = 0 if layout == "rows" else 1
    batch = fd.Batch.from_atoms(systems, max_atoms=128 + extra, dtype=jnp.float32)
    lj = fd.models.LennardJones(sigma=2.338, epsilon=0.4093, cutoff=5.0, switch_onset=4.5)
    lj = lj.with_images(batch)
    fire = fd.FIRE(lj, n_steps=10, convergence_hook=fd.ConvergenceHook.from_fmax(1.6))
    nvt = fd.NVTLangevin(lj, dt=1.0, temperature=300.0, friction=0.01, seed=0, n_steps=3)
    final = (fire + nvt).run(batch)
    assert np.all(np.isfinite(np.asarray(final.positions)))
    assert int(fd.ExitReason.FAILED) not in np.asarray(final.info["exit_reason"]).tolist()
    # every system left FIRE (converged or spent) and ran its 3 NVT steps
    assert np.asarray(final.info["stage_steps"])[:4, 1].tolist() == [3] * 4
