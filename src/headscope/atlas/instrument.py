"""The atlas: ``headscope atlas build RUN_DIR`` / ``headscope atlas serve RUN_DIR``. A study rebuilds the
atlas after every stage that ran (so it fills in while a long study runs); its ``[atlas]`` table holds
:class:`BuildOptions`."""

from __future__ import annotations

from ..registry import Instrument
from ..runs import Command
from .options import BuildOptions, ServeOptions


INSTRUMENT = Instrument(
    name="atlas",
    help="the head atlas: build the web page of a run, or serve it with live prompts",
    commands=(
        Command("atlas.build", BuildOptions, "headscope.atlas.commands:cmd_build",
                doc="write RUN_DIR/atlas/ (open index.html from disk)", needs_model=False, run_positional=True),
        Command("atlas.serve", ServeOptions, "headscope.atlas.commands:cmd_serve",
                doc="serve RUN_DIR/atlas on 127.0.0.1 with the live prompt box", needs_model=False,
                run_positional=True),
    ),
)
