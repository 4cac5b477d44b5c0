"""The import graph of the package: no cycles, no function-level imports between its modules.

The one documented exception is the upward edge of composition: ``Stage.__add__`` and
``Stage.run`` (``fused_dynamics/stages/base.py``) build a ``FusedStage``, which imports the
sub-stages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fused_dynamics

ROOT = Path(fused_dynamics.__file__).parent
PACKAGE = "fused_dynamics"
ALLOWED_LAZY = {("fused_dynamics.stages.base", "fused_dynamics.fused")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _targets(node, module: str, is_package: bool, known) -> list[str]:
    """Package modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(max(node.level - 1, 0)):
        base = base.rpartition(".")[0]
    target = (base + "." + node.module if node.module else base) if node.level else node.module
    if not target or target.split(".")[0] != PACKAGE:
        return []
    out = []
    for alias in node.names:  # `from . import x` names a module when x is one
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def import_graph():
    """(module-level edges, function-level edges) between package modules."""
    modules = _modules()
    top, lazy = {m: set() for m in modules}, {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        nested = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        nested.add(id(node))
                        lazy[module] |= set(_targets(node, module, is_package, modules))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in nested:
                top[module] |= set(_targets(node, module, is_package, modules))
    for graph in (top, lazy):
        for m in graph:
            graph[m].discard(m)
    return top, lazy


def _cycle(graph) -> list[str] | None:
    """One cycle of ``graph`` (a list of modules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is not a cycle back into it
            if m.startswith(n + ".") and n in graph:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if state.get(n) is None:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if state.get(m) is None:
            found = visit(m)
            if found:
                return found
    return None


def test_no_function_level_imports_between_package_modules():
    _, lazy = import_graph()
    found = {(m, t) for m, ts in lazy.items() for t in ts} - ALLOWED_LAZY
    assert not found, f"function-level imports between package modules: {sorted(found)}"


def test_no_import_cycles_between_package_modules():
    top, _ = import_graph()
    assert _cycle(top) is None, f"import cycle: {' -> '.join(_cycle(top))}"


def test_the_graph_walker_sees_cycles_and_lazy_imports():
    """The checks above can fail: the walker finds a planted cycle and the allowed edge."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    _, lazy = import_graph()
    assert "fused_dynamics.fused" in lazy["fused_dynamics.stages.base"]
