"""Pair explanations through the shared detection scorer: balanced accuracy equals explain score's E,
beside a shuffled-explanation baseline; an explanation with no information scores at chance."""

import json

import pytest

from headscope.explain import stages as ex
from headscope.explain.options import RunOptions, ScoreOptions
from headscope.explain.pair_scores import PairScoreOptions, run_score_pairs
from headscope.explain.results import PairScoresResult
from headscope.neurons import stages as ns
from headscope.neurons.options import AttributeOptions, FindOptions, MineOptions
from headscope.runs import RunDir, read_json
from headscope.testing.tiny import tiny_model
from headscope.explain.statistical import StatisticalExplainer

EMPTY_RULE = StatisticalExplainer().render({"window": 8, "bias": 0.0, "terms": []})  # intercept only


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    m = tiny_model("llama_gqa")
    run = RunDir(tmp_path_factory.mktemp("run"), m.identity())
    ns.run_find(m, run, FindOptions(per_layer=3, require_space=False, min_chars=1, last_k=2))
    ns.run_mine(m, run, MineOptions(seq_len=48, top_k=8, top_k_test=8, max_tokens=2400), progress=False)
    ns.run_attribute(m, run, AttributeOptions(k_sigma=1.0), progress=False)
    ex.run_explain(m, run, RunOptions(), progress=False)
    ex.run_score(m, run, ScoreOptions(max_per_class=20, min_per_class=2, control=False), progress=False)
    return m, run


def _same_pair_intervals(run):
    """Each pair's interval and p in score-pairs equal those of `explain score` (same documents, same
    predictions, same seed); returns the interval kinds seen."""
    out = read_json(run / "explain/pair_scores_statistical_by_statistical.json")
    old = [o for o in read_json(run / "explain/scores_statistical.json")["pairs"] if o["E"] is not None]
    assert len(out["pairs"]) == len(old) >= 2
    for new, o in zip(out["pairs"], old):
        d = new["detection"]
        assert d["interval"] == o["interval"] and d["documents"] == o["documents"]
        for a, b in zip(d["ci"] + [d["p"]], [o["E_low"], o["E_high"], o["p"]]):
            assert (a is None and b is None) or a == pytest.approx(b)
    return {o["interval"] for o in old}


def test_balanced_accuracy_is_explain_scores_E(explained):
    m, run = explained
    s = run_score_pairs(m, run, PairScoreOptions(max_per_class=20, min_per_class=2), progress=False)
    out = read_json(run / "explain/pair_scores_statistical_by_statistical.json")
    old = [o for o in read_json(run / "explain/scores_statistical.json")["pairs"] if o["E"] is not None]
    assert len(out["pairs"]) == len(old) >= 2
    for new, o in zip(out["pairs"], old):
        assert new["detection"]["balanced_accuracy"] == pytest.approx(o["E"])
        assert new["detection"]["shuffled_from"] != new["id"]
        assert new["detection"]["shuffled_from"].split(":")[0] != new["id"].split(":")[0]   # another neuron's
    assert "not applicable" in out["fuzzing"]
    assert isinstance(s, PairScoresResult)
    assert set(s.detection) >= {"balanced_accuracy", "shuffled_balanced_accuracy", "difference", "difference_clustered"}
    assert s.detection["difference_clustered"]["by"] == "neuron"
    _same_pair_intervals(run)


def test_pair_intervals_are_clustered_by_the_prompts_documents(explained, tmp_path):
    """Held-out prompts of a neuron drawn from 3 documents: `explain score` and `explain score-pairs` give
    each pair the same document-clustered interval and p (sign-flip over 3 documents: p ≥ 1/8, so BH finds
    nothing), wider than the Wilson interval of the same answers treated as independent (t with 2 degrees
    of freedom, deff ≥ 1)."""
    import shutil
    from headscope.neurons.stats import wilson_interval
    m, run0 = explained
    shutil.copytree(run0.path, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    mined = read_json(run / "neurons/mine.json")
    for n in mined["neurons"]:
        for j, pr in enumerate(n["test"]):
            pr["doc"] = j % 3
    (run / "neurons/mine.json").write_text(json.dumps(mined))
    res = ex.run_score(m, run, ScoreOptions(max_per_class=20, min_per_class=2, control=False), progress=False)
    rows = [r for r in read_json(run / "explain/scores_statistical.json")["pairs"] if r["E"] is not None]
    assert rows and all(r["interval"] == "document" and r["documents"] <= 3 for r in rows)
    assert all(r["p"] is None or r["p"] >= 1 / 8 for r in rows) and res.significant_bh == 0
    k = [sum((p >= 0.5) == t for p, t in zip(r["predictions"], r["truth"])) for r in rows]
    wider = [(r["E_high"] - r["E_low"]) > (lambda w: w[1] - w[0])(wilson_interval(kk, len(r["truth"])))
             for r, kk in zip(rows, k) if r["E_low"] is not None]
    assert wider and all(wider)
    run_score_pairs(m, run, PairScoreOptions(max_per_class=20, min_per_class=2), progress=False)
    assert _same_pair_intervals(run) == {"document"}


def test_uninformative_explanations_score_at_chance(explained):
    """Negative control: every pair gets the same empty rule → the rule judge answers the same for
    every prompt → balanced accuracy exactly 0.5 for every pair, real and shuffled alike."""
    m, run = explained
    path = run / "explain/explanations_statistical.json"
    data = read_json(path)
    for p in data["pairs"]:
        p["explanation"] = EMPTY_RULE
    (run / "explain/explanations_empty.json").write_text(json.dumps(data))
    s = run_score_pairs(m, run, PairScoreOptions(explanations="empty", min_per_class=2), progress=False)
    det = s.detection
    assert det["balanced_accuracy"]["mean"] == 0.5 and det["shuffled_balanced_accuracy"]["mean"] == 0.5
    assert det["difference"]["mean"] == 0.0 and det["difference"]["p_wilcoxon"] is None
