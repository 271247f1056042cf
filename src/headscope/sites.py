"""Parsing which layers and heads a step covers: ``--layers`` ('all', '3', '1,4,7', '10-13', '-4') and
``--heads`` / sites ('20.3,21.*', or head indices '0,3' for every listed layer). Range-checked against the
model; errors are one-line :class:`HeadscopeError` s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import HeadscopeError

if TYPE_CHECKING:
    from .models.load import Model


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """'all', '3', '1,4,7', '10-13' or '-4' (last four) → sorted layer list (range-checked)."""
    if text is None or text == "all":
        return list(range(n_layers))
    text = str(text)
    if text.startswith("-") and text[1:].isdigit():
        k = int(text[1:])
        if k < 1:
            raise HeadscopeError(f"layers '{text}': ask for at least one layer")
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
    if not out:
        raise HeadscopeError(f"layers '{text}' names no layer")
    for layer in out:
        if not 0 <= layer < n_layers:
            raise HeadscopeError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    return sorted(out)


def parse_sites(text: str, model: Model, layers: list[int] | None = None) -> list[tuple[int, int]]:
    """Sites from '20.3,21.*' (layer.head, ``*`` for all heads) or, with ``layers`` given, head
    indices '0,3' / 'all' applied to every listed layer. Range-checked; sorted, unique."""
    out: set[tuple[int, int]] = set()
    text = (text or "all").strip()
    if not text:
        raise HeadscopeError("no heads given")
    if layers is not None and "." not in text:
        heads = list(range(model.n_heads)) if text in ("all", "*") else []
        if not heads:
            for part in text.split(","):
                try:
                    heads.append(int(part))
                except ValueError:
                    raise HeadscopeError(f"cannot parse heads '{text}' (use e.g. 'all', '0,3' or '20.3,21.*')") from None
        for layer in layers:
            for h in heads:
                out.add((model.check_layer(layer), model.check_head(h)))
        return sorted(out)
    for part in text.split(","):
        part = part.strip()
        if "." not in part:
            raise HeadscopeError(f"cannot parse head '{part}' (use LAYER.HEAD, e.g. 20.3 or 21.*)")
        ls, hs = part.split(".", 1)
        try:
            layer = int(ls)
            heads = range(model.n_heads) if hs == "*" else [int(hs)]
        except ValueError:
            raise HeadscopeError(f"cannot parse head '{part}' (use LAYER.HEAD, e.g. 20.3 or 21.*)") from None
        model.check_layer(layer)
        for h in heads:
            out.add((layer, model.check_head(h)))
    return sorted(out)
