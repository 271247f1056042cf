"""The offline statistical explainer: an L1-regularised (sparse) logistic regression over the n-grams
near the end of each example, written out as a readable rule that its own scorer applies.

Features of an example (the prompt text, lower-cased, split into words ``\\w+`` and punctuation marks;
the neuron's token that every example ends with is cut off exactly, :func:`split_example` — a sub-word
token such as 'ptom' is cut from the last word, the word itself is kept):

* ``last`` w — the prompt ends with the word w; ``last`` "w1 w2" — with that bigram;
* ``near`` w / "w1 w2" — the word or bigram occurs among the last ``window`` words;
* ``any`` w — the word occurs anywhere in the prompt;
* ``struct``: ``repeat`` — the last word occurred earlier in the prompt; ``token`` — the predicted token
  occurs in the prompt; ``len<k>`` — the prompt has at least k words (k in 8, 16, 32, 64).

Only features present in at least two training examples are kept, and of features that are identical
on the training examples only the simplest (fewest words, ``last`` before ``near``). The model is
score = b + Σ_j β_j·x_j with x_j ∈ {0, 1}, fitted by proximal gradient (FISTA) on the class-balanced
logistic loss (each class weighs ½, so the intercept does not just learn the base rate: the held-out
examples are scored balanced) + λ‖β‖₁. λ is chosen from a geometric grid below λ_max (where β = 0) by
stratified k-fold cross-validation of balanced accuracy among the λ whose fit has at most ``max_terms``
non-zero terms (ties: the larger λ, the simpler rule). The full-data path and the k folds of every
request of an ``explain_many`` call are solved together, one λ step at a time (:func:`fista_batch`: the
same iterates as the single-problem :func:`fit_l1_logistic`, without a Python loop per problem).
The explanation is the fitted rule, e.g.::

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
LENGTHS = (8, 16, 32, 64)
"""Prompt-length thresholds (words) of the structural ``len`` features."""


def _norm(text: str) -> str:
    """Whitespace as :func:`headscope.explain.prompts.example_text` writes it."""
    return " ".join(text.replace("\r", " ").replace("\n", " ").split(" ")).strip()


def split_example(example: str, token: str | None) -> tuple[str, str]:
    """(prompt text, predicted token) of an example: the text ends with the neuron's token, appended by
    :func:`~headscope.explain.prompts.example_text`; it is cut off exactly (a sub-word token such as
    'ptom' is cut from the last word, not the whole word). ``token`` None or not at the end: the text
    is the prompt and the token unknown ("")."""
    t = _norm(token or "")
    if t and example.endswith(t):
        return example[: len(example) - len(t)], t
    return example, ""


def words(example: str, token: str | None = None) -> list[str]:
    """Lower-cased words and punctuation marks of an example's prompt (the neuron's token cut off,
    :func:`split_example`)."""
    return _TOK.findall(split_example(example, token)[0].lower())


def features(ws: list[str], window: int, token: str = "") -> set[tuple[str, str]]:
    """The binary features present in a prompt's word list (see the module docstring); ``token``: the
    predicted token (lower-cased, stripped), for the "token in prompt" feature."""
    f: set[tuple[str, str]] = set()
    if ws:
        f.add(("last", ws[-1]))
        if ws[-1] in ws[:-1]:
            f.add(("struct", "repeat"))
    if len(ws) >= 2:
        f.add(("last", " ".join(ws[-2:])))
    near = ws[-window:]
    f |= {("near", w) for w in near}
    f |= {("near", " ".join(near[i:i + 2])) for i in range(len(near) - 1)}
    f |= {("any", w) for w in ws}
    tok = token.strip().lower()
    if tok and tok in " ".join(ws):
        f.add(("struct", "token"))
    f |= {("struct", f"len{k}") for k in LENGTHS if len(ws) >= k}
    return f


def describe_term(kind: str, gram: str, window: int) -> str:
    if kind == "last":
        return f'[ends with "{gram}"]'
    if kind == "near":
        return f'["{gram}" in the last {window} words]'
    if kind == "any":
        return f'["{gram}" anywhere in the prompt]'
    if gram == "repeat":
        return "[the last word occurred earlier in the prompt]"
    if gram == "token":
        return "[the predicted token occurs in the prompt]"
    return f"[prompt of ≥ {gram[3:]} words]"


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-example weights [n] of the class-balanced loss: each class weighs ½."""
    npos = max(1, int(y.sum())); nneg = max(1, len(y) - int(y.sum()))
    return np.where(y > 0, 0.5 / npos, 0.5 / nneg)


def lipschitz(Z: np.ndarray, w: np.ndarray) -> float:
    """Lipschitz constant of the gradient of the weighted logistic loss, Z [n, F+1] (a column of ones
    first), w [n]."""
    return 0.25 * np.linalg.norm(Z * np.sqrt(w)[:, None], 2) ** 2 + 1e-12


def fit_l1_logistic(X: np.ndarray, y: np.ndarray, lam: float, iters: int = 300, tol: float = 1e-5,
                    init: tuple[float, np.ndarray] | None = None) -> tuple[float, np.ndarray]:
    """Class-balanced logistic regression with an L1 penalty on β (not on b), by FISTA.
    X [n, F] in {0, 1}, y [n] in {0, 1}; ``init``: a warm start (b, β). Returns (b, β [F]).

    The single-problem reference; :class:`StatisticalExplainer` solves its problems together with
    :func:`fista_batch`, whose iterates are these (up to floating-point rounding)."""
    n, F = X.shape
    w = balanced_weights(y)
    Z = np.hstack([np.ones((n, 1)), X])
    L = lipschitz(Z, w)
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


def fista_batch(Z: np.ndarray, y: np.ndarray, W: np.ndarray, L: np.ndarray, lam, theta: np.ndarray,
                iters: int = 300, tol: float = 1e-5) -> np.ndarray:
    """Many problems of :func:`fit_l1_logistic` solved together, P per design and R designs.

    Z [R, n, F+1] (a column of ones, then X; padding: zero rows and columns), y [R, n]; problem p of
    design r weighs the examples by W[r, p] [n] (0: not in the problem, e.g. a cross-validation fold's
    held-out rows, or padding) and has the Lipschitz constant L[r, p] (:func:`lipschitz` of its own
    rows); lam [R] (or a scalar); theta [R, P, F+1]: the warm starts (b, β). The leading R axis may be
    left out (Z [n, F+1], y [n], W [P, n], L [P], theta [P, F+1]). Each problem runs the loop of
    :func:`fit_l1_logistic` and is frozen at the iteration where that loop stops (converged, or
    ``iters``), so its result is the single-problem one (zero rows and columns add exact zeros).
    Returns theta, shaped like the warm starts."""
    theta = np.array(theta, dtype=np.float64)
    v = theta.copy()
    t = np.ones(theta.shape[:-1])                                   # [R, P]
    active = np.ones(theta.shape[:-1], dtype=bool)
    step = (np.asarray(lam, dtype=np.float64)[..., None] / L)[..., None]  # [R, P, 1]
    Lc = L[..., None]
    Zt, yb = np.swapaxes(Z, -1, -2), y[..., None, :]
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(v @ Zt)))                     # [R, P, n]
        g = (W * (p - yb)) @ Z                              # [R, P, F+1]
        new = v - g / Lc
        new[..., 1:] = np.sign(new[..., 1:]) * np.maximum(np.abs(new[..., 1:]) - step, 0.0)
        t2 = (1 + np.sqrt(1 + 4 * t * t)) / 2
        v_next = new + ((t - 1) / t2)[..., None] * (new - theta)
        done = np.max(np.abs(new - theta), axis=-1) < tol
        a = active[..., None]
        theta = np.where(a, new, theta)
        v = np.where(a, v_next, v)
        t = np.where(active, t2, t)
        active &= ~done
        if not active.any():
            break
    return theta


def lambda_max(X: np.ndarray, y: np.ndarray) -> float:
    """The smallest λ at which β = 0 (balanced weights: the intercept-only fit predicts ½)."""
    w = balanced_weights(y)
    return float(np.max(np.abs(X.T @ (w * (y - 0.5))))) if X.size else 0.0


def fold_balanced_accuracy(score: np.ndarray, y: np.ndarray) -> float:
    """Balanced accuracy of the rule ``score > 0`` [n] on one cross-validation fold's labels ``y`` [n] (> 0:
    active). Unlike :func:`headscope.explain.scoring.balanced_accuracy` (None when the truth is one class),
    a class missing from the fold counts 0.5, so every fold gives a number to average over folds."""
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
        return self.fit_many([req])[0]

    def fit_many(self, reqs: list[ExplainRequest]) -> list[dict]:
        """The rule of each request (as :meth:`fit`); the requests' fits are solved together."""
        rules: list[dict | None] = [None] * len(reqs)
        todo = []
        for i, req in enumerate(reqs):
            d = self._design(req)
            if isinstance(d, dict):
                rules[i] = d
            else:
                todo.append((i, *d))
        if todo:
            grids = [lambda_max(X, y) * np.geomspace(0.95, 0.02, self.n_lambdas) for _, _, X, y in todo]
            chosen = self._choose([(X, y) for _, _, X, y in todo], grids)
            for (i, vocab, X, y), grid, (lam, path) in zip(todo, grids, chosen):
                b, beta = path[int(np.count_nonzero(grid >= lam)) - 1]   # the last fit of the grid down to λ
                nz = [j for j in np.argsort(-np.abs(beta)) if abs(beta[j]) > 1e-6][: self.max_terms]
                terms = [[vocab[j][0], vocab[j][1], round(float(beta[j]), 3)] for j in nz]
                rules[i] = {"window": self.window, "token": reqs[i].token or "", "bias": round(b, 3), "terms": terms}
        return rules

    def _design(self, req: ExplainRequest) -> dict | tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
        """(vocabulary [F], X [n, F], y [n]) of a request, or its rule when there is nothing to fit."""
        texts = req.active + req.inactive
        y = np.array([1.0] * len(req.active) + [0.0] * len(req.inactive))
        feats = [features(words(t, req.token), self.window, _norm(req.token or "")) for t in texts]
        counts: dict[tuple[str, str], int] = {}
        for f in feats:
            for k in f:
                counts[k] = counts.get(k, 0) + 1
        # features present in ≥ 2 examples; of features identical on these examples keep the simplest
        # (fewer words, then "last" before "near"), so the rule does not list one fact several times
        vocab, seen = [], set()
        order = {"struct": 0, "last": 1, "near": 2, "any": 3}
        for k in sorted((k for k, c in counts.items() if c >= 2), key=lambda k: (len(k[1].split()), order[k[0]], k[1])):
            col = tuple(k in f for f in feats)
            if col not in seen:
                seen.add(col)
                vocab.append(k)
        if not req.active or not req.inactive or not vocab:
            return {"window": self.window, "token": req.token or "",
                    "bias": 0.0 if not texts else float(np.sign(y.mean() - 0.5)), "terms": []}
        return vocab, np.array([[k in f for k in vocab] for f in feats], dtype=np.float64), y

    def _folds(self, y: np.ndarray, k: int) -> np.ndarray:
        """Stratified fold index [n] in 0 … k−1 (seeded)."""
        rng = np.random.default_rng(self.seed)
        fold = np.empty(len(y), dtype=int)
        for cls in (0.0, 1.0):
            idx = rng.permutation(np.flatnonzero(y == cls))
            fold[idx] = np.arange(len(idx)) % k
        return fold

    def _choose(self, designs: list[tuple[np.ndarray, np.ndarray]],
                grids: list[np.ndarray]) -> list[tuple[float, list[tuple[float, np.ndarray]]]]:
        """Per design (X [n, F], y [n]) and its descending λ grid: λ chosen by stratified k-fold CV of
        balanced accuracy among the λ whose full-data fit has ≤ max_terms terms ("ok"), and the full-data
        fits (b, β) along the grid (each warm-started from the previous one; the rule is the one at λ).

        Each fold's fits run along the ok λ, each warm-started from the fold's fit at the previous ok λ.
        All problems (per design the full data and k folds; all designs, padded with zero rows and
        columns) are solved together by :func:`fista_batch`, one grid step at a time: the folds at a λ
        run beside the full data at that λ from their last ok fit, and are kept only when λ is ok."""
        R, P = len(designs), 1 + self.folds
        n_max = max(len(y) for _, y in designs)
        f_max = max(X.shape[1] for X, _ in designs)
        Z = np.zeros((R, n_max, f_max + 1))
        Y = np.zeros((R, n_max))
        W = np.zeros((R, P, n_max))
        L = np.ones((R, P))                         # padding problems: W = 0, no gradient, stop at once
        rows, ks = [], []
        for r, (X, y) in enumerate(designs):
            n, F = X.shape
            Z[r, :n, 0] = 1.0
            Z[r, :n, 1:F + 1] = X
            Y[r, :n] = y
            k = min(self.folds, int(y.sum()), int((1 - y).sum()))
            rr = [np.ones(n, dtype=bool)] + ([self._folds(y, k) != f for f in range(k)] if k >= 2 else [])
            for p, m in enumerate(rr):
                W[r, p, :n][m] = balanced_weights(y[m])
                L[r, p] = lipschitz(Z[r, :n, :F + 1][m], W[r, p, :n][m])
            rows.append(rr)
            ks.append(k)
        lams = np.stack(grids)                      # [R, n_lambdas]
        theta = np.zeros((R, P, f_max + 1))
        paths = [[] for _ in range(R)]
        oks = [[] for _ in range(R)]
        accs = [[] for _ in range(R)]
        for i in range(lams.shape[1]):
            new = fista_batch(Z, Y, W, L, lams[:, i], theta)
            theta[:, 0] = new[:, 0]
            for r, (X, y) in enumerate(designs):
                F = X.shape[1]
                beta = new[r, 0, 1:F + 1]
                paths[r].append((float(new[r, 0, 0]), beta))
                if np.count_nonzero(np.abs(beta) > 1e-6) > self.max_terms:
                    continue
                oks[r].append(float(lams[r, i]))
                theta[r, 1:] = new[r, 1:]
                acc = 0.0
                for f in range(1, len(rows[r])):
                    te = ~rows[r][f]
                    acc += fold_balanced_accuracy(new[r, f, 0] + X[te] @ new[r, f, 1:F + 1], y[te]) / ks[r]
                accs[r].append(acc)
        out = []
        for r in range(R):
            ok = oks[r]
            if not ok:
                lam = float(lams[r, 0])
            elif ks[r] < 2:
                lam = ok[len(ok) // 2]
            else:
                best, lam = -1.0, ok[0]
                for l_, acc in zip(ok, accs[r]):   # descending λ: ties keep the larger one
                    if acc > best + 1e-9:
                        best, lam = float(acc), l_
            out.append((lam, paths[r]))
        return out

    # -- the explanation text and its scorer ------------------------------------------------------
    def render(self, rule: dict) -> str:
        parts = [f"{rule['bias']:+.2f}"] + [f"{w:+.2f}·{describe_term(k, g, rule['window'])}" for k, g, w in rule["terms"]]
        return PREFIX + " ".join(parts) + "\nRULE " + json.dumps(rule)

    def explain_many(self, reqs: list[ExplainRequest]) -> list[str]:
        return [self.render(rule) for rule in self.fit_many(reqs)]

    @staticmethod
    def parse(explanation: str) -> dict | None:
        """The rule of an explanation written by :meth:`render`, or None."""
        for line in explanation.splitlines():
            if line.startswith("RULE "):
                try:
                    rule = json.loads(line[5:])
                    return {"window": int(rule["window"]), "bias": float(rule["bias"]), "token": str(rule.get("token", "")),
                            "terms": [(str(k), str(g), float(w)) for k, g, w in rule["terms"]]}
                except (ValueError, KeyError, TypeError):
                    return None
        return None

    @staticmethod
    def rule_score(rule: dict, example: str, token: str | None = None) -> float:
        """b + Σ_j β_j·x_j of one example; ``token``: the example's own appended token (default: the
        rule's, which is the example's when the rule was fitted on the same neuron)."""
        tok = token if token else rule.get("token", "")
        ws = words(example, tok)
        _, t = split_example(example, tok)
        f = features(ws, rule["window"], t)
        return rule["bias"] + sum(w for k, g, w in rule["terms"] if (k, g) in f)

    def classify_many(self, reqs: list[ClassifyRequest]) -> list[float | None]:
        """σ(score) per example; None (unparsed) for an explanation without a RULE line. A request's
        ``token`` (the example's neuron's token) is cut off the example, so another neuron's rule (the
        controls) reads the same prompt words as the pair's own."""
        out = []
        for r in reqs:
            rule = self.parse(r.explanation)
            out.append(None if rule is None else
                       float(1 / (1 + np.exp(-self.rule_score(rule, r.example, getattr(r, "token", ""))))))
        return out
