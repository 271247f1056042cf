"""The one list of instruments. The CLI (``headscope <instrument> <step>``), the study (one TOML table per
stage, run in this order), the atlas builder (each instrument's ``atlas_data``) and the live server read it.

Adding an instrument is one ``<pkg>/instrument.py`` that defines ``INSTRUMENT`` and one line in
:data:`INSTRUMENT_MODULES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache

from .errors import HeadscopeError
from .runs import Command, Stage

INSTRUMENT_MODULES = (
    "headscope.heads.instrument",
    "headscope.lens.instrument",
    "headscope.sae.instrument",
    "headscope.neurons.instrument",
    "headscope.explain.instrument",
    "headscope.export.instrument",
    "headscope.atlas.instrument",
)
"""In pipeline order: a study runs the stages of these instruments in this order."""


@dataclass(frozen=True)
class Instrument:
    """One instrument: its pipeline stages (in order), its other commands, and the function that turns its
    artifacts into atlas data (``"module:function"``, ``fn(run_dir) -> dict | None``)."""

    name: str
    help: str
    stages: tuple[Stage, ...] = ()
    commands: tuple[Command, ...] = ()
    atlas_data: str | None = None
    description: str = ""
    loaders: tuple[tuple[str, str], ...] = ()
    """``(name, "module:function")`` pairs: the Python API's ``run.<instrument>.<name>(...)``, a function
    ``fn(model, run, ...)`` that only reads artifacts (``model`` may be None when it needs none)."""


@lru_cache(maxsize=None)
def instruments() -> tuple[Instrument, ...]:
    """Every instrument of this build, in pipeline order."""
    out = []
    for name in INSTRUMENT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # not part of this build
            raise
        out.append(mod.INSTRUMENT)
    return tuple(out)


def stages() -> tuple[Stage, ...]:
    """Every stage, in the order a study runs them."""
    return tuple(s for ins in instruments() for s in ins.stages)


def stage(name: str) -> Stage:
    for s in stages():
        if s.name == name:
            return s
    raise HeadscopeError(f"unknown stage '{name}'; stages are {', '.join(s.name for s in stages())}")


def writer_of(rel: str, opts_by_stage: dict | None = None) -> str | None:
    """The name of the stage that writes the run-directory path ``rel`` (with its default options, or the
    options in ``opts_by_stage``), for "run X first" errors."""
    for s in stages():
        try:
            opts = (opts_by_stage or {}).get(s.name) or s.options()
            if any(rel == w or rel.startswith(w.rstrip("/") + "/") for w in s.writes(opts)):
                return s.name
        except (TypeError, HeadscopeError):
            continue
    return None
