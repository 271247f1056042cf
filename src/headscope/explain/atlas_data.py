"""The explanations' data for the head atlas.

``atlas_data(run_dir)`` → ``{"per_head": {"L.H": {...}}, "scores": {...}, "feature_scores": [...],
"feature_explanations": {sae: {f: [...]}}, "neuron_explanations": {"L.N": [...]}}`` or None when the
run holds no explanation and no head label.

* ``per_head["L.H"]``: ``label`` (the one-line label and its facts with their sources, assembled from the
  run's current artifacts by :func:`headscope.explain.head_label.head_facts`; the LLM summary from
  ``explain/labels.json`` when it was written from the same facts) and, for (neuron, head) pairs, ``mean_E``, ``n_explained`` and
  ``explanations``: [{neuron, token, backend, explanation, E, TPR, TNR}].
* ``scores``: per pair back-end, the summary of E over congruent neurons (and random ones, and their
  comparison, when the baseline was run).
* ``feature_scores``: one row per feature score file: SAE, explanations, judge, how judgements were read,
  and per scorer the balanced accuracy (and AUROC) with CI beside the shuffled-explanation baseline.
* ``feature_explanations`` / ``neuron_explanations``: what the feature and neuron pages show (the atlas'
  collector moves them into those pages' records, see :func:`headscope.atlas.collect.attach_explanations`).
"""

from __future__ import annotations

from pathlib import Path

from ..runs import read_json


def _pairs(d: Path, per_head: dict, neurons: dict) -> dict:
    scores: dict[str, dict] = {}
    for f in sorted(d.glob("explanations_*.json")):
        backend = f.stem[len("explanations_"):]
        ex = read_json(f)
        sc_path = d / f"scores_{backend}.json"
        sc = read_json(sc_path) if sc_path.is_file() else {"pairs": []}
        by_key = {(p["neuron"], p["name"]): p for p in sc.get("pairs", [])}
        for p in ex.get("pairs", []):
            s = by_key.get((p["neuron"], p["name"]), {})
            entry = per_head.setdefault(p["name"], {}).setdefault("explanations", [])
            row = {"neuron": f"{p['neuron_layer']}.{p['neuron_index']}", "token": p["token"], "backend": backend,
                   "explanation": p["explanation"], "E": s.get("E"), "TPR": s.get("TPR"), "TNR": s.get("TNR")}
            entry.append(row)
            neurons.setdefault(row["neuron"], []).append({"head": p["name"], **{k: v for k, v in row.items()
                                                                                  if k != "neuron"}})
        info = {"top": sc.get("summary")}
        for extra, path in (("random", d / "random" / f"scores_{backend}.json"),
                            ("comparison", d / f"comparison_{backend}.json")):
            if path.is_file():
                data = read_json(path)
                info[extra] = data.get("summary", data)
        scores[backend] = info
    for entry in per_head.values():
        if "explanations" in entry:
            Es = [e["E"] for e in entry["explanations"] if e["E"] is not None]
            entry["n_explained"] = len(entry["explanations"])
            entry["mean_E"] = sum(Es) / len(Es) if Es else None
    return scores


def _brief(s: dict) -> dict:
    """A scorer summary in a few numbers: mean and CI of the real and the shuffled score."""
    out = {}
    for k in ("balanced_accuracy", "shuffled_balanced_accuracy", "difference", "auroc", "shuffled_auroc"):
        if s.get(k):
            out[k] = {"mean": s[k].get("mean"), "ci": s[k].get("ci")}
    if s.get("difference", {}).get("p_wilcoxon") is not None:
        out["p_wilcoxon"] = s["difference"]["p_wilcoxon"]
    out["units"] = s.get("units")
    return out


def _features(root: Path) -> tuple[dict, list]:
    expl: dict[str, dict[str, list]] = {}
    rows = []
    if not root.is_dir():
        return expl, rows
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        per_unit: dict[tuple[str, str], dict] = {}
        for sf in sorted(d.glob("scores_*_by_*.json")):
            sc = read_json(sf)
            judge = sc.get("scorer", {}).get("backend", sf.stem.split("_by_")[-1])
            rows.append({"sae": d.name, "explanations": sc["explanations"], "judge": judge,
                         "probabilities": sc.get("probabilities"),
                         **{k: _brief(v) for k, v in sc.get("summary", {}).items()}})
            for u in sc.get("features", []):
                per_unit[(sc["explanations"], u["id"])] = {
                    "judge": judge, **{k: {kk: u[k].get(kk) for kk in ("balanced_accuracy", "shuffled_balanced_accuracy",
                                                                      "auroc", "shuffled_auroc", "n_pos", "n_neg")}
                                       for k in ("detection", "fuzzing") if k in u}}
        for ef in sorted(d.glob("explanations_*.json")):
            backend = ef.stem[len("explanations_"):]
            for f, e in read_json(ef)["features"].items():
                expl.setdefault(d.name, {}).setdefault(str(f), []).append(
                    {"backend": backend, "explanation": e["explanation"], "scores": per_unit.get((backend, str(f)))})
    return expl, rows


def _labels(run_dir: Path, per_head: dict) -> None:
    """Every head's label from the run's current artifacts (so it is never stale), with the LLM summary of
    ``explain/labels.json`` only when that summary was written from these same facts."""
    from .head_label import head_facts
    saved = read_json(run_dir / "explain/labels.json") if (run_dir / "explain/labels.json").is_file() else {}
    opts = saved.get("options", {})
    facts = head_facts(run_dir, opts.get("top_frac", 0.05))
    for hk, fs in facts.items():
        if not fs:
            continue
        old = saved.get("heads", {}).get(hk, {})
        same = [f["text"] for f in old.get("facts", [])] == [f["text"] for f in fs]
        per_head.setdefault(hk, {})["label"] = {
            "label": " · ".join(f["text"] for f in fs[:opts.get("max_facts", 6)]), "facts": fs,
            "summary": old.get("summary") if same else None}


def atlas_data(run_dir: Path) -> dict | None:
    run_dir = Path(run_dir)
    d = run_dir / "explain"
    if not (run_dir / "run.json").is_file():
        return None
    per_head: dict[str, dict] = {}
    neurons: dict[str, list] = {}
    scores = _pairs(d, per_head, neurons) if d.is_dir() else {}
    _labels(run_dir, per_head)
    fexpl, frows = _features(d / "features") if d.is_dir() else ({}, [])
    out = {"per_head": per_head}
    if scores:
        out["scores"] = {"backends": list(scores), **scores}
    if frows:
        out["feature_scores"] = frows
    if fexpl:
        out["feature_explanations"] = fexpl
    if neurons:
        out["neuron_explanations"] = neurons
    return out if any(v for v in out.values()) else None
