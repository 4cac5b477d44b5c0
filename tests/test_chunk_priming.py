"""A chunk that admits refills while other systems are running primes them in its first step
(docs/semantics.md §14): that step moves the running systems and is the new systems' first
evaluation, so the chunk evaluates the model once per step, not once more; each system's
numbers are those of its own steps, as if it were alone.

Tolerances: the chunk (forces only, its energy at the end) and steps by hand
(``FusedStage.step``, energy at every step) are two compiled programs, which XLA may fuse
differently by an ulp: 1e-12 relative in float64 over a few steps. Step counts exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from test_energy_at_exit import _by_hand, spring_energy  # tests/ is on pytest's path

import fused_dynamics as fd
from fused_dynamics import loop

RTOL = 1e-12
EVALUATIONS: list[int] = []  # one entry per evaluation of the model (the callback is batched)


def _springs(positions, numbers, mask, cell, pbc):
    """Atoms on springs to the origin (1 eV/Å²), plus a host callback that counts calls."""
    jax.debug.callback(lambda: EVALUATIONS.append(1))
    return spring_energy(positions, mask)


def _systems():
    rng = np.random.default_rng(11)
    return [Atoms("Ar4", positions=rng.normal(scale=0.5, size=(4, 3))) for _ in range(2)]


def test_a_refill_is_primed_by_the_first_step_of_the_others():
    """Slot 0 running, slot 1 refilled: a chunk of 3 steps evaluates the model 3 times in its
    loop (plus the energy's forward pass at its end), slot 0 takes 3 steps and slot 1 takes 2,
    each equal to its own steps by hand from its first evaluation."""
    model = fd.models.EnergyFunctionModel(_springs)
    fused = fd.FusedStage([fd.NVE(model, dt=0.1, n_steps=100)], output_stress=False)
    assert not fused.needs_energy
    atoms = _systems()
    batch = fused.init(fd.Batch.from_atoms(atoms, dtype=jnp.float64))
    new = jnp.asarray([False, True])
    EVALUATIONS.clear()
    out, taken, active, _ = loop.chunk(fused, batch, 3, jnp.asarray(False), new, None)
    out = jax.block_until_ready(out)
    assert int(taken) == 3
    assert len(EVALUATIONS) == 3 + 1  # 3 steps, then the energy's forward pass
    assert int(active) == 3 + 2  # slot-steps of systems that stepped
    np.testing.assert_array_equal(np.asarray(out.info["stage_steps"])[:, 0], [3, 2])
    for slot, steps in ((0, 3), (1, 2)):
        ref = _by_hand(fused, fd.Batch.from_atoms([atoms[slot]], dtype=jnp.float64), steps)
        rows = np.asarray(out.system_idx) == slot
        for name in ("positions", "velocities", "forces"):
            a, b = np.asarray(getattr(out, name))[rows], np.asarray(getattr(ref, name))[:4]
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-14, err_msg=f"{name} {slot}")
        np.testing.assert_allclose(out.energy[slot], ref.energy[0], rtol=RTOL)


def test_refills_alone_get_a_priming_pass_that_is_not_a_step():
    """When no other system is running, the refills are primed by a pass of their own: the
    chunk's 2 steps are both theirs (3 evaluations in the loop)."""
    model = fd.models.EnergyFunctionModel(_springs)
    fused = fd.FusedStage([fd.NVE(model, dt=0.1, n_steps=100)], output_stress=False)
    batch = fd.Batch.from_atoms(_systems(), dtype=jnp.float64)
    batch = fused.init(batch)
    EVALUATIONS.clear()
    out, taken, _, _ = loop.chunk(
        fused, batch, 2, jnp.asarray(False), jnp.asarray([1, 1]) > 0, None
    )
    out = jax.block_until_ready(out)
    assert int(taken) == 2
    assert len(EVALUATIONS) == 1 + 2 + 1  # priming, 2 steps, the energy
    np.testing.assert_array_equal(np.asarray(out.info["stage_steps"])[:, 0], [2, 2])


def test_a_system_in_the_chunk_program_does_not_depend_on_its_atom_offset():
    """One structure (FIRE then Langevin MD, 60 steps of the chunk program) alone and after 1
    to 10 others, so its atoms start at offsets from 0 to about 120 of 160 rows: the same
    positions and velocities, bit for bit. (A cheaper Langevin noise, Threefry words made
    float32 normals, broke this by an ulp of the velocities at offset 75: XLA:CPU rounded a
    step of that program differently there. It was not kept.)"""
    from test_inflight_faults import LJ as SWITCHED
    from test_inflight_faults import _dataset

    frames, broken = _dataset()
    good = [a for a in frames if a.info["system_id"] not in broken]
    relax = fd.FIRE(SWITCHED, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=80)
    md = fd.NVTLangevin(SWITCHED, dt=5.0, temperature=40.0, friction=0.02, seed=3, n_steps=20)
    fused = fd.FusedStage([(0, relax), (1, md)], max_force=1e3)
    chunk = loop.compiled_chunk(fused)
    cap = dict(max_atoms=160, max_systems=12, max_atoms_per_system=19)

    def run(systems):
        ids = [a.info["system_id"] for a in systems]
        b = fused.init(fd.Batch.from_atoms(systems, system_ids=ids, **cap))
        none = jnp.zeros(12, bool)
        return chunk(fused, b, jnp.int32(60), jnp.asarray(False), none, None)[0]

    # the structure and offsets where that ulp showed (id 1126, 6 structures before it)
    target = next(a for a in good if a.info["system_id"] == 1126)
    others = [a for a in good if a is not target]
    ref = run([target])
    mine = np.asarray(ref.system_idx) == 0
    for n_before in range(1, 11):
        out = run(others[:n_before] + [target])
        rows = np.asarray(out.system_idx) == n_before
        for name in ("positions", "velocities"):
            a, b = np.asarray(getattr(out, name))[rows], np.asarray(getattr(ref, name))[mine]
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, {n_before} before")
