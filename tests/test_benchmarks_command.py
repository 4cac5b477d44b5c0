"""The one benchmark command, ``python -m benchmarks`` (benchmarks/README.md), without timing.

Its ``--plan`` mode lists what a run would do; nothing is timed here (docs: benchmarks/README.md,
"One command"). The README's generated tables must be what the committed result files give.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


sys.path.insert(0, str(ROOT))
from benchmarks.__main__ import SCRIPTS, main, probe_peer  # noqa: E402

ISSUE_WORKLOADS = {"W1", "W2", "W3", "W4", "W5"}


def _plan(capsys, *args: str) -> dict:
    assert main(["--plan", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_module_entry_point_prints_the_plan():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--plan", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["quick"] is True


@pytest.mark.parametrize("quick", [False, True])
def test_plan_lists_every_benchmark_script(capsys, quick):
    """The full run plans every script of benchmarks/; the quick run those of issue 13's
    workloads W1-W5 (each at least once), and ``--only`` still reaches the others."""
    plan = _plan(capsys, *(["--quick"] if quick else []))
    on_disk = sorted(p.name for p in BENCH.glob("bench_*.py"))
    planned = sorted({s["file"] for s in plan["scripts"]})
    if quick:
        assert set(planned) < set(on_disk)
        assert all(set(s["workloads"]) & ISSUE_WORKLOADS for s in plan["scripts"])
        left = [s for s in SCRIPTS if s.name not in {p["name"] for p in plan["scripts"]}]
        assert left and not any(s.in_quick for s in left)
        # every script of W1-W5 runs in --quick but bench_startup.py (new processes per round)
        issue = {s.name for s in SCRIPTS if set(s.workloads) & ISSUE_WORKLOADS}
        assert issue - {p["name"] for p in plan["scripts"]} == {"startup"}
        assert [s["name"] for s in _plan(capsys, "--quick", "--only", left[0].name)["scripts"]] == [
            left[0].name
        ]
    else:
        assert planned == on_disk
    results = [s["result"] for s in plan["scripts"]]
    assert len(set(results)) == len(results), results
    for s in plan["scripts"]:
        assert s["command"][1].endswith(s["file"])
        assert s["result"].endswith("_quick.json") == quick, s
    assert plan["summary"] == f"results/summary{'_quick' if quick else ''}.json"
    workloads = {w for s in plan["scripts"] for w in s["workloads"]}
    assert ISSUE_WORKLOADS <= workloads


def test_only_selects_scripts_and_refuses_unknown_names(capsys):
    plan = _plan(capsys, "--only", "inflight,neighbors")
    assert [s["name"] for s in plan["scripts"]] == ["inflight", "neighbors"]
    with pytest.raises(SystemExit) as exc:
        main(["--plan", "--only", "nonesuch"])
    assert exc.value.code == 2
    assert "nonesuch" in capsys.readouterr().err


def test_missing_peer_is_recorded_not_fatal():
    info = probe_peer(Path(sys.executable), "no-such-distribution-xyz", "no_such_module_xyz")
    assert info["status"] == "not installed"
    assert "no-such-distribution-xyz" in info["reason"]
    assert probe_peer(None, "ase", "ase")["status"] == "not installed"


def test_readme_tables_match_the_committed_results():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--check", "--tracked-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
