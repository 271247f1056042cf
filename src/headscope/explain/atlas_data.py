"""The explanations' data for the head atlas.

``atlas_data(run_dir)`` → ``{"per_head": {"L.H": {"mean_E", "n_explained", "explanations": [{neuron,
token, backend, explanation, E, TPR, TNR}]}}, "scores": {...}}`` or None when no explanation exists.
``scores`` holds, per backend, the summary of E over congruent neurons (and random ones, and their
comparison, when the baseline was run). ``mean_E`` is over the head's scored pairs of every backend.
"""

from __future__ import annotations

from pathlib import Path

from ..runs import read_json


def atlas_data(run_dir: Path) -> dict | None:
    d = Path(run_dir) / "explain"
    files = sorted(d.glob("explanations_*.json")) if d.is_dir() else []
    if not files:
        return None
    per_head: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    for f in files:
        backend = f.stem[len("explanations_"):]
        ex = read_json(f)
        sc_path = d / f"scores_{backend}.json"
        sc = read_json(sc_path) if sc_path.is_file() else {"pairs": []}
        by_key = {(p["neuron"], p["name"]): p for p in sc["pairs"]}
        for p in ex["pairs"]:
            s = by_key.get((p["neuron"], p["name"]), {})
            entry = per_head.setdefault(p["name"], {"n_explained": 0, "explanations": []})
            entry["n_explained"] += 1
            entry["explanations"].append({"neuron": f"{p['neuron_layer']}.{p['neuron_index']}", "token": p["token"],
                                          "backend": backend, "explanation": p["explanation"],
                                          "E": s.get("E"), "TPR": s.get("TPR"), "TNR": s.get("TNR")})
        info = {"top": sc.get("summary")}
        for extra, path in (("random", d / "random" / f"scores_{backend}.json"),
                            ("comparison", d / f"comparison_{backend}.json")):
            if path.is_file():
                data = read_json(path)
                info[extra] = data.get("summary", data)
        scores[backend] = info
    for entry in per_head.values():
        Es = [e["E"] for e in entry["explanations"] if e["E"] is not None]
        entry["mean_E"] = sum(Es) / len(Es) if Es else None
    return {"per_head": per_head, "scores": {"backends": list(scores), **scores}}
