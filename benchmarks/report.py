"""Write the benchmark tables of README.md from ``benchmarks/results/*.json``.

Replaces everything between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in README.md
with tables generated from the result files (never typed by hand). A full run's file
(``peers.json``) is preferred over a quick one (``peers_quick.json``). Files whose names end in
``_test`` are ignored.

Run: ``python benchmarks/report.py [--readme README.md] [--check] [--tracked-only]``
(``--check`` exits 1 when the README section is not what the result files give, without writing;
``--tracked-only`` reads only the result files git knows, so that the README matches a checkout).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"

if str(HERE.parent) not in sys.path:  # run as a file: the package beside it
    sys.path.insert(0, str(HERE.parent))
from benchmarks.__main__ import SCRIPTS  # noqa: E402

# the scripts that time the peers (run with the peers' interpreter)
PEER_SCRIPTS = frozenset(s.name for s in SCRIPTS if s.peers)
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

MD_NAMES = {
    "fused_dynamics": "fused_dynamics (the pair path it chooses)",
    "fused_dynamics_dense": "fused_dynamics, dense path",
    "jax_md_dense": "JAX-MD, dense pairs (vmap)",
    "jax_md_neighbor_list": "JAX-MD, neighbor list (vmap)",
    "torch_sim": "TorchSim",
    "nvalchemi": "nvalchemi",
    "kups": "kUPS",
    "ase": "ASE (one system at a time)",
}
VERSION_KEY = {
    "fused_dynamics": "fused_dynamics",
    "fused_dynamics_dense": "fused_dynamics",
    "jax_md_dense": "jax_md",
    "jax_md_neighbor_list": "jax_md",
    "jax_md": "jax_md",
    "torch_sim": "torch_sim",
    "nvalchemi": "nvalchemi",
    "kups": "kups",
    "ase": "ase",
}


TRACKED: set[str] | None = None  # with --tracked-only: the result files git knows


def tracked_results() -> set[str]:
    """Names of the result files committed to (or staged in) git."""
    out = subprocess.run(
        ["git", "ls-files", "--", str(RESULTS)],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
    ).stdout
    return {Path(line).name for line in out.splitlines()}


def load(name: str) -> dict | None:
    """``name.json``, else ``name_quick.json``, else None."""
    for stem in (name, f"{name}_quick"):
        path = RESULTS / f"{stem}.json"
        if TRACKED is not None and path.name not in TRACKED:
            continue
        if path.exists():
            data = json.loads(path.read_text())
            data["_file"] = path.name
            return data
    return None


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1e3:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


MARK, SPREAD = "†", 2.0


def unstable(rec: dict) -> str:
    """MARK when the timed rounds of a record differ by more than SPREAD times."""
    walls = rec.get("round_walls_s") or []
    return MARK if len(walls) > 1 and max(walls) > SPREAD * min(walls) else ""


def machine_line(data: dict) -> str:
    m = data.get("machine", {})
    load_avg = data.get("load_average", {}).get("start")
    extra = f", load average {load_avg[0]:.1f} at start" if load_avg else ""
    device = f"{data['device']}; host " if data.get("device") else ""
    return (
        f"{device}{m.get('processor', '?')}, {m.get('cpus', '?')} CPUs, {m.get('platform', '?')}, "
        f"jax {m.get('jax', '?')} ({m.get('backend', '?')}){extra}"
    )


def peers_section(data: dict) -> list[str]:
    w = data["workload"]
    versions = data.get("versions", {})
    md = data.get("md", {})
    f64, f32 = md.get("float64", {}), md.get("float32", {})
    sanity = data.get("sanity", {})
    out = [
        f"**Peers, NVE MD** (`bench_peers.py`, `{data['_file']}`): {w['md']}. {w['model']}.",
        f"Machine: {machine_line(data)}.",
        "",
        "| code | version | float64 atom-steps/s | fused_dynamics speed-up | "
        "float32 atom-steps/s | fused_dynamics speed-up | compile s | same energies & forces |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(f64, key=lambda k: list(MD_NAMES).index(k) if k in MD_NAMES else 99)
    noisy = False
    for name in order:
        r64, r32 = f64[name], f32.get(name, {})
        check = sanity.get("md_float64", {}).get(name, {})
        m64, m32 = unstable(r64), unstable(r32)
        noisy |= bool(m64 or m32)
        out.append(
            f"| {MD_NAMES.get(name, name)} | {versions.get(VERSION_KEY.get(name, name)) or '?'} "
            f"| {fmt(r64.get('atom_steps_per_s'))}{m64} | {fmt(r64.get('fused_speedup'))} "
            f"| {fmt(r32.get('atom_steps_per_s'))}{m32} | {fmt(r32.get('fused_speedup'))} "
            f"| {fmt(r64.get('compile_s'), 2)} | {fmt(check.get('ok'))} |"
        )
    out += [
        "",
        "fused_dynamics speed-up = peer time / fused_dynamics time for the same work (above 1: "
        'fused_dynamics is faster). "Same energies & forces": single-point energies and forces '
        f"of the {w.get('md_atoms', 0) // 256} initial structures within "
        f"{sanity.get('tolerance_md_energy0_per_atom', {}).get('float64', '?')} eV/atom and "
        f"{sanity.get('tolerance_md_forces0', {}).get('float64', '?')} eV/Å of fused_dynamics.",
    ]
    if noisy:
        out.append(
            f"{MARK}: its timing rounds differed by more than {SPREAD:g}x (a contended machine);"
            " the best round is shown."
        )
    relax = data.get("relax", {})
    if relax:
        checks = sanity.get("relax", {})
        out += [
            "",
            f"**Peers, FIRE relaxation**: {w['relax']}.",
            "",
            "| code | wall s | batched model calls | evaluations per system, summed "
            "| fused_dynamics speed-up | compile s | converged, same minima |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in [k for k in ("fused_dynamics", "jax_md", "torch_sim", "ase") if k in relax]:
            r = relax[name]
            label = {
                "fused_dynamics": "fused_dynamics (dense, size buckets)",
                "jax_md": "JAX-MD (vmap per shape)",
                "ase": "ASE (one by one)",
            }.get(name, MD_NAMES.get(name, name))
            out.append(
                f"| {label} | {fmt(r['wall_s'])} | {fmt(r['model_calls'])} "
                f"| {fmt(r['system_evals'])} | {fmt(r.get('fused_speedup'))} "
                f"| {fmt(r.get('compile_s'), 2)} | {fmt(checks.get(name, {}).get('ok'))} |"
            )
    errors = data.get("errors", {})
    if errors:
        out += [
            "",
            "Did not run: "
            + "; ".join(f"{k} ({v.splitlines()[0][:120]})" for k, v in sorted(errors.items())),
        ]
    return out


def inflight_section(data: dict) -> list[str]:
    i, s = data["inflight"], data["static"]
    c = data.get("compile_s", {})
    cap = data.get("capacity", {})
    fire = data.get("fire_steps_per_system") or {}
    out = [
        f"**Inflight batching** (`bench_inflight.py`, `{data['_file']}`): {data['workload']}; "
        f"capacity {cap.get('max_atoms')} atoms / {cap.get('max_systems')} systems, refill every "
        f"{data.get('refill_frequency')} steps.",
        f"Machine: {machine_line(data)}.",
        "",
        "| mode | wall s | systems/s | steps | slot utilisation | compilations in the run |",
        "|---|---|---|---|---|---|",
        f"| inflight refill | {fmt(i['wall_s'])} | {fmt(i['systems_per_s'])} | {fmt(i['steps'])} "
        f"| {fmt(i['utilization'])} | {fmt(i['compilations'])} |",
        f"| static batches, one after another | {fmt(s['wall_s'])} | {fmt(s['systems_per_s'])} "
        f"| {fmt(s['steps'])} | {fmt(s['utilization'])} | – |",
        "",
        f"Throughput ratio inflight / static: **{fmt(data['throughput_ratio'])}**"
        + _ratio_rounds(data)
        + " (target >= 2). "
        f"Compile (warm-up, excluded above): inflight "
        f"{fmt(c.get('inflight'), 2)} s, static {fmt(c.get('static'), 2)} s. FIRE steps per "
        f"system: {fire.get('min', '?')}–{fire.get('max', '?')} (median "
        f"{fmt(fire.get('median'))})"
        + (" before the 200 NVT steps." if "NVT" in str(data.get("workload")) else "."),
    ]
    return out


def _ratio_rounds(data: dict) -> str:
    """`` (min-max over N interleaved rounds)``, or what an older file without rounds says."""
    ratios = data.get("throughput_ratios")
    if not ratios:
        return " (one timed run of each mode, not interleaved: a file of an earlier version)"
    if len(ratios) == 1:
        return " (one round)"
    return f" (min–max {fmt(min(ratios))}–{fmt(max(ratios))}, {len(ratios)} interleaved rounds)"


def overhead_section(data: dict) -> list[str]:
    ratio = data.get("over_bare", {}).get("fused") or {}
    hooks = data.get("idle_hook_overhead")
    hooks = hooks.get("median") if isinstance(hooks, dict) else hooks
    spread = f" (per round {fmt(ratio['min'])}–{fmt(ratio['max'])})" if ratio else ""
    out = [
        f"**Fused-step overhead** (`bench_fused_overhead.py`, `{data['_file']}`): "
        f"{data.get('workload')}: fused step / model-only step, median of interleaved rounds, "
        f"{fmt(ratio.get('median', data.get('fused_over_model_only')))}{spread} "
        f"(target <= 1.10), idle-hook overhead {fmt(hooks)} (target < 0.02).",
    ]
    load = data.get("load_average", {}).get("start", [None])[0]
    if load is not None:
        out[0] += f" Load {fmt(load)} at the start."
    over = data.get("over_bare", {})
    parts = [
        f"{label} {fmt(over[key]['median'])}"
        for key, label in (
            ("only_fire", "FIRE"),
            ("only_langevin", "Langevin"),
            ("only_nve", "NVE"),
        )
        if key in over
    ]
    if parts:
        out[0] += " One-stage steps over the model-only step: " + ", ".join(parts) + "."
    tape = data.get("tape") or {}
    if tape:
        out[0] += (
            f" A positions-and-energies tape every {data.get('tape_every')} steps costs, over "
            f"the step without it: recorded on the device and delivered after the loop "
            f"{fmt(tape['recorded_over_fused']['median'])}, sent by host callbacks "
            f"{fmt(tape['callback_over_fused']['median'])}."
        )
    return out


def padding_section(data: dict) -> list[str]:
    ratio = data.get("over_per_shape", {})
    mixed, one = ratio.get("mixed") or {}, ratio.get("mixed_one_bucket") or {}

    def cell(r):
        return f"{fmt(r.get('median'))} ({fmt(r.get('min'))}–{fmt(r.get('max'))})"

    load = data.get("load_average", {}).get("start", [None])[0]
    return [
        f"**Padding of mixed sizes** (`bench_padding.py`, `{data['_file']}`): "
        f"{data.get('workload')}; one mixed batch over one batch per shape, wall time, median "
        f"(min–max) of {data.get('timing')}: with the size buckets `run` fits "
        f"{cell(mixed)} (target <= 1.15), with one bucket {cell(one)}; load {fmt(load)} at "
        f"the start, commit {data.get('git', {}).get('commit', '?')[:7]}.",
    ]


def w5_section(data: dict) -> list[str]:
    """W5 against JAX-MD's neighbor list (bench_w5.py)."""
    load = data.get("load_average", {})
    out = [
        f"**W5 against JAX-MD's neighbor list** (`bench_w5.py`, `{data['_file']}`): "
        f"{data.get('workload')}. Load average {fmt(load.get('start', [None])[0])} at the "
        f"start and {fmt(load.get('end', [None])[0])} at the end, commit "
        f"{data.get('git', {}).get('commit', '?')[:7]}; initial energies agree: "
        f"{data.get('sanity', {}).get('ok')}.",
        "",
        "| code | atom-steps/s (median round) | ms per step, median (min–max) | compile s "
        "| list rebuilds in a round | fused_dynamics speed-up, median (min–max) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rec in data.get("codes", {}).items():
        step = rec.get("step_ms", {})
        ratio = rec.get("ours_over_peer")
        out.append(
            f"| {name} | {fmt(rec.get('atom_steps_per_s'))} | {fmt(step.get('median'))} "
            f"({fmt(step.get('min'))}–{fmt(step.get('max'))}) | {fmt(rec.get('compile_s'))} "
            f"| {fmt(rec.get('rebuilds')) if rec.get('rebuilds') is not None else 'not counted'} "
            f"| {'1' if ratio is None else _spread_text(ratio)} |"
        )
    return out


def _spread_text(s: dict) -> str:
    return f"{fmt(s.get('median'))} ({fmt(s.get('min'))}–{fmt(s.get('max'))})"


def startup_section(data: dict) -> list[str]:
    """W1 time to solution of a new process (bench_startup.py), cold and warm cache."""
    med = data.get("summary", {})
    ratio = data.get("jax_md_over_ours", {})

    def secs(code, state, key):
        r = med.get(f"{code}_{state}", {}).get(key) or {}
        return fmt(r.get("median"))

    def cell(key):
        r = ratio.get(key) or {}
        return f"{fmt(r.get('median'))} ({fmt(r.get('min'))}–{fmt(r.get('max'))})"

    la = data.get("load_average", {})
    start, end = (la.get("start") or [None])[0], (la.get("end") or [None])[0]
    rows = [
        f"**W1 time to solution in a new process** (`bench_startup.py`, `{data['_file']}`): "
        f"{data.get('workload', {}).get('relax')}; {data.get('workload', {}).get('rounds')} "
        f"interleaved rounds, load {fmt(start)} at the start and {fmt(end)} at the end, commit "
        f"{data.get('git', {}).get('commit', '?')[:7]}. Seconds, median; ratio JAX-MD / ours, "
        "median (min–max) over the rounds (above 1: ours is faster).",
        "",
        "| compilation cache | ours: import / solution | JAX-MD: import / solution "
        "| ratio, import included | ratio, after import |",
        "|---|---|---|---|---|",
    ]
    for state in ("cold", "warm"):
        rows.append(
            f"| {state} | {secs('fused_dynamics', state, 'import_s')} / "
            f"{secs('fused_dynamics', state, 'solution_s')} | {secs('jax_md', state, 'import_s')}"
            f" / {secs('jax_md', state, 'solution_s')} | {cell(state + '_total_s')} "
            f"| {cell(state + '_solution_s')} |"
        )
    rows += [
        "",
        f"JAX-MD's import took {secs('jax_md', 'cold', 'import_s')} s here (median, cold), "
        f"ours {secs('fused_dynamics', 'cold', 'import_s')} s: the ratios with the import "
        "included owe that much to it; the ratios after the import compare building, "
        "compiling and relaxing alone.",
        "",
        "Ours with the warm cache the command line keeps, against JAX-MD as it runs by default "
        f"(no cache), import included: {cell('warm_ours_vs_cold_jax_md_total_s')}. "
        "Sanity: relaxed energies within "
        f"{fmt(data.get('sanity', {}).get('max_energy_per_atom_difference_eV'))} eV/atom, "
        f"every system converged in every process: {data.get('sanity', {}).get('ok')}.",
    ]
    return rows


def _ratio_cell(r: dict) -> str:
    s = r.get("ours_over_peer")
    if not s:
        return "–"
    text = fmt(s["median"])
    if s.get("min") is not None and s.get("max") is not None and s["min"] != s["max"]:
        text += f" ({fmt(s['min'])}–{fmt(s['max'])})"
    return text


def _compile_cell(r: dict) -> str:
    c = r.get("compile_s")
    if not isinstance(c, dict) or not any(isinstance(v, (int, float)) for v in c.values()):
        return "–"
    ours, peer = c.get("ours"), c.get("peer")
    if ours is None and peer is None:
        return "–"
    return f"{fmt(ours, 2)} / {fmt(peer, 2)}"


def _target_cell(r: dict) -> str:
    if r.get("target") is None:
        return "–"
    met = {True: " ✓", False: " ✗"}.get(r.get("met"), "")
    return f"{r['direction']} {fmt(r['target'])}{met}"


def _earlier_commit(script: dict) -> str | None:
    """The short commit of the earlier run a script's record was kept from (``--only``), or
    None for a record of this run."""
    earlier = script.get("from_earlier_run")
    return (earlier.get("commit") or "?")[:10] if earlier else None


def _earlier_runs(data: dict) -> str:
    """A sentence naming the scripts whose rows come from an earlier run (``--only``)."""
    by_commit: dict[str, list[str]] = {}
    for name, v in sorted(data.get("scripts", {}).items()):
        if commit := _earlier_commit(v):
            by_commit.setdefault(commit, []).append(name)
    if not by_commit:
        return ""
    parts = [f"{', '.join(names)} (commit `{c}`)" for c, names in by_commit.items()]
    return (
        " The rows of scripts this command did not run are their last records: "
        + "; ".join(parts)
        + "."
    )


def summary_section(data: dict) -> list[str]:
    """The one-command summary (``python -m benchmarks``): every ratio, coverage, peers."""
    la = data.get("load_average", {})
    start, end = (la.get("start") or [None])[0], (la.get("end") or [None])[0]
    git = data.get("git", {})
    dirty = git.get("fused_dynamics_changed") or []
    stem = data["_file"].removesuffix(".json")
    out = [
        f"**All workloads** (`{data.get('command', 'python -m benchmarks')}`, `{data['_file']}`, "
        f"chart `benchmarks/results/{stem}.png`): commit `{git.get('commit', '?')[:10]}`"
        + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")
        + f", {data.get('cpus', '?')} CPUs, load average {fmt(start)} at start and {fmt(end)} "
        f"at end, {fmt(data.get('wall_s', 0) / 60, 2)} min in all." + _earlier_runs(data),
        "",
        "| workload | comparison | fused_dynamics / peer, median (min–max) | target "
        "| atom-steps/s, ours / peer (median) | compile s (ours / peer) | file |",
        "|---|---|---|---|---|---|---|",
    ]
    stale = set(data.get("stale_results", []))

    def files_of(names: str | None) -> str:
        return ", ".join(
            f"{f} (stale: its script did not finish)" if f in stale else f
            for f in (names or "–").split(", ")
        )

    for key, w in data.get("workloads", {}).items():
        for r in w.get("ratios", []):
            files = files_of(r.get("file") or w.get("file"))  # a row's own file first
            ours, peer = r.get("ours_atom_steps_per_s"), r.get("peer_atom_steps_per_s")
            steps = f"{fmt(ours['median'])} / {fmt(peer['median'])}" if ours and peer else "–"
            out.append(
                f"| {key} | {r['label']} | {_ratio_cell(r)} | {_target_cell(r)} | {steps} "
                f"| {_compile_cell(r)} | {files} |"
            )
    w5 = data.get("workloads", {}).get("W5", {})
    if w5.get("slopes"):
        rates = w5.get("atom_steps_per_s") or {}
        largest = max(rates, key=int) if rates else None
        out += [
            "",
            "W5 log-log slope of time per step against atoms (target <= "
            f"{fmt(w5.get('slope_target'))}): "
            + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in w5["slopes"].items())
            + (
                f"; {fmt(rates[largest])} atom-steps/s at {fmt(int(largest))} atoms "
                f"(`{w5.get('file')}`)."
                if largest
                else "."
            ),
        ]
    out += [
        "",
        "Ratios above 1: fused_dynamics (or the fused mode) is faster, except the rows "
        '"fused step / bare evaluation loop" and "fused run … / bare forces-only loop", time '
        "ratios whose target is at most 1.10. "
        "Min–max over the interleaved rounds where the script keeps them; one figure where it "
        "times one run. ✓ / ✗: the median meets / misses the target of issue 13.",
        "",
        "Coverage of the workloads of issue 13: "
        + "; ".join(
            f"{k} {c.get('covered')} ({c.get('note')})"
            for k, c in sorted(data.get("coverage", {}).items())
        )
        + ".",
    ]
    peers = data.get("peers", {})
    installed = [f"{k} {v.get('version')}" for k, v in peers.items() if v["status"] == "installed"]
    missing = [
        f"{k} (not installed: {v.get('reason', '?')})"
        for k, v in peers.items()
        if v["status"] != "installed"
    ]
    scripts = data.get("scripts", {})
    # a peer script carried from an earlier run measured the peers installed then
    carried = any(_earlier_commit(v) for k, v in scripts.items() if k in PEER_SCRIPTS)
    out.append("")
    out.append("Peers installed for this run: " + (", ".join(installed) or "none") + ".")
    if missing:
        out.append(
            "Not installed for this run, so not measured by it"
            + (
                " (scripts from an earlier run, below, measured what was installed then)"
                if carried
                else ""
            )
            + ": "
            + "; ".join(missing)
            + "."
        )
    failed = [f"{k} ({v['status']}, exit {v['rc']})" for k, v in scripts.items() if v["rc"]]
    rows = [
        f"{k} {fmt(v['wall_s'], 3)} s, peak {fmt(v.get('peak_rss_mb'), 3)} MB"
        + (f" (an earlier run, commit `{_earlier_commit(v)}`)" if _earlier_commit(v) else "")
        for k, v in scripts.items()
    ]
    if rows:
        out.append("Scripts (wall time, peak resident memory): " + "; ".join(rows) + ".")
    if failed:
        out.append("Did not finish: " + "; ".join(failed) + ".")
    return out


def gpu_section(nve: dict) -> list[str]:
    """The GPU runs (issue 13 item 6): NVE against JAX-MD, FIRE, the fused-step overhead."""
    large, relax = load("peers_gpu_large"), load("peers_gpu_relax")
    over, over_cond = load("fused_overhead_gpu"), load("fused_overhead_gpu_cond")
    out = [
        f"**GPU** (`{nve['_file']}` and the other `*_gpu*.json`): {machine_line(nve)}. "
        "Each row names the commit whose code was measured.",
        "",
        "| workload | precision | fused_dynamics atom-steps/s | JAX-MD dense | "
        "JAX-MD neighbor list | fused_dynamics speed-up over the faster | commit |",
        "|---|---|---|---|---|---|---|",
    ]
    for data in (d for d in (nve, large) if d):
        for precision in ("float64", "float32"):
            md = data.get("md", {}).get(precision, {})
            ours = md.get("fused_dynamics", {}).get("atom_steps_per_s")
            dense = md.get("jax_md_dense", {}).get("atom_steps_per_s")
            nl = md.get("jax_md_neighbor_list", {}).get("atom_steps_per_s")
            if not ours:
                continue
            best = max(x for x in (dense, nl, 1e-300) if x)
            out.append(
                f"| NVE {data['workload'].get('md_atoms', 0) // 256} x 256 fcc Ar | {precision} "
                f"| {fmt(ours)} | {fmt(dense)} | {fmt(nl)} | {fmt(ours / best)} "
                f"| {data['git']['commit']} |"
            )
    if relax and relax.get("relax"):
        r = relax["relax"]
        ours, jm = r.get("fused_dynamics", {}), r.get("jax_md", {})
        out.append(
            f"| FIRE, {relax['workload']['relax']} (wall s) | float64 | {fmt(ours.get('wall_s'))}"
            f" | {fmt(jm.get('wall_s'))} (vmap per shape) | – "
            f"| {fmt(jm.get('wall_s', 0) / ours['wall_s'] if ours.get('wall_s') else None)} "
            f"| {relax['git']['commit']} |"
        )
    for data, label in ((over_cond, "with"), (over, "without")):
        if data:
            ratio = data.get("over_bare", {}).get("fused") or {}
            out.append(
                f"| fused FIRE + NVT step / bare model loop, {label} `lax.cond` "
                f"({data.get('workload')}) | float64 | {fmt(ratio.get('median'))} "
                f"({fmt(ratio.get('min'))}–{fmt(ratio.get('max'))}) | – | – | target <= 1.10 "
                f"| {data['git']['commit']} |"
            )
    out += [
        "",
        "On this GPU the fused step is bound by its number of small kernels, not by the pair "
        "sums: a bare model evaluation of 64 x 108 atoms takes 0.11 ms, the fused step 0.29 ms.",
    ]
    return out


def render() -> str:
    parts = []
    for name, section in (
        ("summary", summary_section),
        ("peers", peers_section),
        ("inflight", inflight_section),
        ("inflight_w4", inflight_section),
        ("fused_overhead", overhead_section),
        ("padding", padding_section),
        ("startup", startup_section),
        ("w5", w5_section),
        ("peers_gpu", gpu_section),
    ):
        data = load(name)
        if data is not None:
            parts.append("\n".join(section(data)))
    if not parts:
        return (
            "(no benchmark results yet: run the scripts in `benchmarks/`, then "
            "`python benchmarks/report.py`)"
        )
    return "\n\n".join(parts)


def rewrite(readme: Path, body: str) -> str:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {START} and {END} are missing.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    p.add_argument(
        "--tracked-only",
        action="store_true",
        help="use only result files known to git (the README then matches a checkout)",
    )
    args = p.parse_args()
    if args.tracked_only:
        TRACKED = tracked_results()
    new = rewrite(args.readme, render())
    if args.check:
        sys.exit(0 if new == args.readme.read_text() else 1)
    args.readme.write_text(new)
    print(f"updated {args.readme}")
