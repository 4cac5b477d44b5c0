"""``inspect`` (fused_dynamics.inspection.inspect_command), tested in-process.

On the outputs of the small inflight run of tests/test_output_order.py (eight 7-atom argon
clusters relaxed by FIRE: system 3 fails with two atoms 0.5 Å apart, system 5 is rejected for a
NaN position): every system listed by name, the filters, CSV and JSON exports, and statistics
that leave the failed and rejected systems out and count them apart. An input structure file,
a CIF and a store of another program are refused with exit code 2 and a message that says what
``inspect`` reads.
"""

from __future__ import annotations

import csv
import json

import ase.io
import numpy as np
import pytest
import zarr
from test_output_order import cluster, finished_run  # noqa: F401  (the module's run)

from fused_dynamics.inspection import (
    NotAnOutputError,
    inspect_command,
    read_output,
    summarize_output,
    system_rows,
)


def test_inspect_lists_every_system_by_name_and_leaves_failed_ones_out_of_statistics(
    finished_run,  # noqa: F811
    capsys,
):
    d = finished_run[0]
    assert inspect_command(d / "input.extxyz") == 0
    out = capsys.readouterr().out
    assert "statistics over  6 systems; 1 failed and 1 rejected left out" in out
    table = out[out.index("\nsystems:") :].splitlines()[3:]  # after the heading and header
    assert [int(line.split()[0]) for line in table] == list(range(8))  # one line per system
    assert "failed (" in table[3] and "max_force" in table[3]  # the failure bits by name
    assert "rejected" in table[5] and "converged" in table[0]
    assert "<memory>:4" in table[4]  # the source: an in-memory list, index 4

    frames = read_output(d / "input.extxyz")
    rows = system_rows(frames)
    kept = [a for a in frames if a.info["exit_reason_name"] == "converged"]
    assert len(kept) == 6
    s = summarize_output(d / "input.extxyz")
    assert s["excluded"] == {"failed": 1, "rejected": 1} and s["statistics_over"] == 6
    # the mean is over the six converged systems only (the failed one's energy is huge and
    # positive: two atoms 0.5 Å apart); 1e-12 relative: a mean of the same float64 numbers
    e = [a.get_potential_energy() / len(a) for a in kept]
    assert s["energy_per_atom"]["mean"] == pytest.approx(np.mean(e), rel=1e-12)
    assert s["energy_per_atom"]["max"] < 0 < rows[3]["energy_per_atom"]
    assert s["fmax"]["max"] <= 0.05  # every kept system converged to fmax 0.05 eV/Å
    assert s["exit_reasons"] == {"converged": 6, "failed": 1, "rejected": 1}
    assert s["statuses"] == {"graduated": 7}  # the rejected system never had a status
    assert rows[0]["stage_steps"][0] > rows[1]["stage_steps"][0]  # 0 relaxed longer


def test_filters_and_exports(finished_run, tmp_path, capsys):  # noqa: F811
    path = finished_run[0] / "input.zarr"
    assert inspect_command(path, failed=True, export=tmp_path / "bad.json") == 0
    data = json.loads((tmp_path / "bad.json").read_text())
    assert [r["system_id"] for r in data["per_system"]] == [3, 5]
    assert [r["exit_reason"] for r in data["per_system"]] == ["failed", "rejected"]
    assert data["per_system"][0]["failure_step"] == 0  # at the evaluation that started it
    assert data["systems"] == 8 and data["format"] == "zarr"

    assert inspect_command(path, stage=0, export=tmp_path / "s0.csv") == 0
    with open(tmp_path / "s0.csv") as fh:
        rows = list(csv.DictReader(fh))
    # every system that ran left from sub-stage 0 (the only one); the rejected one never ran
    assert [int(r["system_id"]) for r in rows] == [0, 1, 2, 3, 4, 6, 7]
    assert rows[0]["exit_reason"] == "converged" and json.loads(rows[0]["stage_steps"])[0] > 1
    capsys.readouterr()

    assert inspect_command(path, failed=True, fmt="csv") == 0  # printed, not exported
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("system_id,source,exit_reason") and len(printed) == 3

    # refusals: exit 2, the parameter named
    for kwargs, words in (
        ({"stage": 1}, "stage: 1 is past the last sub-stage"),
        ({"fmt": "xml"}, "fmt: 'xml' is not an export format"),
        ({"export": tmp_path / "bad.json"}, "exists; it is never overwritten"),
    ):
        assert inspect_command(path, **kwargs) == 2
        assert words in capsys.readouterr().err


def test_extxyz_and_zarr_of_one_run_inspect_alike(finished_run):  # noqa: F811
    a = summarize_output(finished_run[0] / "input.extxyz")
    b = summarize_output(finished_run[0] / "input.zarr")
    assert a["exit_reasons"] == b["exit_reasons"] and a["excluded"] == b["excluded"]
    # extxyz prints energies with ASE's repr of float64; positions (thus nothing here) rounded
    assert a["energy_per_atom"] == pytest.approx(b["energy_per_atom"], rel=1e-12)


def test_a_file_that_is_not_an_output_is_refused(tmp_path, capsys):
    ase.io.write(tmp_path / "in.extxyz", [cluster(0), cluster(1)])
    assert inspect_command(tmp_path / "in.extxyz") == 2
    err = capsys.readouterr().err
    assert "is not an output of fused_dynamics: frame 0 has no system_id and no exit_reason" in err
    assert "(an input structure file?)" in err and "outputs[i].path" in err
    with pytest.raises(NotAnOutputError):
        summarize_output(tmp_path / "in.extxyz")

    ase.io.write(tmp_path / "in.cif", cluster(0))
    assert inspect_command(tmp_path / "in.cif") == 2
    assert "(a .cif file)" in capsys.readouterr().err

    zarr.open_group(tmp_path / "other.zarr", mode="w").create_array("x", shape=(1,), dtype="f8")
    assert inspect_command(tmp_path / "other.zarr") == 2
    assert "not a store written by fused_dynamics" in capsys.readouterr().err

    assert inspect_command(tmp_path / "missing.extxyz") == 2
    assert "does not exist" in capsys.readouterr().err
