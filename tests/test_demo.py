"""The demo job: `python -m fused_dynamics.demo --quick` (what `make demo` runs, made small).

One subprocess run is shared by the module (it pays the JAX import and one compilation);
the other tests are in-process and touch no JAX state.
"""

import os
import re
import subprocess
import sys

import ase.io
import numpy as np
import pytest

from fused_dynamics.config import validate_config
from fused_dynamics.demo import DEMO_CONFIG, demo_config, make_structures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["MPLBACKEND"] = "Agg"
    env.pop("JAX_ENABLE_X64", None)
    return env


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "fused_dynamics.demo", "--quick", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_quick_demo_writes_every_system_with_a_final_exit_reason(quick_demo):
    out, _ = quick_demo
    frames = ase.io.read(out / "demo.extxyz", index=":")
    n = demo_config(quick=True)["structures"]["count"]
    assert sorted(a.info["system_id"] for a in frames) == list(range(n))
    # every system left through a final exit (converged or budget), none is still running
    assert {a.info["exit_reason"] for a in frames} <= {1, 2}
    md_budget = demo_config(quick=True)["stages"][1]["n_steps"]
    for a in frames:
        fire_steps, md_steps = a.info["stage_steps"]
        assert 0 < fire_steps <= demo_config(quick=True)["stages"][0]["n_steps"]
        assert md_steps == md_budget
        assert np.isfinite(a.get_potential_energy())
        assert np.all(np.isfinite(a.get_forces()))


def test_quick_demo_figure_is_a_real_png(quick_demo):
    out, _ = quick_demo
    png = out / "demo.png"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_quick_demo_prints_progress_and_summary(quick_demo):
    out, proc = quick_demo
    assert "graduated" in proc.stderr and "steps/s" in proc.stderr  # the tqdm bar
    assert "compiling the fused step" in proc.stderr  # the bar says it compiles, then
    assert "compiling the fused step (the first chunk waits for it) ..." in proc.stdout
    compiled = re.search(r"compiled in (\d+\.\d) s; running", proc.stdout)
    assert compiled and float(compiled.group(1)) > 0, proc.stdout
    for word in ("FIRE", "NVTLangevin", "mean steps", "exit reasons", "fused steps"):
        assert word in proc.stdout, proc.stdout
    assert "demo.extxyz" in proc.stdout and "demo.png" in proc.stdout
    # per stage: entered, converged, budget, failed, as the written systems say
    frames = ase.io.read(out / "demo.extxyz", index=":")
    fire_budget = demo_config(quick=True)["stages"][0]["n_steps"]
    fire_converged = sum(a.info["stage_steps"][0] < fire_budget for a in frames)
    n = len(frames)
    assert "how systems left each stage:" in proc.stdout
    assert re.search(
        rf"0: FIRE\s+{n}\s+{fire_converged}\s+{n - fire_converged}\s+0\n", proc.stdout
    ), proc.stdout
    assert re.search(rf"1: NVTLangevin\s+{n}\s+0\s+{n}\s+0\n", proc.stdout), proc.stdout
    # nothing else on stderr: no warning (matplotlib's on small runs) leaks into the terminal
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr


def test_demo_configs_are_valid_run_configurations():
    for quick in (False, True):
        cfg = validate_config(demo_config(quick, "somewhere"), source="demo")
        assert [s.type for s in cfg.stages] == ["fire", "nvt_langevin"]
        assert cfg.outputs[0].path == os.path.join("somewhere", "demo.extxyz")
    # the full demo is "a few hundred" systems
    assert DEMO_CONFIG["structures"]["count"] >= 200


def test_make_structures_clusters_and_crystals():
    atoms = make_structures(40, seed=3, rattle=0.1, max_size=32)
    again = make_structures(40, seed=3, rattle=0.1, max_size=32)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(atoms, again, strict=True))
    assert all(len(a) <= 32 for a in atoms)
    clusters = [a for a in atoms if not a.pbc.any()]
    crystals = [a for a in atoms if a.pbc.all()]
    assert len(clusters) == len(crystals) == 20
    assert all(abs(a.get_volume()) > 0 for a in atoms)  # clusters sit in a vacuum box
    small = make_structures(10, max_size=8)
    assert all(len(a) <= 8 for a in small)
    with pytest.raises(ValueError, match="max_size"):
        make_structures(2, max_size=2)
