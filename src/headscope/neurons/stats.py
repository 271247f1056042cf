"""The statistics of the look-ups, all from ``scipy.stats`` (thin wrappers that return JSON-able dicts).

* :func:`ks_2samp`, :func:`mann_whitney`: two-sample tests, scipy's default p-values (exact for small
  samples without ties, asymptotic otherwise).
* :func:`wilcoxon_signed`: one-sample test of paired differences against 0 (exact for small n).
* :func:`wilson_interval`, :func:`binom_above`: a proportion's Wilson 95 % interval and the one-sided
  binomial test against chance (``scipy.stats.binomtest``).
* :func:`bootstrap_mean`: percentile bootstrap interval of a mean (``scipy.stats.bootstrap``), used
  over *independent units* (pairs or neurons), never over pooled prompts.
* :func:`bh`: Benjamini–Hochberg adjusted p-values (``scipy.stats.false_discovery_control``).
* :func:`describe`: n, mean, std (population), skew of a sample.

Every function accepts empty input and answers None where the statistic is undefined.
"""

from __future__ import annotations

import numpy as np
import scipy.stats as st


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()


def ks_2samp(a, b) -> dict:
    """Two-sample Kolmogorov–Smirnov test: ``{"D", "p", "n1", "n2"}``."""
    a, b = _arr(a), _arr(b)
    if len(a) == 0 or len(b) == 0:
        return {"D": None, "p": None, "n1": len(a), "n2": len(b)}
    r = st.ks_2samp(a, b)
    return {"D": float(r.statistic), "p": float(r.pvalue), "n1": len(a), "n2": len(b)}


def mann_whitney(a, b, alternative: str = "two-sided") -> dict:
    """Mann–Whitney U test of sample a against b: ``{"U", "p", "n1", "n2", "auc"}``; ``auc`` = U/(n1·n2),
    the probability that a draw from a exceeds one from b (ties count ½)."""
    a, b = _arr(a), _arr(b)
    if len(a) == 0 or len(b) == 0:
        return {"U": None, "p": None, "n1": len(a), "n2": len(b), "auc": None}
    if np.ptp(np.concatenate([a, b])) == 0:  # all values equal: no evidence either way
        return {"U": len(a) * len(b) / 2, "p": 1.0, "n1": len(a), "n2": len(b), "auc": 0.5}
    r = st.mannwhitneyu(a, b, alternative=alternative)
    return {"U": float(r.statistic), "p": float(r.pvalue), "n1": len(a), "n2": len(b),
            "auc": float(r.statistic) / (len(a) * len(b))}


def wilcoxon_signed(d, alternative: str = "two-sided") -> dict:
    """Wilcoxon signed-rank test of differences d against 0: ``{"W", "p", "n", "n_nonzero"}``."""
    d = _arr(d)
    nz = int(np.count_nonzero(d))
    if nz == 0:
        return {"W": None, "p": None if len(d) == 0 else 1.0, "n": len(d), "n_nonzero": 0}
    r = st.wilcoxon(d, alternative=alternative)
    return {"W": float(r.statistic), "p": float(r.pvalue), "n": len(d), "n_nonzero": nz}


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of a proportion k/n (``binomtest(k, n).proportion_ci(method="wilson")``)."""
    if n == 0:
        return None, None
    ci = st.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def binom_above(k: int, n: int, p0: float = 0.5) -> float | None:
    """One-sided exact binomial p-value of k successes in n trials against the rate p0 (H1: > p0)."""
    if n == 0:
        return None
    return float(st.binomtest(int(k), int(n), p0, alternative="greater").pvalue)


def bootstrap_mean(x, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> dict:
    """Mean of the independent units x with a percentile bootstrap interval:
    ``{"mean", "low", "high", "n"}`` (low/high None for fewer than two units)."""
    x = _arr(x)
    if len(x) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    m = float(x.mean())
    if len(x) < 2 or np.ptp(x) == 0:
        return {"mean": m, "low": None if len(x) < 2 else m, "high": None if len(x) < 2 else m, "n": len(x)}
    r = st.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                     random_state=np.random.default_rng(seed))
    return {"mean": m, "low": float(r.confidence_interval.low), "high": float(r.confidence_interval.high), "n": len(x)}


def bootstrap_diff_of_means(a, b, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> dict:
    """mean(a) − mean(b) with a percentile bootstrap interval (a and b resampled independently)."""
    a, b = _arr(a), _arr(b)
    if len(a) == 0 or len(b) == 0:
        return {"diff": None, "low": None, "high": None}
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "low": None, "high": None}
    r = st.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), confidence_level=confidence,
                     n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = r.confidence_interval
    return {"diff": diff, "low": float(lo) if np.isfinite(lo) else diff, "high": float(hi) if np.isfinite(hi) else diff}


def bh(pvalues) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values (None entries stay None and do not count as tests)."""
    ps = list(pvalues)
    idx = [i for i, p in enumerate(ps) if p is not None]
    out: list[float | None] = [None] * len(ps)
    if idx:
        adj = st.false_discovery_control(np.array([ps[i] for i in idx], dtype=np.float64), method="bh")
        for i, q in zip(idx, adj):
            out[i] = float(q)
    return out


def describe(x) -> dict:
    """n, mean, std (population), skew (standardised third moment, ``scipy.stats.skew``); None when empty."""
    x = _arr(x)
    if len(x) == 0:
        return {"n": 0, "mean": None, "std": None, "skew": None}
    s = float(x.std())
    return {"n": int(len(x)), "mean": float(x.mean()), "std": s, "skew": float(st.skew(x)) if s > 0 else 0.0}
