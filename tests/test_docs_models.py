"""docs/models.md: its worked custom model runs as written, and its forces and stress are the
derivatives of its energy (the protocol's one reverse pass) on both graph sources."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import fused_dynamics as fd

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _run_page() -> dict:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("docs_models")  # dataclasses look the class's module up
    sys.modules[module.__name__] = module
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module.__dict__


@pytest.mark.slow
def test_worked_model_runs_and_is_consistent():
    ns = _run_page()
    model, batch, out, relaxed = ns["model"], ns["batch"], ns["out"], ns["relaxed"]
    assert np.asarray(relaxed.info["exit_reason"]).tolist() == [fd.ExitReason.CONVERGED] * 2

    # forces = -dE/dr: central differences, h = 1e-5 Å; truncation ~h^2 E''' ~1e-10 eV/Å
    h = 1e-5
    for atom, axis in [(0, 0), (5, 2)]:
        step = jnp.zeros_like(batch.positions).at[atom, axis].set(h)
        e_plus = model(batch.replace(positions=batch.positions + step)).energy[0]
        e_minus = model(batch.replace(positions=batch.positions - step)).energy[0]
        np.testing.assert_allclose(
            -(e_plus - e_minus) / (2 * h), out.forces[atom, axis], rtol=1e-6, atol=1e-8
        )

    # stress = (1/V) dE/dε for a symmetric strain of cell and positions
    eps = 1e-6
    strain = np.zeros((3, 3))
    strain[0, 1] = strain[1, 0] = eps
    cell = np.asarray(batch.cell)
    slot = np.asarray(batch.system_idx) == 0

    def strained(sign):
        deform = np.eye(3) + sign * strain
        positions = np.asarray(batch.positions).copy()
        positions[slot] = positions[slot] @ deform
        new_cell = cell.copy()
        new_cell[0] = cell[0] @ deform
        return batch.replace(positions=jnp.asarray(positions), cell=jnp.asarray(new_cell))

    de = (model(strained(1)).energy[0] - model(strained(-1)).energy[0]) / (2 * eps)
    volume = abs(np.linalg.det(cell[0]))
    # dE/dε_xy with ε_xy = ε_yx = eps counts both components: 2 σ_xy V
    np.testing.assert_allclose(de / (2 * volume), out.stress[0, 0, 1], rtol=1e-6, atol=1e-10)

    # the same model on a neighbor list: same numbers to float64 rounding (other summation order)
    listed = batch.replace(neighbors=fd.NeighborList.allocate(batch, 5.5, 1.0, half=False))
    out_nl = model(listed)
    np.testing.assert_allclose(out_nl.energy, out.energy, rtol=1e-12)
    np.testing.assert_allclose(out_nl.forces, out.forces, atol=1e-11)
    np.testing.assert_allclose(out_nl.stress, out.stress, atol=1e-13)
