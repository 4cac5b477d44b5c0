"""The README's quickstart runs as written and does what it says."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    final, atoms = namespace["final"], namespace["atoms"]
    steps = np.asarray(final.info["stage_steps"])[:2]
    assert np.all(steps[:, 0] > 0) and np.all(steps[:, 1] == 200)
    assert len(atoms) == 2 and all(a.info["exit_reason"] == 2 for a in atoms)  # budget spent
