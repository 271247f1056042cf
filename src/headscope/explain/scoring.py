"""Scoring an explanation on labelled held-out examples, reusable by any explainer and any unit.

The score of Neo et al.: a scorer sees only the explanation and one held-out example and says whether
the unit (head) is active on it; E = (TPR + TNR) / 2 against the truth (:func:`balanced_accuracy`). Here the
held-out examples are drawn **balanced** — as many active as inactive (:func:`balanced_indices`) — so E is
also the share of the 2m examples answered right. :func:`detection_score` gives E with a 95 % interval and
a one-sided p-value against chance (E = 0.5) that respect where the examples come from:

* A neuron's prompts come from a few documents, and prompts of one document are not independent. When the
  examples' documents are known and some document holds more than one example (``interval`` =
  ``"document"``):

  - the **interval** is Wilson's on the effective sample size (Kish's design effect; the Korn–Graubard
    interval): ρ = the one-way ANOVA correlation of "answered right" within documents (truncated to
    [0, 1]; 1 when the answers do not vary), deff = 1 + (Σ m_g² / n − 1) ρ for documents of m_g examples,
    n* = n / deff · (z_{0.975} / t_{0.975, G−1})² for G documents, and the interval = Wilson(E, n*). It
    never is narrower than Wilson's on n, and few documents widen it (the t quantile). Simulated with
    4–8 documents and ρ = 0.2–0.3 (``bench/pair_interval_coverage.py``) it covers E 95–97 % of the time,
    where a percentile bootstrap over the documents covers 79–89 % and Wilson's on n 70–83 %;
  - the **p-value** is a one-sided **sign-flip (cluster permutation) test over documents**: with
    d_i = (correct_i − ½) / (2 · #examples of i's class) (Σ d_i = E − ½) and S_g = Σ_{i ∈ g} d_i per
    document, H0 says each S_g is as likely negative as positive; p = the share of the 2^G sign patterns
    ε with Σ ε_g S_g ≥ Σ S_g (exact for G ≤ 16 documents, else 65 536 seeded random patterns, p = (1 + #≥)
    / (1 + #)). Its smallest value is 2^−G: a pair whose examples come from 4 documents cannot reach
    p < 0.05, whatever its E. With every example in a document of its own this test *is* the exact
    binomial test of k right out of 2m against ½. Simulated at chance with ρ = 0.2–0.3 it rejects at
    α = 0.05 in 0–4 % of pairs, the binomial test on all prompts in 9–14 %.

* When every example is its own document (or the documents are unknown) the examples are independent
  (``interval`` = ``"wilson"``): the Wilson 95 % interval and the one-sided exact binomial p-value.

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

from ..neurons.stats import bh, binom_above
from .prompts import ClassifyRequest

Z95 = 1.959963984540054
"""z_{0.975}"""


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


def wilson(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed on ``n`` (possibly effective, non-integer)
    trials, written out: (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)."""
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * float(np.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)))
    return max(0.0, c - h), min(1.0, c + h)


def design_effect(correct: np.ndarray, docs: list) -> dict:
    """How much sharing documents shrinks the evidence of ``correct`` ([n] 0/1): the one-way ANOVA
    intra-document correlation ρ (for unequal sizes, m0 = (n − Σm_g²/n)/(G − 1); truncated to [0, 1],
    and 1 when the answers do not vary at all, the conservative bound), Kish's design effect
    deff = 1 + (Σm_g²/n − 1)·ρ and the effective sample size n / deff. Needs G ≥ 2 documents and n > G."""
    _, dix = np.unique(np.asarray([str(x) for x in docs]), return_inverse=True)
    y = correct.astype(float)
    n, G = len(y), int(dix.max()) + 1
    m = np.bincount(dix, minlength=G).astype(float)
    yg = np.bincount(dix, weights=y, minlength=G) / m
    msb = float((m * (yg - y.mean()) ** 2).sum()) / (G - 1)
    msw = float(((y - yg[dix]) ** 2).sum()) / (n - G)
    m0 = (n - float((m ** 2).sum()) / n) / (G - 1)
    den = msb + (m0 - 1) * msw
    rho = 1.0 if den <= 0 else float(np.clip((msb - msw) / den, 0.0, 1.0))
    deff = 1 + (float((m ** 2).sum()) / n - 1) * rho
    return {"icc": rho, "design_effect": deff, "n_effective": n / deff, "documents": G}


def document_interval(correct: np.ndarray, docs: list, level: float = 0.95) -> tuple[float, float, dict]:
    """E's interval when examples share documents (balanced examples: E is the share correct): the Wilson
    interval on the effective sample size n / deff (:func:`design_effect`) with Korn and Graubard's
    degrees-of-freedom adjustment — n* = n/deff · (z / t_{G−1})², so few documents widen it — i.e.
    Wilson(E, n*). Equals Wilson's when every example is its own document (deff = 1, and t → z).
    Returns ``(low, high, design)``."""
    from scipy.stats import norm, t
    d = design_effect(correct, docs)
    z = float(norm.ppf(0.5 + level / 2))
    n_star = d["n_effective"] * (z / float(t.ppf(0.5 + level / 2, d["documents"] - 1))) ** 2
    lo, hi = wilson(float(correct.mean()), n_star, z)
    return lo, hi, d


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
    """TPR, TNR, E = (TPR + TNR)/2, and — on balanced examples, where E is the share correct — E's 95 %
    interval ``E_low``/``E_high`` and one-sided p-value against 0.5: clustered by ``docs`` (each example's
    document) when some document holds several examples (``interval`` = ``"document"``: the design-effect
    Wilson interval of :func:`document_interval` and the sign-flip test over documents of
    :func:`sign_flip_p`, with ``icc`` and ``design_effect``), else Wilson and the exact binomial test
    (``interval`` = ``"wilson"``). ``documents``: how many. E is None when the truth is all one class;
    interval and p are None with a single document. ``seed``: the sign-flip test's random patterns when
    there are more than 16 documents (e.g. the pair's key)."""
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
    if pos != neg:
        return res
    if n_docs == len(truth):
        lo, hi = wilson((tp + tn) / (pos + neg), pos + neg)
        return res | {"interval": "wilson", "E_low": lo, "E_high": hi, "p": binom_above(tp + tn, pos + neg)}
    res["interval"] = "document"
    if n_docs < 2:
        return res | {"E_low": None, "E_high": None, "p": None}
    correct = np.array([bool(p) == bool(t) for p, t in zip(pred, truth)])
    tr = np.array([bool(t) for t in truth])
    lo, hi, d = document_interval(correct, docs)
    return res | {"E_low": lo, "E_high": hi, "p": sign_flip_p(correct, tr, docs, seed=key_seed(seed)),
                  "icc": d["icc"], "design_effect": d["design_effect"]}


def score_explanations(scorer, items: list[ScoringItem], max_per_class: int = 20, min_per_class: int = 5,
                       chunk: int = 64, progress=None) -> list[dict]:
    """Score every item on a balanced subset of its examples with ``scorer.classify_many`` (batched over
    items, ``chunk`` examples a call). Returns one row per item: ``{key, E, E_low, E_high, p, documents,
    interval[, icc, design_effect], TPR, TNR, n_pos, n_neg, unparsed, predictions, truth, examples (indices used)}``
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
