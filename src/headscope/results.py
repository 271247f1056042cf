"""Typed stage results: what a stage function returns, what the stage record keeps and what the Python API
hands back.

A stage's result is a frozen dataclass subclassing :class:`Result` whose fields are JSON values (numbers,
strings, booleans, None, lists and dicts of those, or nested :class:`Result` s). :meth:`Result.to_json` is
strict: a field that is not JSON (a tensor, a NaN, a Path) is a :class:`HeadscopeError`, never silently
dropped. :meth:`Result.from_json` rebuilds the result from the stage record, so a stage reused while fresh
returns the same typed object as one that just ran.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

from .errors import HeadscopeError


def check_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON (tuples as lists, nested :class:`Result` s as their :meth:`~Result.to_json`);
    anything else — a tensor, a numpy integer, a NaN or infinity, a Path, a non-string key — is a
    :class:`HeadscopeError` naming ``where`` and the path inside it (``where.key[2]``)."""
    if isinstance(value, Result):
        return value.to_json()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HeadscopeError(f"{where}: {value} is not finite (store None instead)")
        return value
    if isinstance(value, (list, tuple)):
        return [check_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise HeadscopeError(f"{where}: key {k!r} is not a string")
            out[k] = check_json(v, f"{where}.{k}")
        return out
    raise HeadscopeError(f"{where}: {type(value).__name__} is not a JSON value")


def _result_type(tp) -> type | None:
    """The :class:`Result` subclass a field annotation names (``X`` or ``X | None``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, Result) else None


@dataclasses.dataclass(frozen=True)
class Result:
    """Base of every typed stage result (a frozen dataclass of JSON values)."""

    def to_json(self) -> dict:
        """The result as a JSON object; a non-JSON field raises :class:`HeadscopeError`."""
        name = type(self).__name__
        return {f.name: check_json(getattr(self, f.name), f"{name}.{f.name}") for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict):
        """Rebuild from :meth:`to_json` output (nested :class:`Result` fields, ``X`` or ``X | None``,
        rebuilt by their type)."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, tp = data[f.name], _result_type(hints.get(f.name))
            if tp is not None and isinstance(value, dict):
                value = tp.from_json(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def __str__(self) -> str:  # readable in a notebook cell
        return f"{type(self).__name__}({json.dumps(self.to_json(), indent=1)[:2000]})"
