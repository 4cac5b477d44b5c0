"""One summary of a benchmark run: per workload of issue 13, this project's ratio to each peer.

``build(results, quick)`` reads the result files of the scripts (``benchmarks/results/*.json``,
the ``*_quick.json`` ones for a quick run) and returns a dictionary of plain numbers:

- ``workloads``: W1-W5 of issue 13 and the extra workloads of this project, each with the
  script that measures it, whether it is covered (``"yes"``, ``"partial"``, ``"no"``) and why,
  and its ``ratios``: one record per comparison, ``ours_over_peer`` (above 1: fused_dynamics is
  faster, or the fused mode is) as the median, minimum and maximum over the interleaved rounds
  where the script kept its rounds (else the one ratio it reports, ``rounds: 1``), the target of
  the issue and whether it is met, compile seconds apart, atom-steps/s where the workload has
  them;
- nothing is computed that the result files do not hold: a missing file or field gives
  ``None`` and a note.

``chart(summary, path)`` draws the ratios with their min-max ranges and targets as a PNG.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

PEER_LABELS = {
    "fused_dynamics_dense": "our dense path",
    "jax_md_best": "JAX-MD (faster path)",
    "jax_md_dense": "JAX-MD dense",
    "jax_md_neighbor_list": "JAX-MD neighbor list",
    "lammps": "LAMMPS",
    "jax_md": "JAX-MD",
    "torch_sim": "TorchSim",
    "nvalchemi": "nvalchemi",
    "kups": "kUPS",
    "ase": "ASE",
}
#: Targets of issue 13 (this project over the peer, above 1: ours faster).
W2_TARGETS = {"jax_md_best": 1.5, "jax_md_dense": 1.5, "lammps": 1 / 3}
W1_TARGETS = {"jax_md": 3.0, "torch_sim": 10.0, "ase": 30.0}
W1_STEADY_TARGETS = {"jax_md": 1.5}


def load_result(name: str, quick: bool, results: Path = RESULTS) -> dict | None:
    """``NAME_quick.json`` for a quick run, ``NAME.json`` otherwise; None when absent."""
    path = results / f"{name}_quick.json" if quick else results / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["_file"] = path.name
    return data


def spread(values) -> dict | None:
    """Median, minimum, maximum and count of ``values`` (None when empty)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": len(values),
    }


def ratio_record(label, ratios, target=None, direction=">=", **extra) -> dict:
    """One comparison: the spread of its ratios, its target and whether the median meets it."""
    s = spread(ratios if isinstance(ratios, (list, tuple)) else [ratios])
    met = None
    if s is not None and target is not None:
        met = s["median"] >= target if direction == ">=" else s["median"] <= target
    return {
        "label": label,
        "ours_over_peer": s,
        "target": target,
        "direction": direction,
        "met": met,
        **extra,
    }


def _scaled_rounds(rec: dict) -> list[float]:
    """A code's round walls scaled to all systems (ASE and LAMMPS run one system and scale)."""
    walls = rec.get("round_walls_s") or []
    if not walls:
        return [rec["wall_s"]] if rec.get("wall_s") else []
    scale = rec["wall_s"] / min(walls) if rec.get("wall_s") else 1.0
    return [w * scale for w in walls]


def _peer_order(name: str) -> int:
    return list(PEER_LABELS).index(name) if name in PEER_LABELS else len(PEER_LABELS)


def _per_round_ratios(ours: dict, peer: dict) -> list[float]:
    """peer wall / our wall, round by round (the rounds are interleaved); best/best otherwise."""
    a, b = _scaled_rounds(ours), _scaled_rounds(peer)
    if len(a) > 1 and len(a) == len(b):
        return [pb / pa for pa, pb in zip(a, b, strict=True)]
    if a and b:
        return [min(b) / min(a)]
    return []


def _atom_steps(rec: dict) -> dict | None:
    """atom-steps/s of every round (best round's figure scaled by the round walls)."""
    best, walls = rec.get("atom_steps_per_s"), _scaled_rounds(rec)
    if best is None:
        return None
    if not walls:
        return spread([best])
    return spread([best * min(walls) / w for w in walls])


def _shape(peers: dict) -> str:
    """``"16x256"``: systems x atoms per system of a peers result file's MD workload."""
    w = peers.get("workload", {})
    per = w.get("md_atoms_per_system", 256)
    return f"{w.get('md_atoms', 0) // per}x{per}"


def w2_md(peers: dict | None, peers_108: dict | None = None) -> dict:
    """W2, NVE MD: ours (the path ``choose_neighbors`` picks) over every peer, and our dense
    path over JAX-MD's, per shape and precision (``bench_peers.py``)."""
    out = {
        "title": "W2 NVE MD throughput (16x256 and 64x108 fcc argon, float32 and float64)",
        "script": "bench_peers.py",
        "ratios": [],
    }
    files = [d for d in (peers, peers_108) if d is not None]
    if not files:
        return {**out, "covered": "no", "note": "no peers result file"}
    out["file"] = ", ".join(d["_file"] for d in files)
    out["workload"] = {_shape(d): d.get("workload", {}).get("md") for d in files}
    for data in files:
        _w2_ratios(out, data)
    shapes = [_shape(d) for d in files]
    out["covered"] = "yes" if peers is not None and peers_108 is not None else "partial"
    out["note"] = f"measured: {', '.join(shapes)}" + (
        "" if peers_108 is not None else "; 64x108 not measured"
    )
    if peers_108 is not None:
        out["note"] += f" (108-atom cells with cutoff {peers_108['workload'].get('cutoff')} A)"
    return out


def _w2_ratios(out: dict, peers: dict) -> None:
    shape = _shape(peers)
    md = peers.get("md", {})
    for precision in [p for p in ("float64", "float32") if p in md]:
        codes = md[precision]
        ours = codes.get("fused_dynamics")
        if ours is None:
            continue
        peers_here = dict(codes)
        jm = [k for k in ("jax_md_dense", "jax_md_neighbor_list") if k in codes]
        if jm:
            best = max(jm, key=lambda k: codes[k].get("atom_steps_per_s") or 0)
            peers_here["jax_md_best"] = {**codes[best], "path": best}
        # dense against dense: our dense path (results from before it was measured apart:
        # the only one there was, dense)
        ours_dense = codes.get("fused_dynamics_dense", ours)
        for name in sorted(peers_here, key=_peer_order):
            rec = peers_here[name]
            if name == "fused_dynamics":
                continue
            mine, label = ours, f"{shape} {precision} vs {PEER_LABELS.get(name, name)}"
            if name == "jax_md_dense":
                mine, label = ours_dense, f"{shape} {precision} dense vs JAX-MD dense"
            if name == "fused_dynamics_dense" and ours.get("path") == "dense":
                # the path rule chose dense: one code timed twice, the spread is noise
                label += " (the same path: the rule chose dense)"
            out["ratios"].append(
                ratio_record(
                    label,
                    _per_round_ratios(mine, rec),
                    W2_TARGETS.get(name),
                    peer=name,
                    precision=precision,
                    shape=shape,
                    ours_atom_steps_per_s=_atom_steps(mine),
                    peer_atom_steps_per_s=_atom_steps(rec),
                    compile_s={"ours": mine.get("compile_s"), "peer": rec.get("compile_s")},
                    **({"path": rec["path"]} if "path" in rec else {}),
                )
            )
        out.setdefault("atom_steps_per_s", {})[f"{shape} {precision}"] = {
            name: _atom_steps(rec) for name, rec in codes.items()
        }


STARTUP_ROWS = (
    ("cold_total_s", "new process, cold compilation cache, import included"),
    ("cold_solution_s", "new process, cold compilation cache, after import"),
    ("warm_total_s", "new process, warm compilation cache, import included"),
    ("warm_solution_s", "new process, warm compilation cache, after import"),
    ("warm_ours_vs_cold_jax_md_total_s", "new process, our warm cache vs its default (none)"),
)


def w1_relax(peers: dict | None, padding: dict | None = None, startup: dict | None = None) -> dict:
    """W1, FIRE relaxation: time to solution (compile included) and steady, from bench_peers;
    the mixed batch over per-shape batches (padding, target <= 1.15) from bench_padding; time
    to solution of a new process with the compilation cache cold and warm (bench_startup,
    reported without a target: the target row is bench_peers' in-process one)."""
    out = {
        "title": "W1 FIRE relaxation of mixed clusters and crystals to fmax 0.05 eV/A",
        "script": "bench_peers.py",
        "ratios": [],
    }
    relax = (peers or {}).get("relax") or {}
    ours = relax.get("fused_dynamics")
    if ours is None:
        return {**out, "covered": "no", "note": "no relaxation in the peers result file"}
    out["file"] = peers["_file"]
    out["workload"] = peers.get("workload", {}).get("relax")
    for name, rec in relax.items():
        if name == "fused_dynamics":
            continue
        label = PEER_LABELS.get(name, name)
        solution = (rec["wall_s"] + (rec.get("compile_s") or 0)) / (
            ours["wall_s"] + (ours.get("compile_s") or 0)
        )
        compile_s = {"ours": ours.get("compile_s"), "peer": rec.get("compile_s")}
        out["ratios"].append(
            ratio_record(
                f"time to solution (compile included) vs {label}",
                solution,
                W1_TARGETS.get(name),
                peer=name,
                compile_s=compile_s,
            )
        )
        out["ratios"].append(
            ratio_record(
                f"steady (compiled) vs {label}",
                _per_round_ratios(ours, rec),
                W1_STEADY_TARGETS.get(name),
                peer=name,
                compile_s=compile_s,
            )
        )
    if padding is not None:
        for name, label in (("mixed", "size buckets"), ("mixed_one_bucket", "one bucket")):
            out["ratios"].append(
                ratio_record(
                    f"mixed batch ({label}) / per-shape batches, wall",
                    padding["over_per_shape_rounds"][name],
                    1.15 if name == "mixed" else None,
                    direction="<=",
                    file=padding["_file"],
                )
            )
    if startup is not None:
        for key, label in STARTUP_ROWS:
            rec = startup["jax_md_over_ours"].get(key)
            if rec is None:
                continue
            row = ratio_record(f"time to solution vs JAX-MD, {label}", [], file=startup["_file"])
            out["ratios"].append({**row, "ours_over_peer": rec})  # already a spread of rounds
    workload = peers.get("workload", {})
    n_relax = len(ours.get("energy_per_atom", []))
    if workload.get("relax_set") == "w1" and n_relax >= 256:
        out["covered"] = "yes"
        out["note"] = f"measured on the W1 set: {n_relax} structures of 13-108 atoms, 7 shapes"
    elif workload.get("relax_set") == "w1":
        out["covered"] = "partial"
        out["note"] = (
            f"measured on {n_relax} structures of the W1 set (13-108 atoms, 7 shapes); the full "
            "run relaxes 256"
        )
    else:
        out["covered"] = "partial"
        out["note"] = (
            "measured on bench_peers.py's other relaxation set (55-atom clusters and 256-atom "
            "crystals), not on 256 structures of 13-108 atoms"
        )
    return out


def w3_fused(models: dict | None, overhead: dict | None) -> dict:
    """W3, fused FIRE -> NVT against the two stages run separately; the fused-step overhead."""
    out = {
        "title": "W3 fused FIRE -> NVT against the two stages run one after the other",
        "script": "bench_models.py (fused_gain), bench_fused_overhead.py",
        "ratios": [],
    }
    for model, rec in ((models or {}).get("fused_gain") or {}).items():
        modes = rec.get("modes", {})
        fused, sep = modes.get("fused", {}), modes.get("separate", {})
        walls_f, walls_s = fused.get("walls_s") or [], sep.get("walls_s") or []
        ratios = (
            [s / f for f, s in zip(walls_f, walls_s, strict=True)]
            if walls_f and len(walls_f) == len(walls_s)
            else [rec.get("separate_over_fused", {}).get("of_medians")]
        )
        out["ratios"].append(
            ratio_record(
                f"separate stages / fused, {model}",
                ratios,
                1.3,
                peer="separate stages",
                compile_s={"ours": fused.get("compile_s"), "peer": sep.get("compile_s")},
            )
        )
    for model, rec in ((models or {}).get("fused_gain") or {}).items():
        modes = rec.get("modes", {})
        walls_f = (modes.get("fused") or {}).get("walls_s") or []
        walls_b = (modes.get("bare") or {}).get("walls_s") or []
        if walls_f and len(walls_f) == len(walls_b):  # a file from before the bare loop: none
            out["ratios"].append(
                {
                    **ratio_record(
                        f"fused run / bare forces-only loop, {model}",
                        [f / b for f, b in zip(walls_f, walls_b, strict=True)],
                        1.10,
                        "<=",
                        peer="bare loop",
                    ),
                    "note": (
                        f"whole run of {rec.get('bare_evaluations')} steps (its priming "
                        "evaluation, energy and stress at exit included) over as many bare "
                        "evaluations; a time ratio (at most 1.10 is the target)"
                    ),
                }
            )
    rows = (  # per-step time ratios; the second is what a run makes: forces-only steps
        ("over_bare", "fused", "fused step / bare evaluation loop"),
        ("over_bare_forces", "fused_run", "fused run (forces-only steps) / bare forces-only loop"),
    )
    for group, program, label in rows if overhead is not None else ():
        fo = (overhead.get(group) or {}).get(program) or {}
        if fo:
            out["ratios"].append(
                {
                    **ratio_record(label, [], 1.10, "<=", peer="bare loop"),
                    "ours_over_peer": {
                        **{k: fo[k] for k in ("median", "min", "max")},
                        "rounds": None,
                    },
                    "met": fo["median"] <= 1.10,
                    "note": "per-step time ratio (below 1.10 is the target), not a speed-up",
                }
            )
    files = [d["_file"] for d in (models, overhead) if d is not None]
    out["file"] = ", ".join(files)
    out["covered"] = "partial" if out["ratios"] else "no"
    out["note"] = (
        "8 Cu crystals of 32 atoms (LJ, NequIP), not yet the W2 systems"
        if out["ratios"]
        else "no result file"
    )
    return out


def w4_inflight(inflight: dict | None) -> dict:
    out = {
        "title": "W4 inflight refill against static batches of the same capacity",
        "script": "bench_inflight.py --workload w4",
        "ratios": [],
    }
    if inflight is None:
        return {**out, "covered": "no", "note": "no inflight_w4 result file"}
    out["file"] = inflight["_file"]
    out["workload"] = inflight.get("workload")
    out["ratios"].append(
        ratio_record(
            "inflight / static batches, throughput",
            inflight.get("throughput_ratios") or inflight.get("throughput_ratio"),
            2.0,
            peer="static batches",
            compile_s=inflight.get("compile_s"),
            note=(
                f"{len(inflight['throughput_ratios'])} interleaved rounds, one process"
                if inflight.get("throughput_ratios")
                else "one timed run of each mode (a file of an earlier version)"
            ),
        )
    )
    fire = inflight.get("fire_steps_per_system") or {}
    reasons = (inflight.get("inflight") or {}).get("exit_reasons") or {}
    n = inflight.get("systems") or 0
    out["covered"] = "yes" if n >= 2000 else "partial"
    out["note"] = (
        f"{n} structures, FIRE steps per system {fire.get('min')}-{fire.get('max')} "
        f"(median {fire.get('median')}); "
        + (
            "a FIRE budget per structure from atoms.info (fd.from_info), "
            + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
            if reasons
            else "one budget for all structures (a result file of an earlier version)"
        )
        + ("" if n >= 2000 else "; the issue's 2,000 structures in the full run only")
    )
    return out


def w5_scaling(neighbors: dict | None, w5: dict | None = None) -> dict:
    out = {
        "title": "W5 large LJ liquid NVE with neighbor lists, scaling 500 -> 50,000 atoms",
        "script": "bench_neighbors.py, bench_w5.py",
        "ratios": [],
    }
    peer = (w5 or {}).get("faster_peer")
    if peer is not None:
        rec = w5["codes"][peer]
        ours = w5["codes"]["fused_dynamics"]
        rounds = [p / o for o, p in zip(ours["round_walls_s"], rec["round_walls_s"], strict=True)]
        out["ratios"].append(
            ratio_record(
                f"{w5['atoms']:,} atoms, our neighbor list vs JAX-MD's ({peer[7:]} format, "
                "the faster)",
                rounds,
                1.5,
                peer="jax_md",
                file=w5["_file"],
                ours_atom_steps_per_s=spread(
                    [w5["atoms"] * w5["steps"] / w for w in ours["round_walls_s"]]
                ),
                peer_atom_steps_per_s=spread(
                    [w5["atoms"] * w5["steps"] / w for w in rec["round_walls_s"]]
                ),
                compile_s={"ours": ours["compile_s"], "peer": rec["compile_s"]},
            )
        )
    if neighbors is None:
        return {**out, "covered": "partial" if out["ratios"] else "no",
                "note": "no neighbors result file"}  # fmt: skip
    out["file"] = neighbors["_file"]
    scaling = neighbors.get("scaling", {})
    out["slopes"] = {k: v.get("slope") for k, v in scaling.items()}
    out["slope_target"] = 1.1
    out["slope_met"] = {k: (v is not None and v <= 1.1) for k, v in out["slopes"].items()}
    rows = scaling.get("one_system", {}).get("rows") or []
    out["atom_steps_per_s"] = {r["atoms"]: r.get("atom_steps_per_s") for r in rows}
    vd = neighbors.get("versus_dense", {})
    if vd.get("best_speedup_over_dense") is not None:
        out["ratios"].append(
            ratio_record(
                "our neighbor list / our dense path, 16x256",
                vd.get("best_speedup_over_dense_rounds") or vd["best_speedup_over_dense"],
                1.0,
                peer="our dense path",
                note=(
                    "interleaved rounds, one process"
                    if vd.get("best_speedup_over_dense_rounds")
                    else "best of runs timed one after another (a file of an earlier version)"
                ),
            )
        )
    if peer is not None:
        out["covered"] = "yes"
        out["note"] = (
            "our scaling (log-log slope) on fcc argon crystals (bench_neighbors.py); against "
            f"JAX-MD's neighbor list on {w5['atoms']:,} atoms at liquid density (bench_w5.py)"
        )
    else:
        out["covered"] = "partial"
        out["note"] = (
            "our scaling (log-log slope) on fcc argon crystals; no bench_w5.py result against "
            "JAX-MD's neighbor list"
        )
    return out


def extras(scaling, models, differentiable) -> dict:
    """Workloads of this project beyond W1-W5: scale-out, the ML model, gradient memory."""
    out = {}
    if scaling is not None:
        s = scaling.get("summary", {})
        out["scale_out"] = {
            "title": "Inflight run on 1, 2, 4 forced host devices; pipeline fire | nvt",
            "script": "bench_scaling.py",
            "file": scaling["_file"],
            "covered": "yes",
            "ratios": [
                ratio_record(f"scale-out {k}", v, None, peer="1 device or fused")
                for k, v in sorted(s.items())
            ],
            "load_1min": {k: v.get("load_1min") for k, v in scaling.get("runs", {}).items()},
        }
    vj = (models or {}).get("vs_jax_md") or {}
    if models is not None:
        r = vj.get("fused_over_jax_md")
        nequip = {
            "title": "FIRE -> NVT chain with a small NequIP against JAX-MD's NequIP",
            "script": "bench_models.py",
            "file": models["_file"],
            "covered": "yes" if r else "no",
            "ratios": [],
        }
        if r:
            nequip["ratios"] = [
                {
                    **ratio_record("NequIP chain vs JAX-MD", [r["of_medians"]], None),
                    "ours_over_peer": {
                        "median": r["of_medians"],
                        "min": r.get("per_round_min"),
                        "max": r.get("per_round_max"),
                        "rounds": None,
                    },
                    "peer": "jax_md",
                }
            ]
        else:
            nequip["note"] = (
                "not in this result file (a quick run leaves it out: --no-jax-md; the full run "
                "measures it)"
            )
        out["nequip_vs_jax_md"] = nequip
    if differentiable is not None:
        rows = differentiable.get("rows") or []
        out["differentiable"] = {
            "title": "Gradient through N NVE steps: memory of the checkpointed loop vs a scan",
            "script": "bench_differentiable.py",
            "file": differentiable["_file"],
            "covered": "yes",
            "memory_ratio_scan_over_checkpointed": {
                r["n_steps"]: r.get("memory_ratio_scan_over_checkpointed") for r in rows
            },
            "ratios": [],
        }
    return out


def build(quick: bool, results: Path = RESULTS) -> dict:
    """The ``workloads`` part of the summary, from the result files of a quick or full run."""
    get = lambda name: load_result(name, quick, results)  # noqa: E731
    peers, models = get("peers"), get("models")
    workloads = {
        "W1": w1_relax(peers, get("padding"), get("startup")),
        "W2": w2_md(peers, get("peers_108")),
        "W3": w3_fused(models, get("fused_overhead")),
        "W4": w4_inflight(get("inflight_w4")),
        "W5": w5_scaling(get("neighbors"), get("w5")),
    }
    workloads.update(extras(get("scaling"), models, get("differentiable")))
    return workloads


def _fmt_ratio(r: dict) -> str:
    s = r["ours_over_peer"]
    if s is None:
        return "–"
    text = f"{s['median']:.3g}"
    if s.get("min") is not None and s.get("max") is not None and s["min"] != s["max"]:
        text += f" ({s['min']:.3g}–{s['max']:.3g})"
    return text


def chart(summary: dict, path: Path) -> Path:
    """Horizontal bars of every ratio (log scale) with min-max whiskers and target marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        {**r, "label": f"{key}: {r['label']}"}
        for key, w in summary["workloads"].items()
        for r in w.get("ratios", [])
        if r.get("ours_over_peer") is not None
    ]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    for i, r in enumerate(rows):
        s = r["ours_over_peer"]
        lo, hi = s.get("min") or s["median"], s.get("max") or s["median"]
        color = "tab:green" if r["met"] else ("tab:red" if r["met"] is False else "tab:gray")
        ax.barh(i, s["median"], color=color, alpha=0.8)
        ax.plot([lo, hi], [i, i], color="black", lw=1)
        if r.get("target") is not None:
            ax.plot([r["target"]], [i], marker="|", color="black", ms=12, mew=2)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    la = summary.get("load_average", {})
    ax.set_title(
        f"fused_dynamics / peer ({'quick' if summary.get('quick') else 'full'} run, commit "
        f"{summary.get('git', {}).get('commit', '?')[:9]}, load "
        f"{(la.get('start') or [0])[0]:.1f}->{(la.get('end') or [0])[0]:.1f})\n"
        "bar: median, line: min-max, tick: target; green met, red missed",
        fontsize=8,
    )
    ax.set_xlabel("ratio (above 1: fused_dynamics faster; fused/bare: below 1.10 is the target)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
