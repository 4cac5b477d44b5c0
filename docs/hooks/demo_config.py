"""MkDocs hook: put the commented job file that ``fused-dynamics demo --save-config`` writes into
the command-line page, generated at build time, so the page always shows the current keys,
units, defaults and allowed values."""

import subprocess
import sys
import tempfile
from pathlib import Path

PLACEHOLDER = "<!-- demo-config -->"


def demo_config() -> str:
    """The text of ``fused-dynamics demo --save-config job.toml``; RuntimeError if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "fused_dynamics.cli", "demo", "--save-config", "job.toml"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"demo --save-config failed:\n{proc.stdout}\n{proc.stderr}")
        return (Path(tmp) / "job.toml").read_text(encoding="utf-8")


def on_page_markdown(markdown, page, config, files):
    if PLACEHOLDER in markdown:
        return markdown.replace(PLACEHOLDER, f"```toml\n{demo_config().rstrip()}\n```")
    return markdown
