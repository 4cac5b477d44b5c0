"""The neighbor graph of the model protocol (docs/models.md): edges equal ASE's neighbor list,
the dense and neighbor-list sources agree, and a pair potential written as a GraphModel equals
the built-in one (energy, forces and stress from one reverse pass)."""

from __future__ import annotations

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import neighbor_list

import fused_dynamics as fd
from fused_dynamics.models.graph import Graph, GraphModel, neighbor_graph
from fused_dynamics.models.host_pairs import host_neighbor_list
from fused_dynamics.models.neighbors import NeighborList

jax.config.update("jax_enable_x64", True)

CUTOFF = 4.0


def _structures():
    rng = np.random.default_rng(7)
    out = []
    # triclinic, fully periodic, cell shorter than twice the cutoff (several images)
    cell = np.array([[5.0, 0.0, 0.0], [1.3, 5.2, 0.0], [0.7, -0.9, 5.6]])
    out.append(ase.Atoms("ArKr" * 4, scaled_positions=rng.random((8, 3)), cell=cell, pbc=True))
    # slab: periodic in x, y only
    out.append(
        ase.Atoms(
            "Cu6Ni3",
            positions=rng.random((9, 3)) * [6.0, 6.5, 5.0],
            cell=[6.0, 6.5, 20.0],
            pbc=[True, True, False],
        )
    )
    # cluster (no cell)
    out.append(ase.Atoms("Ar5", positions=rng.random((5, 3)) * 4.0))
    return out


def _edge_set(graph: Graph, batch, system: int) -> list:
    """(i, j, rounded D) of the real edges of one system, atom indices local to the system."""
    mask = np.asarray(graph.mask)
    first = int(np.flatnonzero(np.asarray(batch.system_idx) == system)[0])
    rows = []
    for s_, r_, v_ in zip(
        np.asarray(graph.senders)[mask],
        np.asarray(graph.receivers)[mask],
        np.asarray(graph.vectors)[mask],
        strict=True,
    ):
        if int(np.asarray(batch.system_idx)[s_]) == system:
            rows.append((int(s_) - first, int(r_) - first, *np.round(v_, 8)))
    return sorted(rows)


def _ase_edge_set(atoms, cutoff: float) -> list:
    i, j, d = neighbor_list("ijD", atoms, cutoff)
    return sorted((int(a), int(b), *np.round(v, 8)) for a, b, v in zip(i, j, d, strict=True))


@pytest.mark.parametrize("source", ["dense", "full list", "half list"])
def test_edges_equal_ase_neighbor_list(source):
    """Every edge of every system, both directions, with its vector, equals ASE's "ijD" list
    (vectors rounded to 1e-8 Å: float64 arithmetic differs by ~1e-15 between the two)."""
    atoms = _structures()
    batch = fd.Batch.from_atoms(atoms, dtype=jnp.float64, max_systems=4)  # one empty slot
    if source != "dense":
        batch = batch.replace(
            neighbors=NeighborList.allocate(batch, CUTOFF, 0.5, half=source == "half list")
        )
    model_images = (2, 2, 2) if source == "dense" else None
    graph = neighbor_graph(batch, CUTOFF, model_images)
    assert not np.asarray(graph.invalid).any()
    for s, a in enumerate(atoms):
        assert _edge_set(graph, batch, s) == _ase_edge_set(a, CUTOFF), (source, s)
    # numbers of both ends; unused slots hold the sentinel N and atomic number 0
    m = np.asarray(graph.mask)
    z = np.asarray(batch.atomic_numbers)
    np.testing.assert_array_equal(
        np.asarray(graph.sender_numbers)[m], z[np.asarray(graph.senders)[m]]
    )
    np.testing.assert_array_equal(
        np.asarray(graph.receiver_numbers)[m], z[np.asarray(graph.receivers)[m]]
    )
    assert (np.asarray(graph.senders)[~m] == batch.max_atoms).all()
    assert (np.asarray(graph.receiver_numbers)[~m] == 0).all()


def test_dense_graph_marks_a_cell_too_small_for_its_image_range():
    atoms = _structures()[:1]
    batch = fd.Batch.from_atoms(atoms, dtype=jnp.float64)
    assert np.asarray(neighbor_graph(batch, CUTOFF, (0, 0, 0)).invalid).tolist() == [True]


class _GraphLJ(GraphModel):
    """Lennard-Jones written against the graph protocol: 1/2 Σ over the full edge list."""

    cutoff: float = eqx.field(static=True)  # static: it sizes the graph
    epsilon: float
    sigma: float

    def graph_energy(self, batch, graph):
        r = graph.lengths
        x = (self.sigma / r) ** 6
        phi = 4.0 * self.epsilon * (x * x - x)
        edge = jnp.where(graph.mask, 0.5 * phi, 0.0)
        return jax.ops.segment_sum(edge, graph.system, num_segments=batch.max_systems + 1)[
            : batch.max_systems
        ]


@pytest.mark.parametrize("with_list", [False, True])
def test_graph_model_equals_builtin_pair_potential(with_list):
    """Energy, forces and stress of a GraphModel LJ equal LennardJones (unshifted) in float64
    to 1e-12 relative: the same pairs summed in a different order."""
    atoms = _structures()
    batch = fd.Batch.from_atoms(atoms, dtype=jnp.float64)
    reference = fd.models.LennardJones(epsilon=0.0104, sigma=3.4, cutoff=CUTOFF, shift=False)
    model = _GraphLJ(CUTOFF, epsilon=0.0104, sigma=3.4)
    if with_list:
        reference = reference.with_neighbors(skin=0.5)
        batch = batch.replace(neighbors=NeighborList.allocate(batch, CUTOFF, 0.5, half=False))
    ref, out = reference(batch), model(batch)
    for name in ("energy", "forces", "stress"):
        a, b = np.asarray(getattr(out, name)), np.asarray(getattr(ref, name))
        stress_of_cluster = name == "stress"
        if stress_of_cluster:  # a cluster has no stress (no volume): compare periodic systems
            a, b = a[:2], b[:2]
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=name)


def test_graph_model_runs_in_a_fused_stage_and_fails_a_too_small_cell():
    """A GraphModel is a Model: it runs in a fused run; a cell that outgrows its fixed image
    range fails that system (CELL_TOO_SMALL) and the cluster beside it relaxes untouched."""
    structures = _structures()
    atoms = [structures[0], structures[2]]
    batch = fd.Batch.from_atoms(atoms, dtype=jnp.float64)
    model = _GraphLJ(CUTOFF, epsilon=0.0104, sigma=3.4, images=(0, 0, 0))
    faults = np.asarray(model.system_faults(batch))
    assert faults.tolist() == [int(fd.Failure.CELL_TOO_SMALL), 0]
    relax = fd.FIRE(model, convergence_hook=fd.ConvergenceHook.from_fmax(1e-3), n_steps=300)
    final = relax.run(batch)
    assert np.asarray(final.info["exit_reason"]).tolist() == [
        int(fd.ExitReason.FAILED),
        int(fd.ExitReason.CONVERGED),
    ]
    assert np.asarray(final.info["failure"])[0] & int(fd.Failure.CELL_TOO_SMALL)
    # the same capacities (so the same compiled layout of the dense pairs, models/blocked.py),
    # the cluster alone in the first slot, the other slot empty
    capacity = dict(
        max_atoms=batch.max_atoms,
        max_systems=batch.max_systems,
        max_atoms_per_system=batch.max_atoms_per_system,
    )
    alone = relax.run(fd.Batch.from_atoms(atoms[1:], dtype=jnp.float64, **capacity))
    np.testing.assert_array_equal(
        np.asarray(final.positions)[np.asarray(final.system_idx) == 1],
        np.asarray(alone.positions)[np.asarray(alone.system_idx) == 0],
    )


def test_models_size_their_image_range_under_an_outer_jit():
    """A model called inside jax.jit on a concrete (closed-over) batch sizes its static image
    range on the host (every jnp operation is staged out under a trace, so a jnp-based sizing
    failed with a TracerArrayConversionError); the result equals the eager call."""
    batch = fd.Batch.from_atoms(_structures()[:1], dtype=jnp.float64)

    def energies(epsilon):
        lj = fd.models.LennardJones(epsilon=epsilon, sigma=3.4, cutoff=CUTOFF, shift=False)
        graph_lj = _GraphLJ(CUTOFF, epsilon=epsilon, sigma=3.4)
        return lj(batch).energy, graph_lj(batch).energy

    eager = energies(0.0104)
    traced = jax.jit(energies)(0.0104)
    np.testing.assert_allclose(traced, eager, rtol=1e-14)


@pytest.mark.parametrize("half", [False, True])
def test_host_neighbor_list_equals_the_cell_list(half):
    """ASE's pairs stored as a NeighborList (for fixed positions: training data) are the pairs
    of the cell-list build, in the same canonical order; a larger capacity only adds unused
    slots, and a capacity too small is refused."""
    batch = fd.Batch.from_atoms(_structures(), dtype=jnp.float64, max_systems=4)
    built = NeighborList.allocate(batch, CUTOFF, 0.0, half=half)
    host = host_neighbor_list(batch, CUTOFF, capacity=built.capacity, half=half)
    m = np.asarray(built.mask)
    assert int(np.asarray(host.mask).sum()) == int(m.sum())
    for name in ("senders", "receivers", "shifts"):
        np.testing.assert_array_equal(
            np.asarray(getattr(host, name))[: m.sum()], np.asarray(getattr(built, name))[m]
        )
    assert not bool(host.must_rebuild(batch))
    with pytest.raises(ValueError, match="capacity"):
        host_neighbor_list(batch, CUTOFF, capacity=3, half=half)


def test_a_graph_model_never_uses_a_stale_neighbor_list():
    """A list built before an atom moved 1.3 Å is rebuilt by the graph (as a pair potential's
    list is), so the energy equals the dense graph's, not the stale pairs' sum."""
    atoms = _structures()[:1]
    batch = fd.Batch.from_atoms(atoms, dtype=jnp.float64)
    listed = batch.replace(neighbors=NeighborList.allocate(batch, CUTOFF, 0.3, half=False))
    moved = batch.positions.at[0].add(jnp.asarray([1.3, 0.0, 0.0]))
    model = _GraphLJ(CUTOFF, epsilon=0.0104, sigma=3.4)
    dense = model(batch.replace(positions=moved)).energy
    stale = model(listed.replace(positions=moved)).energy
    np.testing.assert_allclose(stale, dense, rtol=1e-12)
