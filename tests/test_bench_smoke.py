"""Every bench/ script still fits the package: it imports, every ``headscope`` name it imports (also inside
functions, where the scripts import lazily) exists, and every call of a ``headscope`` function or class it
makes binds to that callable's current signature (argument count and keyword names). A removed or renamed
name, option field or parameter fails here instead of in the next benchmark run. Nothing is timed and no
script's ``main`` runs."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def _bindings(tree: ast.AST) -> tuple[dict[str, object], list[str]]:
    """Names a script binds by importing from ``headscope`` (anywhere in the file) → the object, and the
    problems: a module that does not import, a name it lacks. A name bound to two different objects is
    left out (the calls using it cannot be attributed)."""
    names: dict[str, object] = {}
    ambiguous: set[str] = set()
    problems = []

    def bind(name: str, obj: object) -> None:
        if name in names and names[name] is not obj:
            ambiguous.add(name)
        names[name] = obj

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "headscope":
            try:
                mod = importlib.import_module(node.module)
            except Exception as e:  # noqa: BLE001 — reported as the failure
                problems.append(f"line {node.lineno}: import {node.module}: {type(e).__name__}: {e}")
                continue
            for a in node.names:
                if hasattr(mod, a.name):
                    bind(a.asname or a.name, getattr(mod, a.name))
                    continue
                try:
                    bind(a.asname or a.name, importlib.import_module(f"{node.module}.{a.name}"))
                except ImportError:
                    problems.append(f"line {node.lineno}: {node.module} has no {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "headscope":
                    try:
                        mod = importlib.import_module(a.name)
                    except Exception as e:  # noqa: BLE001
                        problems.append(f"line {node.lineno}: import {a.name}: {type(e).__name__}: {e}")
                        continue
                    if a.asname:
                        bind(a.asname, mod)
    for name in ambiguous:
        names.pop(name)
    return names, problems


def _callee(func: ast.expr, names: dict[str, object]):
    """The headscope object a call's ``func`` names (``f``, ``mod.f``, ``mod.Class``), else None."""
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        base = names.get(func.value.id)
        if inspect.ismodule(base):
            return getattr(base, func.attr, _MISSING)
    return None


_MISSING = object()


def check_script(source: str) -> list[str]:
    """Problems of one script's source: missing imports/names, and calls of headscope callables that do not
    bind to their signatures (calls with ``*args``/``**kwargs`` are checked only for their keyword names)."""
    tree = ast.parse(source)
    names, problems = _bindings(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        obj = _callee(node.func, names)
        where = f"line {node.lineno}: {ast.unparse(node.func)}"
        if obj is _MISSING:
            problems.append(f"{where}: no such name")
            continue
        if obj is None or inspect.ismodule(obj) or not callable(obj):
            continue
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        kw = {k.arg: None for k in node.keywords if k.arg is not None}
        if starred:
            params = sig.parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
            bad = [k for k in kw if k not in params and not takes_any]
            if bad:
                problems.append(f"{where}: unknown keyword(s) {bad}")
            continue
        try:
            sig.bind(*[None] * len(node.args), **kw)
        except TypeError as e:
            problems.append(f"{where}: {e} (signature {sig})")
    return problems


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_imports(path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)          # module level only: main() is behind `if __name__ == "__main__"`
    assert callable(getattr(mod, "main", None)), f"{path.name} has no main()"


def embedded_code(source: str) -> list[str]:
    """Module-level string constants of a script that are Python code using headscope (e.g. the code
    bench/allocator.py runs in fresh interpreters)."""
    out = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) \
                and "headscope" in node.value.value:
            try:
                ast.parse(node.value.value)
            except SyntaxError:
                continue
            out.append(node.value.value)
    return out


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_calls_fit_the_package(path):
    source = path.read_text()
    assert check_script(source) == []
    for code in embedded_code(source):
        assert check_script(code) == []


def test_checker_catches_what_it_is_for():
    """The checker flags a removed name, an unknown option field, a missing required argument and a wrong
    keyword, and passes the same calls written correctly."""
    bad = '''
def main():
    from headscope.sae.options import TrainOptions, NoSuchOptions
    from headscope.lens import evaluate as ev
    from headscope.explain.features import sae_name
    TrainOptions(layer=1, no_such_field=3)
    ev.run_eval(None)
    ev.no_such_function()
    sae_name(None, nmae="L1")
'''
    problems = check_script(bad)
    for expected in ("has no NoSuchOptions", "TrainOptions: got an unexpected keyword argument 'no_such_field'",
                     "ev.run_eval: missing a required argument", "ev.no_such_function: no such name",
                     "sae_name: got an unexpected keyword argument 'nmae'"):
        assert any(expected in p for p in problems), (expected, problems)
    good = '''
def main():
    from headscope.sae.options import TrainOptions
    from headscope.lens import evaluate as ev
    from headscope.explain.features import sae_name
    TrainOptions(layer=1, k=8)
    ev.run_eval(None, None, None, progress=False)
    sae_name(None, name="L1")
'''
    assert check_script(good) == []
