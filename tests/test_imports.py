"""The import graph (issue 22): no module imports another that (directly or through others) imports it back
— function-level imports included, ``TYPE_CHECKING`` ones left out —; nothing imports ``headscope.cli``;
each instrument's options module is a leaf (it imports nothing of headscope but ``headscope.options`` and
``headscope.errors``); and every module imports on its own, in a fresh set of headscope modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "headscope"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, sub.end_lineno + 1))
    return lines


def imports_of(name: str) -> set[str]:
    """The headscope modules ``name`` imports anywhere in its code (not under TYPE_CHECKING)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import headscope.x.y as z` / a name inside a module
                t = t.rpartition(".")[0]
            if t.startswith("headscope") and t != name:
                out.add(t)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as the list of modules around it), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_reads_relative_and_function_level_imports():
    assert "headscope.errors" in GRAPH["headscope.options"]
    assert "headscope.registry" in GRAPH["headscope.cli"]  # a function-level `from .registry import`
    assert "headscope.sites" in GRAPH["headscope.heads.scores"]


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_cli():
    assert [m for m, deps in GRAPH.items() if "headscope.cli" in deps] == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.endswith(".options")))
def test_options_modules_are_leaves(name):
    allowed = {"headscope", "headscope.options", "headscope.errors", name.rpartition(".")[0]}
    assert GRAPH[name] <= allowed, f"{name} imports {sorted(GRAPH[name] - allowed)}"


def test_every_instrument_declares_its_options_in_its_options_module():
    from headscope import registry
    for ins in registry.instruments():
        for item in ins.stages + ins.commands:
            assert item.options.__module__ == f"headscope.{ins.name}.options", (item.name, item.options.__module__)


def test_every_module_imports_on_its_own():
    """Each module imported with no headscope module loaded before it (torch and the like stay loaded, so
    this is one process): a module that only works after another was imported first fails here."""
    code = f"""
import importlib, json, sys, traceback
names = {sorted(MODULES)!r}
failed = {{}}
for name in names:
    for m in [m for m in sys.modules if m == "headscope" or m.startswith("headscope.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-1).strip().splitlines()[-1]
print(json.dumps(failed))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {}
