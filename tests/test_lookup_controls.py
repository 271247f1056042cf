"""Controls that can fail for the (neuron, head) look-ups: ‖z‖-only and z-probe baselines, the
same-head / other-neuron control, shuffles across neurons only, document-clustered tests, power."""

import numpy as np
import pytest

from headscope.explain.scorers import group_derangement
from headscope.explain.scoring import ScoringItem
from headscope.explain.stages import detectable_difference, same_head_items
from headscope.neurons.baselines import cluster_bootstrap_diff, fit_probe, norm_threshold, pair_baselines


def _bal(pred, y):
    pred, y = np.asarray(pred, bool), np.asarray(y, bool)
    return 0.5 * (pred[y].mean() + (~pred[~y]).mean())


def test_norm_baseline_reads_a_head_that_writes_strongly_when_active():
    rng = np.random.default_rng(0)
    P, D = 120, 16
    active = rng.random(P) < 0.4
    z = rng.normal(size=(P, D)) * np.where(active, 3.0, 1.0)[:, None]         # active: the head writes strongly
    split = (np.arange(P) >= 70).astype(int)
    b = pair_baselines(z, active, split)
    assert _bal(b["norm"], active[split == 1]) > 0.85
    t = norm_threshold(np.array([1.0, 2.0, 3.0, 4.0]), np.array([False, False, True, True]))
    assert t == 3.0


def test_probe_is_the_ceiling_for_a_direction_and_chance_for_noise():
    rng = np.random.default_rng(1)
    P, D = 200, 32
    z = rng.normal(size=(P, D))
    active = z[:, 3] - z[:, 7] > 0.3                       # a direction, invisible to the norm
    split = (np.arange(P) >= 120).astype(int)
    b = pair_baselines(z, active, split)
    assert _bal(b["probe"], active[split == 1]) > 0.8
    assert _bal(b["norm"], active[split == 1]) < 0.7
    noise = rng.random(P) < 0.5                            # labels independent of z: chance on held-out
    accs = [_bal(pair_baselines(rng.normal(size=(P, D)), rng.random(P) < 0.5, split)["probe"], noise[split == 1])
            for _ in range(8)]
    assert abs(np.mean(accs) - 0.5) < 0.07
    assert pair_baselines(z, np.zeros(P, bool), split) == {"norm": None, "probe": None}
    w, b0, mu, sd = fit_probe(z[:120], active[:120])
    assert w.shape == (D,) and abs(w[3]) > abs(w[0]) and abs(w[7]) > abs(w[0])


def test_cluster_bootstrap_is_wider_when_prompts_share_documents():
    rng = np.random.default_rng(2)
    n = 60
    group = np.arange(n) % 2 == 0
    docs = np.arange(n) // 10                                # 6 documents of 10 prompts
    doc_effect = rng.normal(size=6)[docs] * 1.0
    values = doc_effect + rng.normal(size=n) * 0.2 + 0.3 * group
    clustered = cluster_bootstrap_diff(values, group, docs)
    indep = cluster_bootstrap_diff(values, group, np.arange(n))
    assert clustered["diff"] == pytest.approx(values[group].mean() - values[~group].mean())
    assert clustered["clusters"] == 6 and indep["clusters"] == n
    assert cluster_bootstrap_diff(values, np.ones(n, bool), docs)["diff"] is None


def test_shuffles_never_stay_within_a_neuron_and_same_head_control_is_the_same_head():
    groups = [0, 0, 0, 1, 1, 2, 3, 3]
    for seed in range(20):
        perm = group_derangement(groups, seed)
        assert all(groups[p] != g for p, g in zip(perm, groups))
    lopsided = [0] * 6 + [1, 2]                              # no derangement exists: random other-neuron picks
    perm = group_derangement(lopsided, 0)
    assert all(lopsided[p] != g for p, g in zip(perm, lopsided))
    with pytest.raises(ValueError):
        group_derangement([5, 5, 5])
    items = [ScoringItem(str(i), f"expl{i}", ["x"], [True]) for i in range(5)]
    heads = ["3.1", "3.1", "4.2", "3.1", "4.2"]
    neurons = [0, 1, 1, 0, 2]
    out = same_head_items(items, neurons, heads)
    for i, o in enumerate(out):
        donors = [j for j in range(5) if heads[j] == heads[i] and neurons[j] != neurons[i]]
        if not donors:
            assert o is None
        else:
            assert o.explanation in {f"expl{j}" for j in donors} and o.examples == items[i].examples


def test_detectable_difference_matches_the_power_formula():
    rng = np.random.default_rng(3)
    a, b = list(rng.normal(0.55, 0.06, 12)), list(rng.normal(0.55, 0.06, 6))
    p = detectable_difference(a, b)
    sd = np.sqrt((11 * np.var(a, ddof=1) + 5 * np.var(b, ddof=1)) / 16)
    assert p["detectable"] == pytest.approx(2.8016 * sd * np.sqrt(1 / 12 + 1 / 6), rel=1e-3)
    assert p["neurons_per_set_for_0.03"] > 12                # 12 vs 6 neurons cannot see +0.03 at this spread
