"""Feature explanation and scoring end to end on a tiny model: SAE → dashboards → contexts → explanations
→ detection/fuzzing scores with the shuffled baseline; an endpoint judge through a real local server."""

import json

import pytest

from headscope.errors import HeadscopeError
from headscope.explain.features import (FeatureExplainOptions, FeatureScoreOptions, run_explain_features,
                                        run_feature_contexts, run_score_features)
from headscope.runs import RunDir, read_json
from headscope.sae.dashboards import run_dashboards
from headscope.sae.train import run_train
from headscope.testing.tiny import tiny_model

from sae_helpers import small_corpus


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feat")
    model = tiny_model("gpt2")
    run = RunDir(tmp / "run", model.identity())
    run_train(model, run, 1, progress=False, corpus=small_corpus(tmp), n_tokens=8192, batch_size=256,
              buffer_tokens=2048, expansion=2, architecture="topk", k=4, seq_len=64)
    run_dashboards(model, run, "L1", n_tokens=1024, batch_size=4, page_size=16, progress=False)
    return model, run


def test_contexts_are_what_they_claim(sae_run):
    model, run = sae_run
    opts = FeatureExplainOptions(sae="L1", features=6, n_explain=4, n_test=5, windows=200)
    ctx = run_feature_contexts(model, run, opts, progress=False)
    assert ctx["sae"] == "L1" and len(ctx["features"]) == 6
    left, right = ctx["window"]
    bos = model.token_str([model.bos_id])[0]
    for f, c in ctx["features"].items():
        assert all(max(x["acts"]) > 0 for x in c["explain"]["active"])
        for x, t in c["detection"]:
            assert (max(x["acts"]) > 0) == t            # positives fire somewhere, negatives nowhere
        for x, t in c["fuzzing"]:
            marked = [x["acts"][i] for i in x["highlight"]]
            assert marked and (all(a > 0 for a in marked) if t else all(a <= 0 for a in marked))
        for x in c["explain"]["random"] + [x for x, t in c["detection"] if not t]:
            assert len(x["tokens"]) == left + 1 + right and bos not in x["tokens"][:1]
    with pytest.raises(HeadscopeError, match="no dashboards for SAE 'nope'"):
        run_feature_contexts(model, run, FeatureExplainOptions(sae="nope"), progress=False)


def test_statistical_explanations_and_scores(sae_run):
    model, run = sae_run
    opts = FeatureExplainOptions(sae="L1", features=8, n_explain=6, n_test=6, windows=300)
    res = run_explain_features(model, run, opts, progress=False)
    assert res["features"] == 8
    ex = read_json(run / "explain/features/L1/explanations_statistical.json")
    assert all(e["explanation"].startswith("Fires on the tokens") for e in ex["features"].values())
    s = run_score_features(model, run, FeatureScoreOptions(sae="L1"), progress=False)
    assert s["probabilities"] == "rule"
    out = read_json(run / "explain/features/L1/scores_statistical_by_statistical.json")
    assert len(out["features"]) == 8
    for kind in ("detection", "fuzzing"):
        summ = out["summary"][kind]
        assert summ["units"] + summ["skipped"] == 8
        for key in ("balanced_accuracy", "shuffled_balanced_accuracy", "difference"):
            assert set(summ[key]) >= {"mean", "ci", "n"}
        assert (run / f"explain/features/L1/scores_statistical_by_statistical_{kind}.png").is_file()
    with pytest.raises(HeadscopeError, match="choose from detection, fuzzing"):
        FeatureScoreOptions(sae="L1", scorers=["vibes"])


def test_endpoint_judge_reads_logprobs(sae_run, tmp_path):
    from test_explain_client import Server
    from headscope.explain.openai_client import ChatClient, OpenAIExplainer
    model, run = sae_run
    s = Server(default=("lp", "Yes", {"Yes": -0.1, "No": -2.5}))
    try:
        be = OpenAIExplainer(ChatClient(s.url, "m", concurrency=2, timeout=5))
        opts = FeatureExplainOptions(sae="L1", backend="openai", features=3, n_explain=3, n_test=2, windows=100)
        s.default = ("ok", "Fires on commas.")
        run_explain_features(model, run, opts, progress=False, backend=be)
        assert "<<" in s.requests[0]["body"]["messages"][1]["content"]   # activating tokens highlighted
        s.default = ("lp", "Yes", {"Yes": -0.1, "No": -2.5})
        res = run_score_features(model, run, FeatureScoreOptions(sae="L1", backend="openai", scorers=["detection"]),
                                 progress=False, backend=be)
        assert res["probabilities"] == "logprobs"
        out = read_json(run / "explain/features/L1/scores_openai_by_openai.json")
        p = out["features"][0]["detection"]["probs"][0]
        import math
        assert p == pytest.approx(math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.5)), abs=1e-4)
        json.dumps(out)
    finally:
        s.close()
