"""The one rule that decides whether a head's lens is informative (used by eval, show, scan, atlas).

A lens is **informative** when its held-out information gain over the null lens is significantly above
zero: a one-sided test per head (t = gain / SE, SE clustered by document, df = documents − 1), with the
Benjamini–Hochberg false-discovery rate controlled at q = 0.05 over all heads of the evaluation (many
heads are tested at once). The older rule "gain > 2·SE" is reported beside it (``informative_2se``) but
decides nothing. Control lenses are tested with the same statistic but never enter the BH family.
"""

from __future__ import annotations

import math

import numpy as np

from ..stats import benjamini_hochberg, one_sided_p

Q = 0.05
"""False-discovery rate of the informative rule."""


def decide(per_head: dict, df: int | None, q: float = Q) -> dict[str, dict]:
    """{"L.H": {"p_value", "informative" (BH at q), "informative_2se"}} from per-head {"gain", "gain_se"}."""
    names = list(per_head)
    gain = np.array([per_head[n]["gain"] for n in names], dtype=np.float64)
    se = np.array([np.nan if per_head[n].get("gain_se") is None else per_head[n]["gain_se"] for n in names])
    p = one_sided_p(gain, se, df)
    bh = benjamini_hochberg(p, q)
    out = {}
    for i, n in enumerate(names):
        out[n] = {"p_value": None if not math.isfinite(p[i]) else float(p[i]), "informative": bool(bh[i]),
                  "informative_2se": bool(np.isfinite(se[i]) and gain[i] > 2 * se[i])}
    return out


def from_eval(ev: dict | None) -> dict[str, bool] | None:
    """Informative flag per head recomputed from an ``eval.json`` dict with :func:`decide` (None: no eval)."""
    if not ev or "per_head" not in ev:
        return None
    d = decide(ev["per_head"], ev.get("df"), ev.get("q", Q))
    return {n: v["informative"] for n, v in d.items()}
