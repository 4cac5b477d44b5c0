"""examples/multihost.py, the README's several-host example, runs as written: two processes on
localhost joined by ``jax.distributed`` (2 CPU devices each) share one fused run, and together
write every system exactly once (docs/semantics.md §21)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multihost_example_runs_as_two_processes():
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "examples/multihost.py", str(i), "2", address, "8"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    ids = []
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, out
        line = re.search(rf"process {i}: (\d+) systems \[([\d, ]*)\]", out)
        assert line, out
        ids += [int(x) for x in line.group(2).split(",") if x.strip()]
        assert int(line.group(1)) > 0, f"process {i} ran no system"
    assert sorted(ids) == list(range(8)), ids  # every system once, over both processes
