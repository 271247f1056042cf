"""Gather the atlas' data from a run directory.

Sources, each optional (an absent instrument is simply left out, never faked):

* ``heads``: ``RUN/heads/scores.json`` written by ``headscope heads score`` (induction, previous-token and
  duplicate-token scores [L][H], prefix-induction scores [P][L][H]).
* ``lens``, ``sae``, ``neurons``, ``explain``: ``headscope.<pkg>.atlas_data.atlas_data(run_dir)`` of each
  instrument package, a dict ``{"per_head": {"L.H": {...}}, <global pages>...}``.

:func:`collect` returns ``{"sources": {name: data}, "errors": {name: message}}``; a source whose package is
not part of this build, or whose artifacts are not in the run directory, is absent from both.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import HeadscopeError
from ..runs import read_json

def source_names() -> tuple[str, ...]:
    """The instruments (registry order) that give atlas data: the page's sections, in order."""
    from ..registry import instruments
    return tuple(ins.name for ins in instruments() if ins.atlas_data)


def _instrument(name: str, run_dir: Path):
    from ..registry import instruments
    from ..runs import resolve
    ref = next((ins.atlas_data for ins in instruments() if ins.name == name), None)
    return resolve(ref)(Path(run_dir)) if ref else None


def collect(run_dir: Path, sources: tuple[str, ...] | None = None) -> dict:
    """Every source's atlas data: ``{"sources": {name: data}, "errors": {name: message}}``.

    A source that raises is reported in ``errors`` (shown on the page and on stderr) so that one
    broken instrument does not take the whole atlas down."""
    run_dir = Path(run_dir)
    names = source_names() if sources is None else sources
    out: dict = {"sources": {}, "errors": {}}
    for name in names:
        try:
            data = _instrument(name, run_dir)
        except (HeadscopeError, FileNotFoundError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, FileNotFoundError) or msg.startswith("missing file"):
                continue  # artifacts not there: the stage has not run
            out["errors"][name] = msg
            print(f"headscope: warning: atlas section '{name}' left out: {msg}", file=sys.stderr)
            continue
        except Exception as e:  # noqa: BLE001 — one instrument's bug must not hide the others
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            out["errors"][name] = msg
            print(f"headscope: warning: atlas section '{name}' failed: {msg}", file=sys.stderr)
            continue
        if name == "sae" and data:
            data = expand_sae_pages(run_dir, data)
        if data and any(v not in (None, {}, [], "") for v in data.values()):
            out["sources"][name] = clean(data)
    return out


def expand_sae_pages(run_dir: Path, data: dict) -> dict:
    """Turn the SAE's ``feature_pages`` index into collections ``features_<sae name>`` ({feature: record})
    read from ``sae/<name>/dashboards/page_XXX.json``, so the atlas pages them like any collection."""
    data = dict(data)
    pages = data.pop("feature_pages", None) or {}
    for name, info in pages.items():
        folder = Path(run_dir) / info.get("path", f"sae/{name}/dashboards")
        feats: dict[str, dict] = {}
        for i in range(int(info.get("pages", 0))):
            page = read_json(folder / f"page_{i:03d}.json")
            for f, rec in page.get("features", {}).items():
                feats[str(f)] = {"sae": name, "layer": info.get("layer"), **rec}
        if feats:
            data[f"features_{name}"] = feats
    return data


def clean(obj, depth: int = 0):
    """JSON-ready copy: tensors/arrays to lists, NaN/inf to None, keys to strings, tuples to lists."""
    if depth > 40:
        raise HeadscopeError("atlas data nests deeper than 40 levels")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch / numpy
        return clean(obj.tolist(), depth + 1)
    if isinstance(obj, dict):
        return {str(k): clean(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v, depth + 1) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
