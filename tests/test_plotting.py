"""The figure of a run (fused_dynamics.plotting.plot_run) emits no warning on small runs.

A small run can leave a panel without a trace (a relaxation sampled once, an MD stage no
system reached, no sample at all); matplotlib then warned "No artists with labels found to put
in legend" on the user's terminal. No compiled code: the record is fed by hand.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fused_dynamics.plotting import RunRecord, plot_run


class _Sample(dict):
    """What RecorderHook hands to RunRecord.on_sample: named arrays and the fused step."""

    def __init__(self, step, status, fmax, energy, temperature):
        n = len(status)
        super().__init__(
            status=np.asarray(status),
            system_mask=np.ones(n, bool),
            n_atoms=np.full(n, 4),
            stage_steps=np.zeros((n, 2), np.int64),
            system_id=np.arange(n),
            fmax=np.asarray(fmax, float),
            energy=np.asarray(energy, float),
            temperature=np.asarray(temperature, float),
        )
        self.step = step


def _record(samples):
    rec = RunRecord(
        ["FIRE", "NVE"], [True, False], max_systems=2, total=2, progress=False, targets=[0.05, None]
    )
    for s in samples:
        rec.on_sample(s)
    return rec


SMALL_RUNS = {
    "no sample": [],
    "relaxation sampled once": [_Sample(1, [0, 0], [0.1, 0.2], [-1.0, -1.0], [0.0, 0.0])],
    "only MD sampled": [_Sample(1, [1, 1], [0.1, 0.2], [-1.0, -1.0], [3.0, 4.0])],
    "both stages": [
        _Sample(k + 1, [0, 1], [0.1 / (k + 1), 0.0], [-1.0 - 0.01 * k, -1.0], [0.0, 10.0])
        for k in range(5)
    ],
}


@pytest.mark.parametrize("case", SMALL_RUNS)
def test_plot_of_a_small_run_emits_no_warning(case, tmp_path):
    rec = _record(SMALL_RUNS[case])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        path = plot_run(rec, tmp_path / "run.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_never_replace_a_file_unless_asked(tmp_path):
    """``RunRecord.write_csv`` and ``plot_run`` refuse a path that exists (the file keeps every
    byte) unless ``overwrite=True``, and never replace a directory."""
    rec = _record(SMALL_RUNS[next(iter(SMALL_RUNS))])
    mine = tmp_path / "notes.txt"
    mine.write_text("keep")
    with pytest.raises(FileExistsError, match="notes.txt"):
        rec.write_csv(mine)
    with pytest.raises(FileExistsError, match="notes.txt"):
        plot_run(rec, mine)
    assert mine.read_text() == "keep"
    for write in (rec.write_csv, lambda p, **kw: plot_run(rec, p, **kw)):
        with pytest.raises(FileExistsError, match="directory"):
            write(tmp_path, overwrite=True)
    rec.write_csv(mine, overwrite=True)
    assert mine.read_text().startswith("step,")
    picture = tmp_path / "run.png"
    picture.write_text("keep")
    with pytest.raises(FileExistsError, match="run.png"):
        plot_run(rec, picture)
    assert picture.read_text() == "keep"
    plot_run(rec, picture, overwrite=True)
    assert picture.read_bytes()[:4] == b"\x89PNG"
    # a name without a suffix is written as it is, a PNG (matplotlib alone would write
    # "report.png", over the user's file of that name)
    (tmp_path / "report.png").write_text("keep")
    plot_run(rec, tmp_path / "report")
    assert (tmp_path / "report").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report.png").read_text() == "keep"
    with pytest.raises(ValueError, match="txt"):  # refused before any file is made
        plot_run(rec, tmp_path / "plot.txt")
    assert not (tmp_path / "plot.txt").exists()
