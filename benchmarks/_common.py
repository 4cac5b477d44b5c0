"""Shared helpers of the benchmarks: timing and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def block(x):
    import jax  # as in save

    return jax.block_until_ready(x)


def timed(fn, *args, repeat: int = 3):
    """(first-call seconds, best of ``repeat`` later calls in seconds, result)."""
    t = time.perf_counter()
    out = block(fn(*args))
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = block(fn(*args))
        best = min(best, time.perf_counter() - t)
    return first, best, out


def save(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/NAME.json`` with the machine described."""
    import jax  # here, not at the top: the benchmark command imports git_state without JAX

    RESULTS.mkdir(exist_ok=True)
    payload = dict(payload)
    payload["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "x64": bool(jax.config.jax_enable_x64),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


def git_state() -> dict:
    """Commit of the working tree measured, and the files of the package changed from it."""

    def git(*cmd):
        proc = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT)
        return proc.stdout.rstrip()

    changed = git("status", "--porcelain", "--", "fused_dynamics")
    return {
        "commit": git("rev-parse", "HEAD"),
        "fused_dynamics_changed": [line[3:] for line in changed.splitlines()],
    }
