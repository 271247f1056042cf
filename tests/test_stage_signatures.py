"""Every step is declared by its options dataclass alone (issue 22): a stage is ``fn(model, run, opts,
progress)``, a command ``fn(model, run, opts)`` (``fn(run, opts)`` without a model), with no ``**kwargs``
and no parameter repeating an option field's default; and no ``run_*`` function of an instrument repeats an option's
default as a keyword parameter (the "keyword twin" that drifts from the dataclass)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import headscope
from headscope import registry
from headscope.runs import resolve

EMPTY = inspect.Parameter.empty

def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("stage", registry.stages(), ids=lambda s: s.name)
def test_stage_functions_take_model_run_opts_progress(stage):
    params = list(inspect.signature(resolve(stage.func)).parameters.values())
    assert [p.name for p in params[:4]] == ["model", "run", "opts", "progress"], stage.func
    assert params[3].default is True
    defaults = {f.name: f.default for f in dataclasses.fields(stage.options)}
    for p in params[4:]:  # hooks for tests (an injected back-end object), never an option's twin
        assert p.kind is not inspect.Parameter.VAR_KEYWORD, f"{stage.func} takes **{p.name}"
        assert p.default is not EMPTY, f"{stage.func}: {p.name} has no default"
        assert defaults.get(p.name, EMPTY) != p.default, f"{stage.func}: {p.name}={p.default!r} repeats an option"


@pytest.mark.parametrize("cmd", [c for ins in registry.instruments() for c in ins.commands], ids=lambda c: c.name)
def test_command_functions_take_run_opts(cmd):
    names = list(inspect.signature(resolve(cmd.func)).parameters)
    assert names == (["model", "run", "opts"] if cmd.needs_model else ["run", "opts"]), cmd.func


@pytest.mark.parametrize("item", [i for ins in registry.instruments() for i in ins.stages + ins.commands],
                         ids=lambda i: i.name)
def test_options_are_frozen(item):
    """Options are values (hashed into the stage record, shared by the CLI, the study and the API): none can
    be changed after its checks ran."""
    assert item.options.__dataclass_params__.frozen, item.options


def twins() -> dict[str, set[str]]:
    """``module:function`` → its keyword parameters whose name and default repeat an option field: of its own
    options dataclass when it takes one (``opts: XOptions``), else of any of its instrument's (public
    ``run_*`` functions of ``headscope.<instrument>.*``)."""
    out = {}
    for ins in registry.instruments():
        defaults = {}
        for item in ins.stages + ins.commands:
            for f in dataclasses.fields(item.options):
                d = f.default if f.default is not dataclasses.MISSING else \
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else EMPTY
                defaults.setdefault(f.name, []).append(d)
        pkg = importlib.import_module(f"headscope.{ins.name}")
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            mod = importlib.import_module(m.name)
            for name, fn in vars(mod).items():
                if not (inspect.isfunction(fn) and fn.__module__ == m.name and name.startswith("run_")):
                    continue
                ann = getattr(inspect.signature(fn).parameters.get("opts"), "annotation", None)
                own = ann if isinstance(ann, type) else \
                    getattr(importlib.import_module(f"headscope.{ins.name}.options"), str(ann), None)
                mine = {f.name: [f.default] for f in dataclasses.fields(own)} \
                    if dataclasses.is_dataclass(own) else defaults
                dup = {p.name for p in inspect.signature(fn).parameters.values()
                       if p.default is not EMPTY and any(p.default == d and type(p.default) is type(d)
                                                         for d in mine.get(p.name, []))}
                if dup:
                    out[f"{m.name}:{name}"] = dup
    return out


def test_twin_finder_finds_a_twin(monkeypatch):
    import headscope.heads.scores as scores

    def run_twin(model, run, n_seqs: int = 32, progress: bool = True):
        pass
    run_twin.__module__ = scores.__name__
    monkeypatch.setattr(scores, "run_twin", run_twin, raising=False)
    assert twins()["headscope.heads.scores:run_twin"] == {"n_seqs"}


def test_no_keyword_twin_of_an_option():
    """No ``run_*`` function of an instrument repeats an option's default as a keyword parameter (issue 22:
    the last ones — SAE train/sweep/dashboards, lens checkpoint transfer, the explain steps — now take their
    options dataclass)."""
    found = twins()
    assert found == {}, f"functions repeating option defaults (take the options dataclass instead): {found}"


@pytest.mark.parametrize("item", [i for ins in registry.instruments() for i in ins.stages + ins.commands],
                         ids=lambda i: i.name)
def test_every_step_help_renders(item, capsys):
    """``headscope <instrument> <step> --help`` prints (a literal % in an option's help once broke it)."""
    from headscope.cli import main
    with pytest.raises(SystemExit) as e:
        main([item.instrument, item.step, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(item.options):
        if not f.metadata.get("positional"):
            assert ("--" + f.name.replace("_", "-")) in out or any(a in out for a in f.metadata.get("alias", [])), \
                (item.name, f.name)


@pytest.mark.parametrize("stage", registry.stages(), ids=lambda s: s.name)
def test_every_stage_declares_a_typed_result(stage):
    """Issue 22: every stage returns a typed result (a frozen ``headscope.results.Result``), never a bare dict."""
    from headscope.results import Result
    result = stage.result
    assert isinstance(result, type) and issubclass(result, Result), f"{stage.name} declares no Result"
    assert dataclasses.is_dataclass(result) and result.__dataclass_params__.frozen, stage.name
