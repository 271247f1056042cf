"""Detection and fuzzing scorers, the shuffled-explanation baseline and its CI, on synthetic units whose
truth is known: a unit that fires on one token (found), and units that fire at random (negative control)."""

import itertools
import random

import numpy as np
import pytest

from headscope.explain.contexts import Context, ExplainContextsRequest, JudgeRequest, judge_messages
from headscope.explain.scorers import auroc, derangement, mean_ci, said_yes, score_units
from headscope.explain.scoring import balanced_accuracy
from headscope.explain.token_stats import TokenStatExplainer

VOCAB = [f" w{i}" for i in range(60)]


def window(rng, fire_on=None, p_random=0.0, W=12):
    toks = [rng.choice(VOCAB) for _ in range(W)]
    acts = [1.0 if (t == fire_on or rng.random() < p_random) else 0.0 for t in toks]
    return Context(toks, acts)


def make_units(n_units, informative, seed=0, n=10):
    """Each unit u fires on token VOCAB[u] (informative) or on random positions (negative control)."""
    rng = random.Random(seed)
    ex = TokenStatExplainer()
    units = []
    for u in range(n_units):
        fire = VOCAB[u] if informative else None
        p = 0.0 if informative else 0.08

        def draw(want_active):
            while True:
                c = window(rng, fire, p)
                if fire and want_active and fire not in c.tokens:
                    c.tokens[rng.randrange(len(c.tokens))] = fire
                    c = Context(c.tokens, [1.0 if t == fire else 0.0 for t in c.tokens])
                if (max(c.acts) > 0) == want_active:
                    return c
        active = [draw(True) for _ in range(n)]
        rand = [window(rng, fire, p) for _ in range(n)]
        [expl] = ex.explain_contexts([ExplainContextsRequest(active, rand)])
        pos, neg = [draw(True) for _ in range(n)], [draw(False) for _ in range(n)]
        fuzz = []
        for c in pos:
            real = c.marked()
            others = [i for i, a in enumerate(c.acts) if a <= 0]
            fuzz += [(Context(c.tokens, c.acts, real), True),
                     (Context(c.tokens, c.acts, sorted(rng.sample(others, len(real)))), False)]
        units.append({"id": str(u), "explanation": expl,
                      "items": {"detection": [(c, True) for c in pos] + [(c, False) for c in neg], "fuzzing": fuzz}})
    return units, ex


def test_metrics_against_direct_computation():
    rng = np.random.default_rng(1)
    probs = rng.random(30).round(2).tolist()
    truth = (rng.random(30) < 0.4).tolist()
    pos = [p for p, t in zip(probs, truth) if t]
    neg = [p for p, t in zip(probs, truth) if not t]
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)]
    assert auroc(probs, truth) == pytest.approx(sum(pairs) / len(pairs))
    tpr = np.mean([p >= 0.5 for p in pos])
    tnr = np.mean([p < 0.5 for p in neg])
    assert balanced_accuracy(said_yes(probs), truth) == pytest.approx((tpr + tnr) / 2)
    assert balanced_accuracy(said_yes([1.0, 0.0]), [True, True]) is None
    assert balanced_accuracy(said_yes([None, None]), [True, False]) == 0.5  # unparsed = "no"


def test_derangement_and_ci():
    for seed in range(20):
        p = derangement(7, seed)
        assert sorted(p) == list(range(7)) and all(i != j for i, j in enumerate(p))
    with pytest.raises(ValueError):
        derangement(1)
    x = np.random.default_rng(0).normal(0.7, 0.1, 50).tolist()
    m = mean_ci(x)
    assert m["mean"] == pytest.approx(np.mean(x)) and m["ci"][0] < m["mean"] < m["ci"][1]
    assert m["ci"][1] - m["ci"][0] < 4 * np.std(x) / np.sqrt(50)


def test_informative_units_beat_their_shuffled_baseline():
    units, ex = make_units(12, informative=True)
    res = score_units(ex.judge, units, seed=0)
    for kind in ("detection", "fuzzing"):
        s = res["summary"][kind]
        assert s["balanced_accuracy"]["mean"] > 0.9, kind
        assert s["shuffled_balanced_accuracy"]["ci"][1] < 0.65, kind
        assert s["difference"]["ci"][0] > 0.2 and s["difference"]["p_wilcoxon"] < 0.01, kind
        assert s["graded"] and s["auroc"]["mean"] > 0.9
    for row in res["units"]:
        assert row["detection"]["shuffled_from"] != row["id"]


def test_negative_control_units_that_fire_at_random_score_at_chance():
    units, ex = make_units(12, informative=False, seed=3)
    res = score_units(ex.judge, units, seed=0)
    for kind in ("detection", "fuzzing"):
        s = res["summary"][kind]
        lo, hi = s["balanced_accuracy"]["ci"]
        assert lo - 0.05 < 0.5 < hi + 0.05, (kind, s["balanced_accuracy"])
        assert s["difference"]["ci"][0] < 0.05, kind


def test_llm_prompts_show_marks_only_for_fuzzing():
    c = Context([" a", " b", " c"], [0.0, 2.0, 0.0])
    d = judge_messages(JudgeRequest("detection", "fires on b", c))[1]["content"]
    f = judge_messages(JudgeRequest("fuzzing", "fires on b", c))[1]["content"]
    assert "<<" not in d and "a b c" in d
    assert "a<< b>> c" in f
