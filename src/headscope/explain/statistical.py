"""The offline statistical explainer: an L1-regularised (sparse) logistic regression over the n-grams
near the end of each example, written out as a readable rule that its own scorer applies.

Features of an example (the text, lower-cased, split into words ``\\w+`` and punctuation marks; the
neuron's token that every example ends with is removed first):

* ``last`` w — the example ends with the word w; ``last`` "w1 w2" — with that bigram;
* ``near`` w / "w1 w2" — the word or bigram occurs among the last ``window`` words.

Only features present in at least two training examples are kept, and of features that are identical
on the training examples only the simplest (fewest words, ``last`` before ``near``). The model is
score = b + Σ_j β_j·x_j with x_j ∈ {0, 1}, fitted by proximal gradient (FISTA) on the class-balanced
logistic loss (each class weighs ½, so the intercept does not just learn the base rate: the held-out
examples are scored balanced) + λ‖β‖₁. λ is chosen from a geometric grid below λ_max (where β = 0) by
stratified k-fold cross-validation of balanced accuracy among the λ whose fit has at most ``max_terms``
non-zero terms (ties: the larger λ, the simpler rule). The explanation is the fitted rule, e.g.::

    Active when b + Σ terms > 0: -0.52 + 1.10·[ends with "of"] + 0.61·["the class" in the last 8 words]
    RULE {"window": 8, "bias": -0.52, "terms": [["last", "of", 1.1], ["near", "the class", 0.61]]}

and the scorer reads the ``RULE`` line back and answers σ(score) (≥ 0.5: active). With no informative
feature the rule is the intercept alone, which answers the same for every example (E = 0.5 exactly).
It needs no model and no network; an LLM explainer has to beat it.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .prompts import ClassifyRequest, ExplainRequest

_TOK = re.compile(r"\w+|[^\w\s]")
PREFIX = "Active when b + Σ terms > 0: "


def words(example: str) -> list[str]:
    """Lower-cased words and punctuation marks of an example, without its last one (the neuron's token,
    appended to every example of a pair, so it carries no information)."""
    return _TOK.findall(example.lower())[:-1]


def features(ws: list[str], window: int) -> set[tuple[str, str]]:
    """The binary features present in a word list (see the module docstring)."""
    f: set[tuple[str, str]] = set()
    if ws:
        f.add(("last", ws[-1]))
    if len(ws) >= 2:
        f.add(("last", " ".join(ws[-2:])))
    near = ws[-window:]
    f |= {("near", w) for w in near}
    f |= {("near", " ".join(near[i:i + 2])) for i in range(len(near) - 1)}
    return f


def describe_term(kind: str, gram: str, window: int) -> str:
    return f'[ends with "{gram}"]' if kind == "last" else f'["{gram}" in the last {window} words]'


def fit_l1_logistic(X: np.ndarray, y: np.ndarray, lam: float, iters: int = 300, tol: float = 1e-5,
                    init: tuple[float, np.ndarray] | None = None) -> tuple[float, np.ndarray]:
    """Class-balanced logistic regression with an L1 penalty on β (not on b), by FISTA.
    X [n, F] in {0, 1}, y [n] in {0, 1}; ``init``: a warm start (b, β). Returns (b, β [F])."""
    n, F = X.shape
    npos = max(1, int(y.sum())); nneg = max(1, n - int(y.sum()))
    w = np.where(y > 0, 0.5 / npos, 0.5 / nneg)                      # each class weighs ½
    Z = np.hstack([np.ones((n, 1)), X])
    L = 0.25 * np.linalg.norm(Z * np.sqrt(w)[:, None], 2) ** 2 + 1e-12  # Lipschitz constant of the loss
    theta = np.zeros(F + 1) if init is None else np.concatenate([[init[0]], init[1]])
    v = theta.copy(); t = 1.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(Z @ v)))
        g = Z.T @ (w * (p - y))
        new = v - g / L
        new[1:] = np.sign(new[1:]) * np.maximum(np.abs(new[1:]) - lam / L, 0.0)
        t2 = (1 + np.sqrt(1 + 4 * t * t)) / 2
        v = new + (t - 1) / t2 * (new - theta)
        done = np.max(np.abs(new - theta)) < tol
        theta, t = new, t2
        if done:
            break
    return float(theta[0]), theta[1:]


def lambda_max(X: np.ndarray, y: np.ndarray) -> float:
    """The smallest λ at which β = 0 (balanced weights: the intercept-only fit predicts ½)."""
    n = len(y)
    npos = max(1, int(y.sum())); nneg = max(1, n - int(y.sum()))
    w = np.where(y > 0, 0.5 / npos, 0.5 / nneg)
    return float(np.max(np.abs(X.T @ (w * (y - 0.5))))) if X.size else 0.0


def _bal_acc(score: np.ndarray, y: np.ndarray) -> float:
    pred = score > 0
    pos, neg = y > 0, y <= 0
    return 0.5 * (pred[pos].mean() if pos.any() else 0.5) + 0.5 * ((~pred[neg]).mean() if neg.any() else 0.5)


class StatisticalExplainer:
    """Explainer and scorer in one; see the module docstring."""

    name = "statistical"

    def __init__(self, window: int = 8, max_terms: int = 5, n_lambdas: int = 12, folds: int = 5, seed: int = 0):
        self.window, self.max_terms, self.n_lambdas, self.folds, self.seed = window, max_terms, n_lambdas, folds, seed

    def config(self) -> dict:
        return {"backend": "statistical", "window": self.window, "max_terms": self.max_terms,
                "n_lambdas": self.n_lambdas, "folds": self.folds, "seed": self.seed}

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, req: ExplainRequest) -> dict:
        """The rule ``{"window", "bias", "terms": [[kind, gram, weight], …]}`` for one request."""
        texts = req.active + req.inactive
        y = np.array([1.0] * len(req.active) + [0.0] * len(req.inactive))
        feats = [features(words(t), self.window) for t in texts]
        counts: dict[tuple[str, str], int] = {}
        for f in feats:
            for k in f:
                counts[k] = counts.get(k, 0) + 1
        # features present in ≥ 2 examples; of features identical on these examples keep the simplest
        # (fewer words, then "last" before "near"), so the rule does not list one fact several times
        vocab, seen = [], set()
        for k in sorted((k for k, c in counts.items() if c >= 2), key=lambda k: (len(k[1].split()), k[0], k[1])):
            col = tuple(k in f for f in feats)
            if col not in seen:
                seen.add(col)
                vocab.append(k)
        if not req.active or not req.inactive or not vocab:
            return {"window": self.window, "bias": 0.0 if not texts else float(np.sign(y.mean() - 0.5)), "terms": []}
        X = np.array([[k in f for k in vocab] for f in feats], dtype=np.float64)
        lmax = lambda_max(X, y)
        grid = lmax * np.geomspace(0.95, 0.02, self.n_lambdas)
        lam = self._choose(X, y, grid)
        b, beta = self._path(X, y, [g for g in grid if g >= lam])[-1]
        nz = [j for j in np.argsort(-np.abs(beta)) if abs(beta[j]) > 1e-6][: self.max_terms]
        terms = [[vocab[j][0], vocab[j][1], round(float(beta[j]), 3)] for j in nz]
        return {"window": self.window, "bias": round(b, 3), "terms": terms}

    def _choose(self, X: np.ndarray, y: np.ndarray, grid: np.ndarray) -> float:
        """λ by stratified k-fold CV of balanced accuracy among fits with ≤ max_terms terms."""
        ok = [lam for lam, (_, beta) in zip(grid, self._path(X, y, grid)) if np.count_nonzero(np.abs(beta) > 1e-6) <= self.max_terms]
        if not ok:
            return float(grid[0])
        k = min(self.folds, int(y.sum()), int((1 - y).sum()))
        if k < 2:
            return float(ok[len(ok) // 2])
        rng = np.random.default_rng(self.seed)
        fold = np.empty(len(y), dtype=int)
        for cls in (0.0, 1.0):
            idx = rng.permutation(np.flatnonzero(y == cls))
            fold[idx] = np.arange(len(idx)) % k
        best, best_lam = -1.0, float(ok[0])
        accs = np.zeros(len(ok))
        for f in range(k):
            tr, te = fold != f, fold == f
            for j, (b, beta) in enumerate(self._path(X[tr], y[tr], ok)):
                accs[j] += _bal_acc(b + X[te] @ beta, y[te]) / k
        for lam, acc in zip(ok, accs):  # descending λ: ties keep the larger one
            if acc > best + 1e-9:
                best, best_lam = float(acc), float(lam)
        return best_lam

    @staticmethod
    def _path(X: np.ndarray, y: np.ndarray, grid) -> list[tuple[float, np.ndarray]]:
        """Fits along a descending λ grid, each warm-started from the previous one."""
        out, init = [], None
        for lam in grid:
            init = fit_l1_logistic(X, y, lam, init=init)
            out.append(init)
        return out

    # -- the explanation text and its scorer ------------------------------------------------------
    def render(self, rule: dict) -> str:
        parts = [f"{rule['bias']:+.2f}"] + [f"{w:+.2f}·{describe_term(k, g, rule['window'])}" for k, g, w in rule["terms"]]
        return PREFIX + " ".join(parts) + "\nRULE " + json.dumps(rule)

    def explain_many(self, reqs: list[ExplainRequest]) -> list[str]:
        return [self.render(self.fit(r)) for r in reqs]

    @staticmethod
    def parse(explanation: str) -> dict | None:
        """The rule of an explanation written by :meth:`render`, or None."""
        for line in explanation.splitlines():
            if line.startswith("RULE "):
                try:
                    rule = json.loads(line[5:])
                    return {"window": int(rule["window"]), "bias": float(rule["bias"]),
                            "terms": [(str(k), str(g), float(w)) for k, g, w in rule["terms"]]}
                except (ValueError, KeyError, TypeError):
                    return None
        return None

    @staticmethod
    def rule_score(rule: dict, example: str) -> float:
        """b + Σ_j β_j·x_j of one example."""
        f = features(words(example), rule["window"])
        return rule["bias"] + sum(w for k, g, w in rule["terms"] if (k, g) in f)

    def classify_many(self, reqs: list[ClassifyRequest]) -> list[float | None]:
        """σ(score) per example; None (unparsed) for an explanation without a RULE line."""
        out = []
        for r in reqs:
            rule = self.parse(r.explanation)
            out.append(None if rule is None else float(1 / (1 + np.exp(-self.rule_score(rule, r.example)))))
        return out
