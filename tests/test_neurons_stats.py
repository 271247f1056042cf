"""The look-ups' statistics (scipy.stats wrappers): what each returns, checked against scipy or a
formula written out, and the negative control — null data gives uniform p-values and no BH finding."""

import numpy as np
import pytest
import scipy.stats

from headscope.neurons.stats import (bh, binom_above, bootstrap_diff_of_means, bootstrap_mean, describe, ks_2samp,
                                     mann_whitney, wilcoxon_signed, wilson_interval)


def test_ks_is_scipys_exact_test_for_small_samples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.8, 1, 12), rng.normal(0, 1, 9)
    r = ks_2samp(a, b)
    ref = scipy.stats.ks_2samp(a, b, method="exact")
    assert (r["D"], r["p"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    # the asymptotic p-value (what the old numpy code used) differs at this size
    assert abs(scipy.stats.ks_2samp(a, b, method="asymp").pvalue - r["p"]) > 1e-3
    assert ks_2samp([], b)["D"] is None


def test_mann_whitney_auc_ties_and_degenerate():
    a, b = [0.5, 0.75, 0.75, 1.0], [0.25, 0.5, 0.5]
    r = mann_whitney(a, b)
    ref = scipy.stats.mannwhitneyu(a, b)
    assert r["U"] == ref.statistic and r["p"] == pytest.approx(ref.pvalue)
    wins = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    assert r["auc"] == pytest.approx(wins / (len(a) * len(b)))
    assert mann_whitney([1, 1], [1, 1, 1])["p"] == 1.0 and mann_whitney([], [1])["p"] is None
    g = mann_whitney([3, 4, 5], [0, 1, 2], alternative="greater")
    assert g["p"] == pytest.approx(1 / 20)               # exact: 1 of C(6, 3) orderings


def test_wilson_and_binomial():
    k, n, z = 14, 20, scipy.stats.norm.ppf(0.975)
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == (pytest.approx(c - h), pytest.approx(c + h))
    assert binom_above(k, n) == pytest.approx(sum(scipy.special.comb(n, j) for j in range(k, n + 1)) / 2 ** n)
    assert wilson_interval(0, 0) == (None, None) and binom_above(0, 0) is None


def test_bootstrap_intervals():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, 200)
    r = bootstrap_mean(x)
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert r["low"] < r["mean"] < r["high"]
    assert r["low"] == pytest.approx(x.mean() - 1.96 * se, abs=0.4 * se)
    assert r["high"] == pytest.approx(x.mean() + 1.96 * se, abs=0.4 * se)
    assert bootstrap_mean([3.0])["low"] is None and bootstrap_mean([])["mean"] is None
    d = bootstrap_diff_of_means(x + 1, x)
    assert d["diff"] == pytest.approx(1.0) and d["low"] < 1.0 < d["high"]


def test_bh_matches_the_step_up_rule_and_skips_none():
    ps = [0.01, None, 0.04, 0.03, 0.2, 0.001]
    real = [p for p in ps if p is not None]
    m = len(real)
    order = np.argsort(real)
    adj = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):                              # q_(i) = min_{j ≥ i} p_(j)·m/j
        running = min(running, real[order[rank - 1]] * m / rank)
        adj[order[rank - 1]] = running
    got = bh(ps)
    assert got[1] is None
    assert [g for g in got if g is not None] == pytest.approx(adj.tolist())
    assert bh([]) == []


def test_wilcoxon_and_describe():
    d = [0.3, -0.1, 0.4, 0.2, 0.5, 0.1]
    r = wilcoxon_signed(d)
    assert r["p"] == pytest.approx(scipy.stats.wilcoxon(d).pvalue) and r["n"] == 6
    assert wilcoxon_signed([0, 0])["p"] == 1.0 and wilcoxon_signed([])["p"] is None
    x = np.array([0.5, 0.75, 1.0, 0.5, 0.25])
    s = describe(x)
    assert s["mean"] == pytest.approx(x.mean()) and s["std"] == pytest.approx(x.std())
    assert s["skew"] == pytest.approx(scipy.stats.skew(x)) and describe([])["mean"] is None


def test_negative_control_null_data_finds_nothing():
    """Two samples from one distribution, 300 times: p-values spread over [0, 1] (≈ 5 % below 0.05)
    and BH at q = 0.05 keeps (almost) nothing."""
    rng = np.random.default_rng(7)
    ps = [mann_whitney(rng.normal(size=15), rng.normal(size=15))["p"] for _ in range(300)]
    assert 0.01 < np.mean(np.array(ps) < 0.05) < 0.10
    assert sum(q < 0.05 for q in bh(ps)) <= 2
    # and a real shift is found
    shifted = [mann_whitney(rng.normal(1.5, 1, 15), rng.normal(size=15))["p"] for _ in range(50)]
    assert sum(q < 0.05 for q in bh(shifted)) >= 40
