"""Scoring an explanation on labelled held-out examples, reusable by any explainer and any unit.

The score of Neo et al.: a scorer sees only the explanation and one held-out example and says whether
the unit (head) is active on it; E = (TPR + TNR) / 2 against the truth (:func:`balanced_accuracy`). Here the
held-out examples are drawn **balanced** — as many active as inactive (:func:`balanced_indices`) — so E is
also the accuracy on the 2m examples. :func:`detection_score` gives E with an interval and a p-value
against chance (E = 0.5) that respect where the examples come from:

* A neuron's prompts come from a few documents (4–8 in the demo), and prompts of one document are not
  independent. When the examples' documents are known and some document holds more than one example,
  E's 95 % interval is a **percentile cluster bootstrap over documents** (2000 resamples of the documents
  with replacement, each example weighted by its document's multiplicity, E recomputed as the weighted
  (TPR + TNR)/2; seeded by the pair's key, so deterministic), and the one-sided p-value is a **sign-flip
  (cluster permutation) test over documents**: with d_i = (correct_i − ½) / (2 · #examples of i's class)
  (Σ d_i = E − ½) and S_g = Σ_{i ∈ g} d_i per document, H0 says each S_g is as likely negative as positive;
  p = the share of the 2^G sign patterns ε with Σ ε_g S_g ≥ Σ S_g (exact for G ≤ 16 documents, else
  65 536 seeded random patterns, p = (1 + #≥) / (1 + #)). Its smallest value is 2^−G: a pair whose
  examples come from 4 documents cannot reach p < 0.05, whatever its E. With every example in a document of
  its own this test *is* the exact binomial test of k correct out of 2m against ½.
* When every example is its own document (or the documents are unknown) the examples are independent:
  E gets the Wilson 95 % interval (``scipy.stats.binomtest(k, 2m).proportion_ci(method="wilson")``) and
  the one-sided exact binomial p-value, as before.

Across the pairs of a run, Benjamini–Hochberg adjusts these p-values (:func:`add_fdr`). A pair with fewer
than ``min_per_class`` examples of either class is not scored (E = None, with the reason): it cannot tell
an explanation from chance; a pair whose examples all come from one document gets E but no interval or p.

Entry points: :func:`score_explanations` (many explanations, one batched call to the scorer),
:func:`detection_score` (E, interval, p of one unit's answers) and :func:`balanced_accuracy` (E alone).
"""

from __future__ import annotations

import dataclasses
import functools
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
    docs: list | None = None
    """the document of each example (parallel to ``examples``; None: unknown, taken as independent)"""


def key_seed(key: str | int) -> int:
    """A deterministic 32-bit seed from a unit's key (e.g. the pair ``"3:1.2"``)."""
    return int(hashlib.sha1(str(key).encode()).hexdigest()[:8], 16)


def balanced_indices(truth: list[bool], max_per_class: int, min_per_class: int, seed: str | int = 0
                     ) -> tuple[list[int], str | None]:
    """m = min(#active, #inactive, max_per_class) random examples of each class (seeded by ``seed``,
    e.g. the pair's key), in their original order; ``([], reason)`` when m < ``min_per_class``."""
    pos = [i for i, t in enumerate(truth) if t]
    neg = [i for i, t in enumerate(truth) if not t]
    m = min(len(pos), len(neg), max_per_class)
    if m < max(1, min_per_class):
        return [], f"{len(pos)} active / {len(neg)} inactive held-out examples (< {max(1, min_per_class)} of a class)"
    rng = np.random.default_rng(key_seed(seed))
    pick = sorted(rng.choice(pos, m, replace=False).tolist() + rng.choice(neg, m, replace=False).tolist())
    return pick, None


def balanced_accuracy(pred: list[bool], truth: list[bool]) -> float | None:
    """E = (TPR + TNR) / 2 of yes/no predictions; None when the truth is all one class."""
    pos = sum(bool(t) for t in truth)
    neg = len(truth) - pos
    if pos == 0 or neg == 0:
        return None
    tp = sum(bool(p) and bool(t) for p, t in zip(pred, truth))
    tn = sum((not p) and (not t) for p, t in zip(pred, truth))
    return (tp / pos + tn / neg) / 2


def cluster_bootstrap_interval(correct: np.ndarray, truth: np.ndarray, docs: list, seed: int = 0,
                               n_boot: int = 2000, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of E = (TPR + TNR)/2 from a bootstrap over documents: each resample draws the
    G documents with replacement and weighs every example by its document's multiplicity. ``correct``,
    ``truth``: [n] 0/1; ``docs``: [n] any hashable. Resamples that lose a class are dropped (None, None
    when more than half are)."""
    _, dix = np.unique(np.asarray([str(x) for x in docs]), return_inverse=True)
    G = int(dix.max()) + 1
    rng = np.random.default_rng(seed)
    w = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(float)[:, dix]      # [B, n]
    t, c = truth.astype(float), correct.astype(float)
    pos, neg = w @ t, w @ (1 - t)                                                         # [B]
    ok = (pos > 0) & (neg > 0)
    if ok.sum() < n_boot / 2:
        return None, None
    e = 0.5 * ((w[ok] @ (c * t)) / pos[ok] + (w[ok] @ (c * (1 - t))) / neg[ok])
    a = (1 - level) / 2
    return float(np.quantile(e, a)), float(np.quantile(e, 1 - a))


@functools.lru_cache(maxsize=None)
def _sign_patterns(G: int) -> np.ndarray:
    """All 2^G vectors of ±1 signs: [2^G, G] float."""
    return (((np.arange(2 ** G)[:, None] >> np.arange(G)) & 1) * 2 - 1).astype(float)


def sign_flip_p(correct: np.ndarray, truth: np.ndarray, docs: list, seed: int = 0, exact_max: int = 16,
                n_random: int = 65536) -> float:
    """One-sided p of E > ½ from the sign-flip test over documents (see the module docstring): per example
    d = (correct − ½) / (2 · #examples of its class), S_g = Σ d over document g; p = P(Σ ε_g S_g ≥ Σ S_g)
    over random signs ε (all 2^G patterns when G ≤ ``exact_max``, else ``n_random`` seeded ones)."""
    t = truth.astype(bool)
    n_cls = np.where(t, t.sum(), (~t).sum()).astype(float)
    d = (correct.astype(float) - 0.5) / (2 * n_cls)
    _, dix = np.unique(np.asarray([str(x) for x in docs]), return_inverse=True)
    S = np.bincount(dix, weights=d)                                                       # [G]
    G = len(S)
    obs = S.sum()
    tol = 1e-9 * max(1.0, np.abs(S).sum())
    if G <= exact_max:
        return float(((_sign_patterns(G) @ S) >= obs - tol).mean())
    eps = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_random, G))
    return float((1 + ((eps @ S) >= obs - tol).sum()) / (1 + n_random))


def detection_score(pred: list[bool], truth: list[bool], docs: list | None = None, seed: str | int = 0) -> dict:
    """TPR, TNR, E = (TPR + TNR)/2, and E's 95 % interval ``E_low``/``E_high`` and one-sided p-value against
    0.5: clustered by ``docs`` (the example's document; cluster bootstrap and sign-flip test over documents)
    when some document holds several examples, else Wilson and the exact binomial test (which need
    balanced examples: then E is the accuracy). ``documents``: how many documents; ``interval``: which
    method. E is None when the truth is all one class; interval and p None with a single document."""
    pos = sum(bool(t) for t in truth)
    neg = len(truth) - pos
    tp = sum(bool(p) and bool(t) for p, t in zip(pred, truth))
    tn = sum((not p) and (not t) for p, t in zip(pred, truth))
    if pos == 0 or neg == 0:
        return {"E": None, "TPR": tp / pos if pos else None, "TNR": tn / neg if neg else None,
                "n_pos": pos, "n_neg": neg, "skipped": "test prompts are all one class"}
    res = {"E": balanced_accuracy(pred, truth), "TPR": tp / pos, "TNR": tn / neg, "n_pos": pos, "n_neg": neg}
    n_docs = len({str(x) for x in docs}) if docs is not None else len(truth)
    res["documents"] = n_docs
    if n_docs == len(truth):
        res["interval"] = "wilson"
        if pos == neg:
            lo, hi = wilson_interval(tp + tn, pos + neg)
            res.update(E_low=lo, E_high=hi, p=binom_above(tp + tn, pos + neg))
        return res
    res["interval"] = "document bootstrap"
    if n_docs < 2:
        return res | {"E_low": None, "E_high": None, "p": None}
    correct = np.array([bool(p) == bool(t) for p, t in zip(pred, truth)])
    tr = np.array([bool(t) for t in truth])
    lo, hi = cluster_bootstrap_interval(correct, tr, docs, seed=key_seed(seed))
    return res | {"E_low": lo, "E_high": hi, "p": sign_flip_p(correct, tr, docs, seed=key_seed(seed))}


def score_explanations(scorer, items: list[ScoringItem], max_per_class: int = 20, min_per_class: int = 5,
                       chunk: int = 64, progress=None) -> list[dict]:
    """Score every item on a balanced subset of its examples with ``scorer.classify_many`` (batched over
    items, ``chunk`` examples a call). Returns one row per item: ``{key, E, E_low, E_high, p, documents,
    interval, TPR, TNR, n_pos, n_neg, unparsed, predictions, truth, examples (indices used)}``
    (:func:`detection_score`, clustered by the items' ``docs``) or ``{key, E: None, skipped}``; no FDR yet
    (:func:`add_fdr`). ``progress``: a callable told the examples done."""
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
        docs = [it.docs[i] for i in idx] if it.docs is not None else None
        rows.append({"key": it.key, **detection_score(pred, ys, docs, it.key), "unparsed": sum(p is None for p in ps),
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
        out.append(dataclasses.replace(it, explanation=expl))
    return out
