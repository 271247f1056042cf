"""Shared statistics: cluster-robust standard errors, one-sided tests, Benjamini–Hochberg.

Thin wrappers around scipy.stats, so every instrument computes uncertainty and multiple-comparison
decisions the same way.

* ``clustered_mean_se(values, weights, clusters)`` — a weighted mean over units (e.g. held-out windows)
  and its standard error with units grouped in clusters (documents): the CR1 sandwich estimator
  SE² = G/(G−1) · Σ_g (Σ_{i∈g} w_i (x_i − x̄))² / (Σ w)². Units of one document are not independent,
  so the SE is computed over documents, not over windows or tokens.
* ``one_sided_p(estimate, se, df)`` — p-value of H0: effect ≤ 0 against effect > 0 (Student t with
  ``df`` degrees of freedom, df = clusters − 1; normal when df is None).
* ``benjamini_hochberg(p, q)`` — which of many tests are discoveries at false-discovery rate q
  (``scipy.stats.false_discovery_control``, method "bh").
"""

from __future__ import annotations

import numpy as np
from scipy import stats as _st


def clustered_mean_se(values, weights=None, clusters=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Weighted mean and cluster-robust SE over the last axis.

    values [..., n] per-unit means; weights [n] (e.g. tokens per unit; default 1); clusters [n] (any
    hashable ids; default: every unit its own cluster). Returns (mean [...], se [...], G clusters);
    the SE is NaN when there is a single cluster."""
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[-1]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    cl = np.arange(n) if clusters is None else np.asarray(clusters)
    _, g = np.unique(cl, return_inverse=True)
    G = int(g.max()) + 1 if n else 0
    W = w.sum()
    mean = (x * w).sum(-1) / W
    e = (x - mean[..., None]) * w  # [..., n]
    S = np.zeros(x.shape[:-1] + (G,))
    np.add.at(S, (..., g), e) if x.ndim > 1 else np.add.at(S, g, e)
    if G < 2:
        return mean, np.full(mean.shape, np.nan), G
    var = G / (G - 1) * (S ** 2).sum(-1) / W ** 2
    return mean, np.sqrt(var), G


def one_sided_p(estimate, se, df: int | None = None) -> np.ndarray:
    """P(T ≥ estimate/se) under H0: effect = 0 (one-sided, effect > 0). NaN/zero SE → p = NaN."""
    est = np.asarray(estimate, dtype=np.float64)
    se = np.asarray(se, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, est / se, np.nan)
    return _st.t.sf(z, df) if df is not None and df >= 1 else _st.norm.sf(z)


def benjamini_hochberg(p, q: float = 0.05) -> np.ndarray:
    """Boolean discoveries at false-discovery rate ``q`` (NaN p-values are never discoveries)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros(p.shape, dtype=bool)
    ok = np.isfinite(p)
    if ok.any():
        adj = _st.false_discovery_control(p[ok], method="bh")
        out[ok] = adj <= q
    return out


def cluster_bootstrap_se(sums, counts, statistic, reps: int = 1000, seed: int = 0) -> float:
    """SE of ``statistic(means [..., K]) -> [...]`` under resampling clusters with replacement.

    sums [K, G] per-cluster sums of a per-unit quantity (e.g. per-document sums of a head's gain over
    its tokens), counts [G] per-cluster token counts; each replicate draws G clusters with replacement,
    recomputes the K means Σ w_g·sums_g / Σ w_g·counts_g and applies ``statistic`` (e.g. the median over
    heads). Returns the standard deviation of the replicates (NaN with fewer than 2 clusters)."""
    S = np.asarray(sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    G = n.shape[0]
    if G < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    W = rng.multinomial(G, np.full(G, 1.0 / G), size=reps).astype(np.float64)  # [reps, G]
    means = (W @ S.T) / (W @ n)[:, None]  # [reps, K]
    return float(np.std(statistic(means), ddof=1))
