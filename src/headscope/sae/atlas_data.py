"""What the head atlas shows from the SAE instrument: ``atlas_data(run_dir) -> dict``.

Returns ``{"per_head": {"L.H": {...}}, "saes": [...], "feature_pages": {...}}``:

* ``per_head["L.H"]``: for each SAE on layer L: ``sae`` name, ``reconstruction`` (one sentence: how
  much of the model's behaviour the SAE keeps, with its CI — read the features with that in mind),
  ``top_features`` (feature, attribution, top tokens), ``n_groups``, ``polysemantic``, ``verdict``
  (polysemantic / one group / no structure beyond the null), ``q_poly``, ``power`` (the test's planted
  groups detected on this head: ``{planted, detected, by_group_size, cos, how}``, when measured) (from
  ``heads.json``), and the
  IOI effects of the features that attribute mostly to this head (from ``ioi.json``) when present.
* ``saes``: per SAE: name, layer, architecture, d_sae, k, ``reconstruction`` (sentence) and ``eval``
  (L0, FVE, NMSE, the headline score with its CI and whether it is meaningful, every recovered score
  with CI and ablation effect, dead/dense fractions, tokens, documents), polysemantic fraction next
  to the null's, the test's power over the heads (``power``), whether dashboards exist.
* ``feature_pages``: per SAE name, the dashboard index (pages are the files
  ``sae/<name>/dashboards/page_XXX.json``, each ``{"features": {f: record}}``) plus ``reconstruction``.
"""

from __future__ import annotations

from pathlib import Path

from ..runs import read_json


def atlas_data(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    root = run_dir / "sae"
    per_head: dict[str, dict] = {}
    saes, pages = [], {}
    if not root.is_dir():
        return {"per_head": per_head, "saes": saes, "feature_pages": pages}
    for folder in sorted(p for p in root.iterdir() if (p / "cfg.json").is_file()):
        name = folder.name
        cfg = read_json(folder / "cfg.json")
        meta = cfg.get("metadata", {})
        layer = meta.get("headscope", {}).get("layer")
        if layer is None:
            continue
        entry = {"name": name, "layer": layer, "architecture": cfg.get("architecture"), "d_sae": cfg.get("d_sae"),
                 "k": cfg.get("k")}
        recon = None
        if (folder / "eval.json").is_file():
            ev = read_json(folder / "eval.json")
            entry["eval"] = {k: ev.get(k) for k in ("l0", "fve", "nmse", "ce_recovered_zero", "ce_recovered_mean",
                                                     "kl_recovered_zero", "kl_recovered_mean", "dead_frac", "dense_frac",
                                                     "n_tokens", "n_documents")}
            if "recovered" in ev:
                entry["eval"]["headline"] = ev["recovered"]["headline"]
                entry["eval"]["recovered"] = {k: v for k, v in ev["recovered"].items() if k != "headline"}
            recon = reconstruction_sentence(ev)
            entry["reconstruction"] = recon
        ioi = read_json(folder / "ioi.json") if (folder / "ioi.json").is_file() else None
        if ioi:
            entry["ioi"] = {k: ioi.get(k) for k in ("logit_diff_clean", "logit_diff_sae_spliced_at_s2", "n_prompts")}
        if (folder / "heads.json").is_file():
            heads = read_json(folder / "heads.json")
            entry["polysemantic_frac"] = heads.get("polysemantic_frac")
            entry["null_polysemantic_frac"] = heads.get("null_polysemantic_frac")
            entry["power"] = heads.get("power")
            for h, info in heads["heads"].items():
                rec = {"sae": name, "top_features": info["top_features"], "n_groups": info["n_groups"],
                       "polysemantic": info["polysemantic"]}
                rec.update({k: info[k] for k in ("verdict", "q_poly", "power") if k in info})
                if recon:
                    rec["reconstruction"] = recon
                if ioi:
                    rec["ioi_features"] = [{"feature": e["feature"], "delta_logit_diff": round(e["delta_logit_diff"], 4)}
                                           for e in ioi["features"] if e["head_attribution"][int(h)] >= 0.5][:5]
                per_head.setdefault(f"{layer}.{h}", {}).setdefault("sae", []).append(rec)
        if (folder / "dashboards/index.json").is_file():
            idx = read_json(folder / "dashboards/index.json")
            pages[name] = {k: idx[k] for k in ("layer", "n_features", "alive", "page_size", "pages")} | {
                "path": f"sae/{name}/dashboards", "reconstruction": recon}
            entry["dashboards"] = True
        saes.append(entry)
    return {"per_head": per_head, "saes": saes, "feature_pages": pages}


def _fmt_score(name: str, r: dict) -> str:
    ci = r.get("ci")
    v = r.get("value")
    txt = f"{name} {v:.2f}" if v is not None else f"{name} undefined"
    return txt + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def reconstruction_sentence(ev: dict) -> str:
    """One line for the pages: the headline recovered score with its 95 % CI, FVE, L0, the data, and
    a warning when the ablation moves the model too little for the score to mean anything."""
    base = f"FVE {ev['fve']:.2f}, L0 {ev['l0']:.0f}"
    rec = ev.get("recovered")
    if not rec:
        return base + (f", CE recovered (vs zero-ablation) {ev['ce_recovered_zero']:.2f}"
                       if ev.get("ce_recovered_zero") is not None else "")
    h = rec["headline"]
    which = {"kl_recovered_mean": "KL recovered vs mean-ablation", "kl_recovered_zero": "KL recovered vs zero-ablation"}
    label = which.get(h["score"], h["score"])
    s = f"{_fmt_score(label, h)} (95 % CI), {base}; {ev['n_tokens']:,} held-out tokens, {ev.get('n_documents', '?')} documents"
    ce = [_fmt_score(f"vs {b}-ablation", rec[f"ce_recovered_{b}"]) for b in ("zero", "mean") if rec.get(f"ce_recovered_{b}")]
    if ce:
        s += "; CE recovered " + ", ".join(ce)
    if not h["meaningful"]:
        s += "; the ablation changes the model too little for this ratio to mean much"
    elif h["score"] != "kl_recovered_mean":
        s += "; mean-ablation changes the model too little to score against"
    return s

