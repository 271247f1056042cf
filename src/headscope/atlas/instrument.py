"""The atlas: ``headscope atlas build RUN_DIR`` / ``headscope atlas serve RUN_DIR``. A study rebuilds the
atlas after every stage that ran (so it fills in while a long study runs); its ``[atlas]`` table holds
:class:`BuildOptions`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..options import check, options_dict
from ..registry import Instrument
from ..runs import Command


@dataclass(frozen=True)
class BuildOptions:
    """Writes RUN_DIR/atlas/ (open index.html from disk)."""

    example: list[str] = field(default_factory=list)
    """example prompts whose attention patterns every head page shows (default: three built-in ones)"""
    model: Optional[str] = None
    """the run's model (default: the one the run directory records)"""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights and activations dtype"""
    no_model: bool = False
    """do not load the model (no example attention patterns, no live prompts)"""


@dataclass(frozen=True)
class ServeOptions:
    """Serves RUN_DIR/atlas on 127.0.0.1 with the live prompt box."""

    host: str = "127.0.0.1"
    """address to bind"""
    port: int = 8765
    """port (0 picks a free one)"""
    rebuild: bool = False
    """rebuild the atlas before serving"""
    verbose: bool = False
    """log every request"""
    model: Optional[str] = None
    """the run's model (default: the one the run directory records)"""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights and activations dtype"""
    no_model: bool = False
    """serve without a model (no live prompts)"""

    def __post_init__(self):
        check(0 <= self.port <= 65535, f"--port {self.port} is out of range: use 0..65535 (0 picks a free one)")


def _args(run, opts) -> argparse.Namespace:
    return argparse.Namespace(run_dir=str(run.path), **options_dict(opts))


def cmd_build(run, opts: BuildOptions) -> int:
    from .cli import cmd_build as build
    return build(_args(run, opts))


def cmd_serve(run, opts: ServeOptions) -> int:
    from .cli import cmd_serve as serve
    return serve(_args(run, opts))


INSTRUMENT = Instrument(
    name="atlas",
    help="the head atlas: build the web page of a run, or serve it with live prompts",
    commands=(
        Command("atlas.build", BuildOptions, "headscope.atlas.instrument:cmd_build",
                doc="write RUN_DIR/atlas/ (open index.html from disk)", needs_model=False, run_positional=True),
        Command("atlas.serve", ServeOptions, "headscope.atlas.instrument:cmd_serve",
                doc="serve RUN_DIR/atlas on 127.0.0.1 with the live prompt box", needs_model=False,
                run_positional=True),
    ),
)
