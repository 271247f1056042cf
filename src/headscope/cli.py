"""The ``headscope`` command.

Each instrument registers its own subcommand from a module with a ``register(subparsers)`` function
(listed in ``COMMANDS``); the subcommand sets ``func(args) -> int`` as its handler. Errors that a
user can fix are :class:`HeadscopeError`: printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import HeadscopeError

COMMANDS = (
    "headscope.heads.cli",
    "headscope.lens.cli",
    "headscope.sae.cli",
    "headscope.neurons.cli",
    "headscope.explain.cli",
    "headscope.export.cli",
    "headscope.atlas.cli",
    "headscope.study",
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model options every subcommand that runs a model shares."""
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M), a local HF directory, a .gguf file, or a hub id")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (spread over all GPUs)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def add_out_arg(p: argparse.ArgumentParser, default: str = "runs/default") -> None:
    p.add_argument("--out", default=default, help="run directory for artifacts (default: %(default)s)")


def load_from_args(args):
    """Load the model named by ``--model/--device/--dtype``."""
    from .models.load import load_model
    return load_model(args.model, device=args.device, dtype=args.dtype)


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """'all', '3', '1,4,7', '10-13' or '-4' (last four) → sorted layer list (range-checked)."""
    if text is None or text == "all":
        return list(range(n_layers))
    if text.startswith("-") and text[1:].isdigit():
        k = int(text[1:])
        return list(range(max(0, n_layers - k), n_layers))
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-")
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise HeadscopeError(f"cannot parse layers '{text}' (use e.g. 'all', '3', '1,4', '10-13', '-4')") from None
    for layer in out:
        if not 0 <= layer < n_layers:
            raise HeadscopeError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    return sorted(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headscope",
        description="What does each attention head of a language model do? Head scores, lenses, "
                    "attention-output SAEs and head→neuron look-ups, shown in a head atlas.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"headscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name or (e.name and name.startswith(e.name)):
                continue  # that instrument is not part of this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except HeadscopeError as e:
        print(f"headscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headscope: interrupted; finished work is kept and a second run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
