"""The numpy KS and Mann–Whitney tests against scipy."""

import numpy as np
import pytest
import scipy.stats

from headscope.neurons.stats import describe, ks_2samp, mann_whitney


@pytest.mark.parametrize("n1,n2,shift", [(40, 60, 0.0), (80, 50, 0.5), (200, 300, 0.2), (30, 30, 1.5)])
def test_ks_matches_scipy(n1, n2, shift):
    rng = np.random.default_rng(n1 + n2)
    a, b = rng.normal(shift, 1, n1), rng.standard_t(3, n2)
    ours = ks_2samp(a, b)
    ref = scipy.stats.ks_2samp(a, b, method="asymp")
    assert ours["D"] == pytest.approx(ref.statistic, abs=1e-12)
    # Stephens' correction vs scipy's asymptotic formula: close, not identical
    assert ours["p"] == pytest.approx(ref.pvalue, abs=0.03)


def test_ks_with_ties_and_empty():
    a = [0.0, 0.0, 1.0, 1.0, 2.0]
    b = [0.0, 1.0, 1.0, 3.0]
    assert ks_2samp(a, b)["D"] == pytest.approx(scipy.stats.ks_2samp(a, b).statistic)
    assert ks_2samp([], b)["D"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0.6, 0.2, 45), 1)   # rounded: ties, as explanation scores have
    b = np.round(rng.normal(0.55, 0.2, 60), 1)
    ours = mann_whitney(a, b)
    ref = scipy.stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic")
    assert ours["U"] == pytest.approx(ref.statistic)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-6)


def test_describe():
    x = np.array([0.5, 0.75, 1.0, 0.5, 0.25])
    d = describe(x)
    assert d["mean"] == pytest.approx(x.mean()) and d["std"] == pytest.approx(x.std())
    assert d["skew"] == pytest.approx(scipy.stats.skew(x))
    assert describe([])["mean"] is None
