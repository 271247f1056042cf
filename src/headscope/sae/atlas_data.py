"""What the head atlas shows from the SAE instrument: ``atlas_data(run_dir) -> dict``.

Returns ``{"per_head": {"L.H": {...}}, "saes": [...], "feature_pages": {...}}``:

* ``per_head["L.H"]``: for each SAE on layer L: ``sae`` name, ``top_features`` (feature, attribution,
  top tokens), ``n_groups``, ``polysemantic`` (from ``heads.json``), and the IOI effects of the features
  that attribute mostly to this head (from ``ioi.json``) when present.
* ``saes``: per SAE: name, layer, architecture, d_sae, k, eval metrics (L0, FVE, CE/KL recovered),
  polysemantic fraction, whether dashboards exist.
* ``feature_pages``: per SAE name, the dashboard index (pages are the files
  ``sae/<name>/dashboards/page_XXX.json``, each ``{"features": {f: record}}``).
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
        if (folder / "eval.json").is_file():
            ev = read_json(folder / "eval.json")
            entry["eval"] = {k: ev.get(k) for k in ("l0", "fve", "nmse", "ce_recovered_zero", "ce_recovered_mean",
                                                     "kl_recovered_zero", "kl_recovered_mean", "dead_frac", "dense_frac",
                                                     "n_tokens")}
        ioi = read_json(folder / "ioi.json") if (folder / "ioi.json").is_file() else None
        if ioi:
            entry["ioi"] = {k: ioi.get(k) for k in ("logit_diff_clean", "logit_diff_sae_spliced_at_s2", "n_prompts")}
        if (folder / "heads.json").is_file():
            heads = read_json(folder / "heads.json")
            entry["polysemantic_frac"] = heads.get("polysemantic_frac")
            for h, info in heads["heads"].items():
                rec = {"sae": name, "top_features": info["top_features"], "n_groups": info["n_groups"],
                       "polysemantic": info["polysemantic"]}
                if ioi:
                    rec["ioi_features"] = [{"feature": e["feature"], "delta_logit_diff": round(e["delta_logit_diff"], 4)}
                                           for e in ioi["features"] if e["head_attribution"][int(h)] >= 0.5][:5]
                per_head.setdefault(f"{layer}.{h}", {}).setdefault("sae", []).append(rec)
        if (folder / "dashboards/index.json").is_file():
            idx = read_json(folder / "dashboards/index.json")
            pages[name] = {k: idx[k] for k in ("layer", "n_features", "alive", "page_size", "pages")} | {
                "path": f"sae/{name}/dashboards"}
            entry["dashboards"] = True
        saes.append(entry)
    return {"per_head": per_head, "saes": saes, "feature_pages": pages}
