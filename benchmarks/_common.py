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


def interleaved(runs: dict, rounds: int) -> tuple[dict, dict, dict]:
    """Call every run once (it compiles), then time ``rounds`` rounds of all of them in this
    process, the order rotated every round so that no run always goes first.

    ``runs`` maps a name to a function of no arguments; each call's result is waited for
    (:func:`block`). Returns ``(first_s, first, walls)``: the seconds of each first call, its
    result, and each run's seconds per round, in round order.
    """
    first_s, first, walls = {}, {}, {name: [] for name in runs}
    for name, fn in runs.items():
        t = time.perf_counter()
        first[name] = block(fn())
        first_s[name] = time.perf_counter() - t
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            block(runs[name]())
            walls[name].append(time.perf_counter() - t)
    return first_s, first, walls


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
