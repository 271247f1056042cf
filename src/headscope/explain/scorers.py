"""Scorers for explanations of any unit (SAE feature, (neuron, head) pair): detection and fuzzing, each
beside its random baseline, with confidence intervals.

A unit to score is ``{"id", "explanation", "items": {kind: [(context, truth), ...]}}``; ``kind`` is
``detection`` (activating vs non-activating contexts, shown without marks) or ``fuzzing`` (the real
activating tokens marked vs as many random tokens of the same contexts marked). The judge answers
P(yes) ∈ [0, 1] or None (unparsed) per item.

Per unit and kind:

* ``balanced_accuracy`` = (TPR + TNR) / 2 with "yes" = P ≥ 0.5 (None counts as "no");
* ``auroc`` = P(P_pos > P_neg) + ½ P(tie) = U / (n_pos · n_neg) (Mann–Whitney U, scipy), only when the
  back-end gives graded probabilities (some P strictly between 0 and 1) — a Yes/No text answer has none;
* the same two numbers with the **shuffled explanation** (baseline): every unit's items judged with the
  explanation of another unit (a seeded derangement), so the baseline has the same items, the same judge
  and explanations of the same style, and only the match between explanation and unit is broken.

Summary over units: the mean of each, a 95 % bootstrap CI (``scipy.stats.bootstrap``, percentile, 2000
resamples, seeded), the paired difference real − shuffled with its CI, and the one-sided Wilcoxon
signed-rank p-value of that difference (``scipy.stats.wilcoxon``). Units whose items are all one class
are left out of that kind (``skipped``). When a unit gives its items' documents (``unit["docs"][kind]``), its row
also gets its own balanced accuracy's 95 % ``ci`` and one-sided ``p`` against chance clustered by document
(:func:`headscope.explain.scoring.detection_score`, its bootstrap seeded by ``unit["key"]`` when given, e.g.
the pair's key, so that a pair gets the interval ``explain score`` gives it). When every unit gives its items' clusters (``unit["clusters"][kind]``,
parallel to its items: their documents, or the neuron of a pair), ``difference_clustered`` adds the same
difference with a CI clustered by them (:func:`clustered_difference`): items that share a document (or a
neuron's prompts) are not independent, within a unit or across units. ``groups``: units of one group
(a neuron's pairs) never get each other's explanation as the shuffled one (:func:`group_derangement`).
"""

from __future__ import annotations

import numpy as np

from .contexts import JudgeRequest
from .options import KINDS
from .scoring import balanced_accuracy, detection_score


def said_yes(probs: list[float | None]) -> list[bool]:
    """The judge's answers as yes/no: P ≥ 0.5 is yes, None (unparsed) is no."""
    return [p is not None and p >= 0.5 for p in probs]


def graded(probs: list[float | None]) -> bool:
    """Whether the judge gave probabilities (some strictly between 0 and 1), so that AUROC means something."""
    return any(p is not None and 0.0 < p < 1.0 for p in probs)


def auroc(probs: list[float | None], truth: list[bool]) -> float | None:
    """U / (n_pos · n_neg) of the Mann–Whitney test (None → 0.5); None for one class."""
    from scipy.stats import mannwhitneyu
    pos = [0.5 if p is None else p for p, t in zip(probs, truth) if t]
    neg = [0.5 if p is None else p for p, t in zip(probs, truth) if not t]
    if not pos or not neg:
        return None
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic) / (len(pos) * len(neg))


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded random permutation with no fixed point (n ≥ 2): unit i gets the explanation of perm[i]."""
    if n < 2:
        raise ValueError("a shuffled-explanation baseline needs at least two units")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return [int(x) for x in p]


def mean_ci(x: list[float], seed: int = 0, level: float = 0.95) -> dict:
    """Mean and percentile-bootstrap CI (scipy.stats.bootstrap, 2000 resamples); CI None below 2 values."""
    x = [float(v) for v in x if v is not None]
    if not x:
        return {"mean": None, "ci": None, "n": 0}
    out = {"mean": float(np.mean(x)), "ci": None, "n": len(x)}
    if len(x) >= 2 and np.ptp(x) > 0:
        from scipy.stats import bootstrap
        r = bootstrap((np.asarray(x),), np.mean, confidence_level=level, n_resamples=2000, method="percentile",
                      random_state=np.random.default_rng(seed))
        out["ci"] = [float(r.confidence_interval.low), float(r.confidence_interval.high)]
    elif len(x) >= 2:
        out["ci"] = [out["mean"], out["mean"]]
    return out


def paired(real: list[float | None], base: list[float | None], seed: int = 0) -> dict:
    """real − baseline over the units that have both: mean, bootstrap CI, one-sided Wilcoxon p."""
    d = [r - b for r, b in zip(real, base) if r is not None and b is not None]
    out = mean_ci(d, seed)
    out["p_wilcoxon"] = None
    if len(d) >= 2 and any(v != 0 for v in d):
        from scipy.stats import wilcoxon
        out["p_wilcoxon"] = float(wilcoxon(d, alternative="greater").pvalue)
    return out


def clustered_difference(real: list[list], shuf: list[list], truth: list[list[bool]], docs: list[list[int]],
                         seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> dict:
    """Mean over units of balanced accuracy(real) − balanced accuracy(shuffled), with a percentile
    bootstrap CI **clustered by document**: each resample draws the documents with replacement and weighs
    every judged item (of every unit) by its document's multiplicity, so items that share a document —
    within a unit or across units — move together. Per unit and lists of the same length: ``real``,
    ``shuf`` P(yes) or None, ``truth``, ``docs`` the item's document. ``p_bootstrap``: the share of
    resamples with a difference ≤ 0 (one-sided)."""
    uid = np.concatenate([np.full(len(t), u) for u, t in enumerate(truth)])
    yes = lambda ps: np.array([p is not None and p >= 0.5 for q in ps for p in q], dtype=float)
    yr, ys = yes(real), yes(shuf)
    t = np.array([x for q in truth for x in q], dtype=float)
    d_all = np.array([x for q in docs for x in q])
    uniq, dix = np.unique(d_all, return_inverse=True)
    U = np.zeros((len(t), len(truth)))
    U[np.arange(len(t)), uid] = 1.0

    def diff(w: np.ndarray) -> np.ndarray:                       # w [B, n_docs] → [B]
        wi = w[:, dix]                                              # [B, items]
        pos, neg = (wi * t) @ U, (wi * (1 - t)) @ U                  # [B, units]
        ba = lambda y: 0.5 * ((wi * y * t) @ U / np.maximum(pos, 1e-12) + (wi * (1 - y) * (1 - t)) @ U / np.maximum(neg, 1e-12))
        ok = (pos > 0) & (neg > 0)
        dd = np.where(ok, ba(yr) - ba(ys), 0.0)
        return dd.sum(1) / np.maximum(ok.sum(1), 1)
    point = float(diff(np.ones((1, len(uniq))))[0])
    rng = np.random.default_rng(seed)
    boots = np.concatenate([diff(rng.multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=200).astype(float))
                            for _ in range(n_boot // 200)])
    a = (1 - level) / 2
    return {"mean": point, "ci": [float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))],
            "p_bootstrap": float((boots <= 0).mean()), "documents": int(len(uniq)), "units": len(truth),
            "method": "percentile bootstrap over documents (items weighted by their document's multiplicity)"}


def group_derangement(groups: list, seed: int = 0) -> list[int]:
    """For each unit, another unit of a *different* group (e.g. another neuron's pair): a seeded
    derangement when one exists (tries 1000 permutations), else an independent random choice per unit
    among the other groups' units. Needs two groups."""
    if len(set(groups)) < 2:
        raise ValueError("a shuffled-explanation baseline across groups needs at least two groups")
    g = np.asarray([hash(x) for x in groups])
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        p = rng.permutation(len(groups))
        if not (g[p] == g).any():
            return [int(x) for x in p]
    return [int(rng.choice(np.flatnonzero(g != g[i]))) for i in range(len(groups))]


def score_units(judge, units: list[dict], kinds: tuple[str, ...] = KINDS, seed: int = 0, chunk: int = 64,
                progress=None, groups: list | None = None, cluster_name: str = "document") -> dict:
    """Judge every unit's items with its own and with a shuffled explanation (see the module docstring).

    ``judge(list[JudgeRequest]) -> list[P | None]``. Returns ``{"units": [{id, <kind>: {balanced_accuracy,
    auroc, shuffled_balanced_accuracy, shuffled_auroc, n_pos, n_neg, unparsed, shuffled_from[, ci, p, documents,
    interval]}}],
    "summary": {<kind>: {balanced_accuracy, shuffled_balanced_accuracy, difference, auroc, shuffled_auroc,
    auroc_difference, graded, units, skipped}}}``."""
    perm = derangement(len(units), seed) if groups is None else group_derangement(groups, seed)
    reqs: list[JudgeRequest] = []
    spans = []
    for u, unit in enumerate(units):
        for kind in kinds:
            items = unit["items"].get(kind, [])
            start = len(reqs)
            reqs += [JudgeRequest(kind, unit["explanation"], c) for c, _ in items]
            reqs += [JudgeRequest(kind, units[perm[u]]["explanation"], c) for c, _ in items]
            spans.append((u, kind, start, len(items)))
    probs: list = []
    for s in range(0, len(reqs), chunk):
        probs += judge(reqs[s:s + chunk])
        if progress is not None:
            progress(min(chunk, len(reqs) - s))
    rows = [{"id": unit["id"]} for unit in units]
    for u, kind, start, n in spans:
        truth = [t for _, t in units[u]["items"].get(kind, [])]
        real, shuf = probs[start:start + n], probs[start + n:start + 2 * n]
        rows[u][kind] = {
            "balanced_accuracy": balanced_accuracy(said_yes(real), truth), "auroc": auroc(real, truth),
            "shuffled_balanced_accuracy": balanced_accuracy(said_yes(shuf), truth), "shuffled_auroc": auroc(shuf, truth),
            "n_pos": sum(truth), "n_neg": len(truth) - sum(truth), "unparsed": sum(p is None for p in real),
            "shuffled_from": units[perm[u]]["id"], "graded": graded(real + shuf),
            "probs": [None if p is None else round(float(p), 4) for p in real],
            "shuffled_probs": [None if p is None else round(float(p), 4) for p in shuf], "truth": truth}
        docs = units[u].get("docs", {}).get(kind)
        if docs is not None:   # the unit's own interval and p, clustered by the items' documents
            ds = detection_score(said_yes(real), truth, docs, seed=units[u].get("key", f"{units[u]['id']}:{kind}"))
            rows[u][kind] |= {"ci": [ds.get("E_low"), ds.get("E_high")], "p": ds.get("p"),
                              "documents": ds.get("documents"), "interval": ds.get("interval")}
    summary = {}
    for kind in kinds:
        rs = [r[kind] for r in rows if kind in r]
        ok = [r for r in rs if r["balanced_accuracy"] is not None]
        g = any(r["graded"] for r in ok)
        col = lambda k: [r[k] for r in ok]
        summary[kind] = {
            "balanced_accuracy": mean_ci(col("balanced_accuracy"), seed),
            "shuffled_balanced_accuracy": mean_ci(col("shuffled_balanced_accuracy"), seed),
            "difference": paired(col("balanced_accuracy"), col("shuffled_balanced_accuracy"), seed),
            "graded": g, "units": len(ok), "skipped": len(rs) - len(ok),
            "unparsed": sum(r["unparsed"] for r in rs), "judgements": sum(r["n_pos"] + r["n_neg"] for r in rs)}
        cl = [(unit["clusters"][kind], r) for unit, r in zip(units, rows)
              if kind in r and r[kind]["balanced_accuracy"] is not None and unit.get("clusters", {}).get(kind)]
        if cl and len(cl) == len(ok):
            summary[kind]["difference_clustered"] = clustered_difference(
                [r[kind]["probs"] for _, r in cl], [r[kind]["shuffled_probs"] for _, r in cl],
                [r[kind]["truth"] for _, r in cl], [d for d, _ in cl], seed=seed) | {"by": cluster_name}
        if g:
            summary[kind] |= {"auroc": mean_ci(col("auroc"), seed),
                              "shuffled_auroc": mean_ci(col("shuffled_auroc"), seed),
                              "auroc_difference": paired(col("auroc"), col("shuffled_auroc"), seed)}
    return {"units": rows, "summary": summary}
