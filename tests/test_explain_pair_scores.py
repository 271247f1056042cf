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
