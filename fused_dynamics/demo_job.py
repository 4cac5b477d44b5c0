"""The demo's job: a run configuration (:data:`DEMO_CONFIG`) and :func:`run_demo`, which runs
it through the application service. ``fused-dynamics demo`` and ``python -m
fused_dynamics.demo`` (:mod:`fused_dynamics.demo`) are its command lines.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from .application import RunResult, execute
from .config import validate_config

__all__ = ["DEMO_CONFIG", "QUICK_OVERRIDES", "demo_config", "run_demo"]

DEMO_CONFIG: dict = {
    "seed": 0,
    "dtype": "float32",
    "device": "auto",
    "refill_frequency": 10,
    "structures": {"generate": "argon", "count": 256, "rattle": 0.15, "max_size": 32},
    "model": {
        "type": "lennard_jones",
        "sigma": 3.405,
        "epsilon": 0.0104,
        "cutoff": 7.5,
        "switch_onset": 6.5,
    },
    "stages": [
        {"type": "fire", "fmax": 0.01, "n_steps": 300},
        {
            "type": "nvt_langevin",
            "dt": 5.0,
            "temperature": 60.0,
            "friction": 0.02,
            "n_steps": 100,
        },
    ],
    "capacity": {"max_atoms": 384, "max_systems": 24},
    "outputs": [{"type": "extxyz", "path": "demo.extxyz"}],
    "report": {"plot": "demo.png", "record_every": 5},
}

# --quick: fewer and smaller systems, a smaller batch, short budgets
QUICK_OVERRIDES: dict = {
    "structures": {"count": 16, "max_size": 16},
    "capacity": {"max_atoms": 96, "max_systems": 8},
    "stages": [{"n_steps": 150}, {"n_steps": 20}],
    "report": {"record_every": 2},
}


def demo_config(quick: bool = False, output_dir: str | os.PathLike = "outputs") -> dict:
    """The demo's configuration as a plain dict (output paths under ``output_dir``)."""
    cfg = copy.deepcopy(DEMO_CONFIG)
    if quick:
        for key, value in QUICK_OVERRIDES.items():
            if key == "stages":
                for stage, extra in zip(cfg["stages"], value, strict=True):
                    stage.update(extra)
            else:
                cfg[key].update(value)
    out = os.fspath(output_dir)
    for o in cfg["outputs"]:
        o["path"] = os.path.join(out, o["path"])
    cfg["report"]["plot"] = os.path.join(out, cfg["report"]["plot"])
    return cfg


def run_demo(
    quick: bool = False,
    output_dir: str | os.PathLike = "outputs",
    progress: bool = True,
    echo=print,
    overwrite: bool = False,
    resume: bool = False,
) -> RunResult:
    """Run the demo; returns the :class:`~fused_dynamics.application.RunResult`.

    Outputs that exist in ``output_dir`` are refused (``ConfigError``) unless ``overwrite``
    (replace the files) or ``resume`` (skip the systems already written).
    """
    cfg = validate_config(demo_config(quick, output_dir), base_dir=".", source="demo")
    if not progress:
        cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"progress": False})})
    title = "fused_dynamics demo" + (" (--quick)" if quick else "")
    return execute(cfg, Path("."), echo=echo, title=title, overwrite=overwrite, resume=resume)
