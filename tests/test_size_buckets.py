"""Size buckets of the blocked dense kernel (docs/models.md, "Size buckets"): the fitting rule,
energies, forces and stress equal to an independent sum over ASE's neighbor list (float64,
1e-12), each system bitwise the same alone as beside others under the same buckets, a system
with no place in its bucket failed alone with ``SIZE_BUCKET_FULL``, and a fixed batch's run
fitting them itself."""

from __future__ import annotations

import ase
import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron
from ase.neighborlist import neighbor_list

import fused_dynamics as fd
from fused_dynamics.models import pair_sums
from fused_dynamics.models.blocked import dense_layout, fit_size_buckets

jax.config.update("jax_enable_x64", True)

SIGMA, EPSILON, CUTOFF = 3.405, 0.0104, 5.0


def _structures():
    """Sizes over 1, 2 and 3 tiles of a 108-atom block (tiles of 36): clusters of 13 and 55,
    a periodic fcc crystal of 108 atoms (no image within the cutoff) and a small triclinic
    cell of 4 atoms (image shifts along every lattice vector)."""
    rng = np.random.default_rng(5)

    def rattled(atoms):
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        return atoms

    small = rattled(Icosahedron("Ar", noshells=2, latticeconstant=5.26))
    medium = rattled(Icosahedron("Ar", noshells=3, latticeconstant=5.26))
    crystal = rattled(bulk("Ar", "fcc", a=5.26, cubic=True) * (3, 3, 3))
    cell = np.array([[4.6, 0.0, 0.0], [1.1, 4.8, 0.0], [0.6, -0.8, 5.0]])
    basis = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    tri = rattled(ase.Atoms("Ar4", scaled_positions=basis, cell=cell, pbc=True))
    return [small, medium, crystal, tri, small.copy()]


def _reference(atoms):
    """Energy, forces and stress of LJ (hard cut) over ASE's pairs, in NumPy."""
    i, j, d = neighbor_list("ijD", atoms, CUTOFF)
    r = np.linalg.norm(d, axis=1)
    c6 = (SIGMA / r) ** 6
    phi = 4 * EPSILON * (c6 * c6 - c6)
    dphi = 4 * EPSILON * (-12 * c6 * c6 + 6 * c6) / r
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, i, (dphi / r)[:, None] * d)
    stress = None
    if atoms.pbc.all():
        stress = 0.5 * np.einsum("k,ka,kb->ab", dphi / r, d, d) / atoms.get_volume()
    return 0.5 * phi.sum(), forces, stress


def _model(**kwargs):
    return fd.models.LennardJones(
        sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, shift=False, **kwargs
    )


@pytest.fixture(scope="module")
def mixed():
    """The structures in one batch, the model with buckets fitted to it, and its results in the
    blocked layout (forced: the triclinic cell's image shifts would choose the atom rows)."""
    systems = _structures()
    batch = fd.Batch.from_atoms(systems, max_systems=len(systems) + 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pair_sums, "dense_layout", lambda *capacities: "blocks")
        model = _model().prepare(batch).with_size_buckets(batch)
        yield systems, batch, model, model(batch)


def _system(batch, out, slot):
    sel = np.asarray(batch.system_idx) == slot
    return np.asarray(out.energy)[slot], np.asarray(out.forces)[sel], np.asarray(out.stress)[slot]


def test_fitted_buckets_group_the_sizes_by_the_tiles_they_fill(mixed):
    _, _, model, _ = mixed
    # tiles of 36 atom slots: 13 and 4 atoms fill one (3 systems), 55 two, 108 three
    assert model.size_buckets == ((36, 3), (72, 1), (108, 1))


def test_fitting_rule():
    # W1's mix: 32 clusters of 55 atoms (2 tiles of 32) and 32 crystals of 256 (8 tiles)
    assert fit_size_buckets([55] * 32 + [256] * 32, 256) == ((64, 32), (256, 32))
    # one size, or sizes that fill the same tiles: nothing to save
    assert fit_size_buckets([256] * 8, 256) is None
    assert fit_size_buckets([250, 256, 231], 256) is None
    # a saving below the threshold keeps one bucket: 1 small system beside 7 large
    assert fit_size_buckets([55] + [256] * 7, 256) is None
    assert fit_size_buckets([55] * 4 + [256] * 4, 256, max_buckets=1) is None
    with pytest.raises(ValueError, match="max_atoms_per_system=256"):
        fit_size_buckets([300], 256)
    # the layout counts the pairs of each bucket: the buckets make the blocks the cheaper
    buckets = ((64, 32), (256, 32))
    assert dense_layout(64, 32 * 55 + 32 * 256, 256, 0) == "blocks"
    assert dense_layout(64, 32 * 55 + 32 * 256, 256, 0, buckets) == "blocks"
    assert dense_layout(64, 32 * 55 + 32 * 256, 256, 26) == "rows"


@pytest.mark.parametrize("slot", range(5))
def test_equals_a_sum_over_ases_pairs(mixed, slot):
    # Float64, the same pairs summed in another order: agreement to rounding, 1e-12 absolute.
    systems, batch, _, out = mixed
    energy, forces, stress = _system(batch, out, slot)
    ref_energy, ref_forces, ref_stress = _reference(systems[slot])
    assert abs(ref_energy) > 1e-3
    np.testing.assert_allclose(energy, ref_energy, rtol=0, atol=1e-12)
    np.testing.assert_allclose(forces, ref_forces, rtol=0, atol=1e-12)
    if ref_stress is not None:
        np.testing.assert_allclose(stress, ref_stress, rtol=0, atol=1e-12)


def test_a_system_beside_others_is_bitwise_the_same_as_alone(mixed):
    """A system's bucket follows from its own size, so alone (same capacities, same buckets)
    its sums run over the same tiles in the same order."""
    systems, batch, model, out = mixed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pair_sums, "dense_layout", lambda *capacities: "blocks")
        for slot, atoms in enumerate(systems):
            alone = fd.Batch.from_atoms(
                [atoms],
                max_atoms=batch.max_atoms,
                max_systems=batch.max_systems,
                max_atoms_per_system=batch.max_atoms_per_system,
            )
            got = _system(alone, model(alone), 0)
            for u, v in zip(got, _system(batch, out, slot), strict=True):
                np.testing.assert_array_equal(u, v)


@pytest.mark.slow
def test_a_system_without_a_place_fails_alone():
    systems = _structures()
    batch = fd.Batch.from_atoms(systems)
    # room for two of the three one-tile systems: the third (slot 4, in slot order) has none
    model = _model(size_buckets=((36, 2), (72, 1), (108, 1))).prepare(batch)
    with pytest.raises(ValueError, match=r"size_buckets\[0\] = \(36, 2\) holds 2 systems"):
        model.check_batch(batch)
    out = model(batch)
    energy = np.asarray(out.energy)
    assert np.isnan(energy[4]) and np.all(np.isfinite(energy[:4]))
    full = _model(size_buckets=()).prepare(batch)(batch)
    np.testing.assert_allclose(energy[:4], np.asarray(full.energy)[:4], rtol=0, atol=1e-12)
    faults = np.asarray(model.system_faults(batch))
    assert list(faults) == [0, 0, 0, 0, int(fd.Failure.SIZE_BUCKET_FULL)]
    # in a compiled run (no host-side check under jit): FAILED with that reason, others run
    fire = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(0.05))
    final = jax.jit(lambda b: fire.run(b, n_steps=3))(batch)
    failure = np.asarray(final.info["failure"])
    assert failure[4] & int(fd.Failure.SIZE_BUCKET_FULL)
    assert np.all(failure[:4] == 0)
    assert np.asarray(final.info["exit_reason"])[4] == int(fd.ExitReason.FAILED)


def test_a_fixed_batch_run_fits_the_buckets_and_matches_one_bucket():
    """``run`` fits size buckets to a fixed batch of mixed sizes; the relaxation is the same as
    with one bucket (``size_buckets=()``) to rounding: both sum the same pairs."""
    systems = _structures()[:3] + [_structures()[0].copy() for _ in range(3)]
    batch = fd.Batch.from_atoms(systems)
    fire = fd.FIRE(_model(), convergence_hook=fd.ConvergenceHook.from_fmax(0.05))
    fitted, _ = fd.live.fit_to_batch(fd.FusedStage([(0, fire)]), batch)
    assert fitted.model.size_buckets == ((36, 4), (72, 1), (108, 1))
    one = fd.FIRE(_model(size_buckets=()), convergence_hook=fd.ConvergenceHook.from_fmax(0.05))
    a, b = fire.run(batch, n_steps=40), one.run(batch, n_steps=40)
    np.testing.assert_allclose(np.asarray(a.energy), np.asarray(b.energy), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(a.positions), np.asarray(b.positions), atol=1e-10)


def test_bad_buckets_are_refused_by_name():
    for bad, match in [
        (((64, 2), (32, 4)), "increasing atoms"),
        (((64, 0),), r"size_buckets\[0\] slots"),
        (((64,),), "pairs"),
        (64, "pairs"),
    ]:
        with pytest.raises(ValueError, match=match):
            _model(size_buckets=bad)


def test_an_inflight_run_refuses_size_buckets_before_compiling():
    sampler = fd.SizeAwareSampler(_structures(), max_atoms=200, max_systems=3)
    fire = fd.FIRE(
        _model(size_buckets=((36, 2), (108, 1))),
        convergence_hook=fd.ConvergenceHook.from_fmax(0.05),
    )
    with pytest.raises(ValueError, match="size buckets are for fixed batches"):
        fire.run(sampler=sampler, sinks=[fd.HostMemory()])


def test_a_bucket_wider_than_the_block_pairs_every_tile_once(mixed):
    """A last bucket of more atoms than the batch's capacity A (500 > 108) pairs the block's own
    tiles, never a tile twice: the same results as the fitted buckets."""
    systems, batch, _, out = mixed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pair_sums, "dense_layout", lambda *capacities: "blocks")
        wide = _model(size_buckets=((36, 3), (72, 1), (500, 1))).prepare(batch)(batch)
    for got, want in ((wide.energy, out.energy), (wide.forces, out.forces)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)


def test_fitting_reads_the_layout_on_the_host_even_under_jit():
    """A differentiable run traces the positions, not the layout: the buckets are still fitted
    from the concrete layout (NumPy, not staged ``jnp``); a traced layout keeps one bucket."""
    batch = fd.Batch.from_atoms(_structures())
    model, seen = _model(), []

    @jax.jit
    def positions_traced(positions):
        seen.append(model.with_size_buckets(batch.replace(positions=positions)).size_buckets)
        return positions

    @jax.jit
    def all_traced(b):
        seen.append(model.with_size_buckets(b).size_buckets)
        return b.positions

    positions_traced(batch.positions)
    all_traced(batch)
    assert seen == [((36, 3), (72, 1), (108, 1)), None]


def test_the_buckets_share_one_copy_of_the_pair_arithmetic(mixed, monkeypatch):
    """The tile pairs of every bucket are the rows of one kernel (docs/models.md, "Size
    buckets"): tracing the model with three buckets calls ``pair_energy`` as often as with one
    bucket (twice: the minimum image and the image shifts of the triclinic cell), not once per
    bucket, so a bucket adds index arithmetic to the compiled program, not a copy of the
    pairs and their derivative."""
    _, batch, model, _ = mixed
    calls = []
    pair_energy = type(model).pair_energy

    def counted(self, *args):
        calls.append(1)
        return pair_energy(self, *args)

    monkeypatch.setattr(pair_sums, "dense_layout", lambda *capacities: "blocks")
    monkeypatch.setattr(type(model), "pair_energy", counted)
    assert len(model.size_buckets) == 3
    jax.make_jaxpr(lambda b: model(b).forces)(batch)
    with_buckets = len(calls)
    calls.clear()
    one = _model(size_buckets=()).prepare(batch)
    jax.make_jaxpr(lambda b: one(b).forces)(batch)
    assert with_buckets == len(calls) == 2


def test_species_parameters_in_buckets_equal_one_bucket():
    """Per-species-pair parameters through the buckets' kernel: each system's energy, forces and
    stress equal those of one bucket (the same pairs, each slot's tiles in the same order) to
    1e-12 in float64, on the structures above with every other atom made Kr."""
    systems = [a.copy() for a in _structures()]
    for atoms in systems:
        atoms.numbers[1::2] = 36
    batch = fd.Batch.from_atoms(systems, max_systems=len(systems) + 1)
    params = dict(
        sigma=[[3.405, 3.5], [3.5, 3.65]],
        epsilon=[[0.0104, 0.0123], [0.0123, 0.0140]],
        cutoff=CUTOFF,
        shift=False,
        species=("Ar", "Kr"),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pair_sums, "dense_layout", lambda *capacities: "blocks")
        bucketed = fd.models.LennardJones(**params).prepare(batch).with_size_buckets(batch)
        assert len(bucketed.size_buckets) == 3
        one = fd.models.LennardJones(**params, size_buckets=()).prepare(batch)
        a, b = bucketed(batch), one(batch)
    for slot in range(len(systems)):
        for u, v in zip(_system(batch, a, slot), _system(batch, b, slot), strict=True):
            np.testing.assert_allclose(u, v, rtol=0, atol=1e-12)
    assert np.ptp(np.asarray(a.energy)[: len(systems)]) > 1e-3  # distinct systems, not zeros
