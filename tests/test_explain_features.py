"""Feature explanation and scoring end to end on a tiny model: SAE → dashboards → contexts → explanations
→ detection/fuzzing scores with the shuffled baseline; an endpoint judge through a real local server."""

import json

import pytest

from headscope.errors import HeadscopeError
from headscope.explain.features import (FeatureExplainOptions, FeatureScoreOptions, run_explain_features,
                                        run_feature_contexts, run_score_features)
from headscope.explain.results import FeatureExplainResult, FeatureScoresResult
from headscope.runs import RunDir, read_json
from headscope.sae.dashboards import run_dashboards
from headscope.sae.options import DashboardOptions, TrainOptions
from headscope.sae.train import run_train
from headscope.testing.tiny import tiny_model

from sae_helpers import small_corpus


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feat")
    model = tiny_model("gpt2")
    run = RunDir(tmp / "run", model.identity())
    run_train(model, run, TrainOptions(layer=1, corpus=small_corpus(tmp), n_tokens=8192, batch_size=256,
                                       buffer_tokens=2048, expansion=2, architecture="topk", k=4, seq_len=64),
              progress=False)
    run_dashboards(model, run, DashboardOptions(name="L1", n_tokens=1024, batch_size=4), page_size=16, progress=False)
    return model, run


def test_contexts_are_what_they_claim(sae_run):
    model, run = sae_run
    opts = FeatureExplainOptions(sae="L1", features=6, n_explain=4, n_test=5, windows=200)
    ctx = run_feature_contexts(model, run, opts, progress=False)
    assert ctx["sae"] == "L1" and len(ctx["features"]) + ctx["skipped"] == 6 and len(ctx["features"]) >= 3
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
    assert isinstance(res, FeatureExplainResult)
    n = res.features
    assert 4 <= n <= 8                                  # features with nothing in explain or test documents skipped
    ex = read_json(run / "explain/features/L1/explanations_statistical.json")
    assert all(e["explanation"].startswith("Fires on the tokens") for e in ex["features"].values())
    s = run_score_features(model, run, FeatureScoreOptions(sae="L1"), progress=False)
    assert isinstance(s, FeatureScoresResult) and s.probabilities == "rule"
    out = read_json(run / "explain/features/L1/scores_statistical_by_statistical.json")
    assert len(out["features"]) == n
    for kind in ("detection", "fuzzing"):
        summ = out["summary"][kind]
        assert summ["units"] + summ["skipped"] == n
        assert summ["difference_clustered"]["documents"] >= 2
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
        opts = FeatureExplainOptions(sae="L1", backend="openai", features=6, n_explain=3, n_test=2, windows=100)
        s.default = ("ok", "Fires on commas.")
        run_explain_features(model, run, opts, progress=False, backend=be)
        assert "<<" in s.requests[0]["body"]["messages"][1]["content"]   # activating tokens highlighted
        s.default = ("lp", "Yes", {"Yes": -0.1, "No": -2.5})
        res = run_score_features(model, run, FeatureScoreOptions(sae="L1", backend="openai", scorers=["detection"]),
                                 progress=False, backend=be)
        assert res.probabilities == "logprobs" and res.fuzzing is None
        out = read_json(run / "explain/features/L1/scores_openai_by_openai.json")
        p = out["features"][0]["detection"]["probs"][0]
        import math
        assert p == pytest.approx(math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.5)), abs=1e-4)
        json.dumps(out)
    finally:
        s.close()


def test_test_contexts_share_no_document_or_token_with_shown_ones(sae_run):
    """Leak-free: every scored context lies in documents the explainer never saw a context from; the
    recorded spans are the contexts' real tokens (checked against the corpus stream, documents recounted
    from its EOS tokens); matched negatives come from a positive's document and never fire."""
    import numpy as np
    from headscope.data import TokenCorpus
    from headscope.sampling import Windows
    model, run = sae_run
    opts = FeatureExplainOptions(sae="L1", features=8, n_explain=4, n_test=5, windows=300)
    ctx = run_feature_contexts(model, run, opts, progress=False)
    cfg = read_json(run / "sae/L1/train.json")["config"]
    corpus = TokenCorpus(model, cfg["corpus"], seq_len=cfg["seq_len"], progress=False)
    stream = np.asarray(corpus._stream("heldout"))
    eos_before = np.concatenate([[0], np.cumsum(stream == corpus.eos)])

    def doc(o):                       # documents finished before offset o (the EOS belongs to its document)
        return int(eos_before[o])

    def check_span(x, span):
        a, b = span
        toks = model.token_str(stream[a:b + 1].tolist())
        assert x["tokens"][-len(toks):] == toks          # the span holds the context's body tokens
        return {doc(o) for o in range(a, b + 1)}
    assert ctx["documents"]["test"] > 0 and ctx["documents"]["explain"] > 0
    index = read_json(run / "sae/L1/dashboards/index.json")     # the dashboards' sample, over documents
    plan = Windows(corpus, "heldout", seed=0)
    assert index["n_sequences"] == 1024 // 64 and index["n_documents"] == plan.n_documents(16) >= 2
    assert read_json(run / "sae/L1/train.json")["n_documents"] >= 2
    n_items = n_matched = 0
    for f, c in ctx["features"].items():
        shown = c["explain"]["active"] + c["explain"]["random"]
        assert len(shown) == len(c["shown_spans"])
        shown_docs = set().union(*(check_span(x, sp) for x, sp in zip(shown, c["shown_spans"])))
        shown_offsets = set().union(*(set(range(a, b + 1)) for a, b in c["shown_spans"]))
        pos_docs = set()
        for kind in ("detection", "fuzzing"):
            for (x, t), m in zip(c[kind], c[f"{kind}_meta"]):
                docs = check_span(x, m["span"])
                assert not docs & shown_docs                       # no shared document …
                assert not set(range(m["span"][0], m["span"][1] + 1)) & shown_offsets   # … so no shared token
                assert m["doc"] in docs
                n_items += 1
                if kind == "detection" and t:
                    pos_docs |= docs
        for (x, t), m in zip(c["detection"], c["detection_meta"]):
            if m["kind"] == "matched":
                n_matched += 1
                assert not t and max(x["acts"]) <= 0 and m["doc"] in pos_docs
    assert n_items > 0 and n_matched > 0


def test_clustered_difference_widens_with_shared_documents():
    """Units whose items share documents get a wider document-clustered CI than the same units treated as
    independent (each its own cluster); the point estimate is the plain mean difference of balanced accuracy."""
    import numpy as np
    from headscope.explain.scorers import clustered_difference, said_yes
    from headscope.explain.scoring import balanced_accuracy
    rng = np.random.default_rng(0)
    real, shuf, truth, docs = [], [], [], []
    for u in range(20):
        t = [True] * 6 + [False] * 6
        d = [u % 4] * 12                                        # each unit's items from one of 4 documents
        eff = [0.95, 0.5, 0.5, 0.5][d[0]]                      # only document 0 is explained well
        real.append([float(rng.random() < (eff if x else 1 - eff)) for x in t])
        shuf.append([float(rng.random() < 0.5) for _ in t])
        truth.append(t)
        docs.append(d)
    out = clustered_difference(real, shuf, truth, docs, seed=0)
    want = np.mean([balanced_accuracy(said_yes(r), t) - balanced_accuracy(said_yes(s), t)
                    for r, s, t in zip(real, shuf, truth)])
    assert out["mean"] == pytest.approx(want) and out["documents"] == 4
    indep = clustered_difference(real, shuf, truth, [[u] * 12 for u in range(20)], seed=0)   # units independent
    assert out["ci"][1] - out["ci"][0] > 1.3 * (indep["ci"][1] - indep["ci"][0])
    assert out["ci"][0] < 0 < indep["ci"][0]             # "significant" only when the sharing is ignored
