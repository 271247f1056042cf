"""Scoring an explanation on labelled held-out examples, reusable by any explainer and any unit.

The score of Neo et al.: a scorer sees only the explanation and one held-out example and says whether
the unit (head) is active on it; E = (TPR + TNR) / 2 against the truth. Here the held-out examples are
drawn **balanced** — as many active as inactive (:func:`balanced_indices`) — so E is the accuracy on
2m examples, and it gets

* a Wilson 95 % interval (``scipy.stats.binomtest(k, 2m).proportion_ci(method="wilson")``),
* a one-sided exact binomial p-value against chance (E = 0.5), and, across the pairs of a run,
  Benjamini–Hochberg adjusted q-values (:func:`add_fdr`).

A pair with fewer than ``min_per_class`` examples of either class is not scored (E = None, with the
reason): it cannot tell an explanation from chance.

Entry points: :func:`score_explanations` (many explanations, one batched call to the scorer) and
:func:`balanced_accuracy` (the arithmetic).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..neurons.stats import bh, binom_above, wilson_interval
from .prompts import ClassifyRequest


@dataclass
class ScoringItem:
    """One explanation and its labelled held-out examples (``examples[i]`` is active iff ``truth[i]``)."""

    key: str
    explanation: str
    examples: list[str]
    truth: list[bool]
    token: str = ""
    """the token appended to every example (the pair's neuron's), when known"""


def balanced_indices(truth: list[bool], max_per_class: int, min_per_class: int, seed: str | int = 0
                     ) -> tuple[list[int], str | None]:
    """m = min(#active, #inactive, max_per_class) random examples of each class (seeded by ``seed``,
    e.g. the pair's key), in their original order; ``([], reason)`` when m < ``min_per_class``."""
    pos = [i for i, t in enumerate(truth) if t]
    neg = [i for i, t in enumerate(truth) if not t]
    m = min(len(pos), len(neg), max_per_class)
    if m < max(1, min_per_class):
        return [], f"{len(pos)} active / {len(neg)} inactive held-out examples (< {max(1, min_per_class)} of a class)"
    h = int(hashlib.sha1(str(seed).encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(h)
    pick = sorted(rng.choice(pos, m, replace=False).tolist() + rng.choice(neg, m, replace=False).tolist())
    return pick, None


def balanced_accuracy(pred: list[bool], truth: list[bool]) -> dict:
    """TPR, TNR and E = (TPR + TNR)/2 with E's Wilson interval and binomial p-value against 0.5
    (exact on balanced examples, where E is the accuracy); E is None when the truth is all one class."""
    pos = sum(truth)
    neg = len(truth) - pos
    tp = sum(bool(p) and t for p, t in zip(pred, truth))
    tn = sum((not p) and (not t) for p, t in zip(pred, truth))
    if pos == 0 or neg == 0:
        return {"E": None, "TPR": tp / pos if pos else None, "TNR": tn / neg if neg else None,
                "n_pos": pos, "n_neg": neg, "skipped": "test prompts are all one class"}
    tpr, tnr = tp / pos, tn / neg
    res = {"E": (tpr + tnr) / 2, "TPR": tpr, "TNR": tnr, "n_pos": pos, "n_neg": neg}
    if pos == neg:
        lo, hi = wilson_interval(tp + tn, pos + neg)
        res.update(E_low=lo, E_high=hi, p=binom_above(tp + tn, pos + neg))
    return res


def score_explanations(scorer, items: list[ScoringItem], max_per_class: int = 20, min_per_class: int = 5,
                       chunk: int = 64, progress=None) -> list[dict]:
    """Score every item on a balanced subset of its examples with ``scorer.classify_many`` (batched over
    items, ``chunk`` examples a call). Returns one row per item: ``{key, E, E_low, E_high, p, TPR, TNR,
    n_pos, n_neg, unparsed, predictions, truth, examples (indices used)}`` or ``{key, E: None,
    skipped}``; no FDR yet (:func:`add_fdr`). ``progress``: a callable told the examples done."""
    reqs, spans = [], []
    for it in items:
        idx, why = balanced_indices(it.truth, max_per_class, min_per_class, it.key)
        spans.append((len(reqs), idx, why))
        reqs += [ClassifyRequest(it.explanation, it.examples[i], it.token) for i in idx]
    probs: list = []
    for s in range(0, len(reqs), chunk):
        probs += scorer.classify_many(reqs[s:s + chunk])
        if progress:
            progress(min(chunk, len(reqs) - s))
    rows = []
    for it, (start, idx, why) in zip(items, spans):
        if why:
            n_pos = sum(it.truth)
            rows.append({"key": it.key, "E": None, "n_pos": n_pos, "n_neg": len(it.truth) - n_pos, "skipped": why})
            continue
        ps = probs[start:start + len(idx)]
        ys = [it.truth[i] for i in idx]
        pred = [p is not None and p >= 0.5 for p in ps]
        rows.append({"key": it.key, **balanced_accuracy(pred, ys), "unparsed": sum(p is None for p in ps),
                     "predictions": [None if p is None else round(float(p), 4) for p in ps], "truth": ys,
                     "examples": idx})
    return rows


def add_fdr(rows: list[dict], q: float = 0.05) -> int:
    """Add ``q`` (Benjamini–Hochberg over the rows with a p-value) and ``significant`` (q < ``q``) to
    each row; returns the number significant."""
    qs = bh([r.get("p") for r in rows])
    n = 0
    for r, qq in zip(rows, qs):
        r["q"] = qq
        r["significant"] = qq is not None and qq < q
        n += r["significant"]
    return n


def shuffled_items(items: list[ScoringItem], group: list[int], seed: int = 0) -> list[ScoringItem]:
    """The negative control: each item gets the explanation of another item from a *different* group
    (neuron), chosen at random (seeded); items with no other group keep no explanation ("")."""
    rng = np.random.default_rng(seed)
    out = []
    for i, it in enumerate(items):
        others = [j for j in range(len(items)) if group[j] != group[i]]
        expl = items[int(rng.choice(others))].explanation if others else ""
        out.append(ScoringItem(it.key, expl, it.examples, it.truth, it.token))
    return out
