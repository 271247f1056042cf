"""JSON-ready data about each head for the head atlas, read from ``RUN/lens/``.

``atlas_data(run_dir) -> {"per_head": {"L.H": {...}}, "summary": {...}, "transfer": {...}, "scan": {...}}``

Per head (only heads with a lens): kl_lens / kl_unembed / kl_unembed_nonorm / kl_null (bits/token, held
out), gain (= kl_null − kl_lens), gain_se (clustered by document), p_value, informative (the one rule of
verdict.py: one-sided test, Benjamini–Hochberg q = 0.05 over heads; recomputed here from eval.json),
informative_2se (the old rule, for comparison), top1, entropy, and ``top_tokens``: the tokens with the
largest mean term q·log(q/q_null) of KL(lens ‖ null) over held-out positions (computed by eval) —
present only when the head is informative (a head with no gain says nothing, so no tokens are shown).
``summary.control``: the control lens(es) — same training on a scrambled head output — with their gain
and SE, the value a head with nothing to read gets.

Applications (issue 24), where measured:
- ``per_head[...]["steering"]`` (``lens/steer_eval.json``): per tested direction ("unembed", "lens") the
  row at the strength with the largest effect over the random direction (or the passing one): Δ log₂ p of
  the target (bits), the random direction's, the difference with its 95 % CI over tokens, BH-adjusted
  ``passes``, its BH-adjusted ``q_value`` (over every row tested), KL cost and the residual-stream
  reference's Δ log₂ p at the same KL; ``steers``: any passes; the same row's numbers flat as
  ``<direction>_dlogp`` / ``_random_dlogp`` / ``_diff`` / ``_passes``.
- ``per_head[...]["localisation"]`` (``lens/scan.json``): the token list's hit rate against the
  frequency-matched control list's, difference ± SE over prompts, p, its BH-adjusted ``q_value`` (over
  the scanned heads), ``localised`` (BH over heads).
- ``per_head[...]["applications"]``: {"steering": True/False, "localisation": True/False} for the
  applications measured on this head (absent when not measured): what the lens page says it passed.
- ``steer_eval``: the run's steering summary (tokens, prompts, strengths, clean perplexity, per head and
  direction the success-vs-cost curve points) and ``passed``: the heads that steer beyond the random
  direction; ``scan.classifier``: held-out AUROC of the prompt-set classifier with its CI, its baselines
  and the verdict; ``scan.localisation``: the run's localisation summary and ``localised``: the heads
  that beat the control list.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..runs import read_json
from .verdict import from_eval


def atlas_data(run_dir: Path) -> dict:
    """Lens data for the atlas (empty dict when the run has no evaluated lenses)."""
    folder = Path(run_dir) / "lens"
    if not (folder / "eval.json").exists():
        return {}
    ev = read_json(folder / "eval.json")
    info = read_json(folder / "lenses.json") if (folder / "lenses.json").exists() else {}
    flags = from_eval(ev) or {}
    per_head = {}
    for name, v in ev.get("per_head", {}).items():
        d = {k: v.get(k) for k in ("kl_lens", "kl_unembed", "kl_unembed_nonorm", "kl_null", "gain", "gain_se",
                                   "p_value", "informative_2se", "improvement", "top1", "top1_unembed", "entropy")}
        d["informative"] = bool(flags.get(name, False))
        tops = ev.get("top_tokens", {}).get(name)
        if d["informative"] and tops:
            d["top_tokens"] = tops
        per_head[name] = d
    out = {"per_head": per_head,
           "summary": {"tokens": ev.get("tokens"), "documents": ev.get("documents"), "kl_null": ev.get("kl_null"),
                       "n_heads": ev.get("n_heads"), "n_positive_gain": ev.get("n_positive_gain"),
                       "n_informative": sum(d["informative"] for d in per_head.values()),
                       "n_informative_2se": ev.get("n_informative_2se"), "rule": f"one-sided test, BH q = {ev.get('q', 0.05)}",
                       "median_gain": ev.get("median_gain"), "median_gain_se": ev.get("median_gain_se"),
                       "control": {k: {f: c.get(f) for f in ("source", "gain", "gain_se", "p_value", "kl_lens")}
                                   for k, c in ev.get("control", {}).items()},
                       "lens": info.get("lens"),
                       "train": {k: info.get("train", {}).get(k) for k in ("tokens", "init", "init_tokens", "objective")},
                       "heatmap_gain": ev.get("heatmap_gain")}}
    if "transfer" in ev:
        out["transfer"] = ev["transfer"]
    if (folder / "scan.json").exists():
        sc = read_json(folder / "scan.json")
        out["scan"] = {k: sc.get(k) for k in ("tokens", "k", "n_prompts", "heatmap_hit_rate", "classifier")}
    add_applications(folder, out)
    if (folder / "transfer_checkpoint.json").exists():
        tc = read_json(folder / "transfer_checkpoint.json")
        out["transfer_checkpoint"] = {"target": tc.get("target_model", {}).get("model"),
                                      "n_positive_gain": tc.get("n_positive_gain"),
                                      "gain": {k: v["gain"] for k, v in tc.get("per_head", {}).items()}}
    return out


def bh_adjusted(ps: list) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values (q-values) of ``ps``; None where p is None or not finite."""
    from scipy.stats import false_discovery_control
    ok = [i for i, p in enumerate(ps) if p is not None and math.isfinite(p)]
    out: list[float | None] = [None] * len(ps)
    if ok:
        adj = false_discovery_control(np.asarray([ps[i] for i in ok], dtype=np.float64), method="bh")
        for i, a in zip(ok, adj):
            out[i] = float(a)
    return out


def add_applications(folder: Path, out: dict) -> None:
    """Per-head steering and localisation results (see the module docstring), in place."""
    per_head = out["per_head"]
    if (folder / "steer_eval.json").exists():
        se = read_json(folder / "steer_eval.json")
        for r, qv in zip(se["tests"], bh_adjusted([r.get("p_value") for r in se["tests"]])):
            r["q_value"] = qv
        for name in se["heads"]:
            rows = [r for r in se["tests"] if r["head"] == name]
            by_dir = {}
            for d in sorted({r["direction"] for r in rows}):
                mine = [r for r in rows if r["direction"] == d]
                passing = [r for r in mine if r["passes"]]
                by_dir[d] = max(passing or mine, key=lambda r: r["diff"])
            if name not in per_head:  # a head steered without an evaluated lens: no head entry to extend
                continue
            h = per_head[name]
            h["steering"] = {"directions": by_dir, "steers": any(r["passes"] for r in rows)}
            for d, r in by_dir.items():  # flat numbers one level down: the atlas makes layer×head grids of them
                h["steering"].update({f"{d}_dlogp": r["dlogp"], f"{d}_random_dlogp": r["dlogp_random"],
                                      f"{d}_diff": r["diff"], f"{d}_passes": r["passes"]})
            h.setdefault("applications", {})["steering"] = h["steering"]["steers"]
        out["steer_eval"] = {k: se.get(k) for k in ("heads", "tokens", "n_prompts", "n_cost_prompts", "new_tokens",
                                                   "strengths", "resid_strengths", "clean", "curves", "q")}
        out["steer_eval"]["passed"] = [n for n in se["heads"] if any(r["passes"] for r in se["tests"] if r["head"] == n)]
    if (folder / "scan.json").exists():
        sc = read_json(folder / "scan.json")
        loc = sc.get("localisation")
        if loc:
            names = list(loc["per_head"])
            for name, qv in zip(names, bh_adjusted([loc["per_head"][n].get("p_value") for n in names])):
                v = {**loc["per_head"][name], "q_value": qv}
                if name in per_head:
                    per_head[name]["localisation"] = v
                    per_head[name].setdefault("applications", {})["localisation"] = bool(v["localised"])
            out.setdefault("scan", {})["localisation"] = {k: loc.get(k) for k in ("n_localised", "q", "n_prompts",
                                                                                 "control_tokens", "frequency")}
            out["scan"]["localisation"]["localised"] = [n for n in names if loc["per_head"][n]["localised"]]
