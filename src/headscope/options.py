"""Options declared once: every stage's and command's options are one frozen dataclass.

From that dataclass come, with no second list anywhere:

* the command-line flags (``--batch-size`` for the field ``batch_size``; help from the string literal under
  the field; choices from ``Literal[...]``), through `simple_parsing <https://github.com/lebrice/SimpleParsing>`_
  on top of argparse (:func:`add_options`);
* the keys of the stage's table in a study TOML file, type-checked before anything runs
  (:func:`from_table`: ``n_seqs = "two"`` is a one-line error);
* the hash that decides whether a finished stage is still fresh (:func:`options_hash`).

Range checks live in the dataclass' ``__post_init__`` (use :func:`check`), so the CLI and the study apply the
same ones. Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Optional[...]`` of those,
``Literal[...]`` and ``list[...]`` of scalars.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import re
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin

import simple_parsing
from simple_parsing import DashVariant

from .errors import HeadscopeError


def check(ok: bool, message: str) -> None:
    """Raise :class:`HeadscopeError` with ``message`` unless ``ok`` (for ``__post_init__`` range checks)."""
    if not ok:
        raise HeadscopeError(message)


def check_name(value: str | None, option: str) -> None:
    """A name that becomes a folder of the run directory (``sae/<name>/``) must be one plain folder name:
    not empty, no ``/`` or ``\\``, no leading ``.`` (so never ``..``), no control characters."""
    if value is None:
        return
    check(isinstance(value, str) and value != "" and not value.startswith(".") and "/" not in value
          and "\\" not in value and value.isprintable() and len(value.encode()) <= 200
          and not re.search(r"\.tmp($|[.-])|\.staging-|\.old-", value),
          f"{option} {value!r} is not a plain folder name (no '/', no leading '.', no control characters, "
          "no '.tmp')")


def flag(name: str) -> str:
    """The command-line flag of an option field: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


class Parser(simple_parsing.ArgumentParser):
    """argparse + simple_parsing, with dashed flags and argparse errors as one line and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("add_option_string_dash_variants", DashVariant.DASH)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse prints usage + message; we print one line
        print(f"headscope: error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(simple_parsing.SimpleHelpFormatter):
    """simple_parsing's help, with a literal ``%`` in an option's help text (``95 % bound``) printed as
    such instead of breaking argparse's ``%``-formatting of the help."""

    def _expand_help(self, action):
        if action.help and "%" in action.help:
            action = copy.copy(action)
            action.help = re.sub(r"%(?!\(\w+\)[sdrf])", "%%", action.help)
        return super()._expand_help(action)


def add_options(parser: Parser, cls: type, dest: str = "opts") -> None:
    """Add one flag per field of the options dataclass ``cls``; parsing stores an instance in ``dest``."""
    parser.add_arguments(cls, dest=dest)


def options_dict(opts) -> dict:
    """The options as a plain JSON-able dict (field order kept)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def options_hash(opts) -> str:
    """A short, stable hash of the option values (what decides whether a stage's result is still fresh)."""
    blob = json.dumps(options_dict(opts), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str):
    """``value`` (from TOML) checked against the field type ``tp``; ints are accepted for floats."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except HeadscopeError as e:
                errors.append(e)
        raise errors[0] if errors else HeadscopeError(f"{where}: unsupported type {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise HeadscopeError(f"{where} = {value!r}: choose from {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise HeadscopeError(f"{where} = {value!r}: expected a list")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise HeadscopeError(f"{where} = {value!r}: expected {_type_name(tp)}")
    return value


def field_types(cls: type) -> dict[str, Any]:
    """Field name → resolved type of an options dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_table(cls: type, table: dict, where: str):
    """Build the options dataclass ``cls`` from a TOML table: unknown keys, wrong types and failed range
    checks are one-line :class:`HeadscopeError` s that name ``where`` (e.g. ``[lens.eval]``)."""
    types_ = field_types(cls)
    unknown = sorted(set(table) - set(types_))
    if unknown:
        raise HeadscopeError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{where} {k}") for k, v in table.items()}
    try:
        opts = cls(**kwargs)
        check_values(opts)
    except HeadscopeError as e:
        raise HeadscopeError(f"{where}: {e}") from None
    return opts


INT_LIMIT = 2 ** 63
SEED_LIMIT = 2 ** 32
"""Every int option lies in (-INT_LIMIT, INT_LIMIT) (what torch takes); seeds in [0, SEED_LIMIT) (what numpy
takes, with room for the per-rank and per-step offsets added to them)."""


def check_values(opts, where: str = "") -> None:
    """The checks every options dataclass gets whatever its ``__post_init__`` says: numbers finite and
    within 64 bits, seeds non-negative, no NUL in strings (one-line :class:`HeadscopeError` naming the flag)."""
    import math
    pre = f"{where}: " if where else ""
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            name = f"{pre}{flag(f.name)}"
            if isinstance(x, bool) or x is None:
                continue
            if isinstance(x, int):
                check(-INT_LIMIT < x < INT_LIMIT, f"{name} {x} is out of range (64-bit integers)")
                if f.name == "seed" or f.name.endswith("_seed"):
                    check(x >= 0, f"{name} must be 0 or more, got {x}")
                    check(x < SEED_LIMIT, f"{name} {x} is out of range (seeds are below 2**32)")
            elif isinstance(x, float):
                check(math.isfinite(x), f"{name} must be a finite number, got {x}")
            elif isinstance(x, str):
                check("\0" not in x, f"{name} contains a NUL character")
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise HeadscopeError(f"{name} {x!r} is not valid UTF-8 (rename the file, or re-encode the "
                                         "text)") from None


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def add_model_args(p: argparse.ArgumentParser, default: str | None = "default") -> None:
    """The model options every command that runs a model shares."""
    p.add_argument("--model", default=default, metavar="SPEC",
                   help="'default' (embedded SmolLM2-135M), a local HF directory, a .gguf file, or a hub id")
    p.add_argument("--device", default="cpu" if default else None, metavar="DEVICE",
                   help="cpu, cuda, cuda:N, or auto (spread over all GPUs)")
    p.add_argument("--dtype", default="float32" if default else None, choices=("float32", "bfloat16", "float16"),
                   help="weights and activations dtype")
