"""The documentation site (mkdocs.yml, docs/) builds with ``mkdocs build --strict``: no warning
(a broken link, a bad cross-reference, a docstring griffe cannot parse), the API pages are
generated from the docstrings, the notebooks are rendered and the benchmark page holds the
README's generated tables (docs/index.md)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fused_dynamics as fd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build once into a temporary directory (never into the checkout)."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # what MkDocs and its plugins would write into the checkout by default (other tests may
    # create other files meanwhile: only these are watched)
    watched = [ROOT / "site", ROOT / ".cache" / "mkdocs-jupyter"]
    before = {p for p in watched if p.exists()}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    created = {p.relative_to(ROOT).as_posix() for p in watched if p.exists()} - {
        p.relative_to(ROOT).as_posix() for p in before
    }
    return out, proc, created


def test_builds_strictly_without_warnings(site):
    _, proc, created = site
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert not re.search(r"^WARNING", log, re.M), log[-4000:]
    assert not created, f"the build wrote into the checkout: {sorted(created)}"


def test_api_pages_come_from_the_docstrings(site):
    out, proc, _ = site
    assert proc.returncode == 0
    html = (out / "api" / "fused" / "index.html").read_text()
    summary = inspect.getdoc(fd.FusedStage).splitlines()[0]  # the docstring's first line
    assert summary in html, summary
    stages = (out / "api" / "stages" / "index.html").read_text()
    for name in ("FIRE", "NVE", "NVTLangevin", "NVTNoseHoover", "NPT", "OptaxRelax"):
        assert f'id="fused_dynamics.{name}"' in stages, name


def test_notebooks_are_rendered(site):
    out, proc, _ = site
    assert proc.returncode == 0
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 4
    for stem in notebooks:
        page = out / "notebooks" / stem / "index.html"
        assert page.exists(), stem
        assert "import fused_dynamics as fd" in page.read_text().replace("&amp;", "&"), stem


def test_benchmark_page_holds_the_generated_tables(site):
    out, proc, _ = site
    assert proc.returncode == 0
    readme = (ROOT / "README.md").read_text()
    tables = readme.split("<!-- bench:start -->")[1].split("<!-- bench:end -->")[0]
    rows = [line for line in tables.splitlines() if line.startswith("| fused_dynamics")]
    assert rows, "no generated table in README.md"
    html = (out / "benchmarks" / "index.html").read_text()
    for row in rows:  # the first measured number of each of our rows appears on the page
        number = re.findall(r"\d[\d,.]*", row.split("|")[3])[0]
        assert number in html, (row, number)


def test_command_line_page_holds_the_generated_job_file(site):
    """docs/hooks/demo_config.py puts ``demo --save-config``'s file into the page at build."""
    out, proc, _ = site
    assert proc.returncode == 0
    html = (out / "command-line" / "index.html").read_text()
    assert "<!-- demo-config -->" not in html
    for key in ("[structures]", "[model]", "refill_frequency", "YOUR OWN STRUCTURES"):
        assert key in html, key
