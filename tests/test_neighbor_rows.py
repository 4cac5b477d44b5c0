"""Per-atom rows of a half neighbor list and the pair potentials' explicit forces on them.

A half list allocated for a pair potential also keeps, for every atom, a row of all its
neighbors (``NeighborList.row_receivers``, docs/models.md "Neighbor lists"); the potentials then
sum pair forces along the rows instead of differentiating the half list's energy. These tests
hold the rows path to the half-list path (``max_neighbors=0``) and to the dense path, in
float64 (conftest), and check what the rows add: sums that do not depend on the row width or on
the other systems, bit for bit; an overflow of the rows that is loud and regrown; one refresh
of the list per fused step.
"""

from __future__ import annotations

import dataclasses
import json

import ase
import ase.build
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.cluster import Icosahedron

import fused_dynamics as fd
from fused_dynamics.models import cell_list
from fused_dynamics.models.neighbors import NeighborList

LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.5)
SKIN = 0.5


def systems(seed=0):
    """Argon: a strained rattled crystal (cell thinner than twice the cutoff: image pairs), a
    one-atom cell (its atom's own images only), an icosahedral cluster, a slab periodic in x, y."""
    rng = np.random.default_rng(seed)
    crystal = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    crystal.set_cell(crystal.cell[:] @ (np.eye(3) + rng.uniform(-0.06, 0.06, (3, 3))), True)
    crystal.rattle(0.1, seed=seed + 1)
    prim = ase.build.bulk("Ar", "fcc", a=5.26)
    ico = Icosahedron("Ar", 2).copy()
    ico.rattle(0.1, seed=seed + 2)
    slab = ase.build.fcc111("Ar", (3, 3, 3), a=5.26, vacuum=4.0)
    slab.pbc = (True, True, False)
    slab.rattle(0.1, seed=seed + 3)
    return [crystal, prim, ico, slab]


def without_rows(batch):
    """The same list with no per-atom rows: the half-list (automatic differentiation) path."""
    nl = batch.neighbors
    return batch.replace(
        neighbors=dataclasses.replace(
            nl, row_receivers=nl.row_receivers[:, :0], row_shifts=nl.row_shifts[:, :0]
        )
    )


def assert_outputs_close(got, ref):
    # The same float64 pair terms added in another order (rows against scatter-adds or dense
    # blocks): agreement to rounding, ~1e-15 relative here. The bounds (1e-12 relative for
    # energies and forces, 1e-10 for the ~1e-4 eV/Å³ stresses) still catch one missed pair.
    scale = float(np.max(np.abs(ref.forces)))
    np.testing.assert_allclose(got.forces, ref.forces, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(got.energy, ref.energy, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.stress, ref.stress, rtol=1e-10, atol=1e-16)


def test_rows_equal_half_list_and_dense_path():
    batch = fd.Batch.from_atoms(systems(), max_atoms=140, max_systems=5)
    model = LJ.with_neighbors(skin=SKIN)
    with_nl = model.attach_neighbors(batch)
    nl = with_nl.neighbors
    assert nl.half and nl.max_neighbors > 0 and not bool(nl.overflow)
    # every pair of the half list appears twice in the rows, once from each end
    assert int(jnp.sum(nl.row_receivers < batch.max_atoms)) == 2 * int(nl.n_pairs)
    got = model(with_nl)
    assert_outputs_close(got, model(without_rows(with_nl)))
    assert_outputs_close(got, LJ.with_images(batch)(batch))


def test_rows_with_per_species_parameters():
    rng = np.random.default_rng(5)
    mixed = ase.build.bulk("Ar", "fcc", a=5.4, cubic=True) * (2, 2, 2)
    mixed.symbols[rng.choice(len(mixed), 12, replace=False)] = "Kr"
    mixed.rattle(0.1, seed=6)
    table = {"Ar": (3.405, 0.0104), "Kr": (3.65, 0.0140)}
    lj = fd.models.LennardJones.from_pairs(table, mixing="lorentz_berthelot", cutoff=6.5)
    batch = fd.Batch.from_atoms([mixed, systems()[2]])
    model = lj.with_neighbors(skin=SKIN)
    with_nl = model.attach_neighbors(batch)
    got = model(with_nl)
    assert_outputs_close(got, model(without_rows(with_nl)))
    assert_outputs_close(got, lj.with_images(batch)(batch))


def test_row_sums_do_not_depend_on_the_width_or_the_other_systems():
    """A system's energy, forces and stress are the same bits whatever the row width M (set by
    the densest atom of the batch) and whoever shares the batch (docs/semantics.md §21)."""
    crystal, _, ico, slab = systems(1)
    model = LJ.with_neighbors(skin=SKIN)
    alone = fd.Batch.from_atoms([ico], max_atoms=140, max_systems=3)
    alone = model.attach_neighbors(alone)
    wide = model.attach_neighbors(alone, max_neighbors=alone.neighbors.max_neighbors + 37)
    ref, got = model(alone), model(wide)
    for field in ("energy", "forces", "stress"):
        assert np.array_equal(getattr(ref, field), getattr(got, field)), field
    # the cluster in slot 2 behind a denser crystal and a slab: a wider row, other atom indices
    shared = model.attach_neighbors(
        fd.Batch.from_atoms([crystal, slab, ico], max_atoms=200, max_systems=3)
    )
    assert shared.neighbors.max_neighbors != alone.neighbors.max_neighbors
    out = model(shared)
    n = len(ico)
    start = len(crystal) + len(slab)
    assert np.array_equal(out.forces[start : start + n], ref.forces[:n])
    assert np.array_equal(out.energy[2], ref.energy[0])
    assert np.array_equal(out.stress[2], ref.stress[0])


def test_the_lists_of_a_sharded_batch_share_one_row_width():
    """A sharded batch keeps one list per device, stacked into one array per field (one
    program for every device, docs/semantics.md §21): the devices' lists are measured each on
    its own local batch and all built as wide as the widest needs, rows included. Here device
    0 holds a dense crystal and device 1 a sparse cluster; each device's sums are the bits of
    its own list alone (the row sums do not depend on the width)."""
    from fused_dynamics import sharding

    crystal, _, ico, _ = systems(4)
    model = LJ.with_neighbors(skin=SKIN)
    locals_ = [
        jax.device_get(fd.Batch.from_atoms([a], 40, 2, max_atoms_per_system=32))
        for a in (crystal, ico)
    ]
    own = [model.attach_neighbors(b).neighbors.max_neighbors for b in locals_]
    assert own[0] != own[1]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *locals_)
    stacked = sharding.attach_neighbors(model, stacked)
    rows = stacked.neighbors.row_receivers
    assert rows.shape[:2] == (2, 40) and rows.shape[2] == max(own)
    for k, local in enumerate(locals_):
        ref = model(model.attach_neighbors(local))
        mine = jax.tree_util.tree_map(lambda x, k=k: jnp.asarray(x[k]), stacked)
        got = model(mine)
        for field in ("energy", "forces", "stress"):
            assert np.array_equal(getattr(got, field), getattr(ref, field)), (k, field)


def _as_written_before_rows(src, dst, fused):
    """Rewrite checkpoint ``src`` as the version before per-atom rows wrote it: the list has
    no ``row_receivers``, ``row_shifts``, ``excluded_ids`` (added later still) or
    ``refreshed``, and ``needed`` holds 4 entries."""
    from fused_dynamics import checkpoint as ckpt

    header, batch = ckpt.load(src, fused)
    flat, _ = jax.tree_util.tree_flatten_with_path(batch)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    layout = header["layout"]
    leaves, shapes = [], []
    for name, (_, x), shape in zip(names, flat, layout["leaves"], strict=True):
        x = np.asarray(x)
        if name.endswith(("row_receivers", "row_shifts", "excluded_ids")):
            continue
        if name.endswith("neighbors.needed"):
            x = x[..., :4]
            shape = [list(x.shape), str(x.dtype)]
        leaves.append(x)
        shapes.append(shape)
    layout["leaves"] = shapes
    spec = layout["neighbors"]
    old = ("row_receivers", "row_shifts", "excluded_ids")
    spec["arrays"] = [a for a in spec["arrays"] if a not in old]
    spec["static"].pop("refreshed")
    text = json.dumps(header, sort_keys=True).encode()
    with open(dst, "wb") as f:
        f.write(f"{ckpt.FORMAT} {ckpt.VERSION} {len(text)}\n".encode())
        f.write(text)
        eqx.tree_serialise_leaves(f, leaves)


def test_a_checkpoint_written_before_rows_resumes_without_them(tmp_path):
    """A run checkpointed by a version whose lists had no per-atom rows resumes: the list is
    read with no rows (the half-list path, what that version computed) and the run continues
    to what the same checkpoint gives with rows, to rounding (1e-9 Å after 20 NVE steps: the
    two paths add the same pair terms in other orders, 1e-15 relative per step)."""
    model = LJ.with_neighbors(skin=SKIN)
    batch = model.attach_neighbors(fd.Batch.from_atoms(systems(5)))
    fused = fd.FusedStage([fd.NVE(model, dt=2.0, n_steps=30)])
    path, old = tmp_path / "run.ckpt", tmp_path / "old.ckpt"
    run = fused.start(batch, refill_frequency=10, checkpoint=path, checkpoint_every=10)
    while run.step_count < 10:
        run.advance()
    run.advance()
    _as_written_before_rows(path, old, fused)
    ref = fused.run(resume=path)
    got = fused.run(resume=old)
    assert got.neighbors.max_neighbors == 0 and ref.neighbors.max_neighbors > 0
    assert int(got.step_count) == int(ref.step_count) == 30
    np.testing.assert_allclose(got.positions, ref.positions, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.energy, ref.energy, rtol=1e-10)


def test_rows_overflow_is_loud_and_the_run_regrows_them():
    batch = fd.Batch.from_atoms(systems(2)[:1] + systems(2)[2:3])
    model = LJ.with_neighbors(skin=SKIN)
    ref_batch = model.attach_neighbors(batch)
    most = int(ref_batch.neighbors.needed[cell_list._ROWS])
    short = model.attach_neighbors(batch, max_neighbors=most - 5)
    assert bool(short.neighbors.overflow), "an atom with more neighbors than the row holds"
    out = model(short)
    assert np.all(np.isnan(out.energy[:2])) and np.all(np.isnan(out.forces[: batch.n_atoms[0]]))
    grown = short.neighbors.grown()
    assert grown.max_neighbors >= most and grown.capacity >= short.neighbors.capacity
    fused = fd.FusedStage([fd.NVE(model, dt=2.0, n_steps=20)])
    ref = fused.run(ref_batch)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        again = fused.run(short)
    assert not bool(again.neighbors.overflow) and again.neighbors.max_neighbors >= most
    # the rows' sums do not depend on their width, so the rerun is the same trajectory
    np.testing.assert_array_equal(again.positions, ref.positions)
    np.testing.assert_array_equal(again.velocities, ref.velocities)


def test_full_lists_keep_no_rows():
    batch = fd.Batch.from_atoms(systems()[2:3])
    full = NeighborList.allocate(batch, 6.5, SKIN)
    assert not full.half and full.max_neighbors == 0
    with pytest.raises(ValueError, match="max_neighbors"):
        NeighborList.empty(batch, 6.5, SKIN, 100, max_neighbors=8)
    with pytest.raises(ValueError, match="max_neighbors"):
        NeighborList.allocate(batch, 6.5, SKIN, half=True, max_neighbors=-1)


def test_gradient_through_the_rows_equals_the_half_list():
    """The explicit forces are differentiable: d(sum F^2)/d epsilon and d/d positions through
    the rows equal the second derivatives of the half list's energy."""
    batch = fd.Batch.from_atoms(systems(3)[:3])
    with_nl = LJ.with_neighbors(skin=SKIN).attach_neighbors(batch)
    half = without_rows(with_nl)

    def loss(eps, pos, b):
        model = dataclasses.replace(LJ, epsilon=eps).with_neighbors(skin=SKIN)
        return jnp.sum(model(b.replace(positions=pos), stress=False).forces ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    g_rows = grad(jnp.asarray(0.0104), with_nl.positions, with_nl)
    g_half = grad(jnp.asarray(0.0104), half.positions, half)
    # second derivatives summed in other orders: rounding, 1e-10 relative to their scale
    for a, b in zip(g_rows, g_half, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * float(np.max(np.abs(b))))


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _has_sort(jaxpr) -> bool:
    return any(
        eqn.primitive.name == "sort" or any(_has_sort(j) for j in _sub_jaxprs(eqn))
        for eqn in jaxpr.eqns
    )


def _rebuild_conds(jaxpr) -> int:
    """Number of ``lax.cond`` equations that can rebuild a list (a branch sorts pairs)."""
    count = 0
    for eqn in jaxpr.eqns:
        subs = list(_sub_jaxprs(eqn))
        if eqn.primitive.name == "cond" and any(_has_sort(j) for j in subs):
            count += 1
        else:
            count += sum(_rebuild_conds(j) for j in subs)
    return count


def test_fused_step_refreshes_the_list_once():
    """The fused step refreshes the list and hands it to the model marked ``refreshed``: the
    model's own refresh does not add a second rebuild (its check and its code) to the step."""
    model = LJ.with_neighbors(skin=SKIN)
    batch = model.attach_neighbors(fd.Batch.from_atoms(systems()[2:3]))
    fused = fd.FusedStage([fd.NVE(model, dt=2.0)])
    state = fused.init(batch)
    assert _rebuild_conds(jax.make_jaxpr(fused.step)(state).jaxpr) == 1
    # the model on its own refreshes its list
    assert _rebuild_conds(jax.make_jaxpr(lambda b: model(b, stress=False))(batch).jaxpr) == 1
