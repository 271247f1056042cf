"""Head scores as atlas data."""

from __future__ import annotations

from pathlib import Path

from ..errors import HeadscopeError
from ..runs import read_json


def atlas_data(run_dir: Path) -> dict | None:
    """Head scores as atlas data: ``{"per_head": {"L.H": {score: float}}, "prefix_induction": {...}}``,
    or None when ``RUN/heads/scores.json`` does not exist."""
    path = Path(run_dir) / "heads" / "scores.json"
    if not path.is_file():
        return None
    data = read_json(path)
    try:
        L, H = int(data["n_layers"]), int(data["n_heads"])
        scores = data["scores"]
    except (KeyError, TypeError, ValueError):
        raise HeadscopeError(f"{path} lacks n_layers/n_heads/scores: not a head-scores file") from None
    per_head: dict[str, dict] = {}
    for name, grid in scores.items():
        if len(grid) != L or any(len(row) != H for row in grid):
            raise HeadscopeError(f"{path}: score '{name}' is not a [{L}][{H}] grid")
        for layer in range(L):
            for head in range(H):
                per_head.setdefault(f"{layer}.{head}", {})[name] = grid[layer][head]
    out = {"per_head": per_head}
    prefix = data.get("prefix_induction")
    if isinstance(prefix, dict) and "scores" in prefix:
        lengths = prefix.get("prefix_lengths") or list(range(1, len(prefix["scores"]) + 1))
        for layer in range(L):
            for head in range(H):
                per_head[f"{layer}.{head}"]["prefix_induction"] = {
                    "prefix_lengths": lengths, "scores": [p[layer][head] for p in prefix["scores"]]}
    if "config" in data:
        out["config"] = data["config"]
    return out
