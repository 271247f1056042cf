"""The Python API: headscope from a notebook or a script, reading like the CLI.

::

    from headscope import open_run
    run = open_run("runs/x", model="default")       # or a headscope Model / a transformers model
    res = run.heads.score(n_seqs=16)                 # the stage's options as keywords -> its result
    run.lens.train(layers="18")
    bank = run.lens.load()                           # loaded objects: the lens bank, an SAE, score tensors
    sae = run.sae.load("L18")
    run.study("my.toml")

``run.<instrument>.<step>(**options, force=False)`` exists for every stage and command of the registry
(:mod:`headscope.registry`; a step ``score-features`` is ``score_features``), generated from it: its keywords
are the fields of the step's options dataclass (the CLI flags and the study's TOML keys, checked the same
way). A stage goes through the stage contract (:func:`headscope.runs.run_stage`): it is reused while its
options and inputs are unchanged (``force=True`` reruns it) and returns its typed result
(a :class:`headscope.results.Result`). A command returns its
exit status. Loaders (``run.<instrument>.<name>(...)``) are declared by each instrument
(``Instrument.loaders``) and only read artifacts. Every error a user can fix is a one-line
:class:`HeadscopeError`.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any

from .errors import HeadscopeError
from .options import field_types, from_table


def attr_name(step: str) -> str:
    """The Python name of a step: ``score-features`` → ``score_features``."""
    return step.replace("-", "_")


def _as_model(model, tokenizer=None, device: str = "cpu", dtype: str | None = "float32"):
    """A headscope :class:`~headscope.models.load.Model` from what the user has: a spec string (``"default"``,
    a local HF directory, a .gguf file, a hub id), a headscope Model, a transformers causal LM (with
    ``tokenizer``, or one found from its ``name_or_path``), or an object holding one as ``._model`` with a
    ``.tokenizer`` (nnsight's ``LanguageModel``). Wrapping a transformers model puts it in eval mode with
    gradients off (in place)."""
    from .models.load import Model, load_model, wrap_model
    if model is None or isinstance(model, Model):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), device=device, dtype=dtype)
    hf = model
    if not hasattr(hf, "config") and hasattr(hf, "_model"):  # nnsight LanguageModel
        hf, tokenizer = hf._model, tokenizer or getattr(hf, "tokenizer", None)
    config = getattr(hf, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise HeadscopeError(f"model: expected a spec string, a headscope Model or a transformers causal LM, "
                             f"got {type(model).__name__}")
    name = str(getattr(config, "name_or_path", "") or "custom")
    if tokenizer is None:
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
            raise HeadscopeError(f"model: no tokenizer found for '{name}': pass tokenizer=") from None
    return wrap_model(hf, tokenizer, name=Path(name).name or "custom")


def _is_str_type(tp) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)


def build_options(cls: type, kwargs: dict, where: str):
    """The options dataclass ``cls`` from Python keywords, checked like a study table: unknown names,
    missing required options, wrong types and failed range checks are one-line :class:`HeadscopeError` s.
    An int given for a text option (``layers=18``) is taken as its text; tuples as lists."""
    types_ = field_types(cls)
    table = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple):
            v = list(v)
        if k in types_ and isinstance(v, int) and not isinstance(v, bool) and _is_str_type(types_[k]):
            v = str(v)
        table[k] = v
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in table
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    unknown = set(table) - set(types_)
    if missing and not unknown:
        raise HeadscopeError(f"{where}: missing option(s) {', '.join(missing)}")
    return from_table(cls, table, where)


def _signature(cls: type, extra: list[inspect.Parameter]) -> inspect.Signature:
    """A keyword-only signature of the option fields (for ``help()`` and tab completion)."""
    hints = field_types(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=hints[f.name]))
    return inspect.Signature(params + extra)


class Step:
    """``run.<instrument>.<step>``: one stage or command of the registry, called with its options."""

    def __init__(self, run: "Run", item, is_stage: bool):
        self._run, self._item, self._is_stage = run, item, is_stage
        extra = [inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)] \
            if is_stage else []
        self.__signature__ = _signature(item.options, extra)
        self.__name__ = attr_name(item.step)
        self.__doc__ = f"{item.doc}\n\n{(item.options.__doc__ or '').strip()}".strip()

    @property
    def name(self) -> str:
        """``<instrument>.<step>``, as in the registry and the study's tables."""
        return self._item.name

    def options(self, **kwargs):
        """The checked options dataclass these keywords make (nothing runs)."""
        return build_options(self._item.options, kwargs, f"run.{self._item.instrument}.{self.__name__}()")

    def __call__(self, *args, force: bool = False, **kwargs):
        if args:
            raise HeadscopeError(f"run.{self._item.instrument}.{self.__name__}() takes its options as keywords "
                                 f"({', '.join(field_types(self._item.options))})")
        if not self._is_stage and force:
            raise HeadscopeError(f"{self.name} is a command: it is never reused, so force= does not apply")
        opts = self.options(**kwargs)
        return self._run._call(self._item, opts, self._is_stage, force)

    def __repr__(self) -> str:
        return f"<headscope {'stage' if self._is_stage else 'command'} {self.name}{self.__signature__}>"


class InstrumentAPI:
    """``run.<instrument>``: its stages and commands as :class:`Step` s, and its loaders."""

    def __init__(self, run: "Run", ins):
        self._name = ins.name
        self._steps: dict[str, Any] = {}
        for item, is_stage in [(s, True) for s in ins.stages] + [(c, False) for c in ins.commands]:
            self._steps[attr_name(item.step)] = Step(run, item, is_stage)
        for name, ref in getattr(ins, "loaders", ()):
            self._steps[name] = _loader(run, ins.name, name, ref)
        self.__doc__ = ins.description or ins.help

    def __getattr__(self, name: str):
        steps = self.__dict__.get("_steps", {})
        if name in steps:
            return steps[name]
        raise AttributeError(f"run.{self.__dict__.get('_name')} has no step '{name}'; it has "
                             f"{', '.join(steps)}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._steps))

    def __repr__(self) -> str:
        return f"<headscope instrument {self._name}: {', '.join(self._steps)}>"


def _loader(run: "Run", instrument: str, name: str, ref: str):
    """``run.<instrument>.<name>(...)``: the loader ``ref`` (``"module:function"``, ``fn(model, run, ...)``)
    bound to this run."""
    from .runs import resolve
    fn = resolve(ref)

    def load(*args, **kwargs):
        return fn(run.model_or_none, run.dir, *args, **kwargs)
    load.__name__ = name
    load.__qualname__ = f"run.{instrument}.{name}"
    load.__doc__ = fn.__doc__
    sig = inspect.signature(fn)
    load.__signature__ = sig.replace(parameters=list(sig.parameters.values())[2:])
    return load


class Run:
    """A run directory bound to a model, with one attribute per instrument (``run.lens``, ``run.sae`` …).
    Made by :func:`open_run`."""

    def __init__(self, path: str | Path, model=None, progress: bool = True):
        from .registry import instruments
        from .runs import RunDir, check_out_path
        self.path = Path(path)
        self.progress = progress
        self._model = model
        if model is None:
            self.dir = RunDir(self.path)
        else:
            check_out_path(self.path)
            self.dir = RunDir(self.path, model.identity())
        self._instruments = {ins.name: InstrumentAPI(self, ins) for ins in instruments()}
        for name, api in self._instruments.items():
            setattr(self, name, api)

    @property
    def model(self):
        """The headscope :class:`~headscope.models.load.Model` this run uses."""
        if self._model is None:
            raise HeadscopeError(f"this step needs the model: open_run('{self.path}', model=...)")
        return self._model

    @property
    def model_or_none(self):
        return self._model

    def record(self, stage: str) -> dict | None:
        """The stage's record (options, input/output hashes, timings), or None when it never finished here."""
        return self.dir.record(stage)

    def _call(self, item, opts, is_stage: bool, force: bool):
        from .registry import writer_of
        from .runs import resolve, run_stage
        if is_stage:
            result, _ = run_stage(self.model, self.dir, item, opts, force=force, progress=self.progress,
                                  writer_of=writer_of)
            return result
        fn = resolve(item.func)
        if not item.needs_model:
            return int(fn(self.dir, opts) or 0)
        return int(fn(self.model, self.dir, opts) or 0)

    def study(self, config: str | Path | dict, only: list[str] | None = None,
              force: list[str] | None = None) -> dict:
        """Run a study config (a TOML path, a built-in name ``"demo"``/``"ci"``, or the parsed dict) into
        this run with this run's model; returns ``RUN/study.json``'s content."""
        from .study import builtin_config, load_config, plan, run_study
        if isinstance(config, dict):
            plan(config)
        elif isinstance(config, str) and config in ("demo", "ci") and not Path(config).exists():
            config = load_config(builtin_config(config))
        else:
            config = load_config(config)
        return run_study(config, out=self.path, model=self.model, only=only, force=force, progress=self.progress)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._instruments))

    def __repr__(self) -> str:
        name = self._model.name if self._model is not None else self.dir.model_identity.get("model", "?")
        return f"<headscope run {self.path} (model {name}): {', '.join(self._instruments)}>"


def open_run(path: str | Path, model: Any = "default", *, tokenizer=None, device: str = "cpu",
             dtype: str = "float32", progress: bool = True) -> Run:
    """Open (or create) the run directory ``path`` for ``model``.

    ``model``: ``"default"`` (the embedded SmolLM2-135M), a local HF directory, a .gguf file or a hub id
    (loaded on ``device``/``dtype``); a headscope ``Model``; a transformers causal LM (``tokenizer`` or its
    saved tokenizer; the model TransformerLens/nnsight users have as HF) or an nnsight ``LanguageModel``; or
    None to open an existing run for its loaders and model-free commands only. A run directory made for
    another model is a one-line error."""
    return Run(path, _as_model(model, tokenizer, device, dtype), progress=progress)
