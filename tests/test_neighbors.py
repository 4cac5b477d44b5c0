"""Batched neighbor lists (fused_dynamics.models.neighbors) against ASE and the dense path.

Pair sets are compared exactly with ``ase.neighborlist.neighbor_list("ijS")``; forces, energies
and stresses of the neighbor-list path against the dense all-pairs path (the reference), in
float64 (conftest). Capacities are given explicitly where several batches share one shape, so
they share one compilation.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import ase
import ase.build
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.cluster import Icosahedron
from ase.neighborlist import neighbor_list

import fused_dynamics as fd
from fused_dynamics.models.neighbors import NeighborList, NeighborListHook

RC = 3.0  # Å, pair-set tests (cutoff + skin below)
SKIN = 0.5
LJ = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.5)
# Forces: both paths sum the same float64 terms φ'(r) in different orders (per atom over the
# block vs per pair with scatter-adds), so they agree to rounding, ~1e-15 eV/Å here; 1e-10 is the
# issue's bound and still catches any missed pair (≥ 1e-6 eV/Å at the cutoff of the shifted LJ).
FORCE_ATOL = 1e-10


# ---------------------------------------------------------------------------- structures
def _random_atoms(n, cell, pbc, rng, unwrap=True):
    atoms = ase.Atoms(["Ar"] * n, cell=cell, pbc=pbc)
    atoms.set_scaled_positions(rng.uniform(0, 1, (n, 3)))
    if unwrap:  # positions outside the cell along periodic directions (as MD leaves them)
        jump = rng.integers(-2, 3, (n, 3)) * np.asarray(pbc)
        atoms.positions += jump @ np.asarray(cell)
    return atoms


def triclinic(rng, n=24):
    cell = 5.0 * (np.eye(3) + rng.uniform(-0.25, 0.25, (3, 3)))
    return _random_atoms(n, cell, True, rng)


def small_cell(rng, n=3):
    """A cell thinner than the cutoff: pairs through several images along every direction."""
    cell = 2.1 * (np.eye(3) + rng.uniform(-0.15, 0.15, (3, 3)))
    return _random_atoms(n, cell, True, rng)


def mixed_pbc(rng, n=18, pbc=(True, False, True)):
    cell = np.diag([4.5, 6.0, 3.4]) + rng.uniform(-0.5, 0.5, (3, 3))
    return _random_atoms(n, cell, pbc, rng)


def cluster(rng, n=16):
    """Non-periodic, no cell (stored with the identity cell)."""
    return ase.Atoms(["Ar"] * n, positions=rng.uniform(0, 6.0, (n, 3)))


KINDS = {
    "triclinic": triclinic,
    "small_cell": small_cell,
    "mixed_pbc": mixed_pbc,
    "slab_z_only": lambda rng: mixed_pbc(rng, pbc=(False, False, True)),
    "cluster": cluster,
}


def ase_pairs(atoms, cutoff):
    i, j, s = neighbor_list("ijS", atoms, cutoff)
    return set(zip(i.tolist(), j.tolist(), map(tuple, s.tolist()), strict=True))


def nl_pairs(nl, offset, n):
    snd, rcv = np.asarray(nl.senders), np.asarray(nl.receivers)
    sh, m = np.asarray(nl.shifts), np.asarray(nl.mask)
    sel = m & (snd >= offset) & (snd < offset + n)
    assert np.all((rcv[sel] >= offset) & (rcv[sel] < offset + n)), "a pair crosses systems"
    i, j = (snd[sel] - offset).tolist(), (rcv[sel] - offset).tolist()
    pairs = list(zip(i, j, map(tuple, sh[sel].tolist()), strict=True))
    assert len(pairs) == len(set(pairs)), "a pair is stored twice"
    return set(pairs)


def check_against_ase(systems, batch, nl):
    offset = 0
    for atoms in systems:
        ref = ase_pairs(atoms, nl.interaction_range)
        got = nl_pairs(nl, offset, len(atoms))
        if nl.half:  # each unordered pair once: with the reversed pairs it is ASE's full list
            reverse = {(j, i, tuple(-np.asarray(s))) for i, j, s in got}
            assert not got & reverse, "a half list holds a pair in both directions"
            got |= reverse
        assert got == ref, (sorted(ref - got)[:5], sorted(got - ref)[:5])
        offset += len(atoms)


# Shared capacities: every single-system batch below has the same shapes and statics.
SHARED = dict(capacity=1024, stencil=3, bin_capacity=32)


# ---------------------------------------------------------------------------- pair sets
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_single_system_pairs_equal_ase(kind, seed):
    rng = np.random.default_rng(seed)
    atoms = KINDS[kind](rng)
    batch = fd.Batch.from_atoms([atoms], max_atoms=32, max_systems=2)
    nl = NeighborList.allocate(batch, RC, SKIN, **SHARED)
    assert not bool(nl.overflow)
    assert int(nl.n_pairs) == len(ase_pairs(atoms, RC + SKIN)) > 0
    check_against_ase([atoms], batch, nl)


@pytest.mark.parametrize("half", [False, True])
def test_mixed_padded_batch_pairs_equal_ase(half):
    rng = np.random.default_rng(7)
    systems = [KINDS[k](rng) for k in sorted(KINDS)] + [triclinic(rng, 9)]
    n = sum(len(a) for a in systems)
    # padding atoms at the end and one empty slot
    batch = fd.Batch.from_atoms(systems, max_atoms=n + 13, max_systems=len(systems) + 1)
    nl = NeighborList.allocate(batch, RC, SKIN, half=half)
    assert nl.stencil >= 2, "the small cell needs more than one bin offset"
    assert not bool(nl.overflow) and int(nl.rebuilds) == 1
    assert nl.capacity >= int(nl.n_pairs)
    check_against_ase(systems, batch, nl)
    # unused slots carry the sentinel atom index N and no shift
    free = ~np.asarray(nl.mask)
    assert np.all(np.asarray(nl.senders)[free] == batch.max_atoms)
    assert np.all(np.asarray(nl.shifts)[free] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("half", [False, True])
def test_one_key_sort_gives_the_canonical_order_of_the_sort_by_keys(half, monkeypatch):
    """The list's canonical order (by atom i, partner j, then shift) comes from one sort of a
    packed int64 key when JAX has int64 (x64), from a sort by several keys otherwise and for
    shifts beyond +-511 cells: both orders are the same list, bit for bit (docs/models.md, "What
    a rebuild costs"). Each layout gets a program of its own (a fresh ``jax.jit``: the layout is
    read when the build is traced). A system whose atoms lie ~150 cells apart (unwrapped
    positions) is sorted with the packed field narrowed to 8 bits, so it takes the fallback; a
    tiny cell (4 atoms, several images of each pair) is in both batches."""
    from fused_dynamics.models import cell_list

    assert jax.config.jax_enable_x64
    rng = np.random.default_rng(11)
    tiny = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True)
    tiny.positions += rng.normal(scale=0.2, size=tiny.positions.shape)
    far = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    far.positions += rng.normal(scale=0.2, size=far.positions.shape)
    far.positions[3] += 150 * far.cell[0]
    far.positions[5] -= 140 * far.cell[1]
    packed_layout = cell_list._packed_layout
    for systems, beyond in (([tiny, md_systems()[1]], False), ([far, tiny], True)):
        batch = fd.Batch.from_atoms(systems)
        nl = NeighborList.allocate(batch, RC, SKIN, half=half)
        lists = []
        for layout in (lambda n: (packed_layout(n)[0], 8), lambda n: None):
            monkeypatch.setattr(cell_list, "_packed_layout", layout)
            built = jax.jit(lambda nl, b: cell_list._build(nl, b))(nl, batch)
            lists.append(
                [np.asarray(getattr(built, k)) for k in ("senders", "receivers", "shifts")]
            )
        assert (np.abs(lists[0][2]).max() >= 128) == beyond
        for one_key, by_keys in zip(*lists, strict=True):
            np.testing.assert_array_equal(one_key, by_keys)
        check_against_ase(systems, batch, built)


def test_one_key_sort_of_random_pairs_equals_the_sort_by_keys(monkeypatch):
    """``_canonical_order`` on random pairs (unused-slot sentinels, negative shifts, shifts at
    the field's edges and beyond +-511): the packed sort and the sort by keys agree exactly;
    with the field narrowed to 8 bits (shifts in [-128, 128)) the out-of-field pairs fall back
    and still agree."""
    from fused_dynamics.models import cell_list

    n = 1000
    rng = np.random.default_rng(5)
    p = 4000
    senders = rng.integers(0, n, p)
    receivers = rng.integers(0, n, p)
    shifts = rng.integers(-3, 4, (p, 3))
    shifts[:50] = rng.choice([-512, -511, -129, -128, 127, 128, 511, 512], (50, 3))
    senders[-300:], receivers[-300:], shifts[-300:] = n, n, 0  # unused slots
    senders[:20] = receivers[:20] = 7  # one (i, j) pair under many shifts
    args = [jnp.asarray(a, jnp.int32) for a in (senders, receivers, shifts)]
    packed_layout = cell_list._packed_layout
    for wide in (True, False):
        for size in ((p,), (p - 60,)):  # with and without the shifts beyond +-511
            sub = [a[-size[0] :] for a in args]
            out = []
            for layout in (
                (lambda n: packed_layout(n)) if wide else (lambda n: (packed_layout(n)[0], 8)),
                lambda n: None,
            ):
                monkeypatch.setattr(cell_list, "_packed_layout", layout)
                order = jax.jit(lambda s, r, t: cell_list._canonical_order(s, r, t, True, n))
                out.append([np.asarray(a) for a in order(*sub)])
            for a, b in zip(*out, strict=True):
                np.testing.assert_array_equal(a, b)


def test_float32_floor_of_the_bin_wrap_equals_integer_floor_division():
    """The bin wrap ``floor(ub / na)`` computed in float32 (``cell_list._floor_divide``) equals
    the int32 floor division: every ``na`` in 1..300 with ``ub`` from -130 to na + 130 (a
    stencil reach of 130 bins), and multiples of ``na`` and their neighbours up to the static
    bound ``|ub| + na < 2**21``, where a float32 quotient rounds closest to an integer."""
    from fused_dynamics.models import cell_list

    na = np.arange(1, 301)[:, None]
    ub = np.arange(-130, 431)[None, :]
    ub, na = np.broadcast_arrays(ub, na)
    big_na = np.array([1, 3, 7, 41, 999, 4095, 65521, 2**20 - 3])
    q = (2**21 - 1 - big_na) // big_na  # the largest multiple within the bound
    near = (q * big_na)[:, None] + np.array([-1, 0, 1])[None, :]
    near = np.concatenate([near, -near], axis=1)
    near = np.where(np.abs(near) + big_na[:, None] < 2**21, near, 0)
    ub = np.concatenate([ub.ravel(), near.ravel()]).astype(np.int32)
    na = np.concatenate([na.ravel(), np.repeat(big_na, near.shape[1])]).astype(np.int32)
    for in_float32 in (True, False):
        got = jax.jit(cell_list._floor_divide, static_argnums=2)(ub, na, in_float32)
        np.testing.assert_array_equal(np.asarray(got), np.floor_divide(ub, na))
    # the margin: a float32 quotient one ulp off either way (a division less exact than
    # XLA's correctly rounded one) floors the same
    q = (ub.astype(np.float32) + np.float32(0.5)) / na.astype(np.float32)
    for off in (np.nextafter(q, np.float32(np.inf)), np.nextafter(q, np.float32(-np.inf))):
        np.testing.assert_array_equal(np.floor(off).astype(np.int32), np.floor_divide(ub, na))


# ---------------------------------------------------------------------------- model, eager
def md_systems(seed=0):
    """Argon: a hot triclinic crystal, an icosahedral cluster, a slab periodic in x and y."""
    rng = np.random.default_rng(seed)
    crystal = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    crystal.set_cell(crystal.cell[:] @ (np.eye(3) + rng.uniform(-0.06, 0.06, (3, 3))), True)
    crystal.rattle(0.1, seed=seed + 1)
    ico = Icosahedron("Ar", 2).copy()
    ico.rattle(0.1, seed=seed + 2)
    slab = ase.build.fcc111("Ar", (3, 3, 3), a=5.26, vacuum=4.0)
    slab.pbc = (True, True, False)
    slab.rattle(0.1, seed=seed + 3)
    return [crystal, ico, slab]


@pytest.mark.slow
def test_model_on_neighbor_list_equals_dense_path():
    rng = np.random.default_rng(3)
    prim = ase.build.bulk("Ar", "fcc", a=5.26)  # one atom, cell much thinner than the cutoff
    prim.rattle(0.0)
    small = ase.build.bulk("Ar", "fcc", a=5.26) * (2, 1, 1)
    small.positions += rng.normal(scale=0.1, size=small.positions.shape)
    systems = md_systems() + [prim, small]
    batch = fd.Batch.from_atoms(systems, max_atoms=150, max_systems=6)
    dense = LJ.with_images(batch)
    for half in (True, False):
        model = LJ.with_neighbors(skin=0.7)
        with_nl = model.attach_neighbors(batch, half=half)
        ref, got = dense(batch), model(with_nl)
        np.testing.assert_allclose(got.forces, ref.forces, rtol=0, atol=FORCE_ATOL)
        # energies ~1 eV, stresses ~1e-3 eV/Å³: rounding only
        np.testing.assert_allclose(got.energy, ref.energy, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(got.stress, ref.stress, rtol=1e-10, atol=1e-14)


def test_model_needs_a_list_with_its_cutoff():
    batch = fd.Batch.from_atoms([cluster(np.random.default_rng(0))])
    model = LJ.with_neighbors(skin=0.5)
    with pytest.raises(TypeError, match="attach_neighbors"):
        model(batch)
    short = batch.replace(neighbors=NeighborList.allocate(batch, 3.0, 0.5))
    with pytest.raises(ValueError, match="cutoff"):
        model(short)


# ---------------------------------------------------------------------------- rebuild criterion
def test_rebuild_criterion_invalidation_and_growth():
    rng = np.random.default_rng(4)
    systems = [triclinic(rng), cluster(rng)]
    batch = fd.Batch.from_atoms(systems, max_atoms=48, max_systems=3)
    nl = NeighborList.allocate(batch, RC, SKIN)
    must = jax.jit(lambda nl, b: nl.must_rebuild(b))
    assert not bool(must(nl, batch))
    for step, expect in ((0.49 * SKIN, False), (0.51 * SKIN, True)):
        moved = batch.replace(positions=batch.positions.at[30, 1].add(step))
        assert bool(must(nl, moved)) is expect
    # an affine strain of the cell and positions: only the cutoff * ||F - 1|| term
    for eps, expect in ((0.9, False), (1.1, True)):
        f = np.eye(3) + eps * SKIN / RC * np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]])
        strained = batch.replace(
            cell=batch.cell.at[0].set(batch.cell[0] @ f),
            positions=batch.positions.at[:24].set(batch.positions[:24] @ f),
        )
        assert bool(must(nl, strained)) is expect, eps
    # a re-packed layout or an invalidated list always rebuilds
    assert bool(must(nl.invalidated(), batch))
    assert bool(must(nl, batch.replace(pbc=batch.pbc.at[1, 0].set(True))))
    # growth: larger, stale, overflow cleared, sizes from the recorded needs
    small = NeighborList.allocate(batch, RC, SKIN, capacity=10, bin_capacity=1)
    assert bool(small.overflow)
    big = small.grown()
    assert big.capacity >= max(20, int(small.n_pairs)) and big.bin_capacity > 1
    assert not bool(big.overflow) and bool(big.stale) and int(big.rebuilds) == 1
    # growth that no recorded need explains (blind): atoms per bin grow too, and the second
    # blind growth in a row also the stencil, so that repeated growth always ends
    blind = big.grown()
    assert (blind.capacity, blind.bin_capacity) == (2 * big.capacity, 2 * big.bin_capacity)
    assert blind.stencil == big.stencil and blind.blind_growths == 1
    assert blind.grown().stencil == big.stencil + 1
    # the overflowed run's list (seen) tells the need: sized from it, nothing blind
    seen = dataclasses.replace(big, needed=big.needed.at[0].set(10 * big.capacity))
    sized = big.grown(seen=seen)
    assert sized.capacity == int(np.ceil(big.margin * 10 * big.capacity))
    assert sized.bin_capacity == big.bin_capacity and sized.blind_growths == 0


# ---------------------------------------------------------------------------- in the run loop
class DenseCheck(fd.Hook):
    """After each evaluation, record the largest |F_nl - F_dense| per system (traced)."""

    dense: fd.models.PairPotential
    stage: fd.DynamicsStage = eqx.field(
        static=True, default=fd.DynamicsStage.AFTER_COMPUTE, kw_only=True
    )

    def init_info(self, batch):
        return {"force_error": jnp.zeros(batch.max_systems, batch.dtype)}

    def apply(self, batch, ctx):
        ref = self.dense(batch)
        diff = jnp.where(batch.atom_mask[:, None], jnp.abs(ref.forces - batch.forces), 0.0)
        info = dict(batch.info)
        info["force_error"] = jnp.maximum(info["force_error"], batch.max_atoms_of(diff.max(-1)))
        return batch.replace(info=info)


def hot_batch(model, seed=0, temperature=300.0, **kw):
    batch = fd.Batch.from_atoms(md_systems(seed), max_atoms=150, max_systems=4)
    batch = model.attach_neighbors(batch, **kw)
    return fd.initialize_velocities(batch, temperature, jax.random.PRNGKey(seed))


@pytest.mark.slow
def test_md_forces_equal_dense_reference_with_rebuilds():
    n_steps = 100
    model = LJ.with_neighbors(skin=0.5)
    batch = hot_batch(model)
    check = DenseCheck(LJ.with_images(batch))
    fused = fd.FusedStage([fd.NVE(model, dt=4.0, n_steps=n_steps)], hooks=[NeighborListHook()])
    out = fused.register_fused_hook(check).run(batch)
    err = np.asarray(out.info["force_error"])
    print("max |F_nl - F_dense| per system:", err, "rebuilds:", int(out.neighbors.rebuilds))
    assert np.all(err[:3] <= FORCE_ATOL), err
    assert np.all(np.asarray(out.info["stage_steps"])[:3, 0] == n_steps)
    # rebuilds happened, and far from every step (the allocation's build is the first)
    assert 2 < int(out.neighbors.rebuilds) < n_steps // 2
    assert not bool(out.neighbors.overflow)
    # the atoms did move: the crystal's atoms by more than the skin
    moved = np.abs(np.asarray(out.positions - batch.positions))[:32].max()
    assert moved > SKIN


@pytest.mark.slow
def test_overflow_regrows_once_and_reruns_to_the_same_result():
    model = LJ.with_neighbors(skin=0.5)
    small = hot_batch(model, seed=1, capacity=64)
    assert bool(small.neighbors.overflow), "the allocation already saw the overflow"
    enough = small.neighbors.grown().capacity  # the size the run loop will grow to
    ref_batch = hot_batch(model, seed=1, capacity=enough)
    fused = fd.FusedStage([fd.NVE(model, dt=4.0, n_steps=40)], hooks=[NeighborListHook()])
    ref = fused.run(ref_batch)
    with pytest.warns(RuntimeWarning, match="overflowed") as record:
        out = fused.run(small)
    assert sum("overflowed" in str(w.message) for w in record) == 1, "exactly one regrowth"
    assert out.neighbors.capacity == enough and not bool(out.neighbors.overflow)
    print(
        "capacity",
        small.neighbors.capacity,
        "->",
        enough,
        "max |dr|",
        float(jnp.abs(out.positions - ref.positions).max()),
    )
    # Same trajectory: the rerun rebuilds at other steps (its list starts stale), so the same
    # float64 terms are summed in other orders; differences stay at rounding, far below 1e-10 Å.
    np.testing.assert_allclose(out.positions, ref.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.velocities, ref.velocities, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_vmap_over_temperatures_equals_separate_runs():
    model = LJ.with_neighbors(skin=0.5)
    batch = hot_batch(model, seed=2, temperature=150.0)
    temps = jnp.array([100.0, 400.0])

    def run(t):
        md = fd.NVTLangevin(model, dt=4.0, temperature=t, friction=0.05, seed=1, n_steps=12)
        out = fd.FusedStage([md], hooks=[NeighborListHook()]).run(batch)
        return out.positions, out.neighbors.rebuilds

    pos, rebuilds = jax.vmap(run)(temps)
    for k, t in enumerate(temps):
        p1, r1 = run(float(t))
        # the same program on the same numbers, batched: agreement to rounding
        np.testing.assert_allclose(pos[k], p1, rtol=0, atol=1e-12)
        assert int(rebuilds[k]) == int(r1)
    assert float(jnp.abs(pos[0] - pos[1]).max()) > 1e-6


class NeighborSampler(fd.SizeAwareSampler):
    """Gives the first batch a neighbor list (the run loop does not make one)."""

    def __init__(self, *args, model, **kw):
        super().__init__(*args, **kw)
        self.model = model

    def initial_batch(self, dtype=None):
        cells, pbc = self.cells()
        batch = super().initial_batch(dtype)
        # room for the densest batch the queue can make
        return self.model.attach_neighbors(batch, capacity=4000, cells=cells, pbc=pbc)


@pytest.mark.slow
def test_inflight_refill_rebuilds_for_new_systems():
    rng = np.random.default_rng(5)
    data = []
    for k in range(7):
        a = md_systems(k)[k % 3]
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        data.append(a)

    def run(potential, sampler_cls, **kw):
        md = fd.NVTLangevin(potential, dt=4.0, temperature=200.0, friction=0.05, seed=3, n_steps=9)
        fused = fd.FusedStage([md], hooks=[NeighborListHook()] if kw else [])
        sink = fd.HostMemory()
        sampler = sampler_cls(data, max_atoms=150, max_systems=3, **kw)
        fused.run(sampler=sampler, refill_frequency=4, sinks=[sink])
        return {a.info["system_id"]: a for a in sink.atoms}

    model = LJ.with_neighbors(skin=0.5)
    got = run(model, NeighborSampler, model=model)
    ref = run(LJ, fd.SizeAwareSampler)
    assert sorted(got) == sorted(ref) == list(range(len(data)))
    for i in ref:
        # the same dynamics (Langevin noise keyed by system id and step); rounding only
        np.testing.assert_allclose(got[i].positions, ref[i].positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got[i].get_forces(), ref[i].get_forces(), atol=FORCE_ATOL)


@pytest.mark.slow
def test_sharded_evaluation_equals_unsharded():
    """Atom and system axes sharded over 2 (virtual CPU) devices: same results."""
    code = textwrap.dedent(
        """
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import fused_dynamics as fd
        from tests.test_neighbors import LJ, md_systems
        batch = fd.Batch.from_atoms(md_systems(), max_atoms=150, max_systems=4)
        model = LJ.with_neighbors(skin=0.5)
        batch = model.attach_neighbors(batch)
        mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
        def place(x):
            lead = x.ndim and x.shape[0] in (batch.max_atoms, batch.max_systems)
            return jax.device_put(x, NamedSharding(mesh, P("d") if lead else P()))
        sharded = jax.tree_util.tree_map(place, batch)
        f = jax.jit(lambda b: model(b).forces)
        a, b = f(batch), f(sharded)
        assert len(b.sharding.device_set) == 2, b.sharding
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-12
        print("ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.slow
def test_grad_through_a_differentiable_run_equals_dense_path():
    """Reverse mode through a checkpointed run with rebuilds: same gradient as the dense path."""
    batch = hot_batch(LJ.with_neighbors(skin=0.3), seed=4, temperature=400.0)
    dense_batch = batch.replace(neighbors=None)

    def final_energy(epsilon, neighbors):
        model = fd.models.LennardJones(sigma=3.405, epsilon=epsilon, cutoff=6.5)
        b = batch
        if neighbors:
            model = model.with_neighbors(skin=0.3)
        else:
            model, b = model.with_images(dense_batch), dense_batch
        fused = fd.FusedStage([fd.NVE(model, dt=4.0)], hooks=[NeighborListHook()] * neighbors)
        out = fused.run(b, n_steps=12, differentiable=True)
        return jnp.sum(out.energy), out.neighbors

    # each gradient one compiled program: an outer jit compiles faster than the transformed
    # pieces of an unjitted grad, and the list (sized by hot_batch) needs no regrowth in either
    value_and_grad = jax.jit(jax.value_and_grad(final_energy, has_aux=True), static_argnums=1)
    (e_nl, nl), g_nl = value_and_grad(0.0104, True)
    (e_d, _), g_d = value_and_grad(0.0104, False)
    print(
        "rebuilds", int(nl.rebuilds), "grad", float(g_nl), float(g_d), "rel", float(g_nl / g_d - 1)
    )
    assert int(nl.rebuilds) > 2, "the run rebuilt its list"
    # the same float64 terms in other orders, through 12 steps: rounding only
    np.testing.assert_allclose(e_nl, e_d, rtol=1e-12)
    np.testing.assert_allclose(g_nl, g_d, rtol=1e-9)
