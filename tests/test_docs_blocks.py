"""Every ```python block of the documentation runs as written (float64, CPU) and checks what it
computes with its own ``assert`` lines: the pages under docs/ and README.md.

The blocks of one page run in order in one namespace (a later block may use an earlier one's
names), in a fresh working directory (blocks write files). Blocks already run by other tests are
left out here, not run twice: docs/models.md (tests/test_docs_models.py), docs/differentiable.md
(tests/test_differentiable.py) and README.md's "## Quickstart" block (tests/test_readme.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ELSEWHERE = {"docs/models.md", "docs/differentiable.md"}
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.name == "README.md":  # its quickstart is tests/test_readme.py's
        text = re.sub(r"## Quickstart\n\n```python\n.*?```", "", text, count=1, flags=re.S)
    return BLOCK.findall(text)


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if p.relative_to(ROOT).as_posix() not in RUN_ELSEWHERE]
# pages whose blocks compile a whole run or a training step: 5-20 s of CPU each on 2 cores
SLOW = {"docs/getting-started.md", "docs/concepts.md", "docs/stages/index.md", "docs/training.md"}
WITH_CODE = [
    pytest.param(p, marks=pytest.mark.slow) if p.relative_to(ROOT).as_posix() in SLOW else p
    for p in PAGES
    if _blocks(p)
]


def test_every_fence_is_recognised():
    """A block fenced otherwise (```py, ```Python, indented fences) would escape the tests."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = re.findall(r"^\s*```(\S*)", text, re.M)
        odd = {f for f in fences if f.lower() in {"py", "python3", "pycon"} or f == "Python"}
        assert not odd, (page, odd)


@pytest.mark.parametrize("page", WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    assert jax.config.jax_enable_x64  # tests/conftest.py: float64 on CPU
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    sys.modules[module.__name__] = module  # dataclasses look a class's module up
    try:
        for i, code in enumerate(_blocks(page)):
            name = f"{page.relative_to(ROOT)} block {i + 1}"
            exec(compile(code, name, "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]


SHELL_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def _shell_commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of every ```bash block (comments dropped)."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in SHELL_BLOCK.findall(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                command = line.split("#", 1)[0].strip()
                if command:
                    found.append((page.relative_to(ROOT).as_posix(), command))
    return found


def test_shell_commands_exist():
    """The ```bash blocks are not run (a demo or a test suite inside the tests), but every
    command they show exists: a Makefile target, a fused-dynamics subcommand or the benchmark
    command (``python -m benchmarks``) with each of the options given (read from its --help)."""
    from typer.testing import CliRunner

    from fused_dynamics.cli import app

    commands = _shell_commands()
    assert commands
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    runner = CliRunner()
    helps: dict[str, str] = {}
    for page, command in commands:
        words = command.split()
        if words[0] == "make":
            assert words[1] in targets, (page, command)
            continue
        if words[:3] == ["python", "-m", "benchmarks"]:
            if "benchmarks" not in helps:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks", "--help"],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                helps["benchmarks"] = out.stdout
            for option in re.findall(r"--[a-z][a-z-]*", command):
                assert option in helps["benchmarks"], (page, command, option)
            continue
        assert words[0] == "fused-dynamics", (page, command)
        sub = words[1]
        if sub not in helps:
            result = runner.invoke(app, [sub, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
            assert result.exit_code == 0, (page, command, result.output)
            helps[sub] = result.output
        for option in re.findall(r"--[a-z][a-z-]*", command):
            assert option in helps[sub], (page, command, option)
