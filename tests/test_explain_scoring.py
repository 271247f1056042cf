"""Scoring (balanced held-out examples, intervals and p clustered by document — Wilson and the binomial
test when every prompt is its own document — BH), the statistical explainer (sparse
logistic regression over n-grams, checked against scipy's optimiser), the negative controls (labels that
carry no information, random explanations -> E at chance), the local HF P(Yes)/P(No) scorer, prompts."""

import numpy as np
import pytest
import scipy.optimize
import torch

from headscope.explain.hf_local import LocalHFExplainer
from headscope.explain.prompts import (ClassifyRequest, ExplainRequest, classify_messages, example_text,
                                       explain_messages, parse_yes_no)
from headscope.explain.scoring import (ScoringItem, add_fdr, balanced_accuracy, balanced_indices,
                                       detection_score, score_explanations, shuffled_items)
from headscope.explain.statistical import StatisticalExplainer, features, fit_l1_logistic, lambda_max, words
from headscope.testing.tiny import tiny_model

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def _example(rng, marker=None, n=12):
    ws = list(rng.choice(WORDS, n))
    if marker:
        ws[-1] = marker                                      # the word just before the neuron's token
    return " ".join(ws) + " TOKEN"


def test_balanced_accuracy_arithmetic():
    truth = [True, True, True, False, False]
    pred = [True, False, True, False, True]
    assert balanced_accuracy(pred, truth) == pytest.approx((2 / 3 + 1 / 2) / 2)
    r = detection_score(pred, truth)
    assert r["TPR"] == pytest.approx(2 / 3) and r["TNR"] == pytest.approx(1 / 2)
    assert r["E"] == balanced_accuracy(pred, truth) and "E_low" not in r   # unbalanced: no exact interval
    assert balanced_accuracy([True] * 4, truth[1:]) == 0.5                  # always Yes: chance
    assert balanced_accuracy([not t for t in truth], truth) == 0.0
    assert balanced_accuracy([True, False], [True, True]) is None
    skipped = detection_score([True, False], [True, True])
    assert skipped["E"] is None and "one class" in skipped["skipped"]
    b = detection_score([True, True, False, True], [True, True, False, False])
    assert b["E"] == 0.75 and b["E_low"] < 0.75 < b["E_high"] and b["p"] == pytest.approx(5 / 16)
    assert b["interval"] == "wilson" and b["documents"] == 4


def _clustered_case():
    """8 documents × 6 prompts (3 active, 3 inactive) whose correctness is identical within a document (perfect
    intra-cluster correlation): documents 0–5 all right, 6–7 all wrong → E = 0.75 on 40 prompts."""
    truth, pred, docs = [], [], []
    for g in range(8):
        for i in range(6):
            t = i % 2 == 0
            truth.append(t)
            pred.append(t if g < 6 else not t)
            docs.append(g)
    return pred, truth, docs


def _wilson(p, n, z=1.959963984540054):
    """The Wilson score interval, written out (independent of the package)."""
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return c - h, c + h


def _anova_icc(correct, docs):
    """One-way ANOVA intra-class correlation of 0/1 answers, written out with loops (unequal sizes)."""
    groups = {}
    for c, d in zip(correct, docs):
        groups.setdefault(d, []).append(float(c))
    n, G = len(correct), len(groups)
    mean = sum(map(float, correct)) / n
    msb = sum(len(v) * (sum(v) / len(v) - mean) ** 2 for v in groups.values()) / (G - 1)
    msw = sum((x - sum(v) / len(v)) ** 2 for v in groups.values() for x in v) / (n - G)
    m0 = (n - sum(len(v) ** 2 for v in groups.values()) / n) / (G - 1)
    return min(1.0, max(0.0, (msb - msw) / (msb + (m0 - 1) * msw))) if msb + (m0 - 1) * msw > 0 else 1.0


def test_document_clustered_interval_is_wider_than_wilson_and_matches_the_design_effect_formula():
    from scipy.stats import t
    pred, truth, docs = _clustered_case()
    clustered = detection_score(pred, truth, docs, seed="pair")
    indep = detection_score(pred, truth)                                    # every prompt its own document
    assert clustered["E"] == indep["E"] == 0.75
    assert clustered["interval"] == "document" and clustered["documents"] == 8
    assert indep["interval"] == "wilson" and (indep["E_low"], indep["E_high"]) == pytest.approx(_wilson(0.75, 48))
    # perfect intra-document correlation: ρ = 1, deff = 6, the evidence of 8 documents, not 48 prompts
    assert clustered["icc"] == 1.0 and clustered["design_effect"] == pytest.approx(6.0)
    n_star = 48 / 6 * (1.959963984540054 / t.ppf(0.975, 7)) ** 2
    assert (clustered["E_low"], clustered["E_high"]) == pytest.approx(_wilson(0.75, n_star))
    assert clustered["E_high"] - clustered["E_low"] > 2 * (indep["E_high"] - indep["E_low"])
    # answers unrelated to the documents: ρ estimated ≈ 0, the interval close to Wilson's and never narrower
    rng = np.random.default_rng(0)
    for _ in range(20):
        pred2 = [bool(t) if rng.random() < 0.7 else not t for t in truth]
        r, w = detection_score(pred2, truth, docs), detection_score(pred2, truth)
        correct = [p == t for p, t in zip(pred2, truth)]
        icc = _anova_icc(correct, docs)
        assert r["icc"] == pytest.approx(icc)
        sizes = [docs.count(d) for d in set(docs)]
        n_star = 48 / (1 + (sum(m * m for m in sizes) / 48 - 1) * icc) * (1.959963984540054 / t.ppf(0.975, 7)) ** 2
        assert (r["E_low"], r["E_high"]) == pytest.approx(_wilson(r["E"], n_star))
        assert r["E_high"] - r["E_low"] >= w["E_high"] - w["E_low"]


def test_document_clustered_p_is_the_exact_sign_flip_test():
    """p = share of the 2^G sign patterns of the documents' excess that reach the observed excess: here
    6 documents right and 2 wrong (same size), so p = P(Bin(8, ½) ≥ 6) = 37/256 — not the 1e-4 of a binomial
    test on 48 prompts treated as independent."""
    pred, truth, docs = _clustered_case()
    r = detection_score(pred, truth, docs, seed="pair")
    assert r["p"] == pytest.approx(37 / 256)
    assert detection_score(pred, truth)["p"] < 1e-3
    # 4 documents, all right: the smallest p a 4-document pair can have is 2^-4
    assert detection_score([t for t in truth[:24]], truth[:24], docs[:24])["p"] == pytest.approx(1 / 16)
    # a single document: no interval, no p
    one = detection_score(pred[:6], truth[:6], [0] * 6)
    assert one["E"] == 1.0 and one["E_low"] is None and one["p"] is None


@pytest.mark.parametrize("seed", range(3))
def test_one_prompt_per_document_reduces_to_the_independent_case(seed):
    """With every prompt in a document of its own the sign-flip p is exactly the one-sided binomial p and
    the result is Wilson's; with all but two prompts alone the document interval is close to Wilson's."""
    from scipy.stats import binomtest
    from headscope.explain.scoring import document_interval, sign_flip_p
    rng = np.random.default_rng(seed)
    truth = np.array([True] * 8 + [False] * 8)
    correct = rng.random(16) < 0.7
    k = int(correct.sum())
    p_binom = binomtest(k, 16, alternative="greater").pvalue
    assert sign_flip_p(correct, truth, list(range(16))) == pytest.approx(p_binom, rel=1e-9)
    pred = [bool(c) == bool(t) for c, t in zip(correct, truth)]
    r = detection_score(pred, list(truth), list(range(16)))                 # distinct documents: Wilson form
    assert r["interval"] == "wilson" and r["p"] == pytest.approx(p_binom)
    lo, hi, _ = document_interval(correct, [0] + list(range(15)))           # one document holds two prompts
    wl, wh = _wilson(k / 16, 16)
    assert lo == pytest.approx(wl, abs=0.05) and hi == pytest.approx(wh, abs=0.05)


def test_score_explanations_clusters_by_the_items_documents():
    """An item's ``docs`` reach its row: the same predictions get a wider interval and a larger p when
    its prompts share documents, and BH then counts the clustered p."""
    class Oracle:                                                  # answers from the example text
        def classify_many(self, reqs):
            return [1.0 if r.example.startswith("on") else 0.0 for r in reqs]
    pred, truth, docs = _clustered_case()
    ex = [("on" if p else "off") + f" {i}" for i, p in enumerate(pred)]
    indep = ScoringItem("k", "expl", ex, truth)
    clus = ScoringItem("k", "expl", ex, truth, docs=docs)
    [a] = score_explanations(Oracle(), [indep], max_per_class=24, min_per_class=2)
    [b] = score_explanations(Oracle(), [clus], max_per_class=24, min_per_class=2)
    assert a["E"] == b["E"] == 0.75 and a["examples"] == b["examples"]
    assert b["E_high"] - b["E_low"] > a["E_high"] - a["E_low"] and b["p"] > 0.1 > 1e-3 > a["p"]
    assert b["interval"] == "document" and a["interval"] == "wilson"
    assert add_fdr([a]) == 1 and add_fdr([b]) == 0
    assert shuffled_items([clus, ScoringItem("j", "other", ex, truth, docs=docs)], [0, 1])[0].docs == docs


def test_balanced_indices():
    truth = [True] * 3 + [False] * 9
    idx, why = balanced_indices(truth, max_per_class=20, min_per_class=2, seed="a")
    assert why is None and sum(truth[i] for i in idx) == 3 and len(idx) == 6 and idx == sorted(idx)
    assert balanced_indices(truth, 20, 2, "a") == (idx, None)                # deterministic per key
    assert balanced_indices(truth, 2, 1, "a")[0].__len__() == 4              # capped per class
    none, why = balanced_indices(truth, 20, 4, "a")
    assert none == [] and "3 active / 9 inactive" in why


def test_l1_logistic_matches_scipy_optimum():
    """FISTA reaches the optimum of the class-balanced L1 objective found independently by L-BFGS-B on
    the split variables β = β⁺ − β⁻ ≥ 0."""
    rng = np.random.default_rng(0)
    X = (rng.random((30, 8)) < 0.4).astype(float)
    y = ((X[:, 0] + X[:, 3] + 0.3 * rng.normal(size=30)) > 0.7).astype(float)
    lam = 0.1 * lambda_max(X, y)
    b, beta = fit_l1_logistic(X, y, lam, iters=5000, tol=1e-12)
    w = np.where(y > 0, 0.5 / y.sum(), 0.5 / (len(y) - y.sum()))

    def obj(theta):
        s = theta[0] + X @ (theta[1:9] - theta[9:])
        return np.sum(w * (np.logaddexp(0, s) - y * s)) + lam * theta[1:].sum()

    ref = scipy.optimize.minimize(obj, np.zeros(17), method="L-BFGS-B", bounds=[(None, None)] + [(0, None)] * 16,
                                  options={"ftol": 1e-14, "gtol": 1e-10, "maxiter": 10000})
    ours = obj(np.concatenate([[b], np.maximum(beta, 0), np.maximum(-beta, 0)]))
    assert ours == pytest.approx(ref.fun, abs=1e-6)
    assert np.count_nonzero(np.abs(beta) > 1e-6) < 8                          # sparse
    assert np.all(np.abs(fit_l1_logistic(X, y, lambda_max(X, y) * 1.01)[1]) < 1e-8)   # above λ_max: β = 0


def test_statistical_explainer_recovers_a_planted_rule():
    rng = np.random.default_rng(1)
    act = [_example(rng, "of") for _ in range(10)]
    ina = [_example(rng) for _ in range(10)]
    se = StatisticalExplainer()
    [expl] = se.explain_many([ExplainRequest(act, ina, " TOKEN")])
    rule = se.parse(expl)
    assert rule is not None and expl.startswith("Active when")
    top = max(rule["terms"], key=lambda t: abs(t[2]))
    assert top[1] == "of" and top[2] > 0 and f'"{top[1]}"' in expl.splitlines()[0]
    test = [_example(rng, "of") for _ in range(20)] + [_example(rng) for _ in range(20)]
    truth = [True] * 20 + [False] * 20
    [row] = score_explanations(se, [ScoringItem("k", expl, test, truth)], max_per_class=20, min_per_class=5)
    assert row["E"] == 1.0 and row["p"] < 1e-6
    assert se.classify_many([ClassifyRequest("free text, no rule", "x TOKEN")]) == [None]
    assert words("A b, c TOKEN", " TOKEN") == ["a", "b", ",", "c"]
    assert features(["a", "b", "c"], 2) == {("last", "c"), ("last", "b c"), ("near", "b"), ("near", "c"),
                                           ("near", "b c"),                  # window 2: "a" is out
                                           ("any", "a"), ("any", "b"), ("any", "c")}
    assert ("struct", "repeat") in features(["a", "b", "a"], 2) and ("struct", "token") in features(["x", "of"], 2, "of")


def test_sub_word_token_is_cut_not_the_last_word():
    """A random neuron's token is often a word piece ('ptom'): only the piece is cut off the example, so
    the prompt's last word stays (it used to drop the whole last word "symptom" → the real "sym")."""
    from headscope.explain.prompts import example_text
    ex = example_text(["<s>", "the", " first", " sym"], "ptom")
    assert ex == "the first symptom"
    assert words(ex, "ptom") == ["the", "first", "sym"]
    assert words(example_text(["<s>", "a", " b"], " of"), " of") == ["a", "b"]
    assert words("no token here", "ptom") == ["no", "token", "here"]     # not at the end: nothing is cut


def test_structural_rule_is_learned_and_applied_with_the_examples_own_token():
    """A head active when the last word occurred earlier: the explainer finds the structural feature,
    and the scorer applies it with each example's own token (also under another neuron's rule)."""
    rng = np.random.default_rng(5)

    def ex(on, tok):
        ws = list(rng.choice(WORDS, 9, replace=False))
        last = ws[2] if on else str(rng.choice([w for w in WORDS if w not in ws]))
        return " ".join(ws + [last]) + tok
    se = StatisticalExplainer()
    act, ina = [ex(1, "ptom") for _ in range(25)], [ex(0, "ptom") for _ in range(25)]
    [expl] = se.explain_many([ExplainRequest(act, ina, "ptom")])
    rule = se.parse(expl)
    assert ("struct", "repeat") in {(k, g) for k, g, w in rule["terms"] if w > 0}
    assert "occurred earlier" in expl
    test = [ex(1, " of") for _ in range(15)] + [ex(0, " of") for _ in range(15)]
    [row] = score_explanations(se, [ScoringItem("k", expl, test, [True] * 15 + [False] * 15, " of")], 15, 5)
    assert row["E"] > 0.9


def test_negative_control_uninformative_labels_give_chance():
    """Labels independent of the text: the explainer finds (almost) nothing, held-out E sits at chance
    (its mean over 40 pairs within 0.5 ± 0.05) and BH finds no pair above chance."""
    rng = np.random.default_rng(2)
    se = StatisticalExplainer()
    items = []
    for k in range(40):
        train = [_example(rng) for _ in range(20)]
        lab = rng.permutation([True] * 10 + [False] * 10)
        [expl] = se.explain_many([ExplainRequest([t for t, l in zip(train, lab) if l],
                                                 [t for t, l in zip(train, lab) if not l], " TOKEN")])
        test = [_example(rng) for _ in range(30)]
        items.append(ScoringItem(str(k), expl, test, list(rng.permutation([True] * 15 + [False] * 15))))
    rows = score_explanations(se, items, max_per_class=15, min_per_class=5)
    Es = [r["E"] for r in rows]
    assert abs(np.mean(Es) - 0.5) < 0.05
    assert add_fdr(rows) == 0


def test_negative_control_random_explanations_give_chance():
    """Informative labels, but each pair scored with the explanation of a pair from another group:
    E drops to chance while the pairs' own explanations score high."""
    rng = np.random.default_rng(3)
    se = StatisticalExplainer()
    items, group = [], []
    for k in range(12):
        marker = WORDS[k]                              # each pair has its own rule
        pool = [w for w in WORDS if w != marker]
        ex = lambda on: " ".join(list(rng.choice(pool, 11)) + [marker if on else str(rng.choice(pool))]) + " TOKEN"
        [expl] = se.explain_many([ExplainRequest([ex(1) for _ in range(10)], [ex(0) for _ in range(10)], " TOKEN")])
        items.append(ScoringItem(str(k), expl, [ex(1) for _ in range(15)] + [ex(0) for _ in range(15)],
                                 [True] * 15 + [False] * 15))
        group.append(k)
    own = score_explanations(se, items, 15, 5)
    ctrl_items = shuffled_items(items, group, seed=0)
    assert all(c.explanation != i.explanation for c, i in zip(ctrl_items, items))
    ctrl = score_explanations(se, ctrl_items, 15, 5)
    assert np.mean([r["E"] for r in own]) > 0.9
    assert abs(np.mean([r["E"] for r in ctrl]) - 0.5) < 0.06 and add_fdr(ctrl) == 0


def test_examples_and_prompts():
    assert example_text(["<bos>", "Hello", "\n", " world"], " again") == "Hello  world again"
    assert "\n" not in example_text(["<s>", "a\nb"], "c")
    msgs = explain_messages(ExplainRequest(["x y"], ["z"], " tok"))
    assert "ACTIVE examples:\n1. x y" in msgs[1]["content"] and "INACTIVE examples:\n1. z" in msgs[1]["content"]
    assert "two to three sentences" in msgs[1]["content"]
    q = classify_messages(ClassifyRequest("Fires on X.", "an example"))[1]["content"]
    assert q.endswith("Is the given example an active example? (Yes/No)") and "Fires on X." in q
    assert [parse_yes_no(t) for t in ("Yes", " yes.", "No", "**No**", "maybe")] == [1.0, 1.0, 0.0, 0.0, None]


def test_local_hf_p_yes_is_one_forward_pass_softmax_ratio():
    m = tiny_model("llama_gqa")
    ex = LocalHFExplainer(m, max_new_tokens=8)
    assert ex.yes_ids and ex.no_ids
    req = ClassifyRequest("Active on numbers.", "there are 3 cats")
    p = ex.classify_many([req])[0]
    ids = ex._ids(classify_messages(req))
    probs = torch.softmax(m.hf(ids).logits[0, -1].double(), -1)
    y, n = probs[ex.yes_ids].sum().item(), probs[ex.no_ids].sum().item()
    assert p == pytest.approx(y / (y + n), rel=1e-5)
    a = ex.explain_many([ExplainRequest(["one two"], ["three"], " four")])
    b = ex.explain_many([ExplainRequest(["one two"], ["three"], " four")])
    assert isinstance(a[0], str) and a == b                                  # greedy: deterministic
