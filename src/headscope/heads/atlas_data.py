"""Head scores and head roles as atlas data."""

from __future__ import annotations

from pathlib import Path

from ..errors import HeadscopeError
from ..runs import read_json


def _scores(path: Path) -> dict:
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


def role_census(doc: dict) -> dict[str, dict]:
    """Per role: what it is (title, phrase, definition, source, score and control, causal task) and how many
    heads showed it by score and how many were confirmed causally."""
    out = {}
    for rid, r in doc["roles"].items():
        c = r.get("causal")
        out[rid] = {"role": rid, "title": r["title"], "phrase": r["phrase"], "definition": r["definition"],
                    "source": r["source"], "score_name": r["score_name"], "control_name": r["control_name"],
                    "n_shown": sum(bool(x) for row in r["passed"] for x in row),
                    "n_confirmed": sum(bool(x) and c is not None for row in r["confirmed"] for x in row),
                    "causal_task": c["task"] if c else None, "causal_metric": c["metric"] if c else None,
                    "ablation": c["ablation"] if c else None}
    return out


def atlas_data(run_dir: Path) -> dict | None:
    """Head scores and roles as atlas data, or None when the run has neither ``heads/scores.json`` nor
    ``heads/roles.json``:

    * ``per_head["L.H"]``: every score (and ``prefix_induction``: {prefix_lengths, scores}); with roles,
      ``roles``: the head's verdict (:func:`headscope.heads.verdict.verdict`: ``text``, ``roles_sentence``,
      ``confirmed``, ``shown``, ``rows`` — the roles table —, ``findings`` and evidence ``links``);
    * ``roles``: one record per role (:func:`role_census`), a page of the atlas;
    * ``roles_summary``: how many roles were tested, on what data, the BH level and the screen's agreement
      with the real ablations."""
    run_dir = Path(run_dir)
    path = run_dir / "heads" / "scores.json"
    out = _scores(path) if path.is_file() else {"per_head": {}}
    from .verdict import load_roles, run_verdicts
    doc = load_roles(run_dir)
    if doc is None:
        return out if path.is_file() else None
    for hk, v in run_verdicts(run_dir).items():
        rec = v.to_json()
        rec.pop("head"), rec.pop("n_tested")
        out["per_head"].setdefault(hk, {})["roles"] = rec
    out["roles"] = role_census(doc)
    out["roles_summary"] = {"n_roles": len(doc["roles"]), "q": doc["q"], "data": doc.get("data"),
                            "screen": doc.get("screen")}
    return out
