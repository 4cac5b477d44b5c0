"""A neighbor-list run where one system's cell collapses: that system fails with its reason and
the others finish as they would without it (docs/failures.md: CELL_TOO_SMALL and
NEIGHBOR_OVERFLOW; docs/neighbors.md: how the list grows).

Before, the list grew for the collapsing system (stencil up to 64 bins, ~10^6 bin offsets)
until its int32 pair codes ran out, and the whole run raised ValueError.
"""

import warnings

import jax
import numpy as np
import pytest
from ase.build import bulk

import fused_dynamics as fd
from fused_dynamics.models import cell_list
from fused_dynamics.models.pair_sums import required_images_host

jax.config.update("jax_enable_x64", True)

# Two systems that do not interact have independent dynamics; the lists of the two runs
# compared differ in capacity and stencil, so their sums run in another order: 1e-9 Å after
# the steps below bounds that round-off (measured: 5e-15 Å and 0). A system that fed the
# others wrong pairs, or lost theirs, would be off by more than 1e-3 Å.
TOL = 1e-9


def _argon(seed):
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=seed)
    return atoms


def _run(model, atoms, pressure, n_steps):
    batch = model.attach_neighbors(fd.Batch.from_atoms(atoms))
    stage = fd.NPT(
        model, dt=2.0, temperature=50.0, pressure=np.asarray(pressure), tdamp=100.0,
        pdamp=200.0, n_steps=n_steps,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stage.run(batch)
    return out, [str(w.message) for w in caught]


def _reasons(out):
    return [fd.ExitReason(int(r)).name for r in np.asarray(out.info["exit_reason"])]


def test_a_collapsing_cell_fails_alone_on_the_neighbor_list_path():
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=5.0).with_neighbors(1.0)
    atoms = [_argon(0), _argon(1), _argon(2)]
    out, _ = _run(lj, atoms, [0.0, 50.0, 0.0], 200)  # 50 eV/Å^3 on system 1: it collapses
    assert _reasons(out) == ["BUDGET", "FAILED", "BUDGET"]
    assert int(out.info["failure"][1]) & int(fd.Failure.CELL_TOO_SMALL)
    assert out.neighbors.stencil == 1  # the list was not grown for the collapsed cell
    alone, _ = _run(lj, [atoms[0], atoms[2]], [0.0, 0.0], 200)
    both = np.asarray(out.positions)[np.asarray(out.system_idx) != 1]
    np.testing.assert_allclose(both, np.asarray(alone.positions), rtol=0, atol=TOL)


def test_a_list_without_int32_codes_fails_the_system_that_asks_it(monkeypatch):
    # rc = 9 Å: under 0.3 eV/Å^3 system 1's cell shrinks below 9 Å and asks a stencil of 2,
    # which a lowered code limit (52,416 codes are needed now) cannot hold; the real limit is
    # 2**31 - 1, reached by large batches
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=8.0).with_neighbors(1.0)
    atoms = [_argon(0), _argon(1), _argon(2)]
    grown, _ = _run(lj, atoms, [0.0, 0.3, 0.0], 100)
    assert _reasons(grown) == ["BUDGET", "BUDGET", "BUDGET"]
    assert grown.neighbors.stencil == 2  # without the limit the list grows for it
    monkeypatch.setattr(cell_list, "PAIR_CODE_LIMIT", 60_000)
    out, messages = _run(lj, atoms, [0.0, 0.3, 0.0], 100)
    assert _reasons(out) == ["BUDGET", "FAILED", "BUDGET"]
    assert int(out.info["failure"][1]) == int(fd.Failure.NEIGHBOR_OVERFLOW)
    assert int(out.info["failure_step"][1]) == 0  # the re-run started from step 0
    assert any("systems [1] fail NEIGHBOR_OVERFLOW" in m for m in messages)
    assert out.neighbors.stencil == 1
    others = np.asarray(out.system_idx) != 1
    np.testing.assert_allclose(
        np.asarray(out.positions)[others], np.asarray(grown.positions)[others], rtol=0, atol=TOL
    )


def test_the_crowding_system_is_the_one_whose_demand_does_not_fit(monkeypatch):
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=8.0).with_neighbors(1.0)
    batch = lj.attach_neighbors(fd.Batch.from_atoms([_argon(0), _argon(1), _argon(2)]))
    squeezed = np.asarray(batch.cell).copy()
    squeezed[2] *= 0.8  # 8.5 Å < rc = 9 Å: a stencil of 2
    out = batch.replace(
        cell=squeezed, positions=batch.positions * np.where(batch.system_idx == 2, 0.8, 1)[:, None]
    )
    nl = batch.neighbors.grown(seen=None)
    assert list(cell_list.crowding_systems(nl, out)) == [False, False, True]  # the largest
    monkeypatch.setattr(cell_list, "PAIR_CODE_LIMIT", 100_000)  # 63 x 96 x 39 does not fit
    assert list(cell_list.crowding_systems(nl, out)) == [False, False, True]  # alone, too
    assert list(cell_list.crowding_systems(nl, out, np.array([1, 1, 0], bool))) == [
        True, False, False,
    ]  # fmt: skip


@pytest.mark.parametrize("scale", [1e-3, 0.0])
def test_thin_and_singular_cells_size_no_range(scale):
    """A thin or singular periodic cell sizes neither the stencil nor the dense image range of
    the batch (it fails CELL_TOO_SMALL in the run); a singular one raised LinAlgError."""
    good = np.asarray(_argon(0).cell)
    thin = good.copy()
    thin[2] *= scale
    cells = np.stack([good, thin])
    pbc = np.ones((2, 3), bool)
    assert cell_list.stencil_for_cells(cells, pbc, 6.0) == 1
    assert cell_list.stencil_for_cells(thin[None], pbc[:1], 6.0) == 1
    assert required_images_host(cells, pbc, 6.0) == required_images_host(good[None], pbc[:1], 6.0)
    spacing, sized = cell_list.periodic_spacing_host(cells, pbc)
    assert list(sized) == [True, False]
    np.testing.assert_allclose(spacing[0], [10.6] * 3)


def test_a_thin_cell_fails_cell_too_small_on_the_neighbor_list_path():
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=5.0).with_neighbors(1.0)
    thin = _argon(1)
    thin.set_cell(np.asarray(thin.cell) * [[1], [1], [1e-3]], scale_atoms=True)
    atoms = [_argon(0), thin]
    batch = lj.attach_neighbors(fd.Batch.from_atoms(atoms))
    assert batch.neighbors.stencil == 1
    out = fd.NVE(lj, dt=1.0, n_steps=5).run(batch)
    assert _reasons(out) == ["BUDGET", "FAILED"]
    assert int(out.info["failure"][1]) & int(fd.Failure.CELL_TOO_SMALL)
    alone = fd.NVE(lj, dt=1.0, n_steps=5).run(lj.attach_neighbors(fd.Batch.from_atoms(atoms[:1])))
    n0 = len(atoms[0])
    np.testing.assert_allclose(
        np.asarray(out.positions)[:n0], np.asarray(alone.positions)[:n0], rtol=0, atol=TOL
    )


def test_excluded_systems_are_matched_per_slot_by_their_id():
    # per slot: a slot refilled with another system is built again, and a replica that shares
    # the id in another slot is not left out (matched across slots, it failed with the other);
    # -1 is an id like any other (the "none" marker is the smallest int32)
    lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=5.0).with_neighbors(1.0)
    batch = lj.attach_neighbors(fd.Batch.from_atoms([_argon(0), _argon(1)], system_ids=[-1, -1]))
    nl = batch.neighbors
    assert not np.asarray(nl.excluded(batch)).any()
    one = nl.excluding(batch, np.array([True, False]))
    assert np.asarray(one.excluded(batch)).tolist() == [True, False]
    both = one.excluding(batch, np.array([False, True]))
    assert np.asarray(both.excluded(batch)).tolist() == [True, True]
    refilled = batch.replace(system_id=batch.system_id.at[0].set(9))
    assert np.asarray(one.excluded(refilled)).tolist() == [False, False]
