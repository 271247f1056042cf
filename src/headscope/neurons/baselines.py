"""What a (neuron, head) explanation must beat: baselines from the head's own output, per pair.

"Active" means the head's attribution to the neuron stands out on a prompt, and much of that is "the
head writes strongly here". Two baselines read only the head's z at the prompt's last position
([Dh], captured in the attribute pass) and are fitted on the neuron's *train* prompts, evaluated on
its *held-out* prompts — the same split as the explanations:

* ``norm``: ‖z‖ alone, a threshold fitted on the train prompts (the one maximising balanced accuracy,
  active when ‖z‖ ≥ threshold). An explanation that does not beat it says no more than "the head
  writes strongly".
* ``probe``: an L2-regularised, class-balanced logistic regression on z (standardised on the train
  prompts; ``scipy.optimize`` L-BFGS) — the ceiling: what any reading of the head's output could tell.

Both are stored as per-held-out-prompt predictions, so the scorer evaluates them on exactly the
balanced held-out sample an explanation is scored on (:mod:`headscope.explain.stages`).

:func:`cluster_bootstrap_diff` is the document-clustered test of a difference of means between two
groups of prompts (used by the ablation check): prompts of one document are not independent.
"""

from __future__ import annotations

import numpy as np


def _bal_acc(pred: np.ndarray, y: np.ndarray) -> float:
    return 0.5 * (pred[y].mean() + (~pred[~y]).mean())


def norm_threshold(x: np.ndarray, y: np.ndarray) -> float:
    """The threshold t maximising the balanced accuracy of (x ≥ t) on train values x [n], labels y [n]
    (bool, both classes present); ties: the smallest t."""
    cands = np.unique(x)
    accs = [_bal_acc(x >= t, y) for t in cands]
    return float(cands[int(np.argmax(accs))])


def fit_probe(X: np.ndarray, y: np.ndarray, l2: float = 1.0) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Class-balanced logistic regression with penalty ``l2``·‖w‖²/2 on standardised X [n, d]:
    (w [d], b, mean [d], scale [d]); predict active when ((x − mean)/scale)·w + b > 0."""
    from scipy.optimize import minimize
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    yy = y.astype(float)
    wt = np.where(y, 0.5 / max(1, y.sum()), 0.5 / max(1, (~y).sum()))

    def f(theta):
        w, b = theta[:-1], theta[-1]
        s = Z @ w + b
        loss = np.sum(wt * (np.logaddexp(0, s) - yy * s)) + 0.5 * l2 * (w @ w) / len(y)
        p = 1 / (1 + np.exp(-s))
        g = wt * (p - yy)
        return loss, np.concatenate([Z.T @ g + l2 * w / len(y), [g.sum()]])
    r = minimize(f, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return r.x[:-1], float(r.x[-1]), mu, sd


def pair_baselines(z: np.ndarray, active: np.ndarray, split: np.ndarray) -> dict:
    """Baselines of one pair: z [P, Dh] the head's z at each prompt's last position, active [P] bool,
    split [P] (0 train, 1 held-out). Returns ``{"norm": [bool per held-out prompt] | None, "probe": …}``
    (None when the train prompts are all one class)."""
    tr, te = split == 0, split == 1
    ytr = active[tr]
    if ytr.all() or not ytr.any() or not te.any():
        return {"norm": None, "probe": None}
    nrm = np.linalg.norm(z, axis=1)
    t = norm_threshold(nrm[tr], ytr)
    w, b, mu, sd = fit_probe(z[tr], ytr)
    return {"norm": (nrm[te] >= t).tolist(), "probe": ((((z[te] - mu) / sd) @ w + b) > 0).tolist()}


def cluster_bootstrap_diff(values, group, clusters, reps: int = 4000, seed: int = 0, level: float = 0.95) -> dict:
    """mean(values[group]) − mean(values[~group]) with a percentile bootstrap over ``clusters``
    (documents): each resample draws the clusters with replacement and weighs every value by its
    cluster's multiplicity. ``p_greater``: one-sided, the share of resamples with a difference ≤ 0
    (resamples missing a group are left out). None when a group is empty."""
    v, g = np.asarray(values, float), np.asarray(group, bool)
    if g.all() or not g.any():
        return {"diff": None, "low": None, "high": None, "p_greater": None, "clusters": 0}
    uniq, ix = np.unique(np.asarray(clusters), return_inverse=True)
    C = len(uniq)
    rng = np.random.default_rng(seed)
    W = rng.multinomial(C, np.full(C, 1 / C), size=reps).astype(float)[:, ix]      # [reps, n]
    a, b = (W * g) .sum(1), (W * ~g).sum(1)
    ok = (a > 0) & (b > 0)
    d = (W * g * v).sum(1)[ok] / a[ok] - (W * ~g * v).sum(1)[ok] / b[ok]
    q = (1 - level) / 2
    return {"diff": float(v[g].mean() - v[~g].mean()), "low": float(np.quantile(d, q)),
            "high": float(np.quantile(d, 1 - q)), "p_greater": float(max((d <= 0).mean(), 1 / len(d))),
            "clusters": int(C)}
