"""Small statistics in numpy (no scipy dependency): two-sample KS test, Mann–Whitney U, moments.

* ``ks_2samp``: statistic D = sup |F₁ − F₂|; p-value from the asymptotic Kolmogorov distribution with
  Stephens' small-sample correction, λ = (√nₑ + 0.12 + 0.11/√nₑ)·D, nₑ = n₁n₂/(n₁+n₂),
  p = 2 Σ_{j≥1} (−1)^{j−1} e^{−2j²λ²} (clipped to [0, 1]). Close to scipy's ``method="asymp"``;
  scipy's default switches to an exact p-value for small samples, which differs for n < ~50.
* ``mann_whitney``: U of sample 1 with midranks for ties, normal approximation with tie correction
  and continuity correction, two-sided p — equal to scipy's ``mannwhitneyu(method="asymptotic")``.
"""

from __future__ import annotations

import math

import numpy as np


def ks_2samp(a, b) -> dict:
    """Two-sample Kolmogorov–Smirnov test: ``{"D", "p", "n1", "n2"}`` (None values for an empty sample)."""
    a = np.sort(np.asarray(a, dtype=np.float64)); b = np.sort(np.asarray(b, dtype=np.float64))
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return {"D": None, "p": None, "n1": n1, "n2": n2}
    allv = np.concatenate([a, b])
    cdf1 = np.searchsorted(a, allv, side="right") / n1
    cdf2 = np.searchsorted(b, allv, side="right") / n2
    D = float(np.max(np.abs(cdf1 - cdf2)))
    en = math.sqrt(n1 * n2 / (n1 + n2))
    lam = (en + 0.12 + 0.11 / en) * D
    return {"D": D, "p": kolmogorov_sf(lam), "n1": n1, "n2": n2}


def kolmogorov_sf(lam: float) -> float:
    """P(K > λ) for the Kolmogorov distribution."""
    if lam < 1e-3:
        return 1.0
    j = np.arange(1, 101)
    p = 2.0 * np.sum((-1.0) ** (j - 1) * np.exp(-2.0 * j * j * lam * lam))
    return float(min(1.0, max(0.0, p)))


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mann_whitney(a, b) -> dict:
    """Two-sided Mann–Whitney U test: ``{"U", "p", "n1", "n2"}``."""
    a = np.asarray(a, dtype=np.float64); b = np.asarray(b, dtype=np.float64)
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return {"U": None, "p": None, "n1": n1, "n2": n2}
    allv = np.concatenate([a, b])
    r = _rank(allv)
    U = float(r[:n1].sum() - n1 * (n1 + 1) / 2)
    mu = n1 * n2 / 2
    _, counts = np.unique(allv, return_counts=True)
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - (counts ** 3 - counts).sum() / (n * (n - 1)))
    if var <= 0:
        return {"U": U, "p": 1.0, "n1": n1, "n2": n2}
    z = (abs(U - mu) - 0.5) / math.sqrt(var)
    p = math.erfc(max(z, 0.0) / math.sqrt(2))
    return {"U": U, "p": float(min(1.0, p)), "n1": n1, "n2": n2}


def describe(x) -> dict:
    """n, mean, std (population), skew (standardised third moment) of a sample; None when empty."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "mean": None, "std": None, "skew": None}
    m, s = float(x.mean()), float(x.std())
    skew = float(((x - m) ** 3).mean() / s ** 3) if s > 0 else 0.0
    return {"n": int(len(x)), "mean": m, "std": s, "skew": skew}
