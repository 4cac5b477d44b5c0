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

import fused_dynamics as fd
from fused_dynamics import loop

RTOL = 1e-12
EVALUATIONS: list[int] = []  # one entry per evaluation of the model (the callback is batched)


def _springs(positions, numbers, mask, cell, pbc):
    """Atoms on springs to the origin (1 eV/Å²), plus a host callback that counts calls."""
    jax.debug.callback(lambda: EVALUATIONS.append(1))
    return 0.5 * jnp.sum(jnp.where(mask[:, None], positions**2, 0.0))


def _systems():
    rng = np.random.default_rng(11)
    return [Atoms("Ar4", positions=rng.normal(scale=0.5, size=(4, 3))) for _ in range(2)]


def _by_hand(fused, atoms, n_steps):
    b = fused.init(fd.Batch.from_atoms([atoms], dtype=jnp.float64))
    step = jax.jit(fused.step)
    for _ in range(n_steps):
        b, _ = step(b)
    return b


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
        ref = _by_hand(fused, atoms[slot], steps)
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
